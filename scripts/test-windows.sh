#!/usr/bin/env bash
# test-windows.sh — run ipcbus's test suite in the official Windows CPython under Wine.
#
#   scripts/test-windows.sh                     # the whole suite (tests/), on Windows
#   scripts/test-windows.sh test_windows.py -x  # pytest arguments, relative to tests/
#
# The interpreter and its test dependencies are set up (once, under /tmp; about a minute)
# by scripts/wine-python.sh. POSIX-only tests skip there with a `posix` marker naming why.
# Without Wine on the machine the suite is skipped (exit 0, with the reason), unless
# IPCBUS_REQUIRE_WINE=1 (CI sets it): then Wine is installed with apt, and any failure to
# set it up fails the run.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYVER="${PYVER:-3.11}"; XY="${PYVER/./}"
ROOT="${WINPY_ROOT:-/tmp/winpy}"
SP="$ROOT/py$XY/Lib/site-packages"
export WINEPREFIX="${WINEPREFIX:-/tmp/wineprefix}"

if ! command -v wine >/dev/null 2>&1 && [ "${IPCBUS_REQUIRE_WINE:-}" != 1 ]; then
  echo "SKIPPED: the Windows test suite needs Wine: no \`wine\` on PATH (apt-get install wine wine64," \
       "or run with IPCBUS_REQUIRE_WINE=1 to have it installed, and fail if it cannot be)"
  exit 0
fi
if [ ! -x "$ROOT/winpy$XY" ] || [ ! -f "$SP/pytest_timeout.py" ] || [ ! -d "$SP/hypothesis" ]; then
  bash "$REPO/scripts/wine-python.sh"
fi
# ipcbus is imported from this checkout, in the test process and in every child it starts
# (the embeddable build ignores PYTHONPATH; a .pth file in site-packages is read).
printf 'Z:%s\r\n' "${REPO//\//\\}" > "$SP/ipcbus-repo.pth"
[ $# -gt 0 ] || set -- .
cd "$REPO/tests"
rc=0
timeout "${IPCBUS_WINE_TIMEOUT:-900}" "$ROOT/winpy$XY" -m pytest -q -p no:cacheprovider \
  -c ../pyproject.toml --rootdir .. "$@" </dev/null || rc=$?
wineserver -k 2>/dev/null || true   # the lingering wineserver and its helpers
exit $rc
