"""The smallest WebSocket client ComfyUI's /ws needs (RFC 6455): text and binary messages in, pings answered.

Stdlib only, so following a run needs no package beyond the pack's own.
"""
from __future__ import annotations

import base64
import hashlib
import os
import select
import socket
import struct
from urllib.parse import urlsplit

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0


class WebSocketClosed(ConnectionError):
    """The server closed the connection (or it dropped)."""


class WebSocket:
    def __init__(self, url: str, timeout: float = 30.0):
        parts = urlsplit(url)
        if parts.scheme != "ws":
            raise ValueError(f"only ws:// addresses are supported, not {url!r}")
        self.sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path or "/"
        request = (f"GET {path}{'?' + parts.query if parts.query else ''} HTTP/1.1\r\n"
                   f"Host: {parts.hostname}:{parts.port or 80}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        self._buffer = b""
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        status = head.split("\r\n", 1)[0]
        expected = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
        if " 101 " not in status + " " or expected not in head:
            self.sock.close()
            raise ConnectionError(f"{url} did not accept a WebSocket connection: {status}")

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            self._fill()
        head, self._buffer = self._buffer.split(marker, 1)
        return head

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise WebSocketClosed("the server closed the connection")
        self._buffer += chunk

    def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._fill()
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def send(self, payload: bytes, opcode: int = TEXT) -> None:
        """One masked frame, as a client must send."""
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x80 | opcode])
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _frame(self) -> tuple[bool, int, bytes]:
        first, second = self._read(2)
        n = second & 0x7F
        if n == 126:
            n = struct.unpack(">H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self._read(8))[0]
        mask = self._read(4) if second & 0x80 else None
        payload = self._read(n)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bool(first & 0x80), first & 0x0F, payload

    def recv(self, wait: float | None = None) -> tuple[int, bytes] | None:
        """The next whole message: (TEXT or BINARY, payload); None when none began within `wait` seconds. Once a
        message has begun it is read whole, so a wait never splits a frame."""
        if wait is not None and not self._buffer and not select.select([self.sock], [], [], wait)[0]:
            return None
        opcode, parts = None, []
        while True:
            final, op, payload = self._frame()
            if op == PING:
                self.send(payload, PONG)
                continue
            if op == PONG:
                continue
            if op == CLOSE:
                raise WebSocketClosed("the server closed the connection")
            if op != CONTINUATION:
                opcode = op
            parts.append(payload)
            if final:
                return opcode, b"".join(parts)

    def close(self) -> None:
        try:
            self.send(struct.pack(">H", 1000), CLOSE)
        except OSError:
            pass
        self.sock.close()
