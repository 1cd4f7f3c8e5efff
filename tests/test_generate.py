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


def _prompt_job(t2i, prompts, dst, **kw):
    from jobs.pipeline import JobConfig, run_job

    model = ModelOptions(t2i["preset"], text_encoder=t2i["gemma"])
    cfg = JobConfig(str(prompts), str(dst), model=model, options=UpscaleOptions(format="png"), local=True,
                    progress=False, workflow="generate", **kw)  # fmt: skip
    return run_job(cfg)


def _manifest(dst) -> dict:
    from jobs.manifest import read_manifest
    from pipeline.storage import Location

    return {int(r["key"].rsplit(":", 1)[1]): r for r in read_manifest(Location(str(dst)))}


def test_prompts_with_one_name_get_one_output_each(t2i, tmp_path):
    """Two lines named `pet`, a `Pet`, and two names that become one file name (`pet/x`, `pet_x`): each line its own
    output, named in line order, and --resume finds every one of them again."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "a red dog", "name": "pet", "seed": 1}, {"prompt": "a cat sleeping", "name": "pet", "seed": 2},
        {"prompt": "a cat", "name": "Pet", "seed": 3}, {"prompt": "a dog", "name": "pet/x", "seed": 4},
        {"prompt": "a dog", "name": "pet_x", "seed": 5},
    ]))  # fmt: skip
    dst = tmp_path / "dst"
    summary = _prompt_job(t2i, prompts, dst)
    assert summary.ok == 5, summary.line()
    rows = _manifest(dst)
    outs = [rows[n]["output_key"] for n in range(1, 6)]
    assert outs == ["pet.png", "pet~2.png", "Pet~3.png", "pet_x.png", "pet_x~2.png"], outs
    assert sorted(p.name for p in dst.glob("*.png")) == sorted(outs)
    pixels = {o: _px({"output": (dst / o).read_bytes()}).tobytes() for o in outs}
    assert len(set(pixels.values())) == 5  # five different images: nothing overwritten
    again = _prompt_job(t2i, prompts, dst, resume=True)
    assert again.skipped == 5 and again.ok == 0
    assert [_manifest(dst)[n]["output_key"] for n in range(1, 6)] == outs


def test_a_bad_prompt_line_fails_alone(t2i, tmp_path):
    """Values of the wrong type, depth or magnitude fail their own line with its number and the reason; the job
    goes on and its manifest is written."""
    lines = [
        json.dumps({"prompt": "a cat", "seed": 5}),  # 1: fine
        '{"prompt": "a cat", "seed": 1e400}',
        '{"prompt": "a cat", "size": [1e400, 16]}',
        '{"prompt": "a cat", "seed": true}',
        '{"prompt": "a cat", "seed": 1.5}',
        '{"prompt": "a cat", "steps": "2"}',
        '{"prompt": "a cat", "shift": NaN}',
        '{"prompt": "a cat", "cfg_scale": [1]}',
        '{"prompt": "a cat", "negative_prompt": {}}',
        '{"prompt": "a cat", "name": 5}',
        '{"prompt": ["a cat"]}',
        "[" * 100000 + "]" * 100000,
        '{"prompt": "a cat", "size": [16.5, 16]}',
        '{"prompt": "a cat", "seed": 123456789012345678901234567890}',
        '{"prompt": "a cat", "size": {"w": 16}}',
        json.dumps({"prompt": "a cat " * 30000}),
        json.dumps({"prompt": "a cat \ud800", "name": "cat\ud800"}),  # a lone surrogate: the manifest still takes it
    ]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(lines))
    dst = tmp_path / "dst"
    summary = _prompt_job(t2i, prompts, dst)
    rows = _manifest(dst)
    assert summary.ok + summary.failed == len(lines) and summary.ok in (1, 2)
    assert rows[1]["status"] == "ok" and rows[17]["status"] in ("ok", "failed")
    expect = {2: "seed", 3: "size", 4: "seed", 5: "seed", 6: "steps", 7: "shift", 8: "cfg_scale",
              9: "negative_prompt", 10: "name", 11: "no prompt", 12: "nested too deeply", 13: "size", 14: "seed",
              15: "size", 16: "prompt is"}  # fmt: skip
    for n, what in expect.items():
        r = rows[n]
        assert r["status"] == "failed" and f"line {n}:" in r["error"] and what in r["error"], (n, r["error"])
        assert r["error_kind"] in ("bad_parameter", "bad_input") and len(r["error"]) < 300, r["error"]


def test_a_csv_line_with_an_overlong_field_fails_alone(t2i, tmp_path):
    prompts = tmp_path / "p.csv"
    prompts.write_text('\ufeffprompt,seed\na cat,1\n"' + "x" * 140_000 + '",2\na dog,3,extra\na red dog,4\n')
    dst = tmp_path / "dst"
    summary = _prompt_job(t2i, prompts, dst)
    rows = _manifest(dst)
    assert summary.ok == 2 and summary.failed == 2
    assert rows[2]["status"] == "ok" and rows[5]["status"] == "ok"
    assert "line 3:" in rows[3]["error"] and "over 131,072 characters" in rows[3]["error"]
    assert "line 4:" in rows[4]["error"] and "3 fields" in rows[4]["error"]


def test_generate_into_the_prompt_files_folder_and_over_a_leftover_part(t2i, tmp_path):
    """`generate --prompts p.txt .` writes beside the prompt file (nothing there is overwritten, the prompt file
    least of all); a single prompt whose OUT.part is left over from elsewhere still writes OUT and leaves it be."""
    common = ["-m", t2i["preset"], "--text-encoder", t2i["gemma"], "--no-progress"]
    d = tmp_path / "here"
    d.mkdir()
    (d / "p.txt").write_text("a cat\n")
    (d / "000001-a-cat.txt").write_text("a user's own file")
    r = _cli("generate", "--prompts", str(d / "p.txt"), str(d), *common, "--local", check_rc=0)
    assert "--suffix" not in r.stderr and (d / "000001-a-cat.png").is_file()
    assert (d / "p.txt").read_text() == "a cat\n" and (d / "000001-a-cat.txt").read_text() == "a user's own file"
    named = tmp_path / "000001-a-cat.png"  # a text prompt file whose name is its first line's output
    named.write_text("a cat\n")
    r = _cli("generate", "--prompts", str(named), str(tmp_path), *common, "--local", check_rc=3)
    assert named.read_text() == "a cat\n" and "overwrite the prompt file" in r.stderr
    out = tmp_path / "one.png"
    (tmp_path / "one.png.part").write_bytes(b"someone else's")
    r = _cli("generate", "a cat", str(out), *common, check_rc=0)
    assert Image.open(out).size == (48, 32) and (tmp_path / "one.png.part").read_bytes() == b"someone else's"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".one.png")]
