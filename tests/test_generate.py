"""PixelDiT text-to-image (issue 14): tiny random PixelDiT + tiny Gemma, through the graph, the CLI and the job."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.graph import StageGraph
from pipeline.runtime import ModelOptions
from pipeline.stages import UpscaleOptions

from conftest import ROOT, make_tiny_gemma, make_tiny_t2i


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    d = tmp_path_factory.mktemp("t2i")
    gemma = make_tiny_gemma(d / "gemma")
    return {"preset": str(make_tiny_t2i(d)), "gemma": str(gemma), "dir": d}


def _run(t2i, rows, gen=None, upscale=None, **model):
    opts = ModelOptions(t2i["preset"], text_encoder=t2i["gemma"], **model)
    g = StageGraph(opts, UpscaleOptions(format="png"), "generate", gen=gen or {}, upscale=upscale)
    return list(g.run_local(rows))


def _px(row) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["output"])).convert("RGB"))


def test_generate_sizes_seeds_cfg_and_batching(t2i):
    """One call: the preset's size by default, a row's own size, the same seed the same image (alone or batched),
    another seed another image, CFG on vs off different images, and a bad row failed on its own."""
    rows = _run(t2i, [
        {"key": "a", "prompt": "a cat sleeping", "seed": 1},
        {"key": "b", "prompt": "a cat sleeping", "seed": 1},
        {"key": "c", "prompt": "a cat sleeping", "seed": 2},
        {"key": "d", "prompt": "a dog in the city", "seed": 1, "gen": {"size": (48, 32)}},
        {"key": "e", "prompt": "   ", "seed": 1},
        {"key": "f", "prompt": "a cat", "seed": 1, "gen": {"size": (40, 32)}},
    ])  # fmt: skip
    st = {r["key"]: r for r in rows}
    assert [st[k]["status"] for k in "abcdef"] == ["ok", "ok", "ok", "ok", "failed", "failed"]
    assert "empty prompt" in st["e"]["error"] and "multiples of the patch size 16" in st["f"]["error"]
    assert _px(st["a"]).shape == (32, 48, 3) and _px(st["d"]).shape == (48, 32, 3)
    assert np.array_equal(_px(st["a"]), _px(st["b"])) and not np.array_equal(_px(st["a"]), _px(st["c"]))
    (alone,) = _run(t2i, [{"key": "a", "prompt": "a cat sleeping", "seed": 1}])
    assert np.array_equal(_px(alone), _px(st["a"]))  # batching never changes an image
    (no_cfg,) = _run(t2i, [{"key": "a", "prompt": "a cat sleeping", "seed": 1}], gen={"cfg_scale": 1.0})
    assert not np.array_equal(_px(no_cfg), _px(st["a"]))
    assert _px(st["a"]).std() > 1  # not a flat image


def test_generate_then_upscale_with_pid(t2i):
    """--upscale: the generated image goes through the PiD preset's encode and diffuse stages: 4x its size, and the
    same as upscaling the saved PNG with that preset."""
    (gen,) = _run(t2i, [{"key": "a", "prompt": "a cat", "seed": 3}])
    (up,) = _run(t2i, [{"key": "a", "prompt": "a cat", "seed": 3}], upscale=ModelOptions("small"))
    assert up["status"] == "ok", up.get("error")
    assert _px(up).shape == (128, 192, 3)
    (ref,) = StageGraph(ModelOptions("small"), UpscaleOptions(format="png", seed=3)).run_local(
        [{"key": "x.png", "bytes": gen["output"]}]
    )
    assert np.array_equal(_px(up), _px(ref))


def _cli(*args, check_rc=0):
    out = subprocess.run([sys.executable, "-m", "pidray.cli", *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)  # fmt: skip
    assert out.returncode == check_rc, out.stderr
    assert "Traceback" not in out.stderr
    return out


def test_cli_one_prompt_and_a_prompt_file_job(t2i, tmp_path):
    """`pidray generate PROMPT OUT` writes OUT (never over an existing file); `--prompts FILE DST` is a bulk job:
    every line an image named after it, bad lines failed in the manifest with their line number, the job goes on;
    --resume skips what is done."""
    from jobs.manifest import read_manifest
    from pipeline.storage import Location

    common = ["-m", t2i["preset"], "--text-encoder", t2i["gemma"], "--no-progress"]
    out = tmp_path / "cat.png"
    r = _cli("generate", "a cat sleeping", str(out), *common, "--seed", "4")
    assert Image.open(out).size == (48, 32) and "wrote" in r.stdout
    r = _cli("generate", "a cat sleeping", str(out), *common, check_rc=2)
    assert "never overwrites" in r.stderr
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join([
        json.dumps({"prompt": "a cat sleeping", "seed": 4}),
        json.dumps({"prompt": "a red dog", "size": "32x48", "name": "dog"}),
        "not json",
        json.dumps({"prompt": ""}),
        json.dumps({"prompt": "a cat", "size": "33x48"}),
        json.dumps({"prompt": "a cat", "colour": "red"}),
        json.dumps({"prompt": "busy city street", "steps": 2, "cfg_scale": 1.0}),
    ]))  # fmt: skip
    dst = tmp_path / "dst"
    r = _cli("generate", "--prompts", str(prompts), str(dst), *common, "--local", check_rc=3)
    rows = {x["key"].rsplit(":", 1)[1]: x for x in read_manifest(Location(str(dst)))}
    assert {k: v["status"] for k, v in rows.items()} == {"1": "ok", "2": "ok", "3": "failed", "4": "failed",
                                                        "5": "failed", "6": "failed", "7": "ok"}  # fmt: skip
    assert "not JSON" in rows["3"]["error"] and "no prompt" in rows["4"]["error"]
    assert "multiples of the patch size" in rows["5"]["error"] and "unknown field" in rows["6"]["error"]
    files = sorted(p.name for p in dst.glob("*.png"))
    assert files == ["000001-a-cat-sleeping.png", "000007-busy-city-street.png", "dog.png"]
    assert Image.open(dst / "dog.png").size == (32, 48)
    # the job's image of line 1 (seed 4) is the single-prompt image with seed 4
    assert np.array_equal(np.asarray(Image.open(dst / "000001-a-cat-sleeping.png")), np.asarray(Image.open(out)))
    r = _cli("generate", "--prompts", str(prompts), str(dst), *common, "--local", "--resume", check_rc=3)
    assert "3 skipped" in r.stdout
