"""``ServerTls``, the gateway's TLS termination, byte for byte against an in-memory client.

No socket and no loop: a real TLS client (``ssl.SSLObject`` over memory buffers, trusting a
trustme CA) talks to it, and every byte between them passes through the test.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trustme
from helpers import trusting

from gaia_gateway.transports.wss import PLAIN_HTTP_ANSWER, ServerTls, TlsFailure

HOST = "gateway.test"


@dataclass
class Pair:
    server: ServerTls
    client: ssl.SSLObject
    c_in: ssl.MemoryBIO  # what the client has received
    c_out: ssl.MemoryBIO  # what the client sends


@pytest.fixture(scope="module")
def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The gateway's context, with a certificate for HOST, and a client's that trusts it."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(server)
    return server, trusting(ca)


def new_pair(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> Pair:
    server_ctx, client_ctx = contexts
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=HOST)
    return Pair(ServerTls(server_ctx), client, c_in, c_out)


def handshake(p: Pair) -> None:
    """Run the handshake to its end, every flight through ``receive``/``outgoing``."""
    for _ in range(10):
        try:
            p.client.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        sent = p.c_out.read()
        if sent:
            assert p.server.receive(sent) == b""
        if p.server.outgoing.pending:
            p.c_in.write(p.server.outgoing.read())
        if done and p.server.established:
            return
    raise AssertionError("the handshake did not finish")


def client_sends(p: Pair, *messages: bytes) -> bytes:
    """The bytes that carry these messages from the client, one TLS record each."""
    for m in messages:
        p.client.write(m)
    return p.c_out.read()


def client_reads(p: Pair) -> bytes:
    got = b""
    try:
        while chunk := p.client.read(65536):
            got += chunk
    except ssl.SSLWantReadError:
        pass
    return got


@pytest.fixture
def pair(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> Iterator[Pair]:
    p = new_pair(contexts)
    handshake(p)
    yield p


def test_handshake_then_data_both_ways(pair: Pair) -> None:
    assert pair.server.ssl_object.version() == "TLSv1.3"
    assert pair.server.receive(client_sends(pair, b"hello")) == b"hello"
    pair.c_in.write(pair.server.send(b"world" * 1000))
    assert client_reads(pair) == b"world" * 1000


def test_records_in_one_chunk_are_joined(pair: Pair) -> None:
    data = client_sends(pair, b"a" * 100, b"b" * 20000, b"c")  # 20000 B: two records
    assert pair.server.receive(data) == b"a" * 100 + b"b" * 20000 + b"c"


def test_records_split_anywhere(pair: Pair) -> None:
    data = client_sends(pair, b"x" * 300, b"y" * 5)
    got = b"".join(pair.server.receive(data[i:i + 7]) for i in range(0, len(data), 7))
    assert got == b"x" * 300 + b"y" * 5


def test_handshake_bytes_one_at_a_time(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    p = new_pair(contexts)
    with pytest.raises(ssl.SSLWantReadError):
        p.client.do_handshake()
    hello = p.c_out.read()
    for i in range(len(hello)):
        assert p.server.receive(hello[i:i + 1]) == b""
    assert p.server.outgoing.pending  # the server's flight, once the ClientHello was whole
    handshake(p)
    assert p.server.receive(client_sends(p, b"ok")) == b"ok"


def test_client_close_notify(pair: Pair) -> None:
    pair.client.write(b"last words")
    with pytest.raises(ssl.SSLWantReadError):  # the client's close_notify, then it waits
        pair.client.unwrap()
    assert pair.server.receive(pair.c_out.read()) == b"last words"
    assert pair.server.eof
    assert pair.server.receive(b"anything after it") == b""


def test_server_close_notify(pair: Pair) -> None:
    pair.c_in.write(pair.server.send(b"bye") + pair.server.close())
    assert client_reads(pair) == b"bye"
    assert pair.client.read(10) == b""  # the close_notify: a clean end of stream


def test_close_before_the_handshake_sends_nothing(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    assert new_pair(contexts).server.close() == b""


@pytest.mark.parametrize("first", [b"GET /ws/experience?token=x HTTP/1.1\r\n", b"O", b"PUT"])
def test_plain_http_gets_a_plain_400(contexts: tuple[ssl.SSLContext, ssl.SSLContext],
                                     first: bytes) -> None:
    with pytest.raises(TlsFailure) as failure:
        new_pair(contexts).server.receive(first)
    assert failure.value.reason == "plain HTTP request on the TLS port"
    assert failure.value.status == 400
    assert failure.value.answer == PLAIN_HTTP_ANSWER
    assert PLAIN_HTTP_ANSWER.startswith(b"HTTP/1.1 400 Bad Request\r\n")


def test_not_tls_fails_with_openssl_reason(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    with pytest.raises(TlsFailure) as failure:
        new_pair(contexts).server.receive(bytes(range(1, 64)))
    assert failure.value.reason == "TLS handshake failed: WRONG_VERSION_NUMBER"
    assert failure.value.status is None


def test_client_refusing_the_certificate(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    p = new_pair(contexts)
    p.client = ssl.create_default_context().wrap_bio(p.c_in, p.c_out, server_hostname=HOST)
    with pytest.raises(ssl.SSLWantReadError):
        p.client.do_handshake()
    assert p.server.receive(p.c_out.read()) == b""
    p.c_in.write(p.server.outgoing.read())
    with pytest.raises(ssl.SSLCertVerificationError):
        p.client.do_handshake()
    with pytest.raises(TlsFailure) as failure:
        p.server.receive(p.c_out.read())  # the client's alert
    assert failure.value.reason == "TLS handshake failed: TLSV1_ALERT_UNKNOWN_CA"


def test_a_tampered_record_fails_with_an_alert(pair: Pair) -> None:
    data = bytearray(client_sends(pair, b"payload"))
    data[-1] ^= 1
    with pytest.raises(TlsFailure) as failure:
        pair.server.receive(bytes(data))
    assert failure.value.reason.startswith("TLS error: ")
    assert "BAD_RECORD_MAC" in failure.value.reason or "DECRYPT" in failure.value.reason
    assert failure.value.answer  # the alert for the peer


def test_bytes_after_a_failure_are_dropped(
        contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    tls = new_pair(contexts).server
    with pytest.raises(TlsFailure):
        tls.receive(b"GET / HTTP/1.1\r\n")
    assert tls.receive(b"Host: a\r\n\r\n") == b""  # the rest of the request: no second failure
    assert tls.eof and not tls.established
