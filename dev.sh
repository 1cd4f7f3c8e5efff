#!/usr/bin/env bash
# pidray set-up and entry points on a fresh machine; installs into .venv/ (reused when present).
#   ./dev.sh run    install, then upscale the bundled sample images with the bundled model (out/)
#   ./dev.sh test   install with test extras, then lint and run the whole test suite
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv

install() {
  local stamp="$VENV/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)"
  [ -f "$stamp" ] && return 0
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # torch first, pinned: pip takes the CPU wheel; anything else would pull a multi-GB CUDA build.
  "$VENV/bin/pip" install -q "torch==2.13.0"
  "$VENV/bin/pip" install -q -e ".[test]"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
}

case "${1:-}" in
  run)
    install
    "$VENV/bin/pidray" upscale pipeline/assets/samples out --local
    ;;
  test)
    install
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/python" -m pytest -q tests "${@:2}"
    ;;
  *)
    echo "usage: ./dev.sh run | test [pytest args]" >&2
    exit 2
    ;;
esac
