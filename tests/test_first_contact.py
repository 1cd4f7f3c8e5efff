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
    again = pidray("upscale", src, tmp_path / "big.png", "--no-progress")  # never over an existing file
    assert again.returncode == 3 and "already exists" in again.stderr
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
