"""Parity with the official network: every golden fixture in shared/golden, through the real loading path."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from pipeline.golden import TOLERANCE, verify
from pipeline.model.loading import read_state_dict


def _fixtures(golden_dir):
    return sorted(golden_dir.glob("*.safetensors"))


def test_every_fixture_matches(golden_dir):
    checked = 0
    for path in _fixtures(golden_dir):
        rep = verify(path)
        print("\n".join(rep.lines()))
        assert rep.ok, rep.lines()
        assert all(c.error <= c.tolerance for c in rep.checks)
        assert all("tolerance" in line for line in rep.lines()[1:])  # the bound used is printed
        checked += 1
    assert checked >= 4


def test_pid_fixture_checks_forward_and_seeded_sample(golden_dir):
    rep = verify(golden_dir / "pid_v1_flux.safetensors")
    names = [c.name for c in rep.checks]
    assert names == ["expected.forward", "expected.sample_seed42"]
    assert rep.ok


def test_t2i_fixture_forward_and_dpm_solver_sample_match(golden_dir):
    rep = verify(golden_dir / "pixeldit_t2i_tiny.safetensors")
    assert [c.name for c in rep.checks] == ["expected.forward", "expected.sample"]
    assert rep.ok, rep.lines()


def test_unsupported_t2i_sampler_settings_are_reported_not_passed(golden_dir, tmp_path):
    tensors, meta = read_state_dict(golden_dir / "pixeldit_t2i_tiny.safetensors")
    sampler = json.loads(meta["sampler"])
    sampler["skip_type"] = "logSNR"
    path = tmp_path / "odd_sampler.safetensors"
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={**meta, "sampler": json.dumps(sampler)}
    )
    rep = verify(path)
    sample = [c for c in rep.checks if c.name == "expected.sample"][0]
    assert sample.error is None and "not supported" in sample.note and not rep.ok


def test_flow_timesteps_land_on_zero():
    from pipeline.model.t2i_sampler import flow_timesteps

    ts = flow_timesteps(6, shift=4.0)
    assert ts.shape == (7,) and ts[-1] == 0 and 0.999 < ts[0] < 1 and bool((ts[:-1] > ts[1:]).all())


def test_tampered_fixture_fails_and_cli_exits_nonzero(golden_dir, tmp_path):
    tensors, meta = read_state_dict(golden_dir / "pid_v1_flux.safetensors")
    tensors["expected.forward"] = tensors["expected.forward"] + 1e-3
    bad = tmp_path / "tampered.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(bad), metadata=meta)
    rep = verify(bad)
    assert not rep.ok and rep.checks[0].error > TOLERANCE
    out = subprocess.run([sys.executable, "-m", "pidray.cli", "golden", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1 and "FAIL" in out.stdout


def test_other_seed_and_batch_fixture_of_the_same_format(golden_dir, tmp_path):
    """The verifier takes seed, batch and shape from the file: re-derive a fixture with seed 7, batch 1."""
    from pipeline.model.config import PidConfig
    from pipeline.model.loading import load_network, network_tensors
    from pipeline.model.sampler import GeneratorNoise, sample

    tensors, meta = read_state_dict(golden_dir / "pid_v1_flux.safetensors")
    net = load_network(PidConfig.from_official(json.loads(meta["config"])), network_tensors(tensors))
    one = {k: (v[:1] if k.startswith(("input.", "expected.")) and v.ndim else v) for k, v in tensors.items()}
    x, y, lat, sig = one["input.x"], one["input.y"], one["input.lq_latent"], one["input.degrade_sigma"]
    lq = net.encode_lq(tuple(x.shape[-2:]), latent=lat)
    with torch.inference_mode():
        ref = sample(lambda a, b: net(a, b, y, lq, sig), GeneratorNoise(x.shape, torch.Generator().manual_seed(7)))
    one.pop("expected.sample_seed42")
    one["expected.sample_seed7"] = ref
    meta = dict(meta, sampler_seed="7")
    path = tmp_path / "seed7.safetensors"
    save_file({k: v.contiguous() for k, v in one.items()}, str(path), metadata=meta)
    rep = verify(path)
    assert rep.ok and [c.name for c in rep.checks] == ["expected.forward", "expected.sample_seed7"]


def test_unknown_fixture_kind_is_reported(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"something.else": torch.zeros(2)}, str(path), metadata={"config": "{}"})
    rep = verify(path)
    assert rep.kind == "unknown" and not rep.ok and "unknown fixture kind" in rep.problem


@pytest.mark.parametrize("name", ["flux_vae_tiny.safetensors"])
def test_vae_encoder_rejects_bad_sizes(golden_dir, name):
    from pipeline.encoders.flux_vae import FluxEncoderParams, load_flux_encoder

    tensors, meta = read_state_dict(golden_dir / name)
    enc = load_flux_encoder(FluxEncoderParams.from_dict(json.loads(meta["config"])), tensors)
    with pytest.raises(ValueError, match="multiples of the VAE factor 8"):
        enc.encode(torch.zeros(1, 3, 60, 48))


def test_vae_encoder_loads_the_diffusers_layout_sd3_ships(golden_dir):
    """SD3's VAE file uses diffusers key names; the same weights renamed that way give the same latent."""
    import re

    from pipeline.encoders.flux_vae import FluxEncoderParams, load_flux_encoder

    tensors, meta = read_state_dict(golden_dir / "flux_vae_tiny.safetensors")
    to_diffusers = [  # the inverse naming, written independently of the loader's rules
        (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^encoder\.mid\.block_(\d)\.", lambda m: f"encoder.mid_block.resnets.{int(m.group(1)) - 1}."),
        (r"^encoder\.mid\.attn_1\.norm\.", "encoder.mid_block.attentions.0.group_norm."),
        (r"^encoder\.mid\.attn_1\.([qkv])\.", r"encoder.mid_block.attentions.0.to_\1."),
        (r"^encoder\.mid\.attn_1\.proj_out\.", "encoder.mid_block.attentions.0.to_out.0."),
        (r"^encoder\.norm_out\.", "encoder.conv_norm_out."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
    ]
    diff = {}
    for k, v in tensors.items():
        if not k.startswith("encoder."):
            continue
        if ".attn_1." in k and k.endswith(".weight") and v.ndim == 4:
            v = v[:, :, 0, 0]
        for pat, rep in to_diffusers:
            k = re.sub(pat, rep, k)
        diff[k] = v
    assert "encoder.mid_block.attentions.0.to_q.weight" in diff
    params = FluxEncoderParams.from_dict(json.loads(meta["config"]))
    enc = load_flux_encoder(params, diff)
    with torch.inference_mode():
        err = (enc.encode(tensors["input.image"]) - tensors["expected.latent"]).abs().max().item()
    assert err <= TOLERANCE


def _floor_nearest_preimage(lat: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], gen) -> torch.Tensor:
    """A latent of `size` (each side >= the grid's) that the official rule — PyTorch's floor-index `nearest` to the
    patch grid — maps to what `lat` maps to; positions the rule never reads get random values, so any other rule
    (nearest-exact, bilinear, a crop) reads them and fails."""
    out = torch.randn(*lat.shape[:2], *size, generator=gen)
    for i in range(grid[0]):
        for j in range(grid[1]):
            src = (i * lat.shape[2] // grid[0], j * lat.shape[3] // grid[1])
            dst = (i * size[0] // grid[0], j * size[1] // grid[1])
            out[:, :, dst[0], dst[1]] = lat[:, :, src[0], src[1]]
    return out


def test_a_misaligned_latent_fixture_passes_by_the_official_rule(golden_dir, tmp_path):
    """Issue 13 (2): a fixture whose latent is off the output grid (here 11×7 for a 4×3 grid latent of a 128×96
    output: 8×6 patches) gives the official outputs, because the official network resizes it to the patch grid with
    floor-index nearest. Built from the official fixture by that rule, so its expected tensors are the official ones."""
    tensors, meta = read_state_dict(golden_dir / "pid_v1_flux.safetensors")
    lat = tensors["input.lq_latent"]
    assert tuple(lat.shape[2:]) == (4, 3)  # aligned: × 32 = 128 × 96
    tensors["input.lq_latent"] = _floor_nearest_preimage(lat, (8, 6), (11, 7), torch.Generator().manual_seed(3))
    path = tmp_path / "pid_v1_flux_misaligned.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    rep = verify(path)
    assert rep.ok, rep.lines()
    assert [c.name for c in rep.checks] == ["expected.forward", "expected.sample_seed42"]
    out = subprocess.run([sys.executable, "-m", "pidray.cli", "golden", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_an_expected_tensor_nobody_checks_fails_the_file(golden_dir, tmp_path):
    """Issue 13 (3): an `expected.*` tensor the verifier cannot recompute is not silently skipped."""
    tensors, meta = read_state_dict(golden_dir / "pid_v1_flux.safetensors")
    tensors["expected.lq_tokens"] = torch.zeros(2, 3)
    path = tmp_path / "extra_expected.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    rep = verify(path)
    assert not rep.ok
    assert any(c.name == "expected.lq_tokens" and "not checked: expected.lq_tokens" in c.note for c in rep.checks)
    out = subprocess.run([sys.executable, "-m", "pidray.cli", "golden", str(path)], capture_output=True, text=True)
    assert out.returncode == 1 and "not checked: expected.lq_tokens" in out.stdout


def test_num_steps_metadata_is_honoured(golden_dir, tmp_path):
    """Issue 13 (3): `num_steps` shortens the full t_list (official index rule); the 4-step fixture passes with
    num_steps=4 and fails when it claims 2 steps."""
    tensors, meta = read_state_dict(golden_dir / "pid_v1_flux.safetensors")
    reps = {}
    for n in (4, 2):
        path = tmp_path / f"steps{n}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={**meta, "num_steps": str(n)})
        reps[n] = verify(path)
    assert reps[4].ok
    sample = [c for c in reps[2].checks if c.name == "expected.sample_seed42"][0]
    assert sample.error is not None and sample.error > TOLERANCE and not reps[2].ok


def test_official_configs_with_encoder_decoder_keys_load():
    """Issue 13 (3): the official resolved kwargs carry inert `ed_*` keys; they are accepted, unknown ones are not."""
    from pipeline.model.config import PidConfig

    base = {"hidden_size": 64, "num_groups": 4, "patch_depth": 1, "pixel_depth": 1, "lq_latent_channels": 16,
            "lq_in_channels": 0}  # fmt: skip
    cfg = PidConfig.from_official({**base, "ed_num_layers": 2, "ed_hidden_size": 128})
    assert cfg == PidConfig.from_official(base)
    with pytest.raises(ValueError, match="unknown PiD config keys"):
        PidConfig.from_official({**base, "edge_mode": 1})


def _rewrite(golden_dir, tmp_path, name, out, edit_meta=None, edit_tensors=None):
    tensors, meta = read_state_dict(golden_dir / name)
    if edit_tensors:
        edit_tensors(tensors)
    meta = edit_meta(dict(meta)) if edit_meta else meta
    path = tmp_path / out
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def test_fixture_tolerance_metadata_is_read_printed_and_still_fails_above_it(golden_dir, tmp_path):
    """The t2i fixture states 1e-3 on its sample: that bound is used and printed; the same file claiming 1e-9 fails
    (the verifier never loosens a bound on its own); `default` applies to tensors not named."""
    rep = verify(golden_dir / "pixeldit_t2i_tiny.safetensors")
    sample = next(c for c in rep.checks if c.name == "expected.sample")
    forward = next(c for c in rep.checks if c.name == "expected.forward")
    assert sample.tolerance == 1e-3 and forward.tolerance == 1e-4 and rep.ok
    assert any("expected.sample" in line and "tolerance 1e-03" in line for line in rep.lines())
    strict = _rewrite(golden_dir, tmp_path, "pixeldit_t2i_tiny.safetensors", "strict.safetensors",
                      lambda m: {**m, "tolerance": json.dumps({"expected.sample": 1e-9, "default": 0.5})})  # fmt: skip
    rep = verify(strict)
    sample = next(c for c in rep.checks if c.name == "expected.sample")
    assert sample.tolerance == 1e-9 and not sample.ok and not rep.ok
    assert next(c for c in rep.checks if c.name == "expected.forward").tolerance == 0.5
    out = subprocess.run([sys.executable, "-m", "pidray.cli", "golden", str(strict)], capture_output=True, text=True)
    assert out.returncode == 1 and "tolerance 1e-09" in out.stdout and "FAIL" in out.stdout


@pytest.mark.parametrize("bad", ['[0.1]', '{"default": "x"}', '{"expected.sample": 1e400}', '{"default": -1}',
                                 '{"default": NaN}', 'not json', '{"default": true}'])  # fmt: skip
def test_a_malformed_tolerance_fails_the_file(golden_dir, tmp_path, bad):
    path = _rewrite(golden_dir, tmp_path, "pixeldit_t2i_tiny.safetensors", "bad_tol.safetensors",
                    lambda m: {**m, "tolerance": bad})  # fmt: skip
    rep = verify(path)
    assert not rep.ok and "tolerance" in rep.problem


def test_teacher_fixture_checks_forward_and_guided_sample(golden_dir):
    rep = verify(golden_dir / "pid_v1pt5_teacher_flux.safetensors")
    assert rep.kind == "pid_teacher"
    assert [c.name for c in rep.checks] == ["expected.forward", "expected.sample"], rep.lines()
    assert rep.ok, rep.lines()
    sample = rep.checks[1]
    assert sample.tolerance == 3e-3 and "6 steps, cfg 5" in sample.note


def test_teacher_fixture_fails_with_a_wrong_guidance_scale_or_shift(golden_dir, tmp_path):
    """The stated tolerance still catches the settings being off: cfg 5.1 instead of 5, and a given shift of 2."""

    def cfg_off(m):
        s = json.loads(m["sampler"])
        return {**m, "sampler": json.dumps({**s, "cfg_scale": s["cfg_scale"] + 0.1})}

    def shift_given(m):
        s = json.loads(m["sampler"])
        return {**m, "sampler": json.dumps({**s, "shift_rule": "given", "flow_shift": 2.0})}

    for edit in (cfg_off, shift_given):
        rep = verify(_rewrite(golden_dir, tmp_path, "pid_v1pt5_teacher_flux.safetensors", "t.safetensors", edit))
        sample = next(c for c in rep.checks if c.name == "expected.sample")
        assert sample.error is not None and sample.error > sample.tolerance and not rep.ok, rep.lines()


def test_teacher_fixture_whose_recorded_shift_contradicts_its_rule_fails(golden_dir, tmp_path):
    def lie(m):
        s = json.loads(m["sampler"])
        return {**m, "sampler": json.dumps({**s, "flow_shift": 3.0})}

    rep = verify(_rewrite(golden_dir, tmp_path, "pid_v1pt5_teacher_flux.safetensors", "lie.safetensors", lie))
    assert not rep.ok and "disagrees with its dynamic rule" in rep.problem


@pytest.mark.parametrize("steps,cfg,rule", [(3, 2.0, "given"), (1, 5.0, "dynamic"), (4, 1.0, "dynamic")])
def test_other_teacher_fixtures_of_the_same_format(golden_dir, tmp_path, steps, cfg, rule):
    """The verifier takes steps, guidance scale, shift rule, batch and shape from the file: fixtures re-derived
    from the official one at other settings (one step: order 1; guidance 1: no unconditional pass)."""
    from pipeline.model.config import PidConfig
    from pipeline.model.guided import Guidance, dynamic_shift, guided_sample
    from pipeline.model.loading import load_network, network_tensors

    tensors, meta = read_state_dict(golden_dir / "pid_v1pt5_teacher_flux.safetensors")
    net = load_network(PidConfig.from_official(json.loads(meta["config"])), network_tensors(tensors))
    one = {k: (v[:1] if k.startswith(("input.", "expected.")) and k != "input.y_null" else v)
           for k, v in tensors.items()}  # fmt: skip
    noise = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    shift = 2.0 if rule == "given" else dynamic_shift(64, 96)
    y, lat, sig = one["input.y"], one["input.lq_latent"][..., :2, :3], one["input.degrade_sigma"]
    with torch.inference_mode():
        lq = net.encode_lq((64, 96), latent=lat)
        ref = guided_sample(lambda a, b: net(a, b, y, lq, sig), lambda a, b: net(a, b, one["input.y_null"], lq, sig),
                            noise, Guidance(steps, cfg, shift))  # fmt: skip
    one.update({"input.noise": noise, "input.lq_latent": lat, "expected.sample": ref})
    for k in ("input.x", "input.t", "expected.forward"):
        one.pop(k)
    s = json.loads(meta["sampler"])
    s.update(steps=steps, order=min(steps, 2), cfg_scale=cfg, flow_shift=shift,
             shift_rule="given" if rule == "given" else s["shift_rule"])  # fmt: skip
    path = tmp_path / "teacher_other.safetensors"
    save_file({k: v.contiguous() for k, v in one.items()}, str(path), metadata={**meta, "sampler": json.dumps(s)})
    rep = verify(path)
    assert rep.ok and [c.name for c in rep.checks] == ["expected.sample"], rep.lines()
    s["order"] = 2 if steps == 1 else 1  # an order the official rule would not use is not passed
    save_file({k: v.contiguous() for k, v in one.items()}, str(path), metadata={**meta, "sampler": json.dumps(s)})
    rep = verify(path)
    assert not rep.ok and rep.checks[0].error is None and "not supported" in rep.checks[0].note


def test_teacher_fixture_with_an_unknown_expected_tensor_fails(golden_dir, tmp_path):
    path = _rewrite(golden_dir, tmp_path, "pid_v1pt5_teacher_flux.safetensors", "extra.safetensors",
                    edit_tensors=lambda t: t.update({"expected.lq_aux_rgb": torch.zeros(2, 3)}))  # fmt: skip
    rep = verify(path)
    assert not rep.ok and any("not checked: expected.lq_aux_rgb" in c.note for c in rep.checks)
