"""The `pidray` command answers at once: --help, --version and usage errors load neither torch nor Ray, every command
says what it is doing before the slow imports, and the help, the hints for other upscalers' flags and the preset list
speak to users. All through the real `pidray` command."""

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "pipeline" / "assets" / "samples"
SCRIPT = Path(sys.executable).with_name("pidray")  # the installed console script
PIDRAY = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "pidray"]
# A sitecustomize that says on file descriptor 2 when torch or ray starts importing (and, blocking, refuses it): the
# mark is written even where a caller catches the ImportError.
WATCH = """
import importlib.abc, os, sys
class _Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "ray"):
            os.write(2, f"\\n[importing {name}]\\n".encode())
            if BLOCK:
                raise ImportError(f"{name} must not be imported here")
        return None
sys.meta_path.insert(0, _Watch())
"""
MARK = re.compile(rb"\[importing (torch|ray)\]")


def _env(tmp_path: Path, block: bool) -> dict:
    shim = tmp_path / ("block" if block else "watch")
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(f"BLOCK = {block}\n{WATCH}")
    env = {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{ROOT}"}
    env.pop("COLUMNS", None)
    return env


def pidray(tmp_path, *args, block=True):
    return subprocess.run([*PIDRAY, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=_env(tmp_path, block))  # fmt: skip


def until_torch(tmp_path, *args, timeout=120) -> str:
    """Run pidray on a terminal (stdout and stderr on a pseudo-terminal) until torch or Ray starts to import, then
    stop it: what it said before, and the mark."""
    main, child = pty.openpty()
    proc = subprocess.Popen([*PIDRAY, *map(str, args)], stdin=subprocess.DEVNULL, stdout=child, stderr=child,
                            cwd=ROOT, env=_env(tmp_path, block=False), start_new_session=True)  # fmt: skip
    os.close(child)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while not MARK.search(out) and time.monotonic() < deadline:
            if select.select([main], [], [], 1)[0]:
                try:
                    chunk = os.read(main, 4096)
                except OSError:  # the command ended
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        os.close(main)
    assert MARK.search(out), out.decode(errors="replace")[-2000:]
    return out.decode(errors="replace").replace("\r\n", "\n")


# ------------------------------------------------------------------------------ at once, and before the imports
@pytest.mark.parametrize(
    "args, code, where, expect",
    [
        (["--help"], 0, "stdout", "pidray COMMAND --help"),
        (["--version"], 0, "stdout", "pidray "),
        ([], 0, "stdout", "upscale"),
        (["upscale", "--help"], 0, "stdout", "--tile"),
        (["upscale", "--nosuchflag", "x", "y"], 2, "stderr", "unrecognized arguments: --nosuchflag"),
        (["upscale", "a.png"], 2, "stderr", "required: dst"),
        (["upscale", "a", "b", "--seed", "x"], 2, "stderr", "expected an integer"),
        (["upscal", "a", "b"], 2, "stderr", "did you mean 'upscale'?"),
        (["decode", "--help"], 0, "stdout", "--latent-format"),
        (["generate", "--help"], 0, "stdout", "--prompts"),
        (["serve", "--help"], 0, "stdout", "--port"),
        (["serve", "--prot", "9"], 2, "stderr", "did you mean --port?"),
        (["doctor", "--help"], 0, "stdout", "--golden"),
        (["bench", "kernels", "--help"], 0, "stdout", "--steps"),
        (["presets", "--help"], 0, "stdout", "--weights"),
    ],
)
def test_help_version_and_usage_errors_import_neither_torch_nor_ray(tmp_path, args, code, where, expect):
    out = pidray(tmp_path, *args)
    assert "[importing" not in out.stderr, out.stderr
    assert out.returncode == code and expect in getattr(out, where), (out.stdout, out.stderr)


@pytest.mark.parametrize(
    "args, first",
    [
        (["upscale", SAMPLES / "chelsea.png", "{tmp}/x.png"], "pidray upscale: loading PyTorch and the small model..."),
        (["decode", "{tmp}/in", "{tmp}/out"], "pidray decode: loading PyTorch and the flux-2k model..."),
        (["generate", "a cat", "{tmp}/cat.png"], "pidray generate: loading PyTorch and the pixeldit-2k model..."),
        (["serve", "--port", "{port}"], "pidray serve: starting Ray and the endpoint (small model) on 127.0.0.1:"),
        (["doctor"], "pidray doctor: loading PyTorch..."),
        (["presets", "--weights", "{tmp}"], "Which model (-m/--model):"),
    ],
)  # fmt: skip
def test_each_command_says_what_it_does_before_torch_loads(tmp_path, args, first):
    """On a terminal, a command's first line comes before torch (and Ray) import: the seconds they take, more on a
    busy machine, are never a blank screen."""
    from conftest import free_port

    args = [str(a).replace("{tmp}", str(tmp_path)).replace("{port}", str(free_port())) for a in args]
    said = until_torch(tmp_path, *args)
    before = said[: MARK.search(said.encode()).start()].strip()
    assert before.splitlines()[0].startswith(first), said


def test_no_progress_and_pipes_keep_the_first_line_out(tmp_path):
    """--no-progress asks for quiet, and off a terminal (a log, a pipe) the output is as before: only a terminal
    gets the line."""
    said = until_torch(tmp_path, "upscale", SAMPLES / "chelsea.png", tmp_path / "x.png", "--no-progress")
    assert "loading PyTorch" not in said, said
    out = pidray(tmp_path, "upscale", tmp_path / "missing.png", tmp_path / "o.png", block=False)
    assert out.returncode == 2 and "loading PyTorch" not in out.stderr, out.stderr


def test_written_out_defaults_are_the_real_ones(tmp_path):
    """The parser spells out two defaults (their modules load torch): they are the options' own."""
    from pidray.cli import build_parser
    from pipeline.stages import UpscaleOptions
    from serve.admission import TOKEN_ENV

    args = build_parser().parse_args(["upscale", "a", "b"])
    assert (args.max_pixels, args.max_output_side) == (UpscaleOptions.max_pixels, UpscaleOptions.max_output_side)
    assert f"${TOKEN_ENV}" in pidray(tmp_path, "serve", "--help").stdout


# ------------------------------------------------------------------------------ help that speaks to users
DEV_NOTES = re.compile(r"one place that sees|parsers are added|own modules|the seed's|\.gpu/|shared/golden|pidray\.cli|"
                       r"COMMANDS|\btests?\b")  # fmt: skip
USE_ORDER = ["upscale", "decode", "generate", "serve", "status", "presets", "download", "doctor"]
MAINTENANCE = ["golden", "info", "convert", "eval-small", "bench"]


def test_help_lists_the_commands_by_use_then_maintenance(tmp_path):
    text = pidray(tmp_path, "--help").stdout
    at = {name: re.search(rf"^  {re.escape(name)}\s", text, re.M) for name in USE_ORDER + MAINTENANCE}
    assert all(at.values()), {n for n, m in at.items() if not m}
    heading = re.search(r"^maintenance:", text, re.M)
    starts = [at[n].start() for n in USE_ORDER] + [heading.start()] + [at[n].start() for n in MAINTENANCE]
    assert starts == sorted(starts), text
    assert text.split("\n\n")[1].startswith("Upscale images with NVIDIA's PiD"), text


@pytest.mark.parametrize("command", [[], *([c] for c in USE_ORDER + MAINTENANCE), ["bench", "pipeline"]])
def test_every_help_speaks_to_users(tmp_path, command):
    out = pidray(tmp_path, *command, "--help")
    assert out.returncode == 0, out.stderr
    found = DEV_NOTES.findall(out.stdout)
    assert not found, f"pidray {' '.join(command)} --help: {found}"


# ------------------------------------------------------------------------------ other upscalers' habits
@pytest.mark.parametrize(
    "flags, hint",
    [
        (["-x"], "-x is another upscaler's test-time augmentation; pidray has none: its nearest is --ensemble"),
        (["--tta"], "--tta is another upscaler's test-time augmentation; pidray has none: its nearest is --ensemble"),
        (["-j", "1:2:2"], "-j is realesrgan-ncnn-vulkan's load:proc:save thread counts; pidray sizes its workers"),
        (["-v"], "-v is realesrgan-ncnn-vulkan's verbose output; pidray's is --verbose"),
        (["--face-enhance"], "--face-enhance is Real-ESRGAN's GFPGAN face pass; pidray has no face enhancement"),
        (["--face_enhance"], "--face_enhance is Real-ESRGAN's GFPGAN face pass; pidray has no face enhancement"),
        (["--tile_pad", "10"], "pidray's tiles overlap by --overlap"),
        (["--ext", "jpg"], "pidray's is -f/--format"),
        (["-i", "a", "-o", "b"], "SRC and DST are positional"),
    ],
)
def test_real_esrgan_flags_are_answered_with_what_pidray_does(tmp_path, flags, hint):
    out = pidray(tmp_path, "upscale", "in.png", "out.png", *flags)
    assert out.returncode == 2 and "[importing" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pidray upscale: error: unrecognized arguments: {flags[0]}") and hint in last, last


def test_a_hint_names_only_options_the_command_has(tmp_path):
    out = pidray(tmp_path, "serve", "-x")
    assert out.returncode == 2 and "--ensemble" not in out.stderr  # the endpoint has no --ensemble
    assert "pidray's is --verbose" in pidray(tmp_path, "serve", "-v").stderr


# ------------------------------------------------------------------------------ pidray presets
def test_presets_fit_100_columns_and_say_what_each_is_for(tmp_path):
    from pipeline.model.presets import PRESETS

    out = pidray(tmp_path, "presets", "--weights", tmp_path, block=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.replace(str(tmp_path), "DIR").splitlines()  # the user's own path aside
    assert max(map(len, lines)) <= 100, max(lines, key=len)
    guide = out.stdout.split("\n\n")[0]
    assert "photos, renders" in guide and "generator latents" in guide and "text to image" in guide
    assert {"small", "flux-2kto4k-v1.5", "pixeldit-2k"} <= set(re.findall(r"[\w.-]+", guide)) & set(PRESETS)
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in PRESETS}
    assert set(rows) == set(PRESETS)
    assert rows["small"][1:5] == ["x4", "any", "1", "-"] and rows["small"][-1] == "ready"
    assert rows["flux-2k"][1:6] == ["x4", "2K", "4", "flux,", "zimage"]  # it decodes Flux.1 and Z-Image latents
    assert rows["sdxl-2kto4k"][1:5] == ["x4", "2K-4K", "4", "sdxl"]
    assert rows["flux-2kto4k-v1.5-undistilled"][3] == "25x2" and rows["siglip-sr8x-2k"][1:5] == ["x8", "2K", "4", "-"]
    assert rows["pixeldit-2k"][1] == "-"
