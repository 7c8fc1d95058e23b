"""The AdminBackend over controld's core: what the admin socket, the CLI, rpcd and the LAN page reach.

A thin adapter: every operation is the core's own (controld/core/service.py), so its policy
and quotas apply; the operator's requests run with admin rights (controld/core/policy.py,
``admin_rights``), a LAN host on the page as a secure-mode requester for its own address.
Core errors become :class:`BackendError` one to one (docs/operating.md, "wiring").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

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
from controld.core import model
from controld.core.events import ChangeEvent as StoreEvent
from controld.core.events import ChangeKind
from controld.core.lifecycle import LISTED
from controld.core.policy import admin_rights
from shared.const import PROTO_NUMBERS, VERSION

if TYPE_CHECKING:
    from controld.core.service import Iwf

log = logging.getLogger("controld.admin")
T = TypeVar("T")

OPERATOR_OWNER = "operator"  # the owner (core Origin.client) of the operator's mappings
MAX_REASONS = 1024  # removal reasons remembered until the change is published (bounded)

# The core's refusals as the admin API's kinds (docs/operating.md, "wiring" 2).
KINDS: dict[model.ErrorKind, ErrorKind] = {
    model.ErrorKind.INVALID: ErrorKind.INVALID,
    model.ErrorKind.UNSUPPORTED: ErrorKind.INVALID,
    model.ErrorKind.NOT_FOUND: ErrorKind.NOT_FOUND,
    model.ErrorKind.CONFLICT: ErrorKind.CONFLICT,
    model.ErrorKind.NOT_AUTHORIZED: ErrorKind.DENIED,
    model.ErrorKind.DENIED: ErrorKind.DENIED,
    model.ErrorKind.QUOTA: ErrorKind.QUOTA,
    model.ErrorKind.UPSTREAM: ErrorKind.UPSTREAM,
    model.ErrorKind.UNAVAILABLE: ErrorKind.UNAVAILABLE,
}


def _message(exc: model.CoreError) -> str:
    """One short sentence for people: the core's detail without its requirement reference."""
    text = exc.detail or exc.kind.value
    return text.split(" (docs/", 1)[0].rstrip(".")


class CoreBackend:
    """:class:`controld.adminapi.backend.AdminBackend` for one running :class:`Iwf`."""

    def __init__(self, iwf: Iwf, reload: Callable[[], None] = lambda: None,
                 wall: Callable[[], float] = time.time) -> None:
        self.iwf = iwf
        self._reload = reload
        self.wall = wall
        self._subscribers: list[Callable[[ChangeEvent], None]] = []
        self._why: dict[int, str] = {}  # removal reasons known here (operator, web, flush, host left)
        iwf.table.subscribe(self._published)

    # ------------------------------------------------------------ views

    def view(self, m: model.Mapping) -> MappingView:
        """A core row as operators see it."""
        nat1 = m.mode != "no-nat1" and m.nat1_port is not None
        return MappingView(
            id=m.id, proto=m.proto_name, ext_ip=m.ext_ip, ext_port=m.ext_port,
            nat1_ip=self.iwf.wan_ip if nat1 else None, nat1_port=m.nat1_port if nat1 else None,
            int_ip=m.int_client, int_port=m.int_port, origin=Origin(m.origin), owner=m.cp,
            description=m.description,
            remaining=None if m.lease_end is None else max(0, int(m.lease_end - self.wall())),
            state=m.state.value)

    def _listed(self, mapping_id: int) -> model.Mapping:
        m = self.iwf.table.by_id.get(mapping_id)
        if m is None or m.state not in LISTED:
            raise BackendError(ErrorKind.NOT_FOUND, f"no mapping {mapping_id}")
        return m

    async def status(self) -> Status:
        iwf = self.iwf
        by_origin: dict[str, int] = {}
        for m in iwf.snapshot():
            by_origin[m.origin] = by_origin.get(m.origin, 0) + 1
        epoch = iwf.epoch() if iwf.mode != "nat1-only" else None
        s = iwf.stats
        counters = Counters(requests=dict(s.requests), errors={k: dict(v) for k, v in s.errors.items()},
                            pcp_rtt_p50_ms=s.rtt_p50_ms(), renewals=s.renewals, resyncs=s.resyncs,
                            natd_restarts=s.natd_restarts)
        # nat1-only: external_ip, else STUN, else a public WAN address (docs/stun.md); else the WAN address
        ext = (iwf.external_ip("") or iwf.wan_ip) if iwf.mode == "nat1-only" else iwf.server_ext_ip
        return Status(version=VERSION, mode=iwf.mode, wan_ip=iwf.wan_ip, ext_ip=ext,
                      pcp_server=None if iwf.mode == "nat1-only" else iwf.server,
                      pcp_epoch=epoch[0] if epoch else None, pcp_last_answer=epoch[1] if epoch else None,
                      secure_mode=iwf.policy.secure_mode, mappings=by_origin, counters=counters)

    async def list(self) -> list[MappingView]:
        return [self.view(m) for m in self.iwf.snapshot()]

    async def get(self, mapping_id: int) -> MappingView:
        return self.view(self._listed(mapping_id))

    # ------------------------------------------------------------ changes

    @staticmethod
    def _origin(by: Requester) -> model.Origin:
        if by.admin:
            return model.Origin(model.FrontEnd.OPERATOR, OPERATOR_OWNER)
        if by.address is None:
            raise BackendError(ErrorKind.DENIED, "a LAN requester needs its address")
        return model.Origin(model.FrontEnd(by.origin.value), by.address)

    def _count(self, by: Requester, exc: BackendError | None = None) -> None:
        origin = Origin.OPERATOR.value if by.admin else by.origin.value
        if exc is None:
            self.iwf.stats.request(origin)
        else:
            self.iwf.stats.error(origin, exc.kind.value)

    async def _run(self, by: Requester, op: Callable[[], Awaitable[T]]) -> T:
        """Count the request, run the core call (with admin rights for the operator), map its errors."""
        self._count(by)
        try:
            if by.admin:
                with admin_rights():
                    return await op()
            return await op()
        except model.CoreError as exc:
            err = BackendError(KINDS.get(exc.kind, ErrorKind.INTERNAL), _message(exc))
        except BackendError as exc:
            err = exc
        self._count(by, err)
        raise err

    async def add(self, req: AddRequest, by: Requester) -> MappingView:
        origin = self._origin(by)

        async def op() -> model.Mapping:
            proto = PROTO_NUMBERS.get(req.proto.upper())
            if proto is None:
                raise BackendError(ErrorKind.INVALID, "protocol must be TCP or UDP")
            if req.lifetime == 0 and not by.admin:
                raise BackendError(ErrorKind.INVALID, "only the operator makes permanent forwards")
            if not by.admin and req.int_ip != by.address:
                raise BackendError(ErrorKind.DENIED, f"{by.address} may forward only to itself")
            return await self.iwf.create(origin, model.CreateRequest(
                proto, req.ext_port, req.int_ip, req.int_port, req.lifetime, req.description, exact=True))

        return self.view(await self._run(by, op))

    async def delete(self, target: int | MappingKey, by: Requester) -> MappingView:
        origin = self._origin(by)
        found: list[model.Mapping] = []

        async def op() -> None:
            if isinstance(target, MappingKey):
                proto = PROTO_NUMBERS.get(target.proto.upper(), -1)
                m = self.iwf.table.find(target.ext_port, proto)
                if m is None or m.state not in LISTED:
                    raise BackendError(ErrorKind.NOT_FOUND, f"no mapping {target.proto.upper()} {target.ext_port}")
            else:
                m = self._listed(target)
            if not by.admin and by.address not in (m.cp, m.int_client):
                raise BackendError(ErrorKind.DENIED, f"mapping {m.id} belongs to another host")
            found.append(m)
            self._note(m.id, "operator" if by.admin else f"{by.origin.value} {by.address}")
            await self.iwf.delete(origin, m.proto, m.ext_port)

        await self._run(by, op)
        return self.view(found[0])

    async def flush(self, host: str | None, by: Requester) -> int:
        if not by.admin and host != by.address:
            raise BackendError(ErrorKind.DENIED, "a LAN host may flush only its own mappings")
        for m in self.iwf.snapshot():
            if host is None or host in (m.cp, m.int_client):
                self._note(m.id, "flush")
        why = f"flush{' of ' + host if host else ''} by {'operator' if by.admin else by.address}"
        return await self._run(by, lambda: self.iwf.flush(host, why))

    async def host_left(self, ip: str) -> int:
        for m in self.iwf.snapshot():
            if m.int_client == ip:
                self._note(m.id, "host left")
        return await self.iwf.host_left(ip)

    async def reload(self) -> None:
        self._reload()

    # ------------------------------------------------------------ change events

    def _note(self, mid: int, why: str) -> None:
        if len(self._why) >= MAX_REASONS:
            self._why.pop(next(iter(self._why)))
        self._why[mid] = why

    def subscribe(self, callback: Callable[[ChangeEvent], None]) -> Unsubscribe:
        self._subscribers.append(callback)

        def stop() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return stop

    def _published(self, ev: StoreEvent) -> None:
        """The store's change event, as the watchers see mappings: added when a row becomes
        listed, removed when it stops being listed, updated when a listed row's shown fields change."""
        if not self._subscribers or ev.kind == ChangeKind.ADDRESSES:
            return
        old = ev.before if ev.before is not None and ev.before.state in LISTED else None
        new = ev.after if ev.after is not None and ev.after.state in LISTED else None
        now = self.wall()
        out: ChangeEvent | None = None
        if old is not None and new is None:
            why = self._why.pop(old.id, "")
            if not why and old.lease_end is not None and old.lease_end <= now + 1:
                why = "lease ended"
            out = ChangeEvent("removed", self.view(old), why or "removed", now)
        elif old is None and new is not None:
            out = ChangeEvent("added", self.view(new), new.origin, now)
        elif old is not None and new is not None and \
                (old.state, old.ext_ip, old.ext_port, old.int_port, old.description, old.lease_end) != \
                (new.state, new.ext_ip, new.ext_port, new.int_port, new.description, new.lease_end):
            out = ChangeEvent("updated", self.view(new), new.state.value, now)
        if out is None:
            return
        for callback in list(self._subscribers):
            try:
                callback(out)
            except Exception:  # one broken watcher must not stop the others or the core
                log.exception("admin: a watcher failed")
