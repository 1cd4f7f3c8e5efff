"""Checkpoint I/O: official `model_ema_bf16.pth` files and our safetensors, mapped onto our module names.

Loading never executes pickled code: `.pth` files go through `torch.load(weights_only=True)`.
Keys are mapped by `KEY_RULES` (official -> ours); the load is strict, so a missing or unexpected
key is an error that names the keys, and non-finite weights are refused.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.model.config import PidConfig
from pipeline.model.network import PidNet

# Official key pattern -> our key. Our AdaLN modulators are plain Linears, not Sequential(Linear).
KEY_RULES = [
    (re.compile(r"^(patch_blocks\.\d+)\.adaLN_modulation_img\.0\."), r"\1.mod_img."),
    (re.compile(r"^(patch_blocks\.\d+)\.adaLN_modulation_txt\.0\."), r"\1.mod_txt."),
    (re.compile(r"^(pixel_blocks\.\d+)\.adaLN_modulation\.0\."), r"\1.mod."),
]
_REVERSE_RULES = [
    (re.compile(r"^(patch_blocks\.\d+)\.mod_img\."), r"\1.adaLN_modulation_img.0."),
    (re.compile(r"^(patch_blocks\.\d+)\.mod_txt\."), r"\1.adaLN_modulation_txt.0."),
    (re.compile(r"^(pixel_blocks\.\d+)\.mod\."), r"\1.adaLN_modulation.0."),
]
# Prefixes of released training checkpoints that inference never uses, with the reason.
SKIPPED_PREFIXES = {
    "net_ema.": "second EMA copy of the network",
    "fake_score.": "distillation critic",
    "discriminator.": "GAN discriminator",
}


def to_ours(key: str) -> str:
    for pat, rep in KEY_RULES:
        key = pat.sub(rep, key)
    return key


def to_official(key: str) -> str:
    for pat, rep in _REVERSE_RULES:
        key = pat.sub(rep, key)
    return key


class CheckpointError(ValueError):
    pass


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors (and safetensors metadata) from a .safetensors or weights-only .pth file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: it is not a plain tensor checkpoint that loads with weights_only=True "
            f"(it may need arbitrary code execution, which pidray never allows). Detail: {first}"
        ) from e
    for wrapper in ("model", "state_dict"):  # some tools nest the state dict one level down
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj, {}


def network_tensors(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Select the `net.` tensors (or an unprefixed state dict), mapped to our key names."""
    has_prefix = any(k.startswith("net.") for k in raw)
    out = {}
    for k, v in raw.items():
        if any(k.startswith(p) for p in SKIPPED_PREFIXES):
            continue
        if has_prefix:
            if not k.startswith("net."):
                continue  # inputs/expected tensors of a fixture, or other models
            k = k[len("net.") :]
        out[to_ours(k)] = v
    return out


def load_network(
    cfg: PidConfig,
    tensors: dict[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    ops=None,
) -> PidNet:
    """Build on the meta device and assign the checkpoint's tensors (strict, finite, shape-checked)."""
    if ops is None:
        from pipeline.kernels import get_ops

        ops = get_ops(device=device)
    with torch.device("meta"):
        net = PidNet(cfg, ops=ops)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            "checkpoint does not match the preset's network: "
            f"{len(missing)} missing (first: {[to_official(k) for k in missing[:5]]}), "
            f"{len(unexpected)} unexpected (first: {[to_official(k) for k in unexpected[:5]]})"
        )
    bad_shape = [
        (k, tuple(tensors[k].shape), tuple(v.shape)) for k, v in expected.items() if tensors[k].shape != v.shape
    ]
    if bad_shape:
        k, got, want = bad_shape[0]
        raise CheckpointError(f"{len(bad_shape)} tensors have the wrong shape, e.g. {to_official(k)}: {got} != {want}")
    state = {}
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"checkpoint tensor {to_official(k)} contains NaN or Inf")
        state[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval().requires_grad_(False)


def file_metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's metadata, without reading its tensors."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def file_config(path: str | Path) -> PidConfig | None:
    """The config a pidray-written safetensors file carries in its metadata (None when it has none)."""
    meta = file_metadata(path)
    if meta.get("format") != "pidray-1" or "config" not in meta:
        return None
    try:
        return PidConfig.from_dict(json.loads(meta["config"]))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its config metadata is invalid: {e}") from None


def load_checkpoint(cfg: PidConfig, path: str | Path, **kw) -> PidNet:
    raw, _ = read_state_dict(path)
    return load_network(cfg, network_tensors(raw), **kw)


def save_safetensors(net_or_tensors, path: str | Path, cfg: PidConfig, extra: dict | None = None) -> None:
    """Write our safetensors: official key names with the `net.` prefix, config JSON in the metadata."""
    tensors = net_or_tensors.state_dict() if isinstance(net_or_tensors, torch.nn.Module) else net_or_tensors
    out = {"net." + to_official(k): v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"config": json.dumps(cfg.to_dict()), "format": "pidray-1"}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    save_file(out, str(tmp), metadata=meta)
    tmp.replace(path)  # readers never see a half-written file


def convert(src: str | Path, dst: str | Path, cfg: PidConfig, dtype: torch.dtype | None = None) -> int:
    """Official .pth -> our safetensors, validated by a strict load on the meta-free path. Returns tensor count."""
    raw, _ = read_state_dict(src)
    tensors = network_tensors(raw)
    net = load_network(cfg, tensors, dtype=dtype or next(iter(tensors.values())).dtype)
    save_safetensors(net, dst, cfg, extra={"source": Path(src).name})
    return len(tensors)
