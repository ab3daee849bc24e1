"""A slow link to a real server: a TCP proxy on 127.0.0.1 whose client-to-server direction (what an upload
sends) goes through at ``rate`` bytes per second; replies go at full speed. ``rate = None`` passes
everything through as fast as it comes; the rate can change while connections are open.

    with Throttle(seaweed_server.ports["s3"], rate=2 * 2**20) as link:   # a 2 MiB/s uplink to the store
        endpoint_url = link.endpoint_url
"""

from __future__ import annotations

import socket
import threading
import time

CHUNK = 16 * 1024


class Throttle:
    def __init__(self, port: int, rate: float | None = None, host: str = "127.0.0.1") -> None:
        self.target = (host, port)
        self.rate = rate
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.sent = 0  # bytes passed client -> server
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="throttle-accept").start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                if up:
                    rate = self.rate
                    if rate:
                        time.sleep(len(data) / rate)
                    self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (dst, src):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.closed.set()
        self.sock.close()

    def __enter__(self) -> Throttle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
