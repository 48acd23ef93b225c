"""Codecs: how a message's value becomes bytes on the wire and back.

A codec is any object with a ``name``, an ``encode(value) -> bytes`` and a
``decode(data) -> value`` (the :class:`Codec` protocol). Codecs are looked up
by name in a registry that holds *factories*, so that each channel gets its
own instance (a codec may keep per-channel state, such as a reusable packer,
and need not be thread-safe).

Built-in codecs: ``msgpack`` (the default), ``json``, ``pickle`` (trusted
peers only) and ``raw`` (bytes in, bytes out). Third parties add codecs with
:func:`register_codec`, or with an entry point in the group ``ipcbus.codecs``
whose object is a codec factory (a class or a zero-argument callable)::

    [project.entry-points."ipcbus.codecs"]
    cbor = "mypkg.codec:CBORCodec"
"""

from __future__ import annotations

import functools
import json
import math
import pickle
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import msgpack

from ._errors import CodecError
from ._fastpath import msgpack_pack, msgpack_unpackb, msgpack_values

if TYPE_CHECKING:
    from importlib import metadata

__all__ = [
    "Codec",
    "JSONCodec",
    "MsgpackCodec",
    "PickleCodec",
    "RawCodec",
    "available_codecs",
    "get_codec",
    "register_codec",
]

ENTRY_POINT_GROUP = "ipcbus.codecs"


@runtime_checkable
class Codec(Protocol):
    """The contract every codec keeps.

    ``name`` is what the handshake compares; both ends must use the same.
    ``encode`` turns a value into bytes or raises :class:`CodecError` (never a
    silent lossy conversion). ``decode`` gets a bytes-like object that is only
    valid during the call (copy what you keep) and returns the value, or raises
    :class:`CodecError` for a payload it cannot read. An optional
    ``requires_trust`` attribute, true for codecs whose decoding can run code
    (pickle), makes ipcbus refuse the codec on channels whose peer has not
    been authenticated or inherited.
    """

    name: str

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes | bytearray | memoryview) -> Any: ...


class MsgpackCodec:
    """msgpack with bin/str distinguished; tuples arrive as lists.

    Map keys may be any hashable msgpack type (ints included). A value msgpack
    cannot carry (a set, a datetime, an arbitrary object) is a CodecError.

    With ipcbus's C accelerator, values made only of None, bool, int, float,
    str, bytes, list, tuple and dict are encoded and decoded in C, to exactly
    the bytes and values msgpack gives; msgpack handles every other value
    (ext types, Timestamps, subclasses) and raises the errors.
    """

    name = "msgpack"
    requires_trust = False

    def __init__(self) -> None:
        # A reused Packer is about twice as fast as packb, which builds a new
        # one (and its buffer) on every call; msgpack_pack encodes the common
        # values in C, to the same bytes, in a fraction of that.
        self._pack = msgpack_pack(msgpack.Packer(use_bin_type=True, autoreset=True).pack)
        # (raw=False is msgpack's default; every keyword costs here.)
        self._unpackb = msgpack_unpackb(functools.partial(msgpack.unpackb, strict_map_key=False))

    def encode(self, value: Any) -> bytes:
        try:
            return self._pack(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise CodecError(f"msgpack cannot encode {type(value).__name__}: {exc}") from exc

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        try:
            return self._unpackb(data)
        except Exception as exc:  # msgpack raises several unrelated types
            raise CodecError(f"undecodable msgpack payload ({len(data)} bytes): {exc}") from exc

    def decode_batch(self, data: bytes | bytearray | memoryview) -> list[Any]:
        """Decode back-to-back values (a batch frame).

        Optional codec method: a codec whose encodings are self-delimiting
        provides it, and then many small messages share one frame. Must
        raise CodecError if the data ends inside a value.
        """
        try:
            return list(self._batch_values(data))
        except Exception as exc:  # msgpack raises several unrelated types
            raise CodecError(f"undecodable msgpack batch ({len(data)} bytes): {exc}") from exc

    @staticmethod
    def _batch_values(data: bytes | bytearray | memoryview) -> Iterator[Any]:
        # The values of a batch, decoded as they are asked for (from a copy
        # of data); an error, msgpack's several types of them included, for
        # one that does not decode or is cut short by the end of the data.
        return msgpack_values(data, _values_from)


def _values_from(data: bytes | bytearray | memoryview, offset: int) -> Iterator[Any]:
    # msgpack's decoding of data's values from offset on. Its limits
    # (max_buffer_size and the lengths that follow from it) are the whole
    # data's.
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(data), 1))
    unpacker.feed(memoryview(data)[offset:] if offset else data)
    yield from unpacker
    # The iteration ends quietly inside a value cut short by the end of the
    # data, as at the end of one. Fed one more value, nil, an Unpacker at an
    # end gives exactly None; one inside a value takes the byte into it
    # (and gives a container, a number, bytes or a str, or nothing yet).
    try:
        unpacker.feed(b"\xc0")
        ended = unpacker.unpack() is None
    except Exception:
        ended = False
    if not ended:
        raise ValueError("the data ends inside a value")


def _check_json(value: Any, depth: int = 0) -> None:
    # json.dumps converts non-string keys (1 -> "1") silently; that loses
    # information, so refuse it (tuples becoming arrays is JSON's own model).
    if depth > 500:
        raise CodecError("json: value nested deeper than 500 levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CodecError(f"json cannot carry a {type(key).__name__} map key: {key!r}")
            _check_json(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_json(item, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise CodecError(f"json cannot carry {value!r}")


class JSONCodec:
    """Compact UTF-8 JSON. Never emits NaN or Infinity; bytes, sets, non-string
    keys and other values JSON cannot carry are a CodecError at send."""

    name = "json"
    requires_trust = False

    def __init__(self) -> None:
        # Built once: json.dumps with any option builds a new encoder per call.
        self._dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode

    def encode(self, value: Any) -> bytes:
        _check_json(value)
        try:
            return self._dumps(value).encode("utf-8", "surrogatepass")
        except (TypeError, ValueError) as exc:
            raise CodecError(f"json cannot encode {type(value).__name__}: {exc}") from exc

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        try:
            return json.loads(bytes(data).decode("utf-8", "surrogatepass"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CodecError(f"undecodable json payload ({len(data)} bytes): {exc}") from exc


class PickleCodec:
    """pickle, for trusted peers only: decoding a pickle can run any code.

    Allowed on ``pair()``, forked children and authenticated channels; refused
    on channels from ``listen``/``connect`` that are not authenticated.
    """

    name = "pickle"
    requires_trust = True

    def encode(self, value: Any) -> bytes:
        try:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise CodecError(f"pickle cannot encode {type(value).__name__}: {exc}") from exc

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        try:
            return pickle.loads(data)
        except Exception as exc:  # unpickling can raise anything
            raise CodecError(f"undecodable pickle payload ({len(data)} bytes): {exc}") from exc


class RawCodec:
    """Bytes in, bytes out: the payload is the message."""

    name = "raw"
    requires_trust = False

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise CodecError(f"raw codec carries bytes only, not {type(value).__name__}")
        return bytes(value)

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        return bytes(data)


CodecFactory = Callable[[], Codec]

_registry: dict[str, CodecFactory] = {
    "msgpack": MsgpackCodec,
    "json": JSONCodec,
    "pickle": PickleCodec,
    "raw": RawCodec,
}
_lock = threading.Lock()
_entry_points_loaded = False


def register_codec(name: str, factory: CodecFactory, *, replace: bool = False) -> None:
    """Make ``factory()`` the codec called ``name`` in this process.

    Registering a name that exists is a ValueError unless ``replace=True``.
    """
    if not name or not name.isascii() or len(name) > 64:
        raise ValueError(f"codec name must be 1-64 ASCII characters, not {name!r}")
    with _lock:
        if name in _registry and not replace:
            raise ValueError(f"a codec named {name!r} is already registered")
        _registry[name] = factory


def _load_entry_points() -> None:
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        # Imported here: importlib.metadata pulls in email and socket, and
        # the sans-IO core (which imports this module) must not.
        from importlib import metadata

        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            _registry.setdefault(ep.name, _LazyEntryPoint(ep))


class _LazyEntryPoint:
    # Importing a third-party codec's module only when it is asked for keeps
    # one broken plugin from breaking every channel.
    def __init__(self, ep: metadata.EntryPoint) -> None:
        self._ep = ep

    def __call__(self) -> Codec:
        try:
            factory = self._ep.load()
        except Exception as exc:  # an import can fail in any way
            raise CodecError(
                f"cannot load codec entry point {self._ep.name!r} ({self._ep.value}): {exc}"
            ) from exc
        return factory()


def get_codec(codec: str | Codec) -> Codec:
    """Return a fresh codec instance for ``codec`` (a name), or ``codec`` itself
    if it already is a codec object. Unknown names are a CodecError listing the
    names that exist."""
    if not isinstance(codec, str):
        if not isinstance(codec, Codec):
            raise TypeError(f"not a codec: {codec!r}")
        return codec
    factory = _registry.get(codec)
    if factory is None:
        _load_entry_points()
        factory = _registry.get(codec)
    if factory is None:
        raise CodecError(f"unknown codec {codec!r}; available: {', '.join(available_codecs())}")
    instance = factory()
    if not isinstance(instance, Codec):
        raise CodecError(f"codec factory for {codec!r} returned {instance!r}, not a Codec")
    if instance.name != codec:
        raise CodecError(f"codec registered as {codec!r} calls itself {instance.name!r}")
    return instance


def available_codecs() -> list[str]:
    """The names of every registered codec, entry points included, sorted."""
    _load_entry_points()
    return sorted(_registry)
