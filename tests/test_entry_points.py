"""Third-party codecs and transports found through entry points, for real:
a distribution's ``.dist-info/entry_points.txt`` on a sys.path entry, read
by importlib.metadata in a fresh process (the registries cache per process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

import ipcbus
from ipcbus.codecs import get_codec

PLUGIN = '''
"""A tiny ipcbus plugin: a rot13 codec and a myunix:// transport."""
import codecs as _codecs
import json
import sys

# A local transport on every platform: Unix sockets, or named pipes on Windows.
if sys.platform == "win32":
    from ipcbus.transports import PipeTransport as UnixTransport
else:
    from ipcbus.transports import UnixTransport

CALLS = []


class Rot13Codec:
    name = "rot13"

    def encode(self, value):
        return _codecs.encode(json.dumps(value), "rot13").encode()

    def decode(self, data):
        return json.loads(_codecs.decode(bytes(data).decode(), "rot13"))


class MyUnixTransport(UnixTransport):
    scheme = "myunix"

    def connect(self, address, **options):
        CALLS.append("connect")
        return super().connect(address, **options)

    def listen(self, address, **options):
        CALLS.append("listen")
        return super().listen(address, **options)
'''

ENTRY_POINTS = """
[ipcbus.codecs]
rot13 = ipcbus_rot13_plugin:Rot13Codec
broken-codec = ipcbus_rot13_plugin:DoesNotExist

[ipcbus.transports]
myunix = ipcbus_rot13_plugin:MyUnixTransport
broken-transport = ipcbus_rot13_plugin:DoesNotExist
"""

SCRIPT = '''
import sys, threading
# The embeddable Windows Python ignores PYTHONPATH: the distribution's folder
# goes on sys.path here too (before ipcbus reads any entry point).
sys.path.insert(0, sys.argv[2])
import ipcbus
from ipcbus.codecs import available_codecs, get_codec
from ipcbus.transports import available_transports
import ipcbus_rot13_plugin as plugin

assert "rot13" in available_codecs(), available_codecs()
assert "myunix" in available_transports(), available_transports()
assert get_codec("rot13").encode("abc") == b'"nop"'

url = "myunix://" + sys.argv[1]
got = []
with ipcbus.listen(url, codec="rot13") as listener:
    def client():
        with ipcbus.connect(url, codec="rot13") as ch:
            ch.send({"greeting": "hello"})
            got.append(ch.recv(timeout=10).data)
    t = threading.Thread(target=client)
    t.start()
    with listener.accept(timeout=10) as ch:
        msg = ch.recv(timeout=10).data
        ch.send(["reply", msg["greeting"]])
    t.join(10)
assert got == [["reply", "hello"]], got
assert plugin.CALLS == ["listen", "connect"], plugin.CALLS

# A broken plugin breaks only itself.
try:
    get_codec("broken-codec")
except ipcbus.CodecError as exc:
    print("broken codec:", exc)
else:
    raise AssertionError("a broken codec entry point loaded")
a, b = ipcbus.pair(codec="msgpack")
a.send(1); assert b.recv(timeout=10).data == 1
a.close(); b.close()
try:
    ipcbus.connect("broken-transport://x")
except ipcbus.TransportError as exc:
    print("broken transport:", exc)
print("OK")
'''


def _make_distribution(root: Path) -> None:
    (root / "ipcbus_rot13_plugin.py").write_text(PLUGIN)
    info = root / "ipcbus_rot13_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ipcbus-rot13-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(ENTRY_POINTS))
    (info / "RECORD").write_text("")


def test_plugin_codec_and_transport_from_entry_points(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    _make_distribution(site)
    # A pipe name on Windows (no backslashes there), else a socket path.
    address = f"ipcbus-test-{uuid.uuid4().hex}" if sys.platform == "win32" else str(tmp_path / "plugin.sock")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, address, str(site)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "OK"
    assert "broken codec:" in proc.stdout and "DoesNotExist" in proc.stdout
    assert "broken transport:" in proc.stdout
    # This process never saw the distribution.
    with pytest.raises(ipcbus.CodecError, match="unknown codec 'rot13'"):
        get_codec("rot13")
