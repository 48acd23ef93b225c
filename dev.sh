#!/usr/bin/env bash
# The README's two commands:  ./dev.sh demo   and   ./dev.sh test
# Each makes (once) a virtualenv in .venv from this repository's own files.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
fi
if ! .venv/bin/python -c "import ipcbus, pytest, hypothesis" 2>/dev/null; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
fi
cmd="${1:-test}"; shift || true
case "$cmd" in
  demo) exec .venv/bin/python examples/demo.py "$@" ;;
  test) exec .venv/bin/python -m pytest -q "$@" ;;
  *) echo "usage: ./dev.sh demo|test [args...]" >&2; exit 2 ;;
esac
