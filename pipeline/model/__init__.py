"""The PiD network, its presets, checkpoint loading and the distilled sampler."""

from pipeline.model.config import PidConfig
from pipeline.model.network import LQFeatures, PidNet

__all__ = ["PidConfig", "PidNet", "LQFeatures"]
