"""A newcomer's first commands, through the real `pidray` command: one file to one file, the help they get for a
wrong guess, the messages for missing weights and unknown presets, `pidray presets`."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT

SAMPLES = ROOT / "pipeline" / "assets" / "samples"


def pidray(*args, cwd=None, env=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    out = subprocess.run([sys.executable, "-m", "pidray", *map(str, args)], capture_output=True, text=True,
                         cwd=cwd or ROOT, env=env, timeout=timeout)  # fmt: skip
    assert "Traceback" not in out.stderr, out.stderr
    return out


def _tiny(path: Path, size=(24, 16), mode="RGB") -> Path:
    Image.new(mode, size, (200, 30, 90, 128)[: len(mode)]).save(path)
    return path


# ----------------------------------------------------------------------------------- 1: a file to a file
def test_one_file_to_a_file_name(tmp_path):
    src = _tiny(tmp_path / "one.jpg")
    out = pidray("upscale", src, tmp_path / "big.png", "--no-progress")
    assert out.returncode == 0, out.stderr
    img = Image.open(tmp_path / "big.png")
    assert img.format == "PNG" and img.size == (96, 64)  # the extension chose the format; 4x
    assert not (tmp_path / "big.png").is_dir()
    again = pidray("upscale", src, tmp_path / "big.png", "--no-progress")  # never over an existing file: asked first
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert "big.png exists: --overwrite replaces it" in again.stderr, again.stderr
    assert pidray("upscale", src, tmp_path / "big.png", "--no-progress", "--overwrite").returncode == 0
    same = pidray("upscale", src, src)  # never over SRC: one line, nothing written
    assert same.returncode == 2 and same.stderr.count("\n") == 1 and "is SRC" in same.stderr
    clash = pidray("upscale", src, tmp_path / "c.jpg", "-f", "png")
    assert clash.returncode == 2 and "-f png" in clash.stderr and not (tmp_path / "c.jpg").exists()


def test_a_folder_src_with_a_file_like_dst_says_what_happens(tmp_path):
    (tmp_path / "in").mkdir()
    _tiny(tmp_path / "in" / "a.png")
    out = pidray("upscale", tmp_path / "in", tmp_path / "out.png", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "is a folder, so DST" in out.stderr and (tmp_path / "out.png" / "a.png").is_file()


# ----------------------------------------------------------------------------------- 2: wrong guesses
@pytest.mark.parametrize(
    "args, usage, hint",
    [
        (["upscale", "a", "b", "--scael", "2"], "pidray upscale", "did you mean --scale?"),
        (["upscale", "-i", "a", "-o", "b"], "pidray upscale", "SRC and DST are positional"),
        (["upscale", "a", "b", "-n", "x"], "pidray upscale", "-m/--model"),
        (["serve", "--prot", "9"], "pidray serve", "did you mean --port?"),
        (["upscal", "a", "b"], "pidray [-h]", "did you mean 'upscale'?"),
    ],
)
def test_wrong_guesses_get_their_own_usage_and_the_nearest_match(args, usage, hint):
    out = pidray(*args)
    assert out.returncode == 2
    assert out.stderr.startswith(f"usage: {usage}") and hint in out.stderr, out.stderr


def test_unknown_preset_names_the_nearest_and_only_upscalers(tmp_path):
    _tiny(tmp_path / "a.png")
    out = pidray("upscale", tmp_path / "a.png", tmp_path / "o", "-m", "smal")
    assert out.returncode == 2 and "did you mean 'small'?" in out.stderr
    known = out.stderr.split("known:")[1].split(";")[0]
    assert "flux-2k" in known and "pixeldit-2k" not in known  # a text-to-image model cannot upscale
    assert "[" not in out.stderr  # aliases as words, not a Python list


def test_version_and_bare_command():
    from pipeline import __version__

    out = pidray("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"pidray {__version__}"
    bare = pidray()
    assert bare.returncode == 0 and "upscale" in bare.stdout and "COMMAND --help" in bare.stdout


def test_aliases_tile_zero_gpu_and_fp32(tmp_path):
    from pidray.cli import build_parser

    args = build_parser().parse_args(["upscale", "a", "b", "-t", "0", "-g", "1", "--fp32"])
    assert args.tile is None and args.device == "cuda:1" and args.dtype == "fp32"  # None: the automatic tile
    assert build_parser().parse_args(["upscale", "a", "b", "-t", "256"]).tile == 256
    out = pidray("upscale", "a", "b", "-g", "x")
    assert out.returncode == 2 and "GPU number" in out.stderr
    src = _tiny(tmp_path / "a.png")
    job = pidray("upscale", src, tmp_path / "o", "-t", "0", "--fp32", "--no-progress")  # runs end to end
    assert job.returncode == 0 and (tmp_path / "o" / "a.png").is_file(), job.stderr


def _actions(parser, name="pidray"):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for n, p in a.choices.items():
                yield from _actions(p, f"{name} {n}")
        else:
            yield name, parser, a


def test_every_option_has_a_help_line_with_its_default():
    from pidray.cli import build_parser

    for name, parser, a in _actions(build_parser()):
        if a.help == argparse.SUPPRESS:
            continue
        assert a.help, f"{name} {a.option_strings or a.dest} has no help line"
        shown = parser._get_formatter()._get_help_string(a)
        if a.option_strings and a.nargs != 0 and a.default not in (None, False, "", [], argparse.SUPPRESS):
            assert "default" in shown, f"{name} {a.option_strings}: the help does not show its default"
    help_text = pidray("upscale", "--help").stdout
    assert "bmp" in help_text and "(default: 95)" in help_text and "0: automatic" in help_text


# ----------------------------------------------------------------------------------- 8: long errors
def test_missing_weights_short_first_line_commands_below(tmp_path):
    _tiny(tmp_path / "a.png")
    out = pidray("upscale", tmp_path / "a.png", tmp_path / "o", "-m", "sd3-2k", "--weights", tmp_path,
                 "--text-encoder", tmp_path)  # fmt: skip
    lines = out.stderr.splitlines()
    assert out.returncode == 2 and len(lines[0].replace(str(tmp_path), "DIR")) < 100, out.stderr
    assert "not found" in lines[0] and any(line.strip().startswith("hf download nvidia/PiD") for line in lines[1:])


def test_presets_says_what_is_ready_here(tmp_path):
    out = pidray("presets", "--weights", tmp_path)
    assert out.returncode == 0
    lines = [line for line in out.stdout.splitlines()[1:] if line and not line.startswith(("alias", "here"))]
    rows = {line.split()[0]: line for line in lines}
    assert "ready" in rows["small"] and "captioner" not in rows["small"]  # bundled, no caption encoder
    assert "weights missing+captioner" in rows["flux-2k"]


# ----------------------------------------------------------------------------------- 5: serve's preflight
@pytest.mark.parametrize(
    "args, message",
    [
        (["-m", "smal"], "unknown preset 'smal' (did you mean 'small'?)"),
        (["-m", "flux-2k", "--weights", "{tmp}", "--text-encoder", "{tmp}"], "weight file(s) not found under"),
        (["--preset", "pixeldit-2k"], "is a text-to-image model"),
    ],
)
def test_serve_refuses_before_ray_starts(tmp_path, args, message):
    import time

    t0 = time.time()
    out = pidray("serve", "--port", "1", *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert out.returncode == 2 and message in out.stderr.splitlines()[0], out.stderr
    assert time.time() - t0 < 30 and "Deploying" not in out.stderr  # no Ray: checked before it starts


@pytest.mark.slow
def test_serve_starts_quietly_and_stops_on_sigterm(tmp_path):
    import signal
    import urllib.request

    from conftest import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PIDRAY_API_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "pidray", "serve", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert f"pidray endpoint on http://127.0.0.1:{port}" in line, proc.stderr.read() if not line else line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert rc == 0 and err == "", err  # no Ray notices, no C++ trace: those are in the log
    from serve.run import RAY_LOG

    assert Path(RAY_LOG).exists()


# ----------------------------------------------------------------------------------- 4: progress per tile-step
def test_progress_moves_per_tile_step_on_a_terminal(tmp_path):
    """The job through `script` (a real terminal): the image bar counts every network call's tiles."""
    import re
    import shutil

    if not shutil.which("script"):
        pytest.skip("util-linux `script` is needed to give the job a terminal")
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(SAMPLES / "astronaut.png", src / "astronaut.png")
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    cmd = f"{sys.executable} -m pidray upscale {src} {tmp_path / 'out'} -t 128"  # the trained tile: 3x3 tiles
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIDRAY_CPU_TILES_PER_CALL": "1"}  # one tile a network call
    job = subprocess.run(["script", "-q", "-e", "-c", cmd, str(tmp_path / "ts")], env=env, cwd=ROOT, timeout=300,
                         stdout=subprocess.DEVNULL)  # fmt: skip
    assert job.returncode == 3  # finished, one input failed
    text = (tmp_path / "ts").read_bytes().decode("utf-8", "replace")
    steps = [int(n) for n in re.findall(r"astronaut\.png \[[#-]+\] (\d+)/9 tile-steps", text)]
    assert len(set(steps)) >= 5 and steps == sorted(steps) and steps[-1] == 9, steps  # 80² -> 3x3 tiles, 1 step
    assert re.search(r"upscale \[[#-]+\] +\d+%  \d/2 images  ETA (<1s|[\d.]+s)", text), text[-2000:]
    assert text.count("failed  broken.png") == 1  # said once, as it happened, not again at the end
    assert "done: 1 ok, 1 failed" in text


def test_progress_eta_from_measured_throughput():
    import time

    from jobs.progress import JobProgress

    class Log(list):
        def isatty(self):
            return False

        def write(self, text):
            self.append(text)

        def flush(self):
            pass

    p = JobProgress({"a": 10, "b": 30}, Log())
    p.on_forwards("a", 5)  # the first report: the clock starts, its work (with any warm-up) is not counted
    assert p.eta() != p.eta()  # NaN: nothing measured yet
    time.sleep(0.2)
    p.on_forwards("a", 5)
    eta = p.eta()  # 5 units in ~0.2 s, 30 left: ~1.2 s
    assert 0.6 < eta < 2.5, eta
    p.row_done({"key": "a", "status": "ok"})
    assert p.done == 10 and p.partial == {}


def test_eta_text_claims_less_than_a_second_at_the_end():
    """Under a second the bar says "<1s": the outputs and the manifest still to write are not in the measured work,
    and a tenth-of-a-second figure would claim a precision the ETA does not have."""
    from jobs.progress import _clock

    assert [_clock(x) for x in (0.0, 0.4, 0.99, 1.0, 12.34, 75, float("nan"))] == [
        "<1s", "<1s", "<1s", "1.0s", "12.3s", "1m15s", "?"]  # fmt: skip


# ----------------------------------------------------------------------------------- 6: resume and settings
def test_resume_refuses_outputs_made_with_other_settings(tmp_path):
    import pyarrow.parquet as pq

    src = tmp_path / "in"
    src.mkdir()
    _tiny(src / "a.png")
    assert pidray("upscale", src, tmp_path / "out", "--no-progress").returncode == 0
    meta = pq.ParquetFile(tmp_path / "out" / "_pidray_manifest.parquet").schema_arrow.metadata
    import json

    settings = json.loads(meta[b"pidray.settings"])
    assert settings["scale"] == 4 and settings["preset"] == "small" and meta[b"pidray.version"]
    assert meta[b"pidray.started"].decode().endswith("Z")
    same = pidray("upscale", src, tmp_path / "out", "--resume", "-s", "4", "--no-progress")  # explicit default
    assert same.returncode == 0 and "1 skipped" in same.stdout
    out = pidray("upscale", src, tmp_path / "out", "-s", "2", "--resume")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "scale 4 (now 2)" in out.stderr, out.stderr
    assert Image.open(tmp_path / "out" / "a.png").size == (96, 64)  # kept
    redo = pidray("upscale", src, tmp_path / "out", "-s", "2", "--resume=redo-changed", "--no-progress")
    assert redo.returncode == 0 and "1 ok" in redo.stdout, redo.stderr
    assert Image.open(tmp_path / "out" / "a.png").size == (48, 32)
    assert pidray("upscale", src, tmp_path / "out", "-s", "2", "--resume", "--no-progress").returncode == 0


# ----------------------------------------------------------------------------------- 7: no silent changes
def test_non_images_alpha_to_jpeg_and_ignored_captions_are_said(tmp_path):
    import pyarrow.parquet as pq

    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    _tiny(src / "a.png", mode="RGBA")
    (src / "notes.txt").write_text("hello")
    (src / "sub" / "README").write_text("no extension")
    dry = pidray("upscale", src, tmp_path / "out", "--dry-run")
    assert "skipped  notes.txt  (not an image)" in dry.stdout and "skipped  sub/README  (not an image)" in dry.stdout
    out = pidray("upscale", src, tmp_path / "out", "-f", "jpg", "--caption", "a cat", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "note    a.png: transparency dropped" in out.stderr and "no caption encoder" in out.stderr
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "_pidray_manifest.parquet").to_pylist()}
    assert rows["notes.txt"]["status"] == "skipped" and rows["notes.txt"]["error"] == "not an image"
    assert rows["sub/README"]["status"] == "skipped"
    assert "transparency dropped" in rows["a.png"]["notes"] and rows["a.png"]["output_key"] == "a.jpg"


# ----------------------------------------------------------------------------------- 9: the manifest's timings
def test_each_row_records_its_share_of_a_batched_call(bicubic_weights):
    from pipeline.graph import StageGraph
    from pipeline.runtime import ModelOptions

    from conftest import png_bytes

    small, large = Image.new("RGB", (16, 16), (90, 20, 20)), Image.new("RGB", (80, 80), (20, 90, 20))
    rows = [{"key": "small", "bytes": png_bytes(small)}, {"key": "large", "bytes": png_bytes(large)}]
    out = {r["key"]: r for r in StageGraph(ModelOptions("small", bicubic_weights)).run_local(rows)}
    t = {k: r["timings"]["diffuse"] for k, r in out.items()}
    assert t["small"] < t["large"], t  # 1 tile against 9: each its own part, not the batch's whole time
    assert "work_share" not in out["small"]


def test_a_failed_row_keeps_the_size_its_header_told(tmp_path):
    import pyarrow.parquet as pq

    src = tmp_path / "in"
    src.mkdir()
    _tiny(src / "big.png", size=(40, 30))
    out = pidray("upscale", src, tmp_path / "out", "--max-pixels", "100", "--no-progress")
    assert out.returncode == 3
    row = pq.read_table(tmp_path / "out" / "_pidray_manifest.parquet").to_pylist()[0]
    assert row["status"] == "failed" and (row["in_h"], row["in_w"]) == (30, 40), row


# ----------------------------------------------------------------------------------- 3: the README and docs/
DEV_PROCESS = ("timeout_s", "files_at", "FILES_AT", "GPU session", ".gpu/", "device `run`", "uncommitted", "issue",
               "session")  # fmt: skip


def test_readme_and_docs_speak_to_users():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text()
        found = [p for p in DEV_PROCESS if p.lower() in text.lower()]
        assert not found, f"{page.name}: {found}"
    readme = (ROOT / "README.md").read_text()
    first_screen = "\n".join(readme.splitlines()[:30])
    assert "./dev.sh run" in first_screen and "upscal" in first_screen.split("\n## ")[0]
    assert len(readme.splitlines()) < 120
    for link in __import__("re").findall(r"\]\((docs/[^)]+)\)", readme):  # every page it links to is there
        assert (ROOT / link).is_file(), link


def test_the_readme_tour_runs(tmp_path):
    """The tour's first command as written, from a fresh folder."""
    out = pidray("upscale", SAMPLES / "chelsea.png", tmp_path / "chelsea_x4.png", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert Image.open(tmp_path / "chelsea_x4.png").size == (288, 288)


# ----------------------------------------------------------------------------------- 7: names kept when they can be
def test_x_png_and_x_jpg_keep_their_names_and_resume_finds_each(tmp_path):
    import pyarrow.parquet as pq

    src = tmp_path / "in"
    src.mkdir()
    _tiny(src / "x.png")
    Image.new("RGB", (16, 16), (10, 90, 200)).save(src / "x.jpg")
    Image.new("RGB", (16, 16), (10, 90, 200)).save(src / "y.gif")
    _tiny(src / "y.png")
    assert pidray("upscale", src, tmp_path / "out", "--no-progress").returncode == 0
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "_pidray_manifest.parquet").to_pylist()}
    names = {k: r["output_key"] for k, r in rows.items()}
    assert names == {"x.png": "x.png", "x.jpg": "x.jpg", "y.gif": "y.gif.png", "y.png": "y.png.png"}  # GIF -> PNG
    again = pidray("upscale", src, tmp_path / "out", "--resume", "--no-progress")
    assert "4 skipped" in again.stdout
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "_pidray_manifest.parquet").to_pylist()}
    assert {k: r["output_key"] for k, r in rows.items()} == names
    one_format = pidray("upscale", src, tmp_path / "jpgs", "-f", "jpg", "--dry-run")  # one format: they would collide
    assert "x.png -> x.png.*" in one_format.stdout and "x.jpg -> x.jpg.*" in one_format.stdout


@pytest.mark.slow
def test_the_readme_tour_runs_in_the_order_written():
    """The README's set-up and tour commands, in order, on a fresh clone of this commit (the installed venv reused):
    every one exits 0."""
    sys.path.insert(0, str(Path(__file__).parent))
    from readme_tour import commands, run

    names = commands((Path(__file__).parent.parent / "README.md").read_text())
    assert names[0] == "./dev.sh run" and any(c.startswith("pidray status") for c in names), names
    done = run(venv=str(Path(sys.executable).parent.parent))
    assert len(done) == len(names) and all(rc == 0 for _, rc, _ in done), done


def test_a_transparent_image_as_jpeg_is_flattened_onto_the_background(tmp_path):
    rgba = Image.new("RGBA", (12, 12), (250, 0, 0, 0))  # red, fully transparent: hidden, and must stay hidden
    rgba.save(tmp_path / "t.png")
    for bg, want in (("white", 255), ("#000000", 0)):
        out = pidray("upscale", tmp_path / "t.png", tmp_path / f"t{want}.jpg", "--no-progress", "--background", bg)
        assert out.returncode == 0, out.stderr
        assert "transparency dropped" in out.stderr and f"flattened onto {bg}" in out.stderr
        px = Image.open(tmp_path / f"t{want}.jpg").convert("RGB").getpixel((20, 20))
        assert all(abs(c - want) < 8 for c in px), (bg, px)
    bad = pidray("upscale", tmp_path / "t.png", tmp_path / "x.jpg", "--background", "no-such-colour")
    assert bad.returncode == 2 and "background must be a colour" in bad.stderr and not (tmp_path / "x.jpg").exists()


def test_one_file_to_one_file_leaves_only_that_file(tmp_path):
    """No manifest, receipt or lock is left beside a named output (`--manifest PATH` writes one where asked); the
    doctor's report goes to the cache folder and says where, never into the current folder."""
    work = tmp_path / "work"
    work.mkdir()
    src = _tiny(tmp_path / "one.png")
    out = pidray("upscale", src, "big.png", "--no-progress", cwd=work)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in work.iterdir()) == ["big.png"]
    again = pidray("upscale", src, "big.png", "--no-progress", "--overwrite", "--manifest", tmp_path / "m.parquet",
                   cwd=work)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in work.iterdir()) == ["big.png"] and (tmp_path / "m.parquet").is_file()
    taken = pidray("upscale", src, "big.png", "--manifest", tmp_path / "m.parquet", cwd=work)
    assert taken.returncode == 2 and "m.parquet exists" in taken.stderr
    folder = pidray("upscale", tmp_path / "work", tmp_path / "o", "--manifest", tmp_path / "n.parquet")
    assert folder.returncode == 2 and "--manifest is for one file" in folder.stderr
    doc = pidray("doctor", "--smoke", "--steps", "versions", cwd=work, env={"XDG_CACHE_HOME": str(tmp_path / "c")})
    assert sorted(p.name for p in work.iterdir()) == ["big.png"], doc.stdout
    assert (tmp_path / "c" / "pidray" / "doctor" / "doctor.json").is_file() and "report in" in doc.stdout
