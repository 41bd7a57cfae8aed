"""A small TCP proxy for chaos tests: put it between a client and a server, then cut or stall
the connections going through it.

    proxy = TcpProxy("127.0.0.1", 55432).start()      # listens on 127.0.0.1:<proxy.port>
    proxy.cut()          # reset every open connection, both ends, as a dying network path does
    proxy.sever()        # reset the client ends only: the server is never told (a half-open
                         # connection, as a load balancer or NAT that drops its state leaves)
    proxy.stall(3.0)     # forward nothing, either way, for 3 s; then carry on
    proxy.cut_off(30.0)  # reset every open connection and refuse new ones for 30 s
    proxy.close()

Standard library only; one thread per direction of each connection.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field


def _drop(s: socket.socket, reset: bool) -> None:
    if reset:
        # SO_LINGER with a zero timeout: the connection ends with RST instead of FIN.
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # shutdown() first: close() alone does not end a socket another thread is blocked on in
    # recv(), so the peer would never hear of it.
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()


@dataclass
class _Link:
    client: socket.socket
    server: socket.socket
    closed: bool = False
    severed: bool = False  # client end reset, server end deliberately left open

    def close(self, reset: bool) -> None:
        if self.closed or self.severed:
            return
        self.closed = True
        _drop(self.client, reset)
        _drop(self.server, reset)

    def sever(self) -> None:
        if self.closed or self.severed:
            return
        self.severed = True
        _drop(self.client, reset=True)


@dataclass
class TcpProxy:
    target_host: str
    target_port: int
    listen_host: str = "127.0.0.1"
    listen_port: int = 0  # 0: any free port, see .port
    cuts: int = 0
    connections: int = 0
    _links: list[_Link] = field(default_factory=list)
    _severed: list[_Link] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _open: threading.Event = field(default_factory=threading.Event)  # set = forwarding
    _stop: threading.Event = field(default_factory=threading.Event)
    _refusing: threading.Event = field(default_factory=threading.Event)  # set = reset new connections
    _listener: socket.socket | None = None

    def start(self) -> TcpProxy:
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((self.listen_host, self.listen_port))
        lst.listen(64)
        lst.settimeout(0.2)
        self._listener = lst
        self._open.set()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()
        return self

    @property
    def port(self) -> int:
        assert self._listener is not None, "start() first"
        return int(self._listener.getsockname()[1])

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._refusing.is_set():
                _drop(client, reset=True)  # cut off: as a host that is unreachable refuses
                continue
            try:
                server = socket.create_connection((self.target_host, self.target_port), timeout=5)
            except OSError:
                _drop(client, reset=True)  # the server is down: refuse, as it would
                continue
            server.settimeout(None)
            client.settimeout(None)
            link = _Link(client, server)
            with self._lock:
                self._links.append(link)
                self.connections += 1
            threading.Thread(target=self._pump, args=(link, client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(link, server, client), daemon=True).start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not (link.closed or link.severed):
                data = src.recv(65536)
                if not data:
                    break
                self._open.wait()  # a stall holds the data here
                if link.closed or link.severed:
                    break
                dst.sendall(data)
        except OSError:
            pass
        link.close(reset=False)  # a no-op for a severed link: its server end stays open
        with self._lock:
            if link in self._links:
                self._links.remove(link)

    @property
    def open_connections(self) -> int:
        """Connections forwarded now (not yet closed, cut or severed)."""
        with self._lock:
            return len(self._links)

    def cut(self) -> int:
        """Reset every open connection (new ones are accepted as before); returns how many."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close(reset=True)
        self.cuts += len(links)
        return len(links)

    def sever(self) -> int:
        """Reset the client end of every open connection and leave the server end open and
        silent until close(): the server keeps the session (and its open transaction and
        locks) as if the client were still there.  Returns how many."""
        with self._lock:
            links, self._links = self._links, []
            self._severed.extend(links)
        for link in links:
            link.sever()
        return len(links)

    def stall(self, seconds: float) -> None:
        """Forward nothing in either direction for `seconds` (connections stay open)."""
        self._open.clear()
        try:
            time.sleep(seconds)
        finally:
            self._open.set()

    def cut_off(self, seconds: float) -> int:
        """Reset every open connection and refuse (reset) new ones for `seconds`, then accept
        again; returns how many connections were open."""
        self._refusing.set()
        try:
            n = self.cut()
            time.sleep(seconds)
        finally:
            self._refusing.clear()
        return n

    def close(self) -> None:
        self._stop.set()
        self._open.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        self.cut()
        with self._lock:
            severed, self._severed = self._severed, []
        for link in severed:
            _drop(link.server, reset=True)
