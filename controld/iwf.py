"""The UPnP IGD-PCP Interworking Function (RFC 6970) over one mapping table.

Front ends (SOAP today; PCP and NAT-PMP servers later) call the ``async`` actions
here. Each action validates against the table, records its intent, asks natd for
the NAT1 binding, runs the PCP exchange upstream through natd, stores the result
durably and only then answers. If anything fails half-way, the NAT1 binding and the
row are removed before the control point hears the error (ARCHITECTURE.md).

The PCP protocol logic itself is the sans-I/O :class:`controld.pcp.client.PcpClient`;
this module is its edge: it turns Transmit events into natd requests, natd's
``pcp.rx`` events into :meth:`PcpClient.receive` calls, and runs its timer.
"""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import logging
import os
import random
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from controld.errors import UPnPError, upnp_error_for_pcp
from controld.lifecycle import LISTED, Ev, State, next_state
from controld.natd_link import NatdError, NatdLink
from controld.pcp import client as pcpc
from controld.table import Mapping, MappingTable
from shared import pcp, wire

log = logging.getLogger("controld.iwf")

IGD2_MAX_LEASE = 604800  # RFC 6970 §4.1: IGD:2 lease 0 means this (rfc6970-iwf item 71)
DISCARD_PORT = 9  # RFC 6970 §4.2: probe port to learn the external address (item 25)
PROBE_LIFETIME = 120
MODES = ("auto", "nat1-only", "cascaded", "no-nat1")


@dataclass
class IwfConfig:
    mode: str = "auto"
    pcp_server: str | None = None  # None: natd's WAN default router (RFC 6887 §8.1)
    pcp_timeout: float = 10.0  # bound on one exchange inside a SOAP action (rfc6970-iwf item 13)
    secure_mode: bool = True  # InternalClient must be the caller (rfc6970-iwf item 88)
    recovery_pace: float = 0.01  # seconds between re-created mappings after a state loss


def _is_private(ip: str | None) -> bool:
    if ip is None:
        return True
    a = ipaddress.IPv4Address(ip)
    return a.is_private or a in ipaddress.IPv4Network("100.64.0.0/10")


class Iwf:
    """Interworking core: one table, natd for NAT1 and the WAN, PCP upstream."""

    def __init__(self, cfg: IwfConfig, table: MappingTable, link: NatdLink,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.table = table
        self.link = link
        self.clock = clock
        self.wall = wall
        self.rng = rng or random.SystemRandom()
        self.client = pcpc.PcpClient(self.rng)
        self.mode = cfg.mode if cfg.mode != "auto" else "nat1-only"
        self.wan_ip: str | None = None
        self.gateway: str | None = None
        self.natd_boot: str | None = None
        self.server_ext_ip: str | None = None  # NAT2's external address, from any MAP response
        self.ext_ip_by_cp: dict[str, str] = {}  # rfc6970-iwf item 14: per control point
        self.on_change: Callable[[], None] = lambda: None  # GENA hook: entries or address changed
        self._waiters: dict[Hashable, asyncio.Future[pcp.Response | None]] = {}
        self._wake = asyncio.Event()
        self._renewals: list[tuple[float, int, int]] = []  # heap of (due wall time, mid, attempt)
        self._due: dict[int, tuple[float, int]] = {}  # the live entry per mapping
        self._probe_seq = 0
        self._tasks: list[asyncio.Task[None]] = []

    # --- start, natd and WAN events --------------------------------------------------

    @property
    def server(self) -> str | None:
        return self.cfg.pcp_server or self.gateway

    async def start(self) -> None:
        """Greet natd, restore NAT1 from the table, decide the mode, resume renewals."""
        hello = await self.link.call(wire.Hello(), timeout=30)
        assert isinstance(hello, wire.HelloReply)
        self.natd_boot, self.wan_ip, self.gateway = hello.boot_id, hello.wan_ip, hello.gateway
        for m in list(self.table.by_id.values()):
            if m.state not in LISTED:  # a previous run stopped half-way: nothing was promised
                log.info("dropping unfinished %s (%s)", m.describe(), m.state.value)
                self.table.delete(m)
        await self.sync_nat1()
        self._tasks = [asyncio.create_task(self._timer()), asyncio.create_task(self._renewer())]
        await self.decide_mode()
        for i, m in enumerate(self.table.listed()):
            # Re-assert upstream with the stored nonces, paced (ARCHITECTURE.md, recovery).
            self._schedule(m, self.wall() + i * self.cfg.recovery_pace)
        log.info("iwf up: mode=%s wan=%s pcp-server=%s external=%s, %d mappings restored",
                 self.mode, self.wan_ip, self.server, self.server_ext_ip, self.table.count())

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()

    async def sync_nat1(self) -> None:
        """Send natd the whole NAT1 set (after our start or natd's restart)."""
        bindings = [wire.Binding(m.id, m.proto, m.int_client, m.int_port, m.nat1_port)
                    for m in self.table.listed() if m.nat1_port]
        reply = await self.link.call(wire.Sync(bindings), timeout=30)
        assert isinstance(reply, wire.SyncReply)
        log.info("nat1 sync: %d bindings (+%d -%d)", len(bindings), reply.added, reply.removed)

    async def decide_mode(self) -> None:
        """``auto``: cascaded when the WAN address is private/shared and a PCP server answers."""
        if self.cfg.mode == "nat1-only":
            self.mode = "nat1-only"
            return
        if self.cfg.mode == "auto" and not _is_private(self.wan_ip):
            self.mode = "nat1-only"
            return
        ok = await self._probe_external()
        if self.cfg.mode == "auto":
            self.mode = "cascaded" if ok else "nat1-only"
            if not ok:
                log.warning("WAN %s is private and no PCP server answered at %s: classic IGD only; "
                            "the Internet cannot reach these mappings", self.wan_ip, self.server)
        else:
            self.mode = self.cfg.mode

    async def _probe_external(self) -> bool:
        """Learn NAT2's external address with a short discard-port MAP (rfc6970-iwf item 25)."""
        if self.server is None or self.wan_ip is None:
            return False
        self._probe_seq += 1
        nonce = os.urandom(12)
        req = self._map_request(nonce, pcp.PROTO_TCP, DISCARD_PORT, 0, PROBE_LIFETIME)
        resp = await self._exchange(("probe", self._probe_seq), req, None, None, self.cfg.pcp_timeout)
        if resp is None:
            return False
        if resp.result == pcp.Result.SUCCESS and resp.map is not None:
            self._learn_external(str(resp.map.external_ip))
            # Leave nothing behind on NAT2: delete the probe mapping at once.
            dreq = self._map_request(nonce, pcp.PROTO_TCP, DISCARD_PORT, 0, 0)
            asyncio.create_task(self._exchange(("probe-del", self._probe_seq), dreq, None, None, 10))
        return True

    def _learn_external(self, ip: str) -> None:
        if ip != self.server_ext_ip:
            log.info("external address (NAT2) is %s", ip)
            self.server_ext_ip = ip
            self.on_change()

    async def on_natd_event(self, msg: wire.Message) -> None:
        """Events from natd: PCP packets, WAN changes, heartbeats (restart detection)."""
        if isinstance(msg, wire.PcpReceived):
            self._dispatch(self.client.receive(msg.server, msg.packet, self.clock(), msg.lan_ip))
        elif isinstance(msg, wire.Heartbeat):
            if self.natd_boot is not None and msg.boot_id != self.natd_boot:
                log.warning("natd restarted (boot %s); re-syncing NAT1", msg.boot_id)
                self.natd_boot = msg.boot_id
                await self.sync_nat1()
            self.natd_boot = msg.boot_id
        elif isinstance(msg, wire.WanChanged):
            old = self.wan_ip
            self.wan_ip, self.gateway = msg.wan_ip, msg.gateway
            if msg.wan_ip != old:
                log.info("WAN address %s -> %s; re-deciding mode and re-creating upstream", old, msg.wan_ip)
                self.server_ext_ip = None
                self.client.epochs.clear()
                await self.decide_mode()
                self._recover_all()
                self.on_change()

    # --- the PCP edge ------------------------------------------------------------------

    def _map_request(self, nonce: bytes, proto: int, iport: int, eport: int, lifetime: int,
                     ext_ip: str | None = None, prefer_failure: bool = False,
                     third_party: str | None = None, description: str | None = None) -> pcp.Request:
        """A MAP request; natd fills in the client address (and the NAT1 port) on the way out."""
        eip = ipaddress.IPv4Address(ext_ip) if ext_ip and lifetime else pcp.any_address(4)
        opts = pcp.Options(
            third_party=ipaddress.IPv4Address(third_party) if third_party else None,
            prefer_failure=prefer_failure and lifetime > 0 and eport > 0,
            description=description if lifetime and description else None)
        # A delete carries port 0 and the all-zeros address of its family (erratum 3621).
        data = pcp.MapData(nonce, proto, iport, eport if lifetime else 0, eip)
        return pcp.Request(pcp.Opcode.MAP, lifetime, ipaddress.IPv4Address(self.wan_ip or "0.0.0.0"), data, opts)

    async def _exchange(self, key: Hashable, req: pcp.Request, mid: int | None,
                        internal_ip: str | None, bound: float | None) -> pcp.Response | None:
        """Run one PCP exchange; None when it gave up (no answer within ``bound``)."""
        server = self.server
        if server is None:
            return None
        fut: asyncio.Future[pcp.Response | None] = asyncio.get_running_loop().create_future()
        old = self._waiters.pop(key, None)
        if old is not None and not old.done():
            old.set_result(None)
        self._waiters[key] = fut
        self._dispatch(self.client.request(key, server, req, self.clock(), bound, internal_ip))
        self._wake.set()
        try:
            return await fut
        finally:
            if self._waiters.get(key) is fut:
                del self._waiters[key]
                self.client.cancel(key)

    def _dispatch(self, events: list[pcpc.Event]) -> None:
        for ev in events:
            if isinstance(ev, pcpc.Transmit):
                mid = ev.key[1] if isinstance(ev.key, tuple) and ev.key[0] == "map" else None
                asyncio.create_task(self._transmit(ev, mid if self.mode == "cascaded" else None))
            elif isinstance(ev, pcpc.Answer | pcpc.GaveUp):
                fut = self._waiters.get(ev.key)
                if fut is not None and not fut.done():
                    fut.set_result(ev.response if isinstance(ev, pcpc.Answer) else None)
            elif isinstance(ev, pcpc.EpochLost):
                log.warning("PCP server %s lost its state (epoch); re-creating every mapping", ev.server)
                self._recover_all()
            elif isinstance(ev, pcpc.Unsolicited):
                self._unsolicited(ev)

    async def _transmit(self, ev: pcpc.Transmit, mid: int | None) -> None:
        try:
            await self.link.call(wire.PcpSend(ev.server, ev.packet, mid))
        except NatdError as exc:
            log.warning("PCP send to %s failed: %s", ev.server, exc)

    def _unsolicited(self, ev: pcpc.Unsolicited) -> None:
        resp = ev.response
        if resp.opcode == pcp.Opcode.ANNOUNCE:
            return  # epoch already checked in receive(); a valid epoch needs no action (§14.1.3)
        # A Mapping Update (RFC 6887 §14.2, rfc6970-iwf item 83): update the table quietly.
        for m in self.table.listed():
            if resp.map and m.nonce == resp.map.nonce and resp.result == pcp.Result.SUCCESS:
                m.ext_ip = str(resp.map.external_ip)
                m.ext_port = resp.map.external_port
                self.table.save(m)
                log.info("mapping update from %s: %s", ev.server, m.describe())
                self.on_change()

    async def _timer(self) -> None:
        """Drive the PCP client's retransmissions."""
        while True:
            due = self.client.next_timer()
            timeout = None if due is None else max(0.0, due - self.clock())
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            self._dispatch(self.client.poll(self.clock()))

    # --- renewal, lease end, recovery ------------------------------------------------

    def _schedule(self, m: Mapping, due: float, attempt: int = 0) -> None:
        """Set the mapping's next renewal (or lease end, whichever is first); replaces the last."""
        if m.lease_end is not None:
            due = min(due, m.lease_end)
        self._due[m.id] = (due, attempt)
        heapq.heappush(self._renewals, (due, m.id, attempt))

    def _recover_all(self) -> None:
        now = self.wall()
        for i, m in enumerate(self.table.listed()):
            if m.mode != "nat1-only":
                m.state = next_state(m.state, Ev.STATE_LOST)
                self.table.save(m)
                self._schedule(m, now + i * self.cfg.recovery_pace)

    async def _renewer(self) -> None:
        """Renew PCP mappings at RFC 6887 §11.2.1 times; end UPnP leases (rfc6970-iwf §12)."""
        while True:
            now = self.wall()
            if not self._renewals or self._renewals[0][0] > now:
                # Poll at least once a second so a newly scheduled earlier time is never missed.
                await asyncio.sleep(1.0 if not self._renewals else min(1.0, self._renewals[0][0] - now))
                continue
            due, mid, attempt = heapq.heappop(self._renewals)
            if self._due.get(mid) != (due, attempt):
                continue  # superseded by a later schedule
            del self._due[mid]
            m = self.table.by_id.get(mid)
            if m is None or m.state not in LISTED:
                continue
            if m.lease_end is not None and now >= m.lease_end:
                log.info("lease ended: %s", m.describe())
                asyncio.create_task(self._remove(m, "lease ended"))
                continue
            if m.mode == "nat1-only":
                if m.lease_end is not None:
                    self._schedule(m, m.lease_end)
                continue
            asyncio.create_task(self._renew(m, attempt))

    async def _renew(self, m: Mapping, attempt: int) -> None:
        if m.state == State.ACTIVE:
            m.state = next_state(m.state, Ev.RENEW_DUE)
        lifetime = self._requested_lifetime(m)
        req = self._map_request(m.nonce or b"\0" * 12, m.proto, m.int_port, m.ext_port, lifetime,
                                m.ext_ip, m.prefer_failure, self._third_party(m), m.description)
        bound = max(pcpc.MIN_RENEW_GAP, (m.pcp_expiry or self.wall()) - self.wall()) if m.state == State.RENEWING else 30.0
        resp = await self._exchange(("map", m.id), req, m.id, m.int_client, bound)
        if self.table.by_id.get(m.id) is not m or m.state not in LISTED:
            return
        now = self.wall()
        if resp is not None and resp.result == pcp.Result.SUCCESS and resp.map is not None:
            self._granted(m, resp)
            m.state = next_state(m.state, Ev.UPSTREAM_OK)
            self.table.save(m)
            log.info("renewed %s for %d s", m.describe(), resp.lifetime)
            return
        ev = Ev.TIMEOUT if resp is None else Ev.UPSTREAM_ERROR
        m.state = next_state(m.state, ev)
        self.table.save(m)
        log.warning("renewal of %s failed (%s); retrying", m.describe(),
                    "no answer" if resp is None else pcp.Result(resp.result).name)
        self._schedule(m, now + max(pcpc.MIN_RENEW_GAP, 2.0 ** min(attempt, 8)), attempt + 1)

    def _granted(self, m: Mapping, resp: pcp.Response) -> None:
        assert resp.map is not None
        now = self.wall()
        m.ext_ip = str(resp.map.external_ip)
        m.ext_port = resp.map.external_port
        m.pcp_lifetime = resp.lifetime
        m.pcp_expiry = now + resp.lifetime
        self._learn_external(m.ext_ip)
        self.ext_ip_by_cp[m.cp] = m.ext_ip
        self._schedule(m, pcpc.renewal_time(resp.lifetime, now, 0, self.rng))

    def _requested_lifetime(self, m: Mapping) -> int:
        """rfc6970-iwf items 69-71: infinite -> 0xFFFFFFFF; never past the UPnP lease."""
        if m.lease_end is None:
            return pcp.MAX_LIFETIME
        return max(1, int(m.lease_end - self.wall()))

    def _third_party(self, m: Mapping) -> str | None:
        return m.int_client if m.mode == "no-nat1" else None

    # --- actions -----------------------------------------------------------------------

    async def add_port_mapping(self, cp: str, igd: int, remote_host: str, ext_port: int, proto: int,
                               int_port: int, int_client: str, enabled: bool, description: str,
                               lease: int) -> Mapping:
        """AddPortMapping (RFC 6970 §5.6.2): MAP with PREFER_FAILURE for exactly ``ext_port``."""
        if not enabled:
            raise UPnPError(402, "PortMappingEnabled must be 1: PCP cannot disable a mapping (rfc6970-iwf item 16)")
        if ext_port == 0:
            raise UPnPError(716, "use AddAnyPortMapping for a wildcard port")
        if self.cfg.secure_mode and int_client != cp:
            raise UPnPError(606, "InternalClient must be the caller's own address")
        if igd >= 2 and (lease == 0 or lease > IGD2_MAX_LEASE):
            lease = IGD2_MAX_LEASE  # rfc6970-iwf item 71
        existing = self.table.find(ext_port, proto)
        if existing is not None:
            if existing.state not in LISTED or (existing.int_client, existing.int_port) != (int_client, int_port):
                raise UPnPError(718, f"{existing.proto_name} {ext_port} is mapped to {existing.int_client}")
            return await self._refresh(existing, description, lease)
        now = self.wall()
        m = Mapping(id=self.table.new_id(), cp=cp, igd=igd, remote_host=remote_host, ext_port=ext_port,
                    proto=proto, int_client=int_client, int_port=int_port, description=description,
                    lease=lease, lease_end=now + lease if lease else None, state=State.PENDING,
                    created=now, nonce=os.urandom(12), pcp_server=self.server, prefer_failure=True,
                    mode=self.mode)
        return await self._create(m, "AddPortMapping")

    async def add_any_port_mapping(self, cp: str, igd: int, remote_host: str, ext_port: int, proto: int,
                                   int_port: int, int_client: str, enabled: bool, description: str,
                                   lease: int) -> Mapping:
        """AddAnyPortMapping (RFC 6970 §5.6.1): MAP without PREFER_FAILURE; the answer names the port."""
        if not enabled:
            raise UPnPError(402, "PortMappingEnabled must be 1 (rfc6970-iwf item 16)")
        if self.cfg.secure_mode and int_client != cp:
            raise UPnPError(606, "InternalClient must be the caller's own address")
        if lease == 0 or lease > IGD2_MAX_LEASE:
            lease = IGD2_MAX_LEASE  # an IGD:2 action: rfc6970-iwf item 71
        existing = self.table.find(ext_port, proto) if ext_port else None
        if existing is not None and existing.state in LISTED and \
                (existing.int_client, existing.int_port) == (int_client, int_port):
            return await self._refresh(existing, description, lease)
        now = self.wall()
        m = Mapping(id=self.table.new_id(), cp=cp, igd=igd, remote_host=remote_host, ext_port=ext_port,
                    proto=proto, int_client=int_client, int_port=int_port, description=description,
                    lease=lease, lease_end=now + lease, state=State.PENDING, created=now,
                    nonce=os.urandom(12), pcp_server=self.server, prefer_failure=False, mode=self.mode)
        return await self._create(m, "AddAnyPortMapping")

    async def delete_port_mapping_range(self, cp: str, igd: int, start: int, end: int, proto: int,
                                        manage: bool) -> int:
        """DeletePortMappingRange (RFC 6970 §5.8): one MAP delete per local match; returns the count.

        Only the caller's own mappings unless ``manage`` (the caller asked and is allowed).
        """
        if start > end:
            raise UPnPError(733, "StartPort is greater than EndPort")
        victims = [m for m in self.table.listed() if m.proto == proto and start <= m.ext_port <= end
                   and (manage or m.cp == cp or m.int_client == cp)]
        if not victims:
            raise UPnPError(730, f"no mapping in {start}-{end}")  # rfc6970-iwf item 62: nothing sent
        await asyncio.gather(*(self._remove(m, f"range delete by {cp}") for m in victims))
        return len(victims)

    async def _refresh(self, m: Mapping, description: str, lease: int) -> Mapping:
        """The owner re-adds its own mapping: new lease, same nonce (rfc6970-iwf item 54)."""
        m.description = description
        m.lease = lease
        m.lease_end = self.wall() + lease if lease else None
        if m.mode != "nat1-only":
            req = self._map_request(m.nonce or b"\0" * 12, m.proto, m.int_port, m.ext_port,
                                    self._requested_lifetime(m), m.ext_ip, True, self._third_party(m), description)
            resp = await self._exchange(("map", m.id), req, m.id, m.int_client, self.cfg.pcp_timeout)
            if resp is None:
                raise UPnPError(501, "the PCP server did not answer")
            if resp.result != pcp.Result.SUCCESS or resp.map is None:
                raise upnp_error_for_pcp(resp.result, m.igd, "AddPortMapping")
            self._granted(m, resp)
        self.table.save(m)
        log.info("refreshed %s lease=%s", m.describe(), m.lease or "infinite")
        return m

    async def _create(self, m: Mapping, action: str) -> Mapping:
        self.table.save(m)  # the intent is recorded before anything is sent
        try:
            if m.mode in ("cascaded", "nat1-only"):
                try:
                    reply = await self.link.call(wire.Bind(m.id, m.proto, m.int_client, m.int_port,
                                                           m.ext_port, exact=m.mode == "nat1-only"))
                except NatdError as exc:
                    if exc.code == "port-in-use":
                        raise UPnPError(718, str(exc)) from None
                    if exc.code in ("quota", "no-ports"):
                        raise UPnPError(728, str(exc)) from None
                    if exc.code == "not-lan":
                        raise UPnPError(402, str(exc)) from None
                    raise UPnPError(501, str(exc)) from None
                assert isinstance(reply, wire.BindReply)
                m.nat1_port = reply.wan_port
            if m.mode == "nat1-only":
                m.ext_ip = self.wan_ip
                m.ext_port = m.nat1_port or m.ext_port
                if m.lease_end is not None:
                    self._schedule(m, m.lease_end)
            else:
                req = self._map_request(m.nonce or b"", m.proto, m.int_port, m.ext_port,
                                        self._requested_lifetime(m), None, m.prefer_failure,
                                        self._third_party(m), m.description)
                resp = await self._exchange(("map", m.id), req, m.id, m.int_client, self.cfg.pcp_timeout)
                if resp is None:
                    raise UPnPError(501, f"no answer from PCP server {self.server}")
                if resp.result != pcp.Result.SUCCESS or resp.map is None:
                    log.info("PCP refused %s: %s", m.describe(), pcp.Result(resp.result).name
                             if resp.result in pcp.Result._value2member_map_ else resp.result)
                    raise upnp_error_for_pcp(resp.result, m.igd, action)
                self._granted(m, resp)
        except BaseException as exc:
            m.state = next_state(m.state, Ev.TIMEOUT if isinstance(exc, UPnPError) and exc.code == 501
                                 else Ev.UPSTREAM_ERROR)
            await self._undo(m)
            raise
        m.state = next_state(m.state, Ev.UPSTREAM_OK)
        self.table.save(m)
        log.info("added %s lease=%s", m.describe(), m.lease or "infinite")
        self.on_change()
        return m

    async def _undo(self, m: Mapping) -> None:
        """Leave nothing behind for a mapping that never became active."""
        self.table.delete(m)
        if m.nat1_port is not None:
            try:
                await self.link.call(wire.Unbind(m.id))
            except NatdError as exc:
                log.error("could not remove NAT1 binding of %s: %s", m.describe(), exc)

    async def delete_port_mapping(self, cp: str, igd: int, remote_host: str, ext_port: int, proto: int) -> None:
        """DeletePortMapping (RFC 6970 §5.8): local match first, then MAP lifetime 0."""
        m = self.table.find(ext_port, proto)
        if m is None or m.state not in LISTED:
            raise UPnPError(714, f"no mapping for {ext_port}")  # rfc6970-iwf item 62: nothing sent
        if self.cfg.secure_mode and m.cp != cp and m.int_client != cp:
            raise UPnPError(606 if igd >= 2 else 714, "the mapping belongs to another control point")
        error = await self._remove(m, f"deleted by {cp}")
        if error is not None:
            raise error

    async def _remove(self, m: Mapping, why: str) -> UPnPError | None:
        """Delete upstream (same nonce, port 0), unbind NAT1, drop the row; the row goes whatever NAT2 says."""
        m.state = next_state(m.state, Ev.DELETE)
        self.table.save(m)
        error = None
        if m.mode != "nat1-only" and m.nonce:
            req = self._map_request(m.nonce, m.proto, m.int_port, 0, 0, third_party=self._third_party(m))
            resp = await self._exchange(("map", m.id), req, m.id, m.int_client, self.cfg.pcp_timeout)
            if resp is None:
                error = UPnPError(501, "the PCP server did not answer the delete")
            elif resp.result != pcp.Result.SUCCESS:
                error = upnp_error_for_pcp(resp.result, m.igd, "DeletePortMapping")
        m.state = next_state(m.state, Ev.DELETED)
        await self._undo(m)
        log.info("removed %s: %s%s", m.describe(), why, f" (upstream: {error})" if error else "")
        self.on_change()
        return error

    def get_specific(self, cp: str, remote_host: str, ext_port: int, proto: int) -> Mapping:
        """GetSpecificPortMappingEntry from the local table (RFC 6970 §5.7)."""
        m = self.table.find(ext_port, proto)
        if m is None or m.state not in LISTED:
            raise UPnPError(714, f"no mapping for {ext_port}")
        return m

    def get_generic(self, index: int) -> Mapping:
        """GetGenericPortMappingEntry: answered locally, never sent upstream (rfc6970-iwf item 55)."""
        m = self.table.at_index(index)
        if m is None:
            raise UPnPError(713, f"index {index} out of range")
        return m

    def external_ip(self, cp: str) -> str:
        """ExternalIPAddress for ``cp``: its last PCP answer, else NAT2's address (rfc6970-iwf item 14)."""
        if self.mode == "nat1-only":
            return self.wan_ip if self.wan_ip and not _is_private(self.wan_ip) else ""
        return self.ext_ip_by_cp.get(cp) or self.server_ext_ip or ""

    def connected(self) -> bool:
        return self.wan_ip is not None and (self.mode == "nat1-only" or self.server_ext_ip is not None)

    def lease_remaining(self, m: Mapping) -> int:
        """What the control point sees as the remaining lease (0 for infinite)."""
        if m.lease_end is None:
            return 0
        return max(0, int(m.lease_end - self.wall()))
