"""Datasets in, datasets out: WebDataset tar shards (`webdataset`) and Parquet tables (`parquet`) read as streams of
samples, and written back in input order, whole and atomically, with the image of each sample replaced. No Ray here:
the readers and writers are plain Python, run wherever a driver puts them.
"""

from pipeline.datasets.common import Limits, Sample
from pipeline.datasets.parquet import TableReader, TableWriter, check_same_schema, output_table
from pipeline.datasets.webdataset import ShardReader, ShardWriter, output_members

__all__ = ["Limits", "Sample", "ShardReader", "ShardWriter", "TableReader", "TableWriter", "check_same_schema",
           "output_members", "output_table"]  # fmt: skip
