"""Run the README's set-up and tour commands in the order written, in a fresh clone, each one exiting 0.

    python tests/readme_tour.py [--venv PATH]

The commands are read from the README's first two `bash` blocks (set-up, then the tour), so the README cannot drift
from what works. `./dev.sh test` is left out (it is the test suite itself). `pidray serve` runs until its page
answers, then gets Ctrl-C (its exit code 130 counts as a clean stop). --venv: reuse an installed virtual
environment instead of installing one into the clone (`./dev.sh run` then finds it up to date).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commands(readme: str) -> list[str]:
    """The command lines of the README's first two bash blocks, comments and blank lines left out."""
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)[:2]
    out = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            if line and line != "./dev.sh test":
                out.append(line)
    return out


def _serve(cmd: str, env: dict, cwd: str, deadline_s: float = 300) -> int:
    """`pidray serve`: running until its page answers on 127.0.0.1:8000, then Ctrl-C; its exit code."""
    proc = subprocess.Popen(shlex.split(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    end = time.time() + deadline_s
    try:
        while time.time() < end and proc.poll() is None:
            try:
                with urllib.request.urlopen("http://127.0.0.1:8000/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            print(proc.stdout.read().decode(errors="replace") if proc.poll() is not None else "", file=sys.stderr)
            return proc.poll() if proc.poll() is not None else 124
        proc.send_signal(signal.SIGINT)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run(venv: str | None = None) -> list[tuple[str, int, float]]:
    """Clone, then each command in order; [(command, exit code, seconds)]. Stops at the first that fails."""
    with socket.socket() as s:  # `pidray serve` listens on the README's port
        if s.connect_ex(("127.0.0.1", 8000)) == 0:
            raise SystemExit("port 8000 is in use: the tour's `pidray serve` needs it")
    work = tempfile.mkdtemp(prefix="pidray-tour-")
    clone = os.path.join(work, "pidray")
    subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
    if venv:
        os.symlink(os.path.abspath(venv), os.path.join(clone, ".venv"))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "RAY_ADDRESS")}
    done = []
    for cmd in commands(open(os.path.join(clone, "README.md")).read()):
        if cmd.startswith("source "):  # the venv's bin first on PATH, as `source .venv/bin/activate` does
            env["PATH"] = os.path.join(clone, ".venv", "bin") + os.pathsep + env["PATH"]
            env["VIRTUAL_ENV"] = os.path.join(clone, ".venv")
            done.append((cmd, 0, 0.0))
            continue
        t0 = time.time()
        if cmd.split()[:2] == ["pidray", "serve"]:
            rc = _serve(cmd, env, clone)
            rc = 0 if rc == 130 else rc  # stopped by Ctrl-C, as a person stops it: 128 + SIGINT
        else:
            rc = subprocess.run(cmd, shell=True, cwd=clone, env=env).returncode
        done.append((cmd, rc, time.time() - t0))
        print(f"[{rc}] {time.time() - t0:6.1f}s  {cmd}", flush=True)
        if rc != 0:
            break
    return done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", help="an installed virtual environment to reuse")
    args = ap.parse_args()
    done = run(args.venv)
    failed = [d for d in done if d[1] != 0]
    print(f"{len(done) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
