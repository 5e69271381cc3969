"""TLS on the link between servers and a monitor on its own host (``python -m monitor serve
--tls-cert/--tls-key``; servers give ``--monitor-tls-ca`` or ``[execution] tls_ca``).

:class:`TLSConnection` offers what the link uses of :class:`multiprocessing.connection.Connection`
(``send``/``recv`` of pickled messages, ``send_bytes``/``recv_bytes``, ``poll``, ``fileno``,
``close``), so the HMAC challenges of the server's secret (``monitor.process.link_key``) still
run on top: TLS encrypts the queries, probabilities and answers and lets the server check it
reached the monitor its CA names; the key says which servers the monitor serves.

The TLS state is an :class:`ssl.SSLObject` over memory buffers, and this class does the socket
I/O: one thread reads the connection while others send on it (both sides of the link do), and
OpenSSL does not allow one SSL object to be used by two threads at once, which a plain
``SSLSocket`` would do. Every use of the SSL object takes one lock; the socket I/O happens
outside it.
"""
from __future__ import annotations

import pickle
import select
import socket
import ssl
import struct
import threading
from pathlib import Path

_HEADER = struct.Struct("!Q")      # every message: its length, then its bytes
_READ = 1 << 18                    # socket bytes read at once
HANDSHAKE_TIMEOUT_S = 30.0         # a peer that stalls the handshake is dropped after this


class TLSConfigError(ValueError):
    """A certificate, key or CA file that cannot be used (missing, unreadable, not PEM, or a
    key that does not match its certificate)."""


def server_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """The monitor's side: its certificate chain and private key (PEM), TLS 1.2 or later."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot use the certificate {cert} with the key {key}: "
                             f"{_why(exc)}") from None
    return ctx


def client_context(ca: str | Path) -> ssl.SSLContext:
    """A server's side: trusts the CA bundle ``ca`` (PEM) only, and checks that the monitor's
    certificate names the host the server connects to (a DNS name or an IP address in its
    subjectAltName)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)      # verifies the chain and the host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot use the CA bundle {ca}: {_why(exc)}") from None
    return ctx


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)


class TLSConnection:
    """A TLS connection over the connected TCP socket ``sock`` (taken over: closed with this);
    the handshake runs in the constructor (``ssl.SSLError`` when it fails, ``OSError`` or
    ``EOFError`` when the peer goes away). ``server_hostname``: the client's side, the name
    the peer's certificate must hold."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None,
                 timeout: float = HANDSHAKE_TIMEOUT_S):
        self._sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server_side,
                                 server_hostname=server_hostname)
        self._ssl_lock = threading.Lock()    # the SSL object and its buffers
        self._send_lock = threading.Lock()   # outgoing records leave whole and in order
        self._buf = bytearray()              # plaintext received and not yet returned
        self._eof = False
        self._closed = False
        try:
            sock.settimeout(timeout)
            self._handshake()
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise

    # -- TLS over the socket ---------------------------------------------------------------
    def _handshake(self) -> None:
        while True:
            try:
                with self._ssl_lock:
                    self._obj.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                data = self._sock.recv(_READ)
                if not data:
                    raise EOFError("the peer closed the connection during the TLS handshake")
                with self._ssl_lock:
                    self._in.write(data)

    def _flush(self) -> None:
        """Send what the SSL object has written (handshake records, alerts, key updates)."""
        with self._send_lock:
            with self._ssl_lock:
                data = self._out.read()
            if data:
                self._sock.sendall(data)

    def _fill(self, n: int) -> None:
        """Until ``n`` plaintext bytes are buffered (EOFError when the peer closed first)."""
        while len(self._buf) < n:
            if self._eof:
                raise EOFError("the peer closed the connection")
            try:
                with self._ssl_lock:
                    chunk = self._obj.read(max(n - len(self._buf), _READ))
                if not chunk:              # (an end of stream without close_notify)
                    self._eof = True
                self._buf += chunk
                continue
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                self._eof = True
                continue
            if self._out.pending:
                self._flush()          # what the read produced (e.g. a key update's answer)
            data = self._sock.recv(_READ)
            if not data:
                self._eof = True
                continue
            with self._ssl_lock:
                self._in.write(data)

    # -- multiprocessing.connection.Connection's interface ---------------------------------
    def send_bytes(self, buf) -> None:
        data = memoryview(buf).cast("B")
        with self._send_lock:
            with self._ssl_lock:
                self._obj.write(_HEADER.pack(len(data)))
                if len(data):
                    self._obj.write(data)
                out = self._out.read()
            self._sock.sendall(out)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        self._fill(_HEADER.size)
        (n,) = _HEADER.unpack_from(self._buf)
        if maxlength is not None and n > maxlength:
            self.close()
            raise OSError("bad message length")
        self._fill(_HEADER.size + n)
        msg = bytes(self._buf[_HEADER.size:_HEADER.size + n])
        del self._buf[:_HEADER.size + n]
        return msg

    def send(self, obj) -> None:
        self.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def recv(self):
        return pickle.loads(self.recv_bytes())

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether something can be read without waiting longer than ``timeout`` seconds (a
        message may still be arriving: ``recv`` then waits for its rest)."""
        if self._buf or self._eof:
            return True
        with self._ssl_lock:
            if self._obj.pending() or self._in.pending:
                return True
        r, _, _ = select.select([self._sock], [], [], timeout)
        return bool(r)

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)   # wakes a thread blocked in recv
        except OSError:
            pass
        self._sock.close()
