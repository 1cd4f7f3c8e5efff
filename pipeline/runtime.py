"""Load a preset into ready-to-run parts: network, LQ encoder, caption encoder. Used by the stages."""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass

import torch

from pipeline.encoders.base import LatentEncoder, RGBEncoder
from pipeline.encoders.text import CaptionEncoder, NullCaptionEncoder
from pipeline.errors import SetupError
from pipeline.memory import default_budget
from pipeline.model.loading import load_checkpoint, read_state_dict
from pipeline.model.network import PidNet
from pipeline.model.presets import PRESETS, Preset
from pipeline.weights import resolve

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


_THREADS = threading.local()  # the torch thread count set on each calling thread


def use_threads(threads: int | None) -> None:
    """torch's intra-op thread count for the calling thread, set once per thread (a set costs ~5 ms on a small
    model). OpenMP keeps the count per thread, and Ray Data and Serve run a stage on a pool thread, not the one that
    built it; `torch.get_num_threads()` on a new thread reports the process's count, not the one its OpenMP team
    uses, so only what was set on this thread is trusted. None or 0: leave it as it is.

    The stage is built on one thread (`use_threads(1)` there): an OpenMP team started by the builder would stay beside
    the pool thread's, and with more OpenMP threads than cores libgomp stops spinning and sleeps between every op.
    Measured on one 256² image, diffuse in the Ray Data actor: 14.5 s with the count set only in the constructor,
    13.3 s set on the pool thread, 11.5 s in the plain loop; an actor-level runtime_env with OMP_NUM_THREADS and
    OMP_WAIT_POLICY=ACTIVE reached 11.2 s but made Ray Data hang with two CPU model actors on two cores (and ACTIVE
    spins idle threads forever), so it is not used; PASSIVE made a plain Ray task 26% slower."""
    if threads and getattr(_THREADS, "threads", None) != threads:
        torch.set_num_threads(threads)
        _THREADS.threads = threads


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise SetupError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None


def check_device(device: str | None) -> torch.device:
    """The device, or a SetupError that says why it cannot be used here (before any model loads)."""
    d = pick_device(device)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
            raise SetupError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, {build}); "
                             "use --device cpu or auto")  # fmt: skip
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise SetupError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif d.type != "cpu":
        raise SetupError(f"--device {device}: only cpu and cuda devices are supported")
    return d


def check_encoder(preset: Preset) -> None:
    if not preset.family.implemented:
        working = ", ".join(n for n, p in PRESETS.items() if p.family.implemented)
        raise SetupError(f"the {preset.vae!r} VAE encoder is not implemented yet (preset {preset.name}); presets "
                         f"that run end to end: {working}")  # fmt: skip


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return DTYPES[dtype]


@dataclass
class ModelOptions:
    """Plain, picklable description of which model to run (reaches Ray actors through constructor kwargs)."""

    preset: str = "small"
    weights: str | None = None  # directory laid out like the hub repo, or a checkpoint file
    text_encoder: str | None = None  # local Gemma-2 folder (released presets)
    allow_download: bool = False
    device: str | None = "auto"
    dtype: str | None = "auto"
    kernels: str | None = None  # "auto" (Triton on CUDA) | "torch" | "triton"; None: $PIDRAY_KERNELS or auto
    precision: str = "auto"  # "auto": the dtype's matmuls; "fp8": e4m3 matmuls (pipeline.kernels.fp8)
    compile: bool | None = None  # torch.compile the network; None: on CUDA only (warmed per tile bucket)


PRECISIONS = ("auto", "fp8")


def compiles(opts: ModelOptions, device: torch.device) -> bool:
    return device.type == "cuda" if opts.compile is None else bool(opts.compile)


def net_path(opts: ModelOptions, preset: Preset) -> str:
    """The network checkpoint: `weights` itself when it names a file, else resolved from the preset."""
    if opts.weights and str(opts.weights).endswith((".safetensors", ".pth")):
        return str(opts.weights)
    return str(resolve(preset, opts.weights, allow_download=opts.allow_download, only=("net",))["net"])


def load_net(opts: ModelOptions, preset: Preset) -> tuple[Preset, PidNet]:
    """The preset's network on the options' device and dtype (the preset resolved where the job/request entered)."""
    device = pick_device(opts.device)
    dtype = pick_dtype(opts.dtype, device)
    path = net_path(opts, preset)
    from pipeline.kernels import get_ops

    if opts.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {opts.precision!r}")
    compiled = compiles(opts, device)
    # compiled: the torch reference ops unless a backend is forced (inductor fuses those chains itself)
    forced = opts.kernels or os.environ.get("PIDRAY_KERNELS")
    ops = get_ops(forced or ("torch" if compiled else None), device)
    cfg = preset.config
    if preset.bundled and path.endswith(".safetensors"):
        # Our own small models describe themselves: an earlier version (e.g. `pidray eval-small --compare`) may have
        # another head than the preset's current file. Released presets keep their fixed configuration.
        from pipeline.model.loading import file_config

        cfg = file_config(path) or cfg
    net = load_checkpoint(cfg, path, device=device, dtype=dtype, ops=ops)
    if opts.precision == "fp8":
        from pipeline.kernels.fp8 import quantize_fp8

        quantize_fp8(net)
    if compiled:
        net.compile(dynamic=False)  # one graph per tile shape: DiffuseStage.warmup compiles each bucket
    return preset, net


def vae_dtype(device: torch.device) -> torch.dtype:
    """The VAE encoder's weights: fp32 everywhere. bf16 was measured and rejected: its latent is off by 1.4–1.5% of
    the latent's std on average and up to 20% at single positions (`tests/test_latent_preset.py::
    test_vae_bf16_and_tiles`), while the encode is a small part of an upscale; on a GPU cuDNN runs its convolutions
    in TF32 (10-bit mantissa) by default."""
    return torch.float32


def _vae_module(preset: Preset):
    """The module of the preset's LQ encoder (`PARAMS`, `load`), as its VAE family names it."""
    import importlib

    check_encoder(preset)
    return importlib.import_module(preset.family.encoder_module)


def encoder_params(preset: Preset):
    """The preset's VAE encoder parameters (its family's dataclass, from `preset.encoder`)."""
    return _vae_module(preset).PARAMS.from_dict(preset.encoder)


def encode_bytes(preset: Preset, hw: tuple[int, int], device: torch.device) -> int:
    """Peak bytes of the LQ encode of an hw-pixel (padded) image."""
    if preset.family.pixels:
        return hw[0] * hw[1] * 3 * 4 * 2
    params = encoder_params(preset)
    if hasattr(params, "encode_bytes"):  # a fixed-size encoder
        return params.encode_bytes(hw)
    from pipeline.memory import vae_encode_bytes

    return vae_encode_bytes(hw, vae_dtype(device), params.act_channels)


def load_lq_encoder(opts: ModelOptions, preset: Preset, gpu_share: float = 1.0) -> LatentEncoder:
    if preset.family.pixels:
        return RGBEncoder()
    module = _vae_module(preset)
    paths = resolve(preset, opts.weights, allow_download=opts.allow_download)
    device = pick_device(opts.device)
    if getattr(module, "FILES_LOADER", False):  # representation encoders: a transformers folder (+ statistics)
        enc = module.load(encoder_params(preset), paths, device=device, dtype=vae_dtype(device))
    else:  # VAEs: one tensor file; diffusers-layout files are mapped on load
        tensors, _ = read_state_dict(paths["vae"])
        enc = module.load(encoder_params(preset), tensors, device=device, dtype=vae_dtype(device))
    enc.memory_budget = default_budget(device, gpu_share)  # whole images while they fit; tiles beyond
    return enc


@functools.lru_cache(maxsize=4)
def _gemma(path: str, allow_download: bool, device: str, max_length: int = 300):
    return CaptionEncoder.from_pretrained(path, local_only=not allow_download, device=device, max_length=max_length)


def load_caption_encoder(opts: ModelOptions, preset: Preset):
    cfg = preset.config
    if not preset.captioned:
        return NullCaptionEncoder(cfg.txt_max_length, cfg.txt_embed_dim)
    from pipeline.encoders.text import HUB_ID

    return _gemma(opts.text_encoder or HUB_ID, opts.allow_download, str(pick_device(opts.device)), cfg.txt_max_length)
