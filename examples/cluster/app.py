"""The HTTP application the cluster example serves (no I/O here).

Shared by the cluster worker and by the gunicorn peer in
``benchmarks/bench_cluster.py``, so both serve the same bytes.

Routes:
    ``/``            ``{"pid": N}``: which worker answered
    ``/fib?n=25``    CPU-bound: the n-th Fibonacci number, computed naively
    ``/sleep?s=1``   answered after ``s`` seconds (the worker schedules it)
    ``/block``       debug: blocks the worker's loop forever (heartbeats stop)
    ``/crash``       debug: an uncaught exception ends the worker
"""

from __future__ import annotations

import json
import os
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "MAX_FIB",
    "MAX_SLEEP",
    "Response",
    "fib",
    "parse_target",
    "respond",
    "sleep_seconds",
    "slept",
    "wsgi_app",
]

# Bounds keep one request from occupying a worker for minutes.
MAX_FIB = 32
MAX_SLEEP = 30.0

Response = tuple[int, list[tuple[bytes, bytes]], bytes]


def fib(n: int) -> int:
    """The n-th Fibonacci number, deliberately by naive recursion (CPU load)."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def parse_target(target: str) -> tuple[str, dict[str, str]]:
    """Split a request target into its path and its first query values."""
    parts = urlsplit(target)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    return parts.path or "/", query


def _json(status: int, value: object) -> Response:
    body = json.dumps(value).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return status, headers, body


def respond(path: str, query: dict[str, str]) -> Response:
    """The response for a plain route (``/``, ``/fib``, or a 404/400).

    The worker handles the debug routes (``/sleep``, ``/block``, ``/crash``)
    itself, since they act on its loop rather than produce a body.
    """
    if path == "/":
        return _json(200, {"pid": os.getpid()})
    if path == "/fib":
        try:
            n = int(query.get("n", "25"))
        except ValueError:
            return _json(400, {"error": "n must be an integer"})
        if not 0 <= n <= MAX_FIB:
            return _json(400, {"error": f"n must be between 0 and {MAX_FIB}"})
        return _json(200, {"pid": os.getpid(), "n": n, "fib": fib(n)})
    return _json(404, {"error": "not found", "path": path})


def sleep_seconds(query: dict[str, str]) -> float | None:
    """The delay ``/sleep?s=`` asks for, or None when it is invalid."""
    try:
        s = float(query.get("s", "1"))
    except ValueError:
        return None
    return s if 0 <= s <= MAX_SLEEP else None


def slept(seconds: float) -> Response:
    """The response ``/sleep`` sends when its delay is over."""
    return _json(200, {"pid": os.getpid(), "slept": seconds})


def wsgi_app(environ: dict, start_response) -> list[bytes]:  # type: ignore[type-arg]
    """The same plain routes as a WSGI application (the gunicorn peer)."""
    path = environ.get("PATH_INFO") or "/"
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    status, headers, body = respond(path, query)
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
    start_response(f"{status} {reason}", [(k.decode(), v.decode()) for k, v in headers])
    return [body]
