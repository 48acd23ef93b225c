"""A remote worker: connects to the master over TCP, runs the jobs it is
given, sends back the results.

    IPCBUS_AUTHKEY=... python examples/remote_workers/worker.py tcp://master-host:9000

The shared key comes from the ``IPCBUS_AUTHKEY`` environment variable (never
from the command line, where ``ps`` would show it). Pass ``--tls-ca FILE``
to connect over TLS, trusting that CA.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys

import ipcbus


def count_primes(limit: int) -> int:
    """The number of primes below ``limit`` (a sieve: some real CPU work)."""
    if limit < 3:
        return 0
    sieve = bytearray([1]) * limit
    sieve[0] = sieve[1] = 0
    for p in range(2, int(limit**0.5) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytes(len(range(p * p, limit, p)))
    return sum(sieve)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="the master's URL, e.g. tcp://127.0.0.1:9000")
    parser.add_argument("--name", default=f"worker-{os.getpid()}")
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument("--tls-ca", help="connect over TLS, trusting this CA file")
    args = parser.parse_args()

    key = os.environ.get("IPCBUS_AUTHKEY")
    if not key:
        print("worker: set IPCBUS_AUTHKEY to the master's key", file=sys.stderr)
        return 2
    options = {}
    if args.tls_ca:
        options["ssl_context"] = ssl.create_default_context(cafile=args.tls_ca)
    # For the tests of this example: crash (no goodbye) on receiving job N.
    crash_at = int(os.environ.get("REMOTE_WORKER_CRASH_AT", "0") or 0)

    with ipcbus.connect(args.address, authkey=key, heartbeat=args.heartbeat, **options) as master:
        master.send({"type": "ready", "name": args.name, "pid": os.getpid()})
        for done, msg in enumerate(master):
            job = msg.data
            if job["type"] == "stop":
                break
            if crash_at and done + 1 == crash_at:
                os._exit(17)
            master.send({"type": "result", "id": job["id"], "value": count_primes(job["limit"])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
