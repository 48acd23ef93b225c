"""The value ``recv()`` returns."""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["Message"]


class Message(NamedTuple):
    """One received message: ``data, handle = channel.recv()``.

    ``data`` is the decoded value. ``handle`` is None, the one object the
    sender passed as ``handle=``, or a tuple of objects when it passed
    ``handles=[...]``. Received handles are owned by the receiver: close them
    (or use them as context managers) when done.
    """

    data: Any
    handle: Any = None

    @property
    def handles(self) -> tuple[Any, ...]:
        """Every handle the message carried, as a tuple (possibly empty)."""
        h = self.handle
        if h is None:
            return ()
        if type(h) is tuple:
            return h
        return (h,)
