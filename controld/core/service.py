"""The protocol-neutral mapping service: the RFC 6970 interworking core over one table.

Front ends (UPnP today; PCP, NAT-PMP and the operator API next) call the ``async``
operations here with an :class:`~controld.core.model.Origin` and a neutral request;
failures are :class:`~controld.core.model.CoreError`, never a front end's code. Each
operation checks the policy (once, here, for every front end), validates against the
table, records its intent, asks natd for the NAT1 binding, runs the PCP exchange
upstream through natd, stores the result durably and only then answers. If anything
fails half-way, the NAT1 binding and the row are removed before the client hears the
error (docs/core.md).

The upstream I/O these operations run on (PCP exchanges through natd, renewals,
recovery, epochs, natd and WAN events) is :class:`controld.core.upstream_io.UpstreamIO`,
which this class extends; its sans-I/O parts are :mod:`controld.core.upstream` and
:mod:`controld.pcp.client`.

Requirement map (docs/requirements.md IWF-N; RFC 6970 sections):
- modes nat1-only / cascaded / no-nat1, auto (IWF-2, IWF-12, IWF-33 to IWF-39; §5.4, §5.5)
- exact port -> MAP + PREFER_FAILURE (IWF-47 to IWF-54; §5.6.2); any port -> MAP (IWF-42 to IWF-46; §5.6.1)
- short-error retry, configurable and off by default (IWF-46, IWF-51; RFC 6970 §5.6)
- find: local table, then the probe (IWF-56 to IWF-60; §5.7)
- deletes with the stored nonce, erratum 3621 layout (IWF-61 to IWF-67; §5.8)
- leases: infinite by renewal, expiry (IWF-68 to IWF-76; §5.9)
- per client external address (IWF-14, IWF-77, IWF-78; §4.1)
- host left -> delete its mappings (IWF-79, IWF-80; §5.10)
- epoch / ANNOUNCE / Mapping Update recovery (IWF-81 to IWF-84; §5.10)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

from controld.core.lifecycle import LISTED, Ev, State, next_state
from controld.core.model import CoreError, CreateRequest, ErrorKind, FrontEnd, LanGrant, Mapping, NotOwner, Origin
from controld.core.policy import Policy
from controld.core.store import MappingTable
from controld.core.upstream import MODES, REDECIDE_S
from controld.core.upstream_io import IwfConfig, UpstreamIO, _result_name
from controld.natd_link import NatdError, NatdLink
from shared import pcp, wire
from shared.const import PCP_PORTS, PROTOCOLS, UDP

log = logging.getLogger("controld.core.service")

__all__ = ["MODES", "Iwf", "IwfConfig"]
# natd's refusal codes for a NAT1 binding, as neutral kinds (anything else: UNAVAILABLE).
NATD_ERRORS: dict[str, ErrorKind] = {"port-in-use": ErrorKind.CONFLICT, "quota": ErrorKind.QUOTA,
                                     "no-ports": ErrorKind.QUOTA, "not-lan": ErrorKind.INVALID}


class Iwf(UpstreamIO):
    """Interworking core: one table, natd for NAT1 and the WAN, PCP upstream."""

    def __init__(self, cfg: IwfConfig, table: MappingTable, link: NatdLink,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 rng: random.Random | None = None, policy: Policy | None = None) -> None:
        super().__init__(cfg, table, link, clock, wall, rng)
        self.policy = policy or Policy()
        self._created = 0.0  # the creation second of the last new mapping

    # --- start and stop ----------------------------------------------------------------

    async def start(self) -> None:
        """Greet natd, restore NAT1 from the table, decide the mode, re-assert upstream."""
        hello = await self.link.call(wire.Hello(), timeout=30)
        assert isinstance(hello, wire.HelloReply)
        self.natd_boot, self.wan_ip, self.gateway = hello.boot_id, hello.wan_ip, hello.gateway
        # A previous run stopped half-way on these: nothing was promised, but NAT2 may hold them.
        leftovers = [m for m in self.table.by_id.values() if m.state not in LISTED]
        self.restored_all = not leftovers
        await self.sync_nat1()
        now = self.wall()
        self.timers.redecide_at = now + REDECIDE_S
        self.timers.epoch_poll_at = now + (self.cfg.epoch_poll if self.cfg.epoch_poll > 0 else REDECIDE_S)
        self._arm()
        await self.decide_mode()
        for m in leftovers:
            log.info("cleaning up unfinished %s (%s)", m.describe(), m.state.value)
            self._spawn(self._finish_leftover(m))
        # Re-assert upstream with the stored nonces after RAND(PCP_SERVICE_WAIT), paced by the
        # renewal window (docs/core.md, recovery; docs/requirements.md IWF-32, §18 item 6).
        at = self.wall() + self.rng.uniform(0, self.cfg.service_wait)
        for m in self.table.listed():
            if m.mode != "nat1-only":
                self._schedule(m, at, arm=False)
            elif m.lease_end is not None:  # nothing upstream: only its lease's end, as _create sets it
                self._schedule(m, m.lease_end, arm=False)
        self._arm()
        log.info("iwf up: mode=%s wan=%s pcp-server=%s external=%s, %d mappings restored",
                 self.mode, self.wan_ip, self.server, self.server_ext_ip, self.table.count())

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for t in self._bg:
            t.cancel()

    async def _finish_leftover(self, m: Mapping) -> None:
        """Delete upstream with the stored nonce (docs/requirements.md IWF-32 notes), then the binding and row."""
        if m.mode != "nat1-only" and m.nonce:
            await self._delete_upstream(m)
        await self._undo(m)

    # --- operations (every front end) ---------------------------------------------------

    def _new_mapping(self, origin: Origin, req: CreateRequest, ext_port: int) -> Mapping:
        now = self.wall()
        second = float(int(now))
        if second != self._created:
            self._created = second  # rows made within one second share the object
        # The mapping nonce (RFC 6887 §11.1) is the PCP client's own; the IWF makes one for a mapping
        # that goes upstream. A nat1-only row never does (a row keeps the mode it was made in).
        nonce = origin.client_id or (os.urandom(12) if self.mode != "nat1-only" else None)
        return Mapping(id=self.table.new_id(), cp=origin.client, igd=origin.version, remote_host=req.remote_host,
                       ext_port=ext_port, proto=req.proto, int_client=req.int_client, int_port=req.int_port,
                       description=req.description, lease=req.lease,
                       lease_end=now + req.lease if req.lease else None, state=State.PENDING,
                       created=self._created, nonce=nonce, pcp_server=self.server,
                       prefer_failure=req.exact, mode=self.mode, origin=origin.front_end.value)

    async def create(self, origin: Origin, req: CreateRequest) -> Mapping:
        """Create (or refresh, for its owner) a mapping: policy first, then NAT1 and upstream.

        ``req.exact``: MAP with PREFER_FAILURE for exactly that port (RFC 6970 §5.6.2,
        IWF-47 to IWF-54); otherwise MAP without it, the answer names the port (§5.6.1,
        IWF-42 to IWF-46). A refresh of one's own mapping never counts against the quota.
        """
        proto, ext_port = req.proto, req.ext_port
        existing: Mapping | None = None
        if req.exact:
            if ext_port == 0:
                # IWF-49: PREFER_FAILURE cannot carry port 0.
                raise CoreError(ErrorKind.INVALID, "an exact request needs an external port")
            self.policy.check_rules(ext_port, req.int_client, req.int_port, req.description)
            existing = self.table.find(ext_port, proto)
        else:
            ext_port = self.policy.nearest_port(ext_port, req.int_client, req.int_port, req.description)
        if existing is None:
            self.policy.check_quota(origin.client, self.table.count(), self.table.owned_by(origin.client))
        self.policy.check_client(origin.client, req.int_client)
        if proto not in PROTOCOLS:
            raise CoreError(ErrorKind.INVALID, "protocol must be TCP or UDP")
        if req.exact:
            if proto == UDP and ext_port in PCP_PORTS:
                raise CoreError(ErrorKind.CONFLICT, f"UDP {ext_port} is PCP's own port and is never mapped "
                                                    "(RFC 6887 §11.3)")
            if existing is not None:
                if existing.state in LISTED and existing.int_client == req.int_client \
                        and existing.int_port != req.int_port and existing.mode != "no-nat1":
                    # The same client re-adding a port overwrites it (miniupnpd too).
                    await self._move_internal_port(existing, req.int_port)
                elif existing.state not in LISTED or \
                        (existing.int_client, existing.int_port) != (req.int_client, req.int_port):
                    raise CoreError(ErrorKind.CONFLICT,
                                    f"{existing.proto_name} {ext_port} is mapped to {existing.int_client}")
                return await self._refresh(existing, req.description, req.lease)
        else:
            if proto == UDP and ext_port in PCP_PORTS:
                ext_port = 0  # only a suggestion: let NAT2 choose rather than ask for PCP's port
            existing = self.table.find(ext_port, proto) if ext_port else None
            if existing is not None and existing.state in LISTED and \
                    (existing.int_client, existing.int_port) == (req.int_client, req.int_port):
                return await self._refresh(existing, req.description, req.lease)
        return await self._create(self._new_mapping(origin, req, ext_port))

    async def delete_range(self, origin: Origin, proto: int, start: int, end: int, manage: bool) -> int:
        """One MAP delete per local match (RFC 6970 §5.8); returns the count.

        Only the requester's own mappings unless ``manage`` is asked for and the policy
        grants it (``--manage-host``).
        """
        if start > end:
            raise CoreError(ErrorKind.INVALID, "StartPort is greater than EndPort")
        manage = manage and self.policy.may_manage(origin.client)
        cp = origin.client
        victims = [m for m in self.table.listed() if m.proto == proto and start <= m.ext_port <= end
                   and (manage or m.cp == cp or m.int_client == cp)]
        if not victims:
            raise CoreError(ErrorKind.NOT_FOUND, f"no mapping in {start}-{end}")  # IWF-62: nothing sent
        # IWF-26, IWF-66: one delete per mapping, paced.
        await self._remove_many(victims, f"range delete by {cp}")
        return len(victims)

    def list_range(self, origin: Origin, proto: int, start: int, end: int, manage: bool) -> list[Mapping]:
        """Listed mappings of ``proto`` in ``start``-``end``, in port order; own ones unless managing."""
        manage = manage and self.policy.may_manage(origin.client)
        cp = origin.client
        return sorted((m for m in self.table.listed() if m.proto == proto and start <= m.ext_port <= end
                       and (manage or cp in (m.cp, m.int_client))), key=lambda m: m.ext_port)

    async def _move_internal_port(self, m: Mapping, int_port: int) -> None:
        """Point an existing mapping at another LAN port. Only NAT1 changes: upstream the
        internal tuple is the NAT1 binding's (RFC 6970 §5.5), which keeps its port."""
        try:
            await self.link.call(wire.Bind(m.id, m.proto, m.int_client, int_port, m.nat1_port or m.ext_port,
                                           exact=True))
        except NatdError as exc:
            raise CoreError(ErrorKind.CONFLICT, f"cannot move {m.describe()} to port {int_port}: {exc}") from None
        m = self.table.apply(m, int_port=int_port)
        log.info("%s now goes to LAN port %d", m.describe(), int_port)

    async def _refresh(self, m: Mapping, description: str, lease: int) -> Mapping:
        """The owner re-adds its own mapping: new lease, same nonce (docs/requirements.md IWF-54).

        The new lease and description take effect only once NAT2 agreed; a failed refresh
        leaves the mapping as it was.
        """
        wanted = dataclasses.replace(m, description=description, lease=lease,
                                     lease_end=self.wall() + lease if lease else None)
        changes: dict[str, Any] = {"description": description, "lease": lease, "lease_end": wanted.lease_end}
        if m.mode != "nat1-only":
            req = self._request_for(m, self._requested_lifetime(wanted), True, description)
            resp = await self._upstream(m, req)  # on failure the row stays as it was
            changes.update(self._grant(resp))
            cur = self.table.by_id.get(m.id, m)
            if cur.state == State.RECOVERING:
                changes["state"] = next_state(cur.state, Ev.UPSTREAM_OK)
            m = self.table.apply(m, **changes)
            self._granted(m)
        else:
            m = self.table.apply(m, **changes)
            if m.lease_end is not None:
                self._schedule(m, m.lease_end)
        log.info("refreshed %s lease=%s", m.describe(), m.lease or "infinite")
        return m

    async def _create(self, m: Mapping) -> Mapping:
        # The intent is recorded before anything is sent; on disk before anything goes upstream,
        # which could outlive a crash. With NAT1 that is the write after the bind below (a
        # binding orphaned by a crash before it is removed by the start-up sync); without
        # NAT1 (no-nat1) it is this one.
        m = self.table.apply(m, durable=m.mode == "no-nat1")
        nat1_port: int | None = None
        try:
            if m.mode in ("cascaded", "nat1-only"):
                try:
                    reply = await self.link.call(wire.Bind(m.id, m.proto, m.int_client, m.int_port,
                                                           m.ext_port, exact=m.mode == "nat1-only"))
                except NatdError as exc:
                    raise CoreError(NATD_ERRORS.get(exc.code, ErrorKind.UNAVAILABLE), str(exc)) from None
                assert isinstance(reply, wire.BindReply)
                nat1_port = reply.wan_port
                if m.mode == "cascaded":
                    # On disk before the MAP goes out: after a crash, the clean-up delete for this
                    # row needs its NAT1 binding to be relayed (natd relays bound MAPs only).
                    m = self.table.apply(m, nat1_port=nat1_port)
            granted: dict[str, Any] = {}
            if m.mode == "nat1-only":  # nothing waits before the write below: the port goes with it
                granted = {"ext_ip": self.wan_ip, "ext_port": nat1_port or m.ext_port, "nat1_port": nat1_port}
            else:
                req = self._request_for(m, self._requested_lifetime(m), m.prefer_failure, m.description)
                resp = await self._upstream(m, req)
                assert resp.map is not None
                if m.prefer_failure and resp.map.external_port != m.ext_port:
                    # NAT2 gave another port although we asked for exactly this one: what
                    # CANNOT_PROVIDE_EXTERNAL would have said (docs/requirements.md IWF-51): undo it there.
                    await self._delete_upstream(m)
                    raise CoreError(ErrorKind.CONFLICT, f"port {m.ext_port} is not available upstream "
                                                        f"(NAT2 offered {resp.map.external_port})")
                if resp.map.protocol == UDP and resp.map.external_port in PCP_PORTS:
                    await self._delete_upstream(m)  # leave nothing behind on NAT2 either
                    raise CoreError(ErrorKind.UPSTREAM, "NAT2 assigned a PCP port (RFC 6887 §11.3)")
                if resp.lifetime == 0:
                    raise CoreError(ErrorKind.UPSTREAM, "NAT2 answered SUCCESS with lifetime 0: it holds nothing")
                granted = self._grant(resp)
        except BaseException as exc:
            next_state(m.state, Ev.TIMEOUT if isinstance(exc, CoreError)  # (checks the transition)
                       and exc.kind == ErrorKind.UNAVAILABLE else Ev.UPSTREAM_ERROR)
            if isinstance(exc, CoreError) and (m.nat1_port or m.mode == "no-nat1"):
                self._retry_delete_later(m, exc)  # unanswered: the MAP may have reached NAT2 all the same
            await self._undo(m)
            raise
        # Durable before the client hears "yes" (docs/requirements.md IWF-28 to IWF-30).
        try:
            m = self.table.apply(m, **granted, state=next_state(m.state, Ev.UPSTREAM_OK))
        except CoreError:
            await self._abandon(m)
            raise
        if m.mode == "nat1-only":
            if m.lease_end is not None:
                self._schedule(m, m.lease_end)
        else:
            self._granted(m)
        log.info("added %s lease=%s", m.describe(), m.lease or "infinite")
        return m

    async def _abandon(self, m: Mapping) -> None:
        """A create NAT2 granted that could not be saved (disk full): nothing of it may stay,
        upstream, in NAT1 or in memory."""
        if m.mode != "nat1-only":
            error = await self._delete_upstream(m)
            self._retry_delete_later(m, error)
        await self._undo(m)

    async def _undo(self, m: Mapping, why: str = "never became active") -> None:
        """Leave nothing behind for a mapping that never became active (or is being removed: ``why``)."""
        self.table.delete(m, why)  # never raises: a full disk does not stop the Unbind below
        self.timers.drop(m.id)
        # By mode, not by nat1_port: a Bind whose port could not be saved (disk full) is still in NAT1.
        if m.nat1_port is not None or m.mode in ("cascaded", "nat1-only"):
            try:
                await self.link.call(wire.Unbind(m.id))
            except NatdError as exc:
                log.error("could not remove NAT1 binding of %s: %s", m.describe(), exc)

    async def delete(self, origin: Origin, proto: int, ext_port: int) -> None:
        """Delete one mapping (RFC 6970 §5.8): local match first, then MAP lifetime 0."""
        cp = origin.client
        m = self.table.find(ext_port, proto)
        if m is None or m.state not in LISTED:
            raise CoreError(ErrorKind.NOT_FOUND, f"no mapping for {ext_port}")  # IWF-62: nothing sent
        if not self.policy.may_touch(cp, m.cp, m.int_client):
            raise CoreError(ErrorKind.NOT_AUTHORIZED, "the mapping belongs to another client")
        recovering = m.state == State.RECOVERING
        error = await self._remove(m, f"deleted by {cp}")
        if error is not None and not recovering:
            raise error  # (while recovering NAT2 had lost it anyway: gone everywhere is success)

    async def host_left(self, ip: str) -> int:
        """A LAN host's DHCP lease ended: delete all its mappings (docs/requirements.md IWF-79, IWF-80)."""
        victims = [m for m in self.table.listed() if m.int_client == ip]
        await self._remove_many(victims, f"host {ip} left (DHCP)")
        if victims:
            log.info("host %s left: %d mappings removed", ip, len(victims))
        return len(victims)

    async def flush(self, host: str | None, why: str) -> int:
        """Delete every listed mapping, or every one of LAN host ``host`` (owner or internal
        client); returns how many. Paced and bounded in time like :meth:`host_left`."""
        victims = [m for m in self.table.listed() if host is None or host in (m.cp, m.int_client)]
        await self._remove_many(victims, why)
        if victims:
            log.info("%s: %d mappings removed", why, len(victims))
        return len(victims)

    def epoch(self) -> tuple[int, float] | None:
        """The PCP server's last epoch time and the wall-clock time of that answer (RFC 6887 §8.5)."""
        e = self.client.epochs.get(self.server or "")
        return None if e is None else (e.server_time, self.wall() - (self.clock() - e.client_time))

    async def _remove_many(self, victims: list[Mapping], why: str) -> None:
        """Remove many mappings with at most ``recovery_window`` PCP deletes in flight (no burst
        at NAT2). Returns after ``pcp_timeout`` at the latest: the rest carries on in the
        background, as RFC 6970 §5.8 allows (docs/requirements.md IWF-67), so an action always answers."""
        gate = asyncio.Semaphore(max(1, self.cfg.recovery_window))

        async def one(m: Mapping) -> None:
            async with gate:
                await self._remove(m, why)

        async def every() -> None:
            await asyncio.gather(*(one(m) for m in victims))

        work = self._spawn(every())
        _, pending = await asyncio.wait({work}, timeout=self.cfg.pcp_timeout)
        if pending:
            log.info("%s: answered after %.0f s; upstream deletes continue in the background",
                     why, self.cfg.pcp_timeout)

    async def _remove(self, m: Mapping, why: str) -> CoreError | None:
        """Delete upstream (same nonce, port 0), unbind NAT1, drop the row; the row goes whatever NAT2 says."""
        cur = self.table.by_id.get(m.id)  # the row as it is now (callers may have waited)
        if cur is None or cur.state not in LISTED:
            return None  # already on its way out
        # On disk only when something upstream may outlive a crash: a nat1-only row that crashed
        # while DELETING comes back ACTIVE, and the start-up sync puts its binding back.
        m = self.table.apply(cur, durable=cur.mode != "nat1-only", state=next_state(cur.state, Ev.DELETE))
        error = await self._delete_upstream(m)
        self._retry_delete_later(m, error)
        next_state(m.state, Ev.DELETED)  # (checks the transition; the row goes now)
        await self._undo(m, why)
        log.info("removed %s: %s%s", m.describe(), why, f" (upstream: {error})" if error else "")
        return error

    async def find(self, origin: Origin, proto: int, ext_port: int, owner_only: bool = False) -> Mapping:
        """One mapping by external port (RFC 6970 §5.7, IWF-56 to IWF-60).

        The local table first, all of it (a probe on a port we hold would shorten that
        mapping: IWF-60 notes); ``owner_only``: another client's entry is NOT_AUTHORIZED
        under secure mode. Otherwise a MAP probe with PREFER_FAILURE and a 60 s lifetime;
        whatever it finds is NOT_FOUND (CANNOT_PROVIDE_EXTERNAL: in use by someone else;
        SUCCESS: free, and the probe is deleted again), UNAVAILABLE when NAT2 does not
        answer (IWF-58), UPSTREAM for other PCP errors.
        """
        m = self.table.find(ext_port, proto)
        if m is not None and m.state in LISTED:
            if owner_only and not self.policy.may_touch(origin.client, m.cp, m.int_client):
                raise CoreError(ErrorKind.NOT_AUTHORIZED, f"{m.proto_name} {ext_port} belongs to another client")
            return m
        if ext_port == 0 or self.mode == "nat1-only" or (proto == UDP and ext_port in PCP_PORTS):
            raise CoreError(ErrorKind.NOT_FOUND, f"no mapping for {ext_port}")
        resp = await self._probe(proto, ext_port, True)
        if resp is None:
            raise CoreError(ErrorKind.UNAVAILABLE, f"no answer from PCP server {self.server} "
                                                   "(docs/requirements.md IWF-58)")
        if resp.result not in (pcp.Result.SUCCESS, pcp.Result.CANNOT_PROVIDE_EXTERNAL):
            raise CoreError(ErrorKind.UPSTREAM, f"probe: PCP {_result_name(resp.result)}", resp.result)
        raise CoreError(ErrorKind.NOT_FOUND, f"no mapping for {ext_port} (probe: {_result_name(resp.result)})")

    def at_index(self, index: int) -> Mapping:
        """The ``index``-th listed mapping: answered locally, never sent upstream (IWF-55)."""
        m = self.table.at_index(index)
        if m is None:
            raise CoreError(ErrorKind.NOT_FOUND, f"index {index} out of range")
        return m

    def external_ip(self, cp: str) -> str:
        """The external address for ``cp``: its last PCP answer, else NAT2's address (IWF-14, IWF-77);
        without PCP (nat1-only) the configured one, else STUN's, else a public WAN address."""
        if self.mode == "nat1-only":
            return self._fallback_external()
        return self.ext_ip_by_cp.get(cp) or self.server_ext_ip or ""

    def connected(self) -> bool:
        """Whether mappings can work now: a WAN address and, upstream, a known external address."""
        return self.wan_ip is not None and (self.mode == "nat1-only" or self.server_ext_ip is not None)

    def link_up(self) -> bool:
        """Whether the WAN interface has an address."""
        return self.wan_ip is not None

    def count(self) -> int:
        """How many mappings are listed (active, renewing, recovering)."""
        return self.table.count()

    def snapshot(self) -> tuple[Mapping, ...]:
        """Every listed mapping, in listing order (rows are immutable: safe to keep)."""
        return tuple(self.table.listed())

    async def counters(self) -> wire.CountersReply:
        """The WAN interface's traffic counters (natd reads them); UNAVAILABLE when natd is away."""
        try:
            reply = await self.link.call(wire.GetCounters(), timeout=5)
        except NatdError as exc:
            raise CoreError(ErrorKind.UNAVAILABLE, f"counters unavailable: {exc}") from None
        if not isinstance(reply, wire.CountersReply):
            raise CoreError(ErrorKind.UNAVAILABLE, "counters unavailable")
        return reply

    def lease_remaining(self, m: Mapping) -> int:
        """What the control point sees as the remaining lease (0 = infinite, IGD:1).

        Never more than NAT2 granted (the mapping lives upstream only that long unless
        renewed); an infinite lease stays 0: it is kept alive by renewals (docs/requirements.md IWF-69).
        """
        if m.lease_end is None:
            return 0
        left = m.lease_end - self.wall()
        if m.mode != "nat1-only" and m.pcp_expiry is not None:
            left = min(left, m.pcp_expiry - self.wall())
        return max(1, int(left))

    # --- LAN PCP and NAT-PMP (docs/lan-pcp.md "What the wiring needs from the core") --------

    def watch_state_loss(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(why)`` when upstream state is lost or the WAN address changes: LAN
        PCP and NAT-PMP clients must hear of it (RFC 6887 §14.1.3, RFC 6886 §3.2.1)."""
        self._loss_watchers.append(callback)


    def outer_address(self, cp: str) -> str:
        """The outermost external address a LAN client sees ("" if unknown): NAT2's when
        cascaded (RFC 7648 proxy semantics), the WAN address in nat1-only."""
        if self.mode == "nat1-only":
            return self.wan_ip or ""
        return self.external_ip(cp)

    def find_internal(self, proto: int, int_client: str, int_port: int) -> Mapping | None:
        """The listed mapping of an internal tuple (PCP and NAT-PMP key mappings on it, RFC 6887 §11.3)."""
        return self.table.find_internal(proto, int_client, int_port)

    def lan_owns(self, origin: Origin, m: Mapping) -> bool:
        """A PCP mapping is its client's and nonce's (RFC 6887 §11.3); anything else is its
        client address's (docs/lan-pcp.md, Ownership), whatever secure mode says."""
        if origin.front_end == FrontEnd.PCP or m.origin == FrontEnd.PCP.value:
            return m.origin == origin.front_end.value and m.nonce == origin.client_id \
                and origin.client in (m.cp, m.int_client)
        return origin.client in (m.cp, m.int_client)

    def _check_owner(self, origin: Origin, m: Mapping) -> None:
        if not self.lan_owns(origin, m):
            raise NotOwner(f"{m.describe()} belongs to another client or nonce", self.lease_remaining(m) or 1)

    def _free_suggestion(self, req: CreateRequest) -> int:
        """A suggested external port nobody holds, near the client's (a suggestion, RFC 6887
        §11.3): the core never picks PCP's own ports and a taken one is passed over."""
        want = req.ext_port or req.int_port
        for i in range(64):  # bounded search outward from the suggestion
            port = want + (i + 1) // 2 * (1 if i % 2 else -1)
            if not 1024 <= port <= 65535 or (req.proto == UDP and port in PCP_PORTS):
                continue
            held = self.table.find(port, req.proto)
            if (held is None or held.state not in LISTED) and \
                    self.policy.permissions.allowed(port, req.int_client, req.int_port, req.description):
                return port
        return 0

    async def lan_map(self, origin: Origin, req: CreateRequest) -> LanGrant:
        """Create or refresh a LAN client's mapping by its internal tuple (PCP MAP, NAT-PMP map).

        The owner's refresh keeps the external port (RFC 6887 §11.3); with ``req.exact``
        (PREFER_FAILURE) a different suggestion is CONFLICT; someone else's tuple is
        NOT_AUTHORIZED with that mapping's remaining lifetime. Policy and quotas are
        :meth:`create`'s. The grant names the outermost address and port and a lifetime
        never above NAT2's (RFC 7648).
        """
        m = self.find_internal(req.proto, req.int_client, req.int_port)
        if m is not None:
            self._check_owner(origin, m)
            if req.exact and req.ext_port != m.ext_port:
                raise CoreError(ErrorKind.CONFLICT, f"{m.describe()} already has another external port")
            self.policy.check_rules(m.ext_port, req.int_client, req.int_port, req.description)
            m = await self._refresh(m, req.description or m.description, req.lease)
        else:
            if not req.exact:
                req = dataclasses.replace(req, ext_port=self._free_suggestion(req))
                if req.ext_port == 0:
                    raise CoreError(ErrorKind.DENIED, f"no allowed external port for {req.int_client}:{req.int_port}")
            m = await self.create(origin, req)
        return LanGrant(m, m.ext_ip or self.outer_address(origin.client), m.ext_port, self.lease_remaining(m))

    async def lan_delete(self, origin: Origin, proto: int, int_client: str, int_port: int) -> None:
        """Delete a LAN client's mapping by internal tuple (RFC 6887 §15.1, RFC 6886 §3.4):
        NOT_FOUND when there is none, NOT_AUTHORIZED (with its lifetime) when not the caller's."""
        m = self.find_internal(proto, int_client, int_port)
        if m is None:
            raise CoreError(ErrorKind.NOT_FOUND, f"no mapping for {int_client}:{int_port}")
        self._check_owner(origin, m)
        error = await self._remove(m, f"deleted by {origin.front_end.value} client {origin.client}")
        if error is not None and m.state != State.RECOVERING:
            raise error

    async def lan_delete_all(self, origin: Origin, proto: int) -> int:
        """Every mapping of ``proto`` the client made by its own protocol (NAT-PMP internal
        port 0, RFC 6886 §3.4); returns how many."""
        victims = [m for m in self.table.listed() if m.proto == proto and m.cp == origin.client
                   and m.origin == origin.front_end.value]
        await self._remove_many(victims, f"all {origin.front_end.value} mappings of {origin.client}")
        return len(victims)
