"""The three model stages (encode → pixel-space diffuse → tile-merge) plus decode, as plain callable classes.

Each takes and returns one row (a dict). A row that failed carries `error` and passes through later
stages untouched, so a bad file is recorded with its reason and never stops a job. No Ray here:
jobs/ and serve/ decide resources and concurrency.
"""

from pipeline.stages.common import UpscaleOptions, failed, is_failed
from pipeline.stages.decode import DecodeStage
from pipeline.stages.diffuse import DiffuseStage
from pipeline.stages.encode import EncodeStage
from pipeline.stages.merge import MergeStage

__all__ = ["UpscaleOptions", "DecodeStage", "EncodeStage", "DiffuseStage", "MergeStage", "failed", "is_failed"]
