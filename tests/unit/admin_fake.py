"""An in-memory AdminBackend for the admin API, CLI, rpcd and web page tests.

It keeps the rules the core promises in docs/operating.md (secure mode: a LAN host maps and
deletes only for its own address; per-host quota; a port taken is a conflict; operator
lifetime 0 is permanent) so the front ends can be tested against them without natd or NAT2.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from controld.adminapi.backend import (
    AddRequest,
    BackendError,
    ChangeEvent,
    Counters,
    ErrorKind,
    MappingKey,
    MappingView,
    Origin,
    Requester,
    Status,
    Unsubscribe,
)

EXT_IP, NAT1_IP = "198.20.0.1", "100.64.0.2"


class FakeBackend:
    """The core's admin face, in memory."""

    def __init__(self, per_host_quota: int = 4, secure_mode: bool = True) -> None:
        self.mappings: dict[int, MappingView] = {}
        self.next_id = 1
        self.per_host_quota = per_host_quota
        self.secure_mode = secure_mode
        self.reloads = 0
        self.host_lefts: list[str] = []
        self.subscribers: list[Callable[[ChangeEvent], None]] = []
        self.counters = Counters(requests={"upnp": 12, "pcp": 3}, errors={"upnp": {"718": 2}},
                                 pcp_rtt_p50_ms=1.8, renewals=5, resyncs=1, natd_restarts=0)

    def _publish(self, kind: str, m: MappingView, reason: str) -> None:
        for cb in list(self.subscribers):
            cb(ChangeEvent(kind, m, reason, time.time()))

    def seed(self, origin: Origin, owner: str, proto: str, ext_port: int, int_port: int,
             description: str = "", remaining: int | None = 3600) -> MappingView:
        """A mapping made by another front end (UPnP, PCP, NAT-PMP)."""
        m = MappingView(self.next_id, proto, EXT_IP, ext_port, NAT1_IP, 20000 + self.next_id, owner, int_port,
                        origin, owner, description, remaining, "active")
        self.mappings[m.id] = m
        self.next_id += 1
        self._publish("added", m, origin.value)
        return m

    async def status(self) -> Status:
        by: dict[str, int] = {}
        for m in self.mappings.values():
            by[m.origin.value] = by.get(m.origin.value, 0) + 1
        return Status("0.1.0", "cascaded", NAT1_IP, EXT_IP, "100.64.0.1", 12345, time.time() - 4,
                      self.secure_mode, by, self.counters)

    async def list(self) -> list[MappingView]:
        return list(self.mappings.values())

    async def get(self, mapping_id: int) -> MappingView:
        if mapping_id not in self.mappings:
            raise BackendError(ErrorKind.NOT_FOUND, f"no mapping {mapping_id}")
        return self.mappings[mapping_id]

    async def add(self, req: AddRequest, by: Requester) -> MappingView:
        if not by.admin and self.secure_mode and req.int_ip != by.address:
            raise BackendError(ErrorKind.DENIED, f"secure mode: {by.address} may map only to itself")
        if not by.admin and req.lifetime == 0:
            raise BackendError(ErrorKind.INVALID, "a LAN host's mapping needs a lifetime")
        for m in self.mappings.values():
            if (m.proto, m.ext_port) == (req.proto, req.ext_port):
                raise BackendError(ErrorKind.CONFLICT, f"{req.proto} {req.ext_port} is taken")
        if sum(m.int_ip == req.int_ip for m in self.mappings.values()) >= self.per_host_quota:
            raise BackendError(ErrorKind.QUOTA, f"{req.int_ip} has {self.per_host_quota} mappings")
        owner = by.address or "operator"
        m = MappingView(self.next_id, req.proto, EXT_IP, req.ext_port, NAT1_IP, 20000 + self.next_id, req.int_ip,
                        req.int_port, by.origin, owner, req.description, req.lifetime or None, "active")
        self.mappings[m.id] = m
        self.next_id += 1
        self._publish("added", m, by.origin.value)
        return m

    def _find(self, target: int | MappingKey) -> MappingView:
        for m in self.mappings.values():
            if (isinstance(target, int) and m.id == target) or \
                    (isinstance(target, MappingKey) and (m.proto, m.ext_port) == (target.proto, target.ext_port)):
                return m
        raise BackendError(ErrorKind.NOT_FOUND, f"no mapping {target}")

    async def delete(self, target: int | MappingKey, by: Requester) -> MappingView:
        m = self._find(target)
        if not by.admin and by.address not in (m.owner, m.int_ip):
            raise BackendError(ErrorKind.DENIED, f"mapping {m.id} is not {by.address}'s")
        del self.mappings[m.id]
        self._publish("removed", replace(m, state="gone"), by.origin.value)
        return m

    async def flush(self, host: str | None, by: Requester) -> int:
        gone = [m for m in self.mappings.values() if host is None or m.int_ip == host]
        for m in gone:
            await self.delete(m.id, by)
        return len(gone)

    async def host_left(self, ip: str) -> int:
        self.host_lefts.append(ip)
        gone = [m for m in self.mappings.values() if m.int_ip == ip]
        for m in gone:
            del self.mappings[m.id]
            self._publish("removed", replace(m, state="gone"), "host left")
        return len(gone)

    async def reload(self) -> None:
        self.reloads += 1

    def subscribe(self, callback: Callable[[ChangeEvent], None]) -> Unsubscribe:
        self.subscribers.append(callback)
        return lambda: self.subscribers.remove(callback)


class Served:
    """A FakeBackend behind a real AdminServer on a Unix socket, in a thread of its own."""

    def __init__(self, path: str, backend: FakeBackend | None = None) -> None:
        import asyncio
        import threading

        from controld.adminapi.server import AdminServer

        self.path = path
        self.backend = backend or FakeBackend()
        self.loop = asyncio.new_event_loop()
        self.server = AdminServer(path, self.backend)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.run(self.server.start())

    def run(self, coro: object, timeout: float = 10.0) -> object:
        """Run a coroutine on the server's loop and return its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def call(self, fn: Callable[[], object]) -> object:
        """Run a plain function on the server's loop (e.g. seed a mapping)."""
        async def wrap() -> object:
            return fn()
        return self.run(wrap())

    def close(self) -> None:
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
