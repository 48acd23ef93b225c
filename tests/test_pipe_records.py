"""The pipe transport's record layer (sans-IO, portable) and its refusal
off Windows. The Windows side runs in tests/test_windows.py."""

from __future__ import annotations

import struct
import sys

import pytest

import ipcbus
from ipcbus.transports._pipe import RECORD, TAG_DATA, RecordReader, build_records, pipe_path


def test_records_round_trip_byte_at_a_time() -> None:
    chunks = [b"hello", b"x" * 70000, b"!"]
    wire = b"".join(build_records(c, (), None) for c in chunks)
    reader = RecordReader()
    out = bytearray()
    for i in range(len(wire)):
        reader.feed(wire[i : i + 1])
        while (got := reader.take(1 << 20, 16)) is not None:
            data, fds = got
            assert fds == [] and data
            out += data
    assert bytes(out) == b"".join(chunks)
    assert reader.at_eof() == []


def test_take_respects_max_bytes() -> None:
    reader = RecordReader()
    reader.feed(build_records(b"abcdef", (), None))
    assert reader.take(4, 0) == (b"abcd", [])
    assert reader.take(4, 0) == (b"ef", [])
    assert reader.take(4, 0) is None


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (b"\x07\x00\x00\x00\x01x", "record tag"),
        (RECORD.pack(TAG_DATA, 0), "empty data record"),
        (struct.pack(">BI", 1, 10**8), "handle record of"),
    ],
)
def test_bad_records_are_protocol_errors(wire: bytes, match: str) -> None:
    reader = RecordReader()
    reader.feed(wire)
    with pytest.raises(ipcbus.ProtocolError, match=match):
        reader.take(1024, 16)


def test_eof_inside_a_record_is_a_protocol_error() -> None:
    reader = RecordReader()
    reader.feed(RECORD.pack(TAG_DATA, 10) + b"abc")
    assert reader.take(1024, 16) == (b"abc", [])
    with pytest.raises(ipcbus.ProtocolError, match="EOF inside a record"):
        reader.at_eof()


def test_pipe_names() -> None:
    assert pipe_path("bus") == "\\\\.\\pipe\\bus"
    assert pipe_path("\\\\.\\pipe\\bus") == "\\\\.\\pipe\\bus"
    with pytest.raises(ipcbus.TransportError, match="needs a name"):
        pipe_path("")


def test_handles_need_the_peer_pid() -> None:
    with pytest.raises(ipcbus.HandleError, match="pid is not known"):
        build_records(b"x", [3], None)


@pytest.mark.skipif(sys.platform == "win32", reason="checks the refusal off Windows")
def test_pipe_urls_fail_clearly_off_windows() -> None:
    with pytest.raises(ipcbus.TransportError, match="only on Windows"):
        ipcbus.listen("pipe://bus")
    with pytest.raises(ipcbus.TransportError, match="only on Windows"):
        ipcbus.connect("pipe://bus")
