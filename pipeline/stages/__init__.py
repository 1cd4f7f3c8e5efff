"""The stages: decode → encode → pixel-space diffuse → merge (plus the bulk job's read and write), as plain classes.

Each stage has `process(row) -> row` and, when it gains from batching across images, `process_batch(rows)`; it
raises for a bad input. `run_stage` is the one failure envelope every driver wraps them in: a failed row carries
`error` and its kind and passes through later stages untouched, so a bad file is recorded with its reason and never
stops a job. No Ray here: jobs/ and serve/ decide resources and concurrency from the stage graph.
"""

from pipeline.stages.common import UpscaleOptions, failed, is_failed, run_stage
from pipeline.stages.decode import DecodeStage
from pipeline.stages.diffuse import DiffuseStage
from pipeline.stages.encode import EncodeStage
from pipeline.stages.io import ReadStage, WriteStage
from pipeline.stages.merge import MergeStage

__all__ = ["UpscaleOptions", "DecodeStage", "EncodeStage", "DiffuseStage", "MergeStage", "ReadStage", "WriteStage",
           "failed", "is_failed", "run_stage"]  # fmt: skip
