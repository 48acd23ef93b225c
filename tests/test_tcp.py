"""The tcp:// transport: addresses, the authentication rules, TLS (with a CA
made here), heartbeats against stopped and killed peers, volume and many
concurrent clients. Everything runs on loopback with real sockets and real
processes."""

from __future__ import annotations

import datetime
import logging
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import ipcbus
from ipcbus import _protocol as proto
from ipcbus._channel import Channel
from ipcbus.codecs import get_codec
from ipcbus.transports import get_transport
from ipcbus.transports._tcp import TlsStream, format_address, parse_address

KEY = b"test-shared-key"
ROOT = Path(__file__).resolve().parent.parent


def _serve_echo(listener: ipcbus.Listener, n: int = 1, **kw) -> tuple[threading.Thread, list]:
    """Accept ``n`` channels in a thread, echo each until EOF; errors land in the list."""
    errors: list[BaseException] = []

    def run() -> None:
        threads = []
        for _ in range(n):
            try:
                ch = listener.accept(timeout=20)
            except BaseException as exc:
                errors.append(exc)
                return
            t = threading.Thread(target=_echo, args=(ch, errors))
            t.start()
            threads.append(t)
        for t in threads:
            t.join(60)

    t = threading.Thread(target=run)
    t.start()
    return t, errors


def _echo(ch: Channel, errors: list) -> None:
    try:
        with ch:
            while True:
                try:
                    msg = ch.recv(timeout=30)
                except ipcbus.ChannelClosed:
                    return
                ch.send(msg.data)
    except BaseException as exc:
        errors.append(exc)


def _child(code: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=full_env,
    )


def _finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"child did not finish; stderr:\n{err.decode()}") from None
    return out.decode(), err.decode()


# ------------------------------------------------------------------ addresses


def test_parse_and_format_addresses():
    assert parse_address("127.0.0.1:80") == ("127.0.0.1", 80)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("localhost:65535") == ("localhost", 65535)
    assert format_address("::1", 5) == "tcp://[::1]:5"
    assert format_address("10.0.0.1", 5) == "tcp://10.0.0.1:5"
    for bad in ("127.0.0.1", ":80", "::1:80", "[::1]80", "host:x", "host:70000", "[::1"):
        with pytest.raises(ipcbus.TransportError):
            parse_address(bad)


def test_port_zero_reports_real_port_and_roundtrips():
    with ipcbus.listen("tcp://127.0.0.1:0", authkey=KEY) as listener:
        host, port = parse_address(listener.address[len("tcp://") :])
        assert host == "127.0.0.1" and port != 0
        server, errors = _serve_echo(listener)
        with ipcbus.connect(listener.address, authkey=KEY) as ch:
            assert ch.transport == "tcp" and ch.authenticated
            sock = ch.stream.socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            ch.send({"a": [1, 2, 3]})
            assert ch.recv(timeout=10).data == {"a": [1, 2, 3]}
        server.join(30)
    assert not errors


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_ipv6_loopback():
    with ipcbus.listen("tcp://[::1]:0", authkey=KEY) as listener:
        assert listener.address.startswith("tcp://[::1]:")
        server, errors = _serve_echo(listener)
        with ipcbus.connect(listener.address, authkey=KEY) as ch:
            ch.send("over v6")
            assert ch.recv(timeout=10).data == "over v6"
        server.join(30)
    assert not errors


def test_handles_are_refused():
    with ipcbus.listen("tcp://127.0.0.1:0", authkey=KEY) as listener:
        server, errors = _serve_echo(listener)
        with ipcbus.connect(listener.address, authkey=KEY) as ch:
            assert not ch.can_send_handles
            a, b = socket.socketpair()
            with a, b, pytest.raises(ipcbus.HandleError, match="tcp"):
                ch.send("x", handle=a)
            with pytest.raises(ipcbus.HandleError, match="tcp"):
                ch.stream.send(b"x", [0])
            ch.send("still fine")
            assert ch.recv(timeout=10).data == "still fine"
        server.join(30)
    assert not errors


def test_listener_close_wakes_a_blocked_accept():
    listener = ipcbus.listen("tcp://127.0.0.1:0", authkey=KEY)
    caught: list[BaseException] = []

    def run() -> None:
        try:
            listener.accept()
        except BaseException as exc:
            caught.append(exc)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.2)
    listener.close()
    t.join(10)
    assert not t.is_alive()
    assert isinstance(caught[0], ipcbus.TransportError)


# -------------------------------------------------------------- authentication


def test_no_key_refuses_to_start():
    with pytest.raises(ipcbus.TransportError, match="authkey"):
        ipcbus.listen("tcp://127.0.0.1:0")
    with pytest.raises(ipcbus.TransportError, match="authkey"):
        ipcbus.connect("tcp://127.0.0.1:1")
    # The opt-out is for loopback only.
    for host in ("0.0.0.0", "[::]"):
        with pytest.raises(ipcbus.TransportError, match="loopback"):
            ipcbus.listen(f"tcp://{host}:0", allow_unauthenticated=True)
    with pytest.raises(ipcbus.TransportError, match="loopback"):
        ipcbus.connect("tcp://192.0.2.1:9", allow_unauthenticated=True)


def test_loopback_opt_out_works_and_refuses_pickle():
    with pytest.raises(ipcbus.CodecError, match="pickle"):
        ipcbus.listen("tcp://127.0.0.1:0", codec="pickle", allow_unauthenticated=True)
    with ipcbus.listen("tcp://localhost:0", allow_unauthenticated=True) as listener:
        server, errors = _serve_echo(listener)
        with ipcbus.connect(listener.address, allow_unauthenticated=True) as ch:
            assert not ch.authenticated
            ch.send("plain")
            assert ch.recv(timeout=10).data == "plain"
        server.join(30)
    assert not errors
    # pickle is allowed once the channel is authenticated
    with ipcbus.listen("tcp://127.0.0.1:0", authkey=KEY, codec="pickle") as listener:
        server, errors = _serve_echo(listener)
        with ipcbus.connect(listener.address, authkey=KEY, codec="pickle") as ch:
            ch.send({1, 2, 3})
            assert ch.recv(timeout=10).data == {1, 2, 3}
        server.join(30)
    assert not errors


def test_wrong_key_fails_on_both_sides_and_is_logged(caplog):
    caplog.set_level(logging.WARNING, logger="ipcbus")
    with ipcbus.listen("tcp://127.0.0.1:0", authkey=KEY) as listener:
        got: list = []

        def run() -> None:
            with listener.accept(timeout=20) as ch:
                try:
                    got.append(ch.recv(timeout=20))
                except BaseException as exc:
                    got.append(exc)

        t = threading.Thread(target=run)
        t.start()
        with pytest.raises(ipcbus.AuthenticationError, match="authentication failed"):
            ipcbus.connect(listener.address, authkey=b"not the key")
        t.join(30)
    assert len(got) == 1 and isinstance(got[0], ipcbus.AuthenticationError), got
    warnings = [r.getMessage() for r in caplog.records if r.name == "ipcbus"]
    assert any("authentication failed with tcp peer 127.0.0.1:" in w for w in warnings), warnings


def test_key_on_one_side_only_is_an_authentication_error():
    with ipcbus.listen("tcp://127.0.0.1:0", authkey=KEY) as listener:
        server, errors = _serve_echo(listener)
        with pytest.raises(ipcbus.AuthenticationError, match="key"):
            ipcbus.connect(listener.address, allow_unauthenticated=True)
        server.join(30)
    assert len(errors) == 1 and isinstance(errors[0], ipcbus.AuthenticationError)


def _hello(nonce: bytes) -> bytes:
    name = b"msgpack"
    body = bytes([len(name)]) + name + struct.pack(">I", 1 << 20) + bytes([len(nonce)]) + nonce
    return proto.HELLO.pack(proto.MAGIC, proto.VERSION, proto.HELLO_FLAG_AUTH, len(body), 4242) + body


def _read_hello(sock: socket.socket) -> bytes:
    head = _recv_exactly(sock, proto.HELLO.size)
    _m, _v, _f, body_len, _pid = proto.HELLO.unpack(head)
    return head + _recv_exactly(sock, body_len)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return buf


def _recv_all(sock: socket.socket) -> bytes:
    buf = b""
    while chunk := sock.recv(65536):
        buf += chunk
    return buf


def test_server_reads_no_frame_from_a_client_that_fails_auth(caplog):
    """A raw client sends a hello, a bogus proof and then an application
    frame in one write: the server fails the proof, logs it, delivers
    nothing, and closes."""
    caplog.set_level(logging.WARNING, logger="ipcbus")
    data_frame = get_codec("msgpack").encode({"smuggled": True})
    data_frame = proto.FRAME.pack(len(data_frame), proto.FRAME_DATA, 0, 0) + data_frame
    bogus = proto.FRAME.pack(32, proto.FRAME_AUTH, 0, 0) + bytes(32)
    with ipcbus.listen("tcp://127.0.0.1:0", authkey=KEY) as listener:
        host, port = parse_address(listener.address[6:])
        with socket.create_connection((host, port), timeout=10) as raw:
            raw.sendall(_hello(os.urandom(32)) + bogus + data_frame)
            with listener.accept(timeout=10) as ch:
                with pytest.raises(ipcbus.AuthenticationError):
                    ch.recv(timeout=10)
                assert ch.closed
            # The server wrote its hello and its own proof, then closed.
            server_bytes = _read_hello(raw)
            assert server_bytes[:4] == proto.MAGIC
            rest = _recv_all(raw)
            assert rest[: proto.FRAME.size] == proto.FRAME.pack(32, proto.FRAME_AUTH, 0, 0)
            assert len(rest) == proto.FRAME.size + 32
    assert any("authentication failed" in r.getMessage() for r in caplog.records)


def test_client_holds_application_frames_until_the_server_proves_the_key():
    """A client that sends right away: its messages never reach a server
    that has not authenticated; only the hello and the client's proof do."""
    tcp = get_transport("tcp")
    with socket.create_server(("127.0.0.1", 0)) as server_sock:
        port = server_sock.getsockname()[1]
        stream = tcp.connect(f"127.0.0.1:{port}")
        raw, _ = server_sock.accept()
        with raw:
            raw.settimeout(10)
            ch = Channel._open(stream, "client", authkey=KEY)
            try:
                ch.send({"secret": 1})
                ch.flush(timeout=5)
                client_hello = _read_hello(raw)
                assert client_hello[5] & proto.HELLO_FLAG_AUTH
                raw.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    raw.recv(1)  # nothing after the hello: the message is held
                raw.settimeout(10)
                raw.sendall(_hello(os.urandom(32)) + proto.FRAME.pack(32, proto.FRAME_AUTH, 0, 0) + bytes(32))
                with pytest.raises(ipcbus.AuthenticationError):
                    ch.wait_handshake(timeout=10)
            finally:
                ch.close()
            rest = _recv_all(raw)
            # Exactly the client's proof, then EOF: never the held message.
            assert rest[: proto.FRAME.size] == proto.FRAME.pack(32, proto.FRAME_AUTH, 0, 0)
            assert len(rest) == proto.FRAME.size + 32


def test_a_peer_that_echoes_our_nonce_is_refused():
    """Two "peer" ends compute the same proof; echoing our nonce would let a
    peer reflect our proof back. The core refuses it."""
    codec = get_codec("msgpack")
    nonce = os.urandom(proto.NONCE_SIZE)
    conn = proto.Connection(codec, pid=1, can_carry_handles=False, authkey=KEY, nonce=nonce, role="peer")
    conn.receive_data(_hello(nonce))
    with pytest.raises(ipcbus.AuthenticationError, match="echoed"):
        conn.next_event()


# ------------------------------------------------------------------------- TLS


def _make_pki(tmp: Path) -> dict[str, Path]:
    x509 = pytest.importorskip("cryptography.x509", reason="the cryptography package is needed to make a test CA")
    import ipaddress

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def write(path: Path, cert: x509.Certificate, k: ec.EllipticCurvePrivateKey | None) -> None:
        data = cert.public_bytes(serialization.Encoding.PEM)
        if k is not None:
            data += k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        path.write_bytes(data)

    def ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False)
            .sign(k, hashes.SHA256())
        )
        return cert, k

    def leaf(cn: str, issuer: tuple, usage, sans: list) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer[0].subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(issuer[1], hashes.SHA256()), k

    root = ca("ipcbus test CA")
    other = ca("some other CA")
    server = leaf(
        "ipcbus test server", root, ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client = leaf("worker-7", root, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    paths = {n: tmp / f"{n}.pem" for n in ("ca", "other_ca", "server", "client")}
    write(paths["ca"], root[0], None)
    write(paths["other_ca"], other[0], None)
    write(paths["server"], *server)
    write(paths["client"], *client)
    return paths


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return _make_pki(tmp_path_factory.mktemp("pki"))


def _server_ctx(pki: dict[str, Path], *, mutual: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server"])
    if mutual:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki["ca"])
    return ctx


def _client_ctx(pki: dict[str, Path], *, ca: str = "ca", cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki[ca]))
    if cert:
        ctx.load_cert_chain(pki["client"])
    return ctx


def test_tls_roundtrip(pki):
    with ipcbus.listen("tcp://127.0.0.1:0", authkey=KEY, ssl_context=_server_ctx(pki)) as listener:
        server, errors = _serve_echo(listener)
        with ipcbus.connect(listener.address, authkey=KEY, ssl_context=_client_ctx(pki)) as ch:
            assert isinstance(ch.stream, TlsStream)
            assert ch.stream.tls_version in ("TLSv1.2", "TLSv1.3")
            assert ch.authenticated
            for i in range(200):  # enough to cross several TLS records and writes
                ch.send({"i": i, "pad": "x" * 500})
            for i in range(200):
                assert ch.recv(timeout=10).data["i"] == i
            big = os.urandom(3 * 1024 * 1024)
            ch.send(big)
            assert ch.recv(timeout=30).data == big
        server.join(30)
    assert not errors


def test_mutual_tls(pki):
    ctx = _server_ctx(pki, mutual=True)
    with ipcbus.listen("tcp://127.0.0.1:0", authkey=KEY, ssl_context=ctx) as listener:
        seen: list = []

        def run() -> None:
            with listener.accept(timeout=20) as ch:
                seen.append(ch.stream.peer_certificate())
                ch.send(ch.recv(timeout=10).data)

        t = threading.Thread(target=run)
        t.start()
        # Without a client certificate the server refuses the handshake...
        with pytest.raises(ipcbus.IPCError), ipcbus.connect(
            listener.address, authkey=KEY, ssl_context=_client_ctx(pki)
        ) as bad:
            bad.send("x")
            bad.recv(timeout=10)
        # ...and the accept loop hands out the next, good peer.
        ch = ipcbus.connect(listener.address, authkey=KEY, ssl_context=_client_ctx(pki, cert=True))
        with ch:
            ch.send("mutual")
            assert ch.recv(timeout=10).data == "mutual"
        t.join(30)
    subject = dict(item[0] for item in seen[0]["subject"])
    assert subject["commonName"] == "worker-7"


def test_tls_client_trusting_another_ca_fails(pki, caplog):
    caplog.set_level(logging.WARNING)
    with ipcbus.listen("tcp://127.0.0.1:0", authkey=KEY, ssl_context=_server_ctx(pki)) as listener:
        server, errors = _serve_echo(listener)
        with pytest.raises(ipcbus.HandshakeError, match="certificate verif"):
            ipcbus.connect(listener.address, authkey=KEY, ssl_context=_client_ctx(pki, ca="other_ca"))
        with pytest.raises(ipcbus.HandshakeError, match="certificate verif"):
            # the right CA, but the certificate does not name this host
            ipcbus.connect(
                listener.address, authkey=KEY, ssl_context=_client_ctx(pki), server_hostname="example.com"
            )
        with ipcbus.connect(listener.address, authkey=KEY, ssl_context=_client_ctx(pki)) as ch:
            ch.send(1)
            assert ch.recv(timeout=10).data == 1
        server.join(30)
    assert not errors
    assert any("TLS handshake" in r.getMessage() for r in caplog.records)


def test_plain_client_to_tls_listener_fails(pki):
    with ipcbus.listen("tcp://127.0.0.1:0", authkey=KEY, ssl_context=_server_ctx(pki)) as listener:
        server, errors = _serve_echo(listener)  # accept() drives the TLS handshakes
        with pytest.raises(ipcbus.IPCError):
            ipcbus.connect(listener.address, authkey=KEY, handshake_timeout=20)
        with ipcbus.connect(listener.address, authkey=KEY, ssl_context=_client_ctx(pki)) as ch:
            ch.send("tls")
            assert ch.recv(timeout=10).data == "tls"
        server.join(30)
    assert not errors


def test_silent_peer_does_not_stall_tls_accept(pki, caplog):
    """A peer that connects and never speaks TLS: accept() still hands out
    the next peer, and the silent one is dropped after the TLS timeout."""
    caplog.set_level(logging.WARNING)
    ctx = _server_ctx(pki)
    with ipcbus.listen("tcp://127.0.0.1:0", authkey=KEY, ssl_context=ctx, tls_handshake_timeout=0.5) as listener:
        host, port = parse_address(listener.address[6:])
        with socket.create_connection((host, port), timeout=10) as silent:
            server, errors = _serve_echo(listener)
            with ipcbus.connect(listener.address, authkey=KEY, ssl_context=_client_ctx(pki)) as ch:
                ch.send("past the silent one")
                assert ch.recv(timeout=10).data == "past the silent one"
            server.join(30)
            assert not errors
            # Dropped by the server once its timeout passed (it runs while
            # accept() waits): the silent socket then reads EOF.
            with pytest.raises(TimeoutError):
                listener.accept(timeout=1.0)
            silent.settimeout(10)
            assert silent.recv(1) == b""
    assert any("did not finish" in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------------- volume


def test_100k_messages_in_order_between_processes():
    n = 100_000
    with ipcbus.listen("tcp://127.0.0.1:0", authkey=KEY) as listener:
        proc = _child(
            f"""
            import os, ipcbus
            ch = ipcbus.connect({listener.address!r}, authkey=os.environ["IPCBUS_TEST_KEY"].encode())
            for i in range({n}):
                ch.send({{"i": i, "s": "payload"}})
            # the reverse direction too: echo what the parent sends
            for msg in ch:
                ch.send(msg.data)
            ch.close()
            """,
            {"IPCBUS_TEST_KEY": KEY.decode()},
        )
        try:
            with listener.accept(timeout=30) as ch:
                for i in range(n):
                    msg = ch.recv(timeout=30)
                    assert msg.data == {"i": i, "s": "payload"}, (i, msg.data)
                sender = threading.Thread(target=lambda: [ch.send(j) for j in range(n)])
                sender.start()
                for j in range(n):
                    assert ch.recv(timeout=30).data == j
                sender.join(30)
        finally:
            _out, err = _finish(proc)
    assert proc.returncode == 0, err


def test_200_concurrent_clients():
    clients, per_proc, msgs = 200, 100, 100
    with ipcbus.listen("tcp://127.0.0.1:0", authkey=KEY) as listener:
        server, errors = _serve_echo(listener, clients)
        code = f"""
            import os, sys, threading, ipcbus
            key = os.environ["IPCBUS_TEST_KEY"].encode()
            base = int(sys.argv[1]) if len(sys.argv) > 1 else 0
            ok = []
            def client(c):
                with ipcbus.connect({listener.address!r}, authkey=key, timeout=30, handshake_timeout=30) as ch:
                    for i in range({msgs}):
                        ch.send({{"c": c, "i": i}})
                    for i in range({msgs}):
                        m = ch.recv(timeout=30).data
                        assert m == {{"c": c, "i": i}}, m
                ok.append(c)
            ts = [threading.Thread(target=client, args=(c,)) for c in range({per_proc})]
            for t in ts: t.start()
            for t in ts: t.join()
            print(len(ok))
        """
        procs = [_child(code, {"IPCBUS_TEST_KEY": KEY.decode()}) for _ in range(clients // per_proc)]
        results = [_finish(p, 90) for p in procs]
        server.join(60)
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
        assert out.strip() == str(per_proc), (out, err)
    assert not errors, errors[:3]


# ----------------------------------------------------------------- heartbeat


# Pings go out every HEARTBEAT / 4 s: a false alarm would need the peer's
# heartbeat thread to stall for the whole period.
HEARTBEAT = 1.5


@pytest.mark.posix("SIGSTOP/SIGCONT to freeze the peer")
def test_heartbeat_detects_a_stopped_peer():
    """The peer never reads; its heartbeat pings keep the channel alive.
    SIGSTOP makes it silent with the TCP connection still open (half-open
    from our side's view): recv raises HeartbeatTimeout, not a timeout."""
    with ipcbus.listen("tcp://127.0.0.1:0", authkey=KEY, heartbeat=HEARTBEAT) as listener:
        proc = _child(
            f"""
            import os, sys, time, ipcbus
            ch = ipcbus.connect({listener.address!r}, authkey=os.environ["IPCBUS_TEST_KEY"].encode(),
                                heartbeat={HEARTBEAT})
            ch.send("ready")
            time.sleep(120)
            """,
            {"IPCBUS_TEST_KEY": KEY.decode()},
        )
        try:
            with listener.accept(timeout=30) as ch:
                assert ch.recv(timeout=30).data == "ready"
                # Alive and idle for two heartbeat periods: only pings flow.
                with pytest.raises(TimeoutError) as info:
                    ch.recv(timeout=2 * HEARTBEAT)
                assert not isinstance(info.value, ipcbus.IPCError)
                assert not ch.closed
                os.kill(proc.pid, signal.SIGSTOP)
                with pytest.raises(ipcbus.HeartbeatTimeout):
                    ch.recv(timeout=60)
                assert ch.closed
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            _finish(proc)


@pytest.mark.posix("SIGKILL (Windows has no such signal)")
def test_killed_peer_is_an_end_of_stream():
    with ipcbus.listen("tcp://127.0.0.1:0", authkey=KEY, heartbeat=HEARTBEAT) as listener:
        proc = _child(
            f"""
            import os, time, ipcbus
            ch = ipcbus.connect({listener.address!r}, authkey=os.environ["IPCBUS_TEST_KEY"].encode(),
                                heartbeat={HEARTBEAT})
            ch.send("ready")
            time.sleep(120)
            """,
            {"IPCBUS_TEST_KEY": KEY.decode()},
        )
        try:
            with listener.accept(timeout=30) as ch:
                assert ch.recv(timeout=30).data == "ready"
                proc.send_signal(signal.SIGKILL)
                with pytest.raises(ipcbus.ChannelClosed):
                    ch.recv(timeout=60)
        finally:
            proc.kill()
            _finish(proc)


def test_heartbeat_value_is_checked():
    for bad in (0, -1, "1"):
        with pytest.raises(ValueError, match="heartbeat"):
            ipcbus.listen("tcp://127.0.0.1:0", authkey=KEY, heartbeat=bad)


# ---------------------------------------------------------------------- trio


def test_trio_tcp_and_tls(pki):
    trio = pytest.importorskip("trio")
    import ipcbus.trio

    async def exchange(server_opts: dict, client_opts: dict) -> None:
        async with await ipcbus.trio.listen("tcp://127.0.0.1:0", authkey=KEY, **server_opts) as listener:

            async def serve() -> None:
                ch = await listener.accept()
                async with ch:
                    async for msg in ch:
                        await ch.send(msg.data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                with trio.fail_after(30):
                    ch = await ipcbus.trio.connect(listener.address, authkey=KEY, **client_opts)
                    async with ch:
                        assert ch.authenticated
                        for i in range(1000):
                            await ch.send({"i": i})
                        for i in range(1000):
                            assert (await ch.recv()).data == {"i": i}
                        with pytest.raises(ipcbus.HandleError, match="tcp"):
                            a, b = socket.socketpair()
                            with a, b:
                                await ch.send("x", handle=a)

    async def main() -> None:
        await exchange({}, {})
        await exchange({"ssl_context": _server_ctx(pki, mutual=True)},
                       {"ssl_context": _client_ctx(pki, cert=True)})

    trio.run(main)


def test_trio_authentication_rules(pki):
    trio = pytest.importorskip("trio")
    import ipcbus.trio

    async def main() -> None:
        with pytest.raises(ipcbus.TransportError, match="authkey"):
            await ipcbus.trio.listen("tcp://127.0.0.1:0")
        with pytest.raises(ipcbus.TransportError, match="loopback"):
            await ipcbus.trio.listen("tcp://0.0.0.0:0", allow_unauthenticated=True)
        async with await ipcbus.trio.listen("tcp://127.0.0.1:0", authkey=KEY) as listener:
            got: list = []

            async def serve() -> None:
                ch = await listener.accept()
                async with ch:
                    try:
                        got.append(await ch.recv())
                    except ipcbus.IPCError as exc:
                        got.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                with trio.fail_after(30), pytest.raises(ipcbus.AuthenticationError):
                    await ipcbus.trio.connect(listener.address, authkey=b"wrong")
            assert isinstance(got[0], ipcbus.AuthenticationError)
        # A TLS client that trusts another CA fails at connect.
        async with await ipcbus.trio.listen(
            "tcp://127.0.0.1:0", authkey=KEY, ssl_context=_server_ctx(pki)
        ) as listener:

            async def serve_one() -> None:
                ch = await listener.accept()
                async with ch:
                    with pytest.raises(ipcbus.IPCError):
                        await ch.recv()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_one)
                with trio.fail_after(30), pytest.raises(ipcbus.HandshakeError, match="certificate verif"):
                    await ipcbus.trio.connect(
                        listener.address, authkey=KEY, ssl_context=_client_ctx(pki, ca="other_ca")
                    )

    trio.run(main)


@pytest.mark.posix("SIGSTOP/SIGCONT to freeze the peer")
def test_trio_heartbeat_detects_a_stopped_peer():
    trio = pytest.importorskip("trio")
    import ipcbus.trio

    async def main() -> None:
        async with await ipcbus.trio.listen("tcp://127.0.0.1:0", authkey=KEY, heartbeat=HEARTBEAT) as listener:
            proc = _child(
                f"""
                import os, time, ipcbus
                ch = ipcbus.connect({listener.address!r}, authkey=os.environ["IPCBUS_TEST_KEY"].encode(),
                                    heartbeat={HEARTBEAT})
                ch.send("ready")
                time.sleep(120)
                """,
                {"IPCBUS_TEST_KEY": KEY.decode()},
            )
            try:
                with trio.fail_after(30):
                    ch = await listener.accept()
                async with ch:
                    with trio.fail_after(30):
                        assert (await ch.recv()).data == "ready"
                    with trio.move_on_after(2 * HEARTBEAT) as idle:
                        await ch.recv()  # only pings flow: nothing to return
                    assert idle.cancelled_caught and not ch.closed
                    os.kill(proc.pid, signal.SIGSTOP)
                    with trio.fail_after(60), pytest.raises(ipcbus.HeartbeatTimeout):
                        await ch.recv()
            finally:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                _finish(proc)

    trio.run(main)
