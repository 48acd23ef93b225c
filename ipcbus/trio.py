"""The trio API of ipcbus: the blocking API's names, ``async``.

::

    import ipcbus.trio

    ch = await ipcbus.trio.connect("unix:///run/app/bus.sock")
    async with ch:
        await ch.send({"cmd": "hello"})
        async for msg in ch:
            ...

Every ``async`` function here is a trio checkpoint. For bulk traffic use
``send_nowait`` / ``recv_nowait`` (they raise ``trio.WouldBlock`` when the
buffer is full / empty) and fall back to ``await send`` / ``await recv``.
"""

from __future__ import annotations

from ._trio_channel import AsyncChannel as AsyncChannel
from ._trio_channel import AsyncListener as AsyncListener
from ._trio_channel import connect as connect
from ._trio_channel import listen as listen
from ._trio_channel import pair as pair
from ._trio_process import AsyncChildProcess as AsyncChildProcess
from ._trio_process import exec as exec
from ._trio_process import exec_file as exec_file
from ._trio_process import fork as fork
from ._trio_process import parent as parent
from ._trio_process import spawn as spawn
from ._trio_process import wait_any as wait_any
from ._trio_process import wait_children as wait_children

__all__ = [
    "AsyncChannel",
    "AsyncChildProcess",
    "AsyncListener",
    "connect",
    "exec",
    "exec_file",
    "fork",
    "listen",
    "pair",
    "parent",
    "spawn",
    "wait_any",
    "wait_children",
]
