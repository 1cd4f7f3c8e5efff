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

browser() {
  # The endpoint's page is tested in headless Chromium from Debian's packages.
  command -v chromium >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: chromium not found and cannot be installed here; the page test will fail" >&2
  fi
}

case "${1:-}" in
  run)
    install
    "$VENV/bin/pidray" upscale pipeline/assets/samples out --overwrite  # replaces its own earlier outputs
    ;;
  test)
    install
    browser
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/python" -m pytest -q tests "${@:2}"
    ;;
  *)
    echo "usage: ./dev.sh run | test [pytest args]" >&2
    exit 2
    ;;
esac
