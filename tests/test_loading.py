"""Checkpoint loading: released .pth layout (weights_only), our safetensors, convert, and refusals."""

import collections
import pickle
import subprocess
import sys

import pytest
import torch

from pipeline.model.loading import (
    CheckpointError,
    load_checkpoint,
    read_state_dict,
    save_safetensors,
    to_official,
)

from conftest import random_net, tiny_config


def _official_pth(net, path, dtype=torch.bfloat16, extra=None):
    """Write a checkpoint the way the released model_ema_bf16.pth files are laid out: `net.` + official keys."""
    sd = collections.OrderedDict(("net." + to_official(k), v.to(dtype)) for k, v in net.state_dict().items())
    sd.update(extra or {})
    torch.save(sd, path)


def _run(net, cfg):
    torch.manual_seed(1)
    f = cfg.latent_factor
    x, lat = torch.randn(1, 3, 32, 32), torch.randn(1, cfg.lq_latent_channels, 32 // f, 32 // f)
    y = torch.randn(1, cfg.txt_max_length, cfg.txt_embed_dim)
    return net(x, torch.tensor([600.0]), y, net.encode_lq((32, 32), latent=lat), torch.tensor([0.2]))


def test_official_pth_loads_and_skips_training_copies(tmp_path):
    cfg = tiny_config()
    net = random_net(cfg)
    path = tmp_path / "model_ema_bf16.pth"
    _official_pth(net, path, extra={"net_ema.foo": torch.zeros(1), "fake_score.bar": torch.zeros(1)})
    loaded = load_checkpoint(cfg, path)
    ref = random_net(cfg)
    ref.load_state_dict({k: v.bfloat16().float() for k, v in net.state_dict().items()})
    assert torch.allclose(_run(loaded, cfg), _run(ref, cfg), atol=1e-5, rtol=0)


def test_convert_pth_to_safetensors_round_trip(tmp_path):
    cfg = tiny_config(pit_lq_inject=True, lq_aux_rgb_head=True, lq_gate_type="sigma_aware_per_token")
    net = random_net(cfg)
    src, dst = tmp_path / "model_ema_bf16.pth", tmp_path / "model.safetensors"
    _official_pth(net, src, dtype=torch.float32)
    from pipeline.model.loading import convert

    n = convert(src, dst, cfg)
    assert n == len(net.state_dict())
    tensors, meta = read_state_dict(dst)
    assert "config" in meta and all(k.startswith("net.") for k in tensors)
    assert "net.lq_proj.lq_aux_rgb_head.3.weight" in tensors  # training-only keys survive and load
    # same weights; a different memory alignment may change fp32 rounding (~1e-7)
    assert torch.allclose(_run(load_checkpoint(cfg, dst), cfg), _run(net, cfg), atol=1e-5, rtol=0)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(path, "wb") as f:
        pickle.dump({"net.x": Exploit()}, f)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_state_dict(path)
    assert not marker.exists()


def test_nan_checkpoint_is_refused(tmp_path):
    cfg = tiny_config()
    net = random_net(cfg)
    with torch.no_grad():
        net.final_layer.linear.weight[0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_safetensors(net, path, cfg)
    with pytest.raises(CheckpointError, match="final_layer.linear.weight contains NaN"):
        load_checkpoint(cfg, path)


def test_wrong_preset_for_checkpoint_names_the_keys(tmp_path):
    net = random_net(tiny_config())
    path = tmp_path / "m.safetensors"
    save_safetensors(net, path, tiny_config())
    with pytest.raises(CheckpointError, match="missing .*pit_head"):
        load_checkpoint(tiny_config(pit_lq_inject=True), path)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_checkpoint(tiny_config(lq_latent_channels=8), path)


def test_corrupt_or_missing_files(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_state_dict(bad)
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")


def test_cli_convert_reports_errors_without_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pidray.cli", "convert", str(tmp_path / "nope.pth"), str(tmp_path / "o.safetensors"),
         "--preset", "flux-2k"], capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2 and "checkpoint not found" in out.stderr and "Traceback" not in out.stderr
