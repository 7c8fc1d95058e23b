"""The protocol-neutral mapping service: the RFC 6970 interworking core over one table.

Front ends (UPnP today; PCP, NAT-PMP and the operator API next) call the ``async``
operations here with an :class:`~controld.core.model.Origin` and a neutral request;
failures are :class:`~controld.core.model.CoreError`, never a front end's code. Each
operation checks the policy (once, here, for every front end), validates against the
table, records its intent, asks natd for the NAT1 binding, runs the PCP exchange
upstream through natd, stores the result durably and only then answers. If anything
fails half-way, the NAT1 binding and the row are removed before the client hears the
error (docs/core.md).

The PCP protocol logic itself is the sans-I/O :class:`controld.pcp.client.PcpClient`;
this module is its edge: it turns Transmit events into natd requests, natd's
``pcp.rx`` events into :meth:`PcpClient.receive` calls, and runs its timer.

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
import ipaddress
import logging
import os
import random
import time
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Any

from controld.core.lifecycle import LISTED, Ev, State, next_state
from controld.core.model import CoreError, CreateRequest, ErrorKind, Mapping, Origin
from controld.core.policy import Policy
from controld.core.store import MappingTable
from controld.core.upstream import (
    MODES,
    REDECIDE_S,
    EpochPollDue,
    MappingDue,
    RedecideDue,
    TimerEvent,
    UpstreamTimers,
    choose_mode,
    is_private,
    needs_probe,
    recovery_due,
)
from controld.natd_link import NatdError, NatdLink
from controld.pcp import client as pcpc
from controld.pcp.discovery import ServerFile, choose_server
from shared import pcp, wire
from shared.const import DISCARD_PORT, PCP_PORTS, PROBE_LIFETIME, PROTOCOLS, TCP, UDP

log = logging.getLogger("controld.core.service")

MAX_CP_ADDRESSES = 4096  # per-CP ExternalIPAddress entries kept (bounded)
__all__ = ["MODES", "Iwf", "IwfConfig"]
NATD_MARGIN_S = 5.0  # a PCP exchange's natd request may take this much longer than its wait
# natd's refusal codes for a NAT1 binding, as neutral kinds (anything else: UNAVAILABLE).
NATD_ERRORS: dict[str, ErrorKind] = {"port-in-use": ErrorKind.CONFLICT, "quota": ErrorKind.QUOTA,
                                     "no-ports": ErrorKind.QUOTA, "not-lan": ErrorKind.INVALID}


@dataclass
class IwfConfig:
    mode: str = "auto"
    pcp_server: str | None = None  # None: DHCP option 158 file, else the WAN default router (RFC 6887 §8.1)
    pcp_server_file: str | None = None  # written by the DHCP client hook (packaging/hooks/)
    pcp_timeout: float = 10.0  # bound on one exchange inside a SOAP action (docs/requirements.md IWF-13)
    service_wait: float = 2.0  # on start, re-assert after RAND(0, this) seconds (docs/core.md)
    recovery_window: int = 32  # background renewals/re-creations in flight at once (pacing)
    short_error_retry: float = 0.0  # docs/requirements.md IWF-46, IWF-51, §18 item 4: seconds to wait, 0 = off
    cpe_retries: int = 2  # CANNOT_PROVIDE_EXTERNAL retries when the above is on (IWF-51 default)
    epoch_poll: float = 30.0  # solicited ANNOUNCE this often while mappings live upstream (RFC 6887 §14.1); 0 = off


class _Superseded(Exception):
    """A newer exchange for the same mapping replaced this one."""


def _description(text: str) -> str:
    """The DESCRIPTION text sent upstream (docs/requirements.md IWF-23), blank-padded to a multiple of 4.

    miniupnpd 2.3.1 ignores option padding and answers MALFORMED_OPTION to any option
    whose length is not a multiple of 4 (measured on the test bed); blanks keep the text
    valid UTF-8 without a trailing NUL (RFC 7220 §4).
    """
    raw = pcp.description_bytes(text)
    return raw.decode("utf-8") + " " * (-len(raw) % 4)


def _result_name(result: int) -> str:
    return pcp.Result(result).name if result in pcp.Result._value2member_map_ else str(result)


class Iwf:
    """Interworking core: one table, natd for NAT1 and the WAN, PCP upstream."""

    def __init__(self, cfg: IwfConfig, table: MappingTable, link: NatdLink,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 rng: random.Random | None = None, policy: Policy | None = None) -> None:
        self.cfg = cfg
        self.policy = policy or Policy()
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
        self.ext_ip_by_cp: dict[str, str] = {}  # docs/requirements.md IWF-14: per control point
        self.server_file = ServerFile(cfg.pcp_server_file)
        self._server_seen: str | None = None
        self._waiters: dict[Hashable, asyncio.Future[pcp.Response | None]] = {}
        self._timer: asyncio.TimerHandle | None = None  # the one timer (see _arm)
        self._timer_at: float | None = None  # its loop time
        self._wan_task: asyncio.Task[None] | None = None
        self._may_move: set[int] = set()  # mappings allowed a new external port (docs/requirements.md IWF-81)
        self.timers = UpstreamTimers()  # renewals, lease ends, redecide, epoch poll: one timer drives all
        self._probe_seq = 0
        self._epoch_seq = 0
        self._probe_lock = asyncio.Lock()  # probes share one internal tuple (discard port): one at a time
        self._slots = asyncio.Semaphore(max(1, cfg.recovery_window))
        self._no_new_until: dict[str, float] = {}  # NO_RESOURCES: no new mappings there (RFC 6887 §11.4)
        self._pf_keys: dict[tuple[bytes, int, int], Hashable] = {}  # outstanding PREFER_FAILURE requests
        self._bg: set[asyncio.Task[object]] = set()

    # --- start, natd and WAN events --------------------------------------------------

    @property
    def server(self) -> str | None:
        """The PCP server: configured, else DHCP option 158, else the default router (RFC 6887 §8.1)."""
        addr, source = choose_server(self.cfg.pcp_server, self.server_file.servers(), self.gateway)
        if addr != self._server_seen:
            log.info("PCP server is %s (%s)", addr, source)
            self._server_seen = addr
        return addr

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> asyncio.Task[object]:
        """A background task kept referenced until it ends (asyncio holds tasks weakly)."""
        task = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        return task

    def _probe_nonce(self) -> bytes:
        """One nonce for every probe, kept across restarts, so a left-over probe mapping stays ours."""
        raw = self.table.get_meta("probe_nonce")
        if raw is None or len(bytes.fromhex(raw)) != 12:
            raw = os.urandom(12).hex()
            self.table.set_meta("probe_nonce", raw)
        return bytes.fromhex(raw)

    async def start(self) -> None:
        """Greet natd, restore NAT1 from the table, decide the mode, re-assert upstream."""
        hello = await self.link.call(wire.Hello(), timeout=30)
        assert isinstance(hello, wire.HelloReply)
        self.natd_boot, self.wan_ip, self.gateway = hello.boot_id, hello.wan_ip, hello.gateway
        # A previous run stopped half-way on these: nothing was promised, but NAT2 may hold them.
        leftovers = [m for m in self.table.by_id.values() if m.state not in LISTED]
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
            self._schedule(m, at, arm=False)
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

    async def sync_nat1(self) -> None:
        """Send natd the whole NAT1 set (after our start or natd's restart)."""
        # Unfinished rows too: a create in flight or a delete after a crash still needs its
        # binding for natd to relay the PCP request (RFC 6970 §5.5).
        bindings = [wire.Binding(m.id, m.proto, m.int_client, m.int_port, m.nat1_port)
                    for m in self.table.by_id.values() if m.nat1_port and m.mode != "no-nat1"]
        reply = await self.link.call(wire.Sync(bindings), timeout=30)
        assert isinstance(reply, wire.SyncReply)
        for mid in reply.refused:  # natd will not forward these (host left the LAN, limit lowered)
            m = self.table.by_id.get(mid)
            if m is not None and m.state in LISTED:
                log.warning("natd refused the NAT1 forward of %s; removing it", m.describe())
                self._spawn(self._remove(m, "natd refused its NAT1 forward"))
        log.info("nat1 sync: %d bindings (+%d -%d)", len(bindings), reply.added, reply.removed)

    async def decide_mode(self) -> None:
        """``auto``: cascaded when the WAN address is private/shared and a PCP server answers.

        docs/requirements.md IWF-12: with no WAN address, or no way to tell whether to use a PCP
        server, the IWF is not invoked (classic IGD). A configured or DHCP-provided server
        is such a way: the IWF then stays cascaded and answers 501 while it is silent (IWF-13).
        """
        ok = await self._probe_external() if needs_probe(self.cfg.mode, self.wan_ip) else None
        told = bool(self.cfg.pcp_server or self.server_file.servers())
        self.mode = choose_mode(self.cfg.mode, self.wan_ip, ok, told)
        if ok is not None and self.cfg.mode == "auto" and self.mode == "nat1-only":
            log.warning("WAN %s is private and no PCP server answered at %s: classic IGD only; "
                        "the Internet cannot reach these mappings", self.wan_ip, self.server)

    async def _redecide(self) -> None:
        """``auto`` fell back to nat1-only on a private WAN: look for the PCP server again."""
        try:
            if self.cfg.mode == "auto" and self.mode == "nat1-only" and self.wan_ip and is_private(self.wan_ip):
                await self.decide_mode()
                if self.mode != "nat1-only":
                    log.info("PCP server %s found: new mappings go upstream (mode %s)", self.server, self.mode)
                    self.table.publish()
        finally:
            self.timers.redecide_at = self.wall() + REDECIDE_S
            self._arm()

    async def _poll_epoch(self) -> None:
        """Ask the server for its Epoch now and then (RFC 6887 §14.1: a client MAY send ANNOUNCE).

        A provider's multicast ANNOUNCE rarely reaches a CPE (and miniupnpd 2.3.1 sends it to
        port 5351, not 5350: measured on the test bed), so a server restart is found within
        ``epoch_poll`` seconds instead of at the next renewal; the answer goes through the
        same epoch check as every response (docs/requirements.md IWF-84). The next poll is
        armed when this one is over; while off (a reload may turn it on) every REDECIDE_S.
        """
        try:
            if self.cfg.epoch_poll > 0 and self.mode != "nat1-only" and self.wan_ip is not None and \
                    any(m.mode != "nat1-only" for m in self.table.listed()):
                self._epoch_seq += 1
                req = pcp.Request(pcp.Opcode.ANNOUNCE, 0, ipaddress.IPv4Address(self.wan_ip))
                try:
                    await self._exchange(("announce", self._epoch_seq), req, None,
                                         min(self.cfg.epoch_poll, self.cfg.pcp_timeout))
                except _Superseded:
                    pass
        finally:
            self.timers.epoch_poll_at = self.wall() + (self.cfg.epoch_poll if self.cfg.epoch_poll > 0 else REDECIDE_S)
            self._arm()

    async def _probe(self, proto: int, ext_port: int, prefer_failure: bool) -> pcp.Response | None:
        """One short MAP from the WAN address for the discard port (docs/requirements.md IWF-25, IWF-57),
        deleted again at once; the probes' internal tuple is shared, so they run one at a time."""
        if self.server is None or self.wan_ip is None:
            return None
        async with self._probe_lock:
            self._probe_seq += 1
            nonce = self._probe_nonce()
            req = self._map_request(nonce, proto, DISCARD_PORT, ext_port, PROBE_LIFETIME,
                                    prefer_failure=prefer_failure)
            try:
                resp = await self._exchange(("probe", self._probe_seq), req, None, self.cfg.pcp_timeout)
            except _Superseded:
                return None
            if resp is not None and resp.result == pcp.Result.SUCCESS and resp.map is not None:
                self._learn_external(str(resp.map.external_ip))
                # Leave nothing behind on NAT2 (docs/requirements.md IWF-60 notes): delete it, same nonce.
                dreq = self._map_request(nonce, proto, DISCARD_PORT, 0, 0)
                try:
                    await self._exchange(("probe-del", self._probe_seq), dreq, None, min(5.0, self.cfg.pcp_timeout))
                except _Superseded:
                    pass
            return resp

    async def _probe_external(self) -> bool:
        """Learn NAT2's external address with a short discard-port MAP (docs/requirements.md IWF-25)."""
        resp = await self._probe(TCP, 0, False)
        return resp is not None and resp.result != pcp.Result.UNSUPP_VERSION

    def _learn_external(self, ip: str) -> None:
        if ip != self.server_ext_ip:
            log.info("external address (NAT2) is %s", ip)
            self.server_ext_ip = ip
            self.table.publish()

    async def on_natd_event(self, msg: wire.Message) -> None:
        """Events from natd: unsolicited PCP packets, WAN changes, heartbeats (restart detection).

        Never waits on a PCP exchange here: this stream must keep flowing, so anything that
        needs one runs as its own task.
        """
        if isinstance(msg, wire.PcpReceived):
            self._dispatch(self.client.receive(msg.server, msg.packet, self.clock(), msg.lan_ip))
        elif isinstance(msg, wire.Heartbeat):
            if self.natd_boot is not None and msg.boot_id != self.natd_boot:
                log.warning("natd restarted (boot %s); re-syncing NAT1", msg.boot_id)
                await self.sync_nat1()  # raises on failure: the next heartbeat tries again
                now = self.wall()
                for mid, (_, attempt) in list(self.timers.due.items()):
                    m = self.table.by_id.get(mid)
                    if attempt > 0 and m is not None:  # renewals that failed while natd was away
                        self._schedule(m, now)
            self.natd_boot = msg.boot_id
        elif isinstance(msg, wire.WanChanged):
            old = self.wan_ip
            self.wan_ip, self.gateway = msg.wan_ip, msg.gateway
            if msg.wan_ip != old:
                log.info("WAN address %s -> %s; re-deciding mode and re-creating upstream", old, msg.wan_ip)
                if self._wan_task is not None:
                    self._wan_task.cancel()  # a newer address supersedes a reaction still running
                self._wan_task = asyncio.create_task(self._wan_changed())

    async def _wan_changed(self) -> None:
        """docs/requirements.md IWF-81: NAT2 keyed the old mappings on the old address; re-create them
        from the new one (the old ones expire there) and re-learn the external address."""
        self.server_ext_ip = None
        self.ext_ip_by_cp.clear()
        self.client.epochs.clear()
        await self.decide_mode()
        self._recover_all(None, 0.0, may_move=True)
        self.table.publish()

    # --- the PCP edge ------------------------------------------------------------------

    def _map_request(self, nonce: bytes, proto: int, iport: int, eport: int, lifetime: int,
                     ext_ip: str | None = None, prefer_failure: bool = False,
                     third_party: str | None = None, description: str | None = None,
                     remote_host: str = "") -> pcp.Request:
        """A MAP request; natd fills in the client address (and the NAT1 port) on the way out."""
        eip = ipaddress.IPv4Address(ext_ip) if ext_ip and lifetime else pcp.any_address(4)
        filters: tuple[pcp.Filter, ...] = ()
        if remote_host and lifetime:
            # RemoteHost -> FILTER, one host, all its ports (docs/requirements.md IWF-20: prefix 96 + 32).
            filters = (pcp.Filter(128, 0, ipaddress.IPv4Address(remote_host)),)
        opts = pcp.Options(
            third_party=ipaddress.IPv4Address(third_party) if third_party else None,
            # Never with port 0 (MALFORMED_OPTION, RFC 6887 §13.2) nor on a delete (docs/requirements.md IWF-49).
            prefer_failure=prefer_failure and lifetime > 0 and eport > 0,
            filters=filters,
            description=_description(description) if lifetime and description else None)  # RFC 7220, item 23
        # A delete carries port 0 and the all-zeros address of its family
        # (RFC 6887 erratum 3621, docs/requirements.md §18 item 2).
        data = pcp.MapData(nonce, proto, iport, eport if lifetime else 0, eip)
        return pcp.Request(pcp.Opcode.MAP, lifetime, ipaddress.IPv4Address(self.wan_ip or "0.0.0.0"), data, opts)

    async def _exchange(self, key: Hashable, req: pcp.Request, m: Mapping | None,
                        bound: float | None) -> pcp.Response | None:
        """Run one PCP exchange; None when it gave up (no answer within ``bound``).

        Raises _Superseded when a newer exchange for the same key took over.
        """
        server = m.pcp_server if m is not None and m.pcp_server else self.server
        if server is None:
            return None
        fut: asyncio.Future[pcp.Response | None] = asyncio.get_running_loop().create_future()
        old = self._waiters.pop(key, None)
        if old is not None and not old.done():
            old.set_exception(_Superseded())
        self._waiters[key] = fut
        pf = (req.map.nonce, req.map.protocol, req.map.internal_port) \
            if req.map is not None and req.options.prefer_failure else None
        if pf is not None:
            self._pf_keys[pf] = key
        # natd rewrites a request to a NAT1 binding only for cascaded mappings (RFC 6970 §5.5).
        via = m.id if m is not None and m.mode == "cascaded" and m.nat1_port else None
        self._dispatch(self.client.request(key, server, req, self.clock(), bound,
                                           m.int_client if m is not None else None, via))
        self._arm()
        try:
            return await fut
        finally:
            if self._waiters.get(key) is fut:
                del self._waiters[key]
                self.client.cancel(key)
            if pf is not None and self._pf_keys.get(pf) == key:
                del self._pf_keys[pf]

    def _dispatch(self, events: list[pcpc.Event]) -> None:
        for ev in events:
            if isinstance(ev, pcpc.Transmit):
                self._spawn(self._transmit(ev))
            elif isinstance(ev, pcpc.Answer | pcpc.GaveUp):
                fut = self._waiters.get(ev.key)
                if fut is not None and not fut.done():
                    fut.set_result(ev.response if isinstance(ev, pcpc.Answer) else None)
            elif isinstance(ev, pcpc.EpochLost):
                # RFC 6887 §8.5, §14.1.3 (docs/requirements.md IWF-82, IWF-84): re-create everything there;
                # after an ANNOUNCE wait a random 0-5 s first.
                delay = self.rng.uniform(0, pcpc.ANNOUNCE_MAX_DELAY) if ev.announce else 0.0
                log.warning("PCP server %s lost its state (%s); re-creating every mapping in %.1f s",
                            ev.server, "ANNOUNCE" if ev.announce else "epoch", delay)
                self._recover_all(ev.server, delay)
            elif isinstance(ev, pcpc.Unsolicited):
                self._unsolicited(ev)

    async def _transmit(self, ev: pcpc.Transmit) -> None:
        """One transmission = one natd request; its reply carries the matched response, if any."""
        wait_ms = min(wire.MAX_WAIT_MS, int(ev.wait * 1000))
        try:
            reply = await self.link.call(wire.PcpExchange(ev.server, ev.packet, ev.via, wait_ms),
                                         timeout=ev.wait + NATD_MARGIN_S)
        except NatdError as exc:
            log.warning("PCP send to %s failed: %s", ev.server, exc)
            return
        if isinstance(reply, wire.PcpAnswer) and reply.packet is not None:
            self._dispatch(self.client.receive(ev.server, reply.packet, self.clock(), reply.lan_ip))

    def _unsolicited(self, ev: pcpc.Unsolicited) -> None:
        resp = ev.response
        if resp.opcode != pcp.Opcode.MAP or resp.map is None:
            return  # an ANNOUNCE: its epoch was checked in receive(); a valid one needs no action
        pf_key = self._pf_keys.get((resp.map.nonce, resp.map.protocol, resp.map.internal_port))
        fut = self._waiters.get(pf_key) if pf_key is not None else None
        if fut is not None and not fut.done() and resp.result == pcp.Result.SUCCESS and resp.lifetime:
            # Our PREFER_FAILURE request got SUCCESS for other values. The client rightly did not
            # take it as the answer (RFC 6887 §11.4 race), but each create uses a fresh nonce, so
            # no stale update can carry it: NAT2 ignored PREFER_FAILURE (miniupnpd 2.3.1 does,
            # measured). Hand it to the waiting action, which compares the port itself.
            log.warning("PCP server %s ignored PREFER_FAILURE (%s): it granted port %d instead", ev.server,
                        pf_key, resp.map.external_port)
            self.client.cancel(pf_key)
            fut.set_result(resp)
            return
        # A Mapping Update (RFC 6887 §14.2, docs/requirements.md IWF-83): update the table quietly.
        for m in self.table.listed():
            if (m.nonce, m.proto, m.int_port) != (resp.map.nonce, resp.map.protocol, resp.map.internal_port):
                continue
            if resp.result != pcp.Result.SUCCESS:
                log.warning("mapping update from %s for %s: %s", ev.server, m.describe(), _result_name(resp.result))
                continue
            if resp.lifetime == 0:
                continue  # the answer to one of our own deletes arriving late
            m = self.table.apply(m, ext_ip=str(resp.map.external_ip), ext_port=resp.map.external_port,
                                 pcp_expiry=self.wall() + min(resp.lifetime, pcpc.MAX_SANE_LIFETIME))
            self._note_cp_address(m)
            log.info("mapping update from %s: %s", ev.server, m.describe())
            self.table.publish()

    def _arm(self) -> None:
        """(Re)arm the one timer at the earliest deadline: the PCP client's next retransmission
        (monotonic clock) or the next upstream deadline (wall clock). Called whenever either may
        have moved earlier; a timer already due sooner is kept."""
        delays = []
        due = self.client.next_timer()
        if due is not None:
            delays.append(due - self.clock())
        deadline = self.timers.next_deadline()
        if deadline is not None:
            delays.append(deadline - self.wall())
        if not delays:
            return
        loop = asyncio.get_running_loop()
        at = loop.time() + max(0.0, min(delays))
        if self._timer is not None and self._timer_at is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = loop.call_at(at, self._on_timer), at

    def _on_timer(self) -> None:
        """The timer fired: retransmit or give up what is due, act on due deadlines, re-arm."""
        self._timer = self._timer_at = None
        self._dispatch(self.client.poll(self.clock()))
        for ev in self.timers.on_timer(self.wall()):
            self._on_due(ev)
        self._arm()

    def _on_due(self, ev: TimerEvent) -> None:
        if isinstance(ev, RedecideDue):
            self._spawn(self._redecide())
        elif isinstance(ev, EpochPollDue):
            self._spawn(self._poll_epoch())
        elif isinstance(ev, MappingDue):
            self._mapping_due(ev.mid, ev.attempt)

    # --- renewal, lease end, recovery ------------------------------------------------

    def _schedule(self, m: Mapping, due: float, attempt: int = 0, arm: bool = True) -> None:
        """Set the mapping's next renewal (or lease end, whichever is first); replaces the last.
        ``arm`` False: the caller schedules many and arms the timer once (10k at start-up)."""
        if m.lease_end is not None:
            due = min(due, m.lease_end)
        self.timers.schedule(m.id, due, attempt)
        if arm:
            self._arm()

    def _recover_all(self, server: str | None, delay: float, may_move: bool = False) -> None:
        """Every upstream mapping (at ``server``, or all) is re-created, paced by the window.

        ``may_move``: after our own WAN address changed, NAT2 still holds the old mappings
        for the old address, so the promised ports may be taken by ourselves: re-create
        without PREFER_FAILURE and let the table follow (docs/requirements.md IWF-81). Otherwise
        (a server restart, IWF-82) a mapping keeps its port or keeps trying.
        """
        at = self.wall() + delay
        for m in self.table.listed():
            if m.mode != "nat1-only" and (server is None or m.pcp_server in (None, server)):
                if may_move:
                    self._may_move.add(m.id)
                m = self.table.apply(m, state=next_state(m.state, Ev.STATE_LOST))
                self._schedule(m, at, arm=False)
        self._arm()

    def _mapping_due(self, mid: int, attempt: int) -> None:
        """A renewal (RFC 6887 §11.2.1) or the lease end (docs/requirements.md IWF-74) is due."""
        m = self.table.by_id.get(mid)
        if m is None or m.state not in LISTED:
            return
        if m.lease_end is not None and self.wall() >= m.lease_end:
            # IWF-74: the lease ended: PCP delete, NAT1 rule, row.
            log.info("lease ended: %s", m.describe())
            self._spawn(self._remove(m, "lease ended"))
            return
        if m.mode == "nat1-only":
            if m.lease_end is not None:
                self._schedule(m, m.lease_end)
            return
        self._spawn(self._renew(m, attempt))

    async def _renew(self, m: Mapping, attempt: int) -> None:
        """Renew (or re-create) ``m`` upstream: same nonce, assigned values suggested (RFC 6887 §11.2.1)."""
        async with self._slots:  # pacing: at most recovery_window background exchanges at once
            cur = self.table.by_id.get(m.id)  # the row as it is now, after waiting for a slot
            if cur is None or cur.state not in LISTED:
                return
            m = cur
            if m.state == State.ACTIVE:
                m = self.table.apply(m, durable=False, state=next_state(m.state, Ev.RENEW_DUE))
            if self.server is not None and m.pcp_server != self.server:
                # A different server (DHCP changed it): a nonce of its own (docs/requirements.md IWF-7).
                log.info("%s moves to PCP server %s", m.describe(), self.server)
                m = self.table.apply(m, durable=False, pcp_server=self.server, nonce=os.urandom(12))
            lifetime = self._requested_lifetime(m)
            strict = m.prefer_failure and m.id not in self._may_move
            req = self._map_request(m.nonce or b"\0" * 12, m.proto, m.int_port, m.ext_port, lifetime,
                                    m.ext_ip, strict, self._third_party(m), m.description,
                                    m.remote_host)
            now = self.wall()
            if m.state == State.RENEWING and m.pcp_expiry:
                bound = max(pcpc.MIN_RENEW_GAP, m.pcp_expiry - now)
            else:
                bound = max(pcpc.MIN_RENEW_GAP, self.cfg.pcp_timeout)
            try:
                resp = await self._exchange(("map", m.id), req, m, bound)
            except _Superseded:
                return  # a refresh or delete took over this mapping's exchange
        cur = self.table.by_id.get(m.id)
        if cur is None or cur.state not in LISTED:
            return
        m, now = cur, self.wall()
        # A SUCCESS with lifetime 0 holds nothing upstream: a failed renewal, retried.
        if resp is not None and resp.result == pcp.Result.SUCCESS and resp.map is not None and resp.lifetime \
                and strict and resp.map.external_port != m.ext_port:
            # The promised port is someone else's now and the server ignored PREFER_FAILURE
            # (miniupnpd does): give the other port back and keep trying for ours (IWF-82).
            log.warning("%s: NAT2 offered port %d instead; released, will retry", m.describe(),
                        resp.map.external_port)
            await self._delete_upstream(m)
            resp = dataclasses.replace(resp, result=pcp.Result.CANNOT_PROVIDE_EXTERNAL)
        if resp is not None and resp.result == pcp.Result.SUCCESS and resp.map is not None and resp.lifetime:
            self._may_move.discard(m.id)
            moved = (str(resp.map.external_ip), resp.map.external_port) != (m.ext_ip, m.ext_port)
            m = self.table.apply(m, **self._grant(resp), state=next_state(m.state, Ev.UPSTREAM_OK))
            self._granted(m)
            # docs/requirements.md IWF-75: renewal answers never reach the CP; a moved mapping is evented.
            log.info("renewed %s for %d s", m.describe(), resp.lifetime)
            if moved:
                self.table.publish()
            return
        ev = Ev.TIMEOUT if resp is None else Ev.UPSTREAM_ERROR
        m = self.table.apply(m, state=next_state(m.state, ev))
        granted, t0 = m.pcp_lifetime or 0, (m.pcp_expiry or now) - (m.pcp_lifetime or 0)
        if m.state == State.RECOVERING:
            # Not in place upstream (server restart, port briefly taken): retry soon, backing off
            # from 4 s to RECOVERY_MAX_BACKOFF, not at the old grant's renewal times (hours away).
            due = recovery_due(now, attempt, self.rng)
        else:
            due = pcpc.retry_time(granted, t0, attempt + 1, now, self.rng)
        # Failed renewal (docs/requirements.md IWF-76, our policy): keep the row, retry until the lease ends.
        log.warning("renewal of %s failed (%s); retrying in %.0f s", m.describe(),
                    "no answer" if resp is None else _result_name(resp.result), due - now)
        self._schedule(m, due, attempt + 1)

    def _grant(self, resp: pcp.Response) -> dict[str, Any]:
        """The row's changes for what NAT2 granted (docs/requirements.md IWF-30)."""
        assert resp.map is not None
        life = min(resp.lifetime, pcpc.MAX_SANE_LIFETIME)  # absurd lifetimes count as a day (§15)
        return {"ext_ip": str(resp.map.external_ip), "ext_port": resp.map.external_port,
                "pcp_lifetime": life, "pcp_expiry": self.wall() + life}

    def _granted(self, m: Mapping) -> None:
        """After a grant is stored: learn the addresses and schedule the first renewal."""
        assert m.ext_ip is not None and m.pcp_lifetime is not None
        now = self.wall()
        self._learn_external(m.ext_ip)
        self._note_cp_address(m)
        # RFC 6887 §11.2.1: renewals never less than 4 s apart, however short the grant.
        self._schedule(m, max(pcpc.renewal_time(m.pcp_lifetime, now, 0, self.rng), now + pcpc.MIN_RENEW_GAP))

    def _note_cp_address(self, m: Mapping) -> None:
        """docs/requirements.md IWF-14, IWF-78: the CP's ExternalIPAddress is its last PCP answer's address."""
        if m.ext_ip is None:
            return
        if m.cp not in self.ext_ip_by_cp and len(self.ext_ip_by_cp) >= MAX_CP_ADDRESSES:
            self.ext_ip_by_cp.pop(next(iter(self.ext_ip_by_cp)))
        if self.ext_ip_by_cp.get(m.cp) != m.ext_ip:
            self.ext_ip_by_cp[m.cp] = m.ext_ip
            self.table.publish()

    def _requested_lifetime(self, m: Mapping) -> int:
        """docs/requirements.md IWF-69 to IWF-71: infinite -> 0xFFFFFFFF; never past the UPnP lease."""
        if m.lease_end is None:
            return pcp.MAX_LIFETIME
        return max(1, int(m.lease_end - self.wall()))

    def _third_party(self, m: Mapping) -> str | None:
        """THIRD_PARTY only without NAT1 (docs/requirements.md IWF-33, IWF-39), never our own address (§13.1)."""
        return m.int_client if m.mode == "no-nat1" and m.int_client != self.wan_ip else None

    # --- operations (every front end) ---------------------------------------------------

    def _new_mapping(self, origin: Origin, req: CreateRequest, ext_port: int) -> Mapping:
        now = self.wall()
        return Mapping(id=self.table.new_id(), cp=origin.client, igd=origin.version, remote_host=req.remote_host,
                       ext_port=ext_port, proto=req.proto, int_client=req.int_client, int_port=req.int_port,
                       description=req.description, lease=req.lease,
                       lease_end=now + req.lease if req.lease else None, state=State.PENDING,
                       created=now, nonce=os.urandom(12), pcp_server=self.server,
                       prefer_failure=req.exact, mode=self.mode)

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
            req = self._map_request(m.nonce or b"\0" * 12, m.proto, m.int_port, m.ext_port,
                                    self._requested_lifetime(wanted), m.ext_ip, True, self._third_party(m),
                                    description, m.remote_host)
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

    async def _upstream(self, m: Mapping, req: pcp.Request) -> pcp.Response:
        """One synchronous MAP for a client's request: the answer, or a CoreError (UPSTREAM
        carries the PCP result that RFC 6970 §4.3 maps).

        With ``short_error_retry`` set, a short-lifetime error is retried once after that
        many seconds, CANNOT_PROVIDE_EXTERNAL up to ``cpe_retries`` times
        (docs/requirements.md IWF-46, IWF-51; off by default per §18 item 4).
        """
        server = m.pcp_server or self.server
        hold = self._no_new_until.get(server or "")
        if m.state == State.PENDING and hold is not None and self.clock() < hold:
            # RFC 6887 §11.4: after NO_RESOURCES, no new mappings at that server for its error lifetime.
            raise CoreError(ErrorKind.UPSTREAM, f"PCP server {server} has no resources for new mappings",
                            pcp.Result.NO_RESOURCES)
        retries = 0
        while True:
            try:
                resp = await self._exchange(("map", m.id), req, m, self.cfg.pcp_timeout)
            except _Superseded:
                raise CoreError(ErrorKind.UNAVAILABLE, "a newer request for this mapping took over") from None
            if resp is None:
                raise CoreError(ErrorKind.UNAVAILABLE, f"no answer from PCP server {server} "
                                                       "(docs/requirements.md IWF-13)")
            if resp.result == pcp.Result.SUCCESS and resp.map is not None:
                return resp
            log.info("PCP refused %s: %s (lifetime %d)", m.describe(), _result_name(resp.result), resp.lifetime)
            if resp.result == pcp.Result.NO_RESOURCES and server and resp.lifetime:
                self._no_new_until[server] = self.clock() + min(resp.lifetime, 1800)
            limit = self.cfg.cpe_retries if resp.result == pcp.Result.CANNOT_PROVIDE_EXTERNAL else 1
            if self.cfg.short_error_retry > 0 and pcpc.is_short_error(resp) and retries < limit:
                retries += 1
                log.info("short-lifetime error for %s: retry %d in %.0f s", m.describe(), retries,
                         self.cfg.short_error_retry)
                await asyncio.sleep(self.cfg.short_error_retry)
                continue
            raise CoreError(ErrorKind.UPSTREAM, f"PCP {_result_name(resp.result)}", resp.result)

    async def _create(self, m: Mapping) -> Mapping:
        # The intent is recorded before anything is sent; on disk before anything goes upstream,
        # which could outlive a crash. With NAT1 that is the write after the bind below (a
        # binding orphaned by a crash before it is removed by the start-up sync); without
        # NAT1 (no-nat1) it is this one.
        m = self.table.apply(m, durable=m.mode == "no-nat1")
        try:
            if m.mode in ("cascaded", "nat1-only"):
                try:
                    reply = await self.link.call(wire.Bind(m.id, m.proto, m.int_client, m.int_port,
                                                           m.ext_port, exact=m.mode == "nat1-only"))
                except NatdError as exc:
                    raise CoreError(NATD_ERRORS.get(exc.code, ErrorKind.UNAVAILABLE), str(exc)) from None
                assert isinstance(reply, wire.BindReply)
                # On disk before the MAP goes out (cascaded): after a crash, the clean-up delete for
                # this row needs its NAT1 binding to be relayed (natd relays bound MAPs only).
                m = self.table.apply(m, durable=m.mode == "cascaded", nat1_port=reply.wan_port)
            granted: dict[str, Any] = {}
            if m.mode == "nat1-only":
                granted = {"ext_ip": self.wan_ip, "ext_port": m.nat1_port or m.ext_port}
            else:
                req = self._map_request(m.nonce or b"", m.proto, m.int_port, m.ext_port,
                                        self._requested_lifetime(m), None, m.prefer_failure,
                                        self._third_party(m), m.description, m.remote_host)
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
            await self._undo(m)
            raise
        # Durable before the client hears "yes" (docs/requirements.md IWF-28 to IWF-30).
        m = self.table.apply(m, **granted, state=next_state(m.state, Ev.UPSTREAM_OK))
        if m.mode == "nat1-only":
            if m.lease_end is not None:
                self._schedule(m, m.lease_end)
        else:
            self._granted(m)
        log.info("added %s lease=%s", m.describe(), m.lease or "infinite")
        self.table.publish()
        return m

    async def _undo(self, m: Mapping) -> None:
        """Leave nothing behind for a mapping that never became active."""
        self.table.delete(m)
        self.timers.drop(m.id)
        if m.nat1_port is not None:
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

    async def _delete_upstream(self, m: Mapping) -> CoreError | None:
        """MAP lifetime 0 with the stored nonce, port 0, all-zeros address (RFC 6887 §15.1, erratum 3621)."""
        if m.mode == "nat1-only" or not m.nonce:
            return None
        req = self._map_request(m.nonce, m.proto, m.int_port, 0, 0, third_party=self._third_party(m))
        try:
            resp = await self._exchange(("map", m.id), req, m, self.cfg.pcp_timeout)
        except _Superseded:
            resp = None
        if resp is None:
            return CoreError(ErrorKind.UNAVAILABLE, "the PCP server did not answer the delete")
        if resp.result != pcp.Result.SUCCESS:
            return CoreError(ErrorKind.UPSTREAM, f"PCP {_result_name(resp.result)}", resp.result)
        return None

    async def _remove(self, m: Mapping, why: str) -> CoreError | None:
        """Delete upstream (same nonce, port 0), unbind NAT1, drop the row; the row goes whatever NAT2 says."""
        cur = self.table.by_id.get(m.id)  # the row as it is now (callers may have waited)
        if cur is None or cur.state not in LISTED:
            return None  # already on its way out
        m = self.table.apply(cur, state=next_state(cur.state, Ev.DELETE))
        error = await self._delete_upstream(m)
        next_state(m.state, Ev.DELETED)  # (checks the transition; the row goes now)
        await self._undo(m)
        log.info("removed %s: %s%s", m.describe(), why, f" (upstream: {error})" if error else "")
        self.table.publish()
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
        """The external address for ``cp``: its last PCP answer, else NAT2's address (IWF-14, IWF-77)."""
        if self.mode == "nat1-only":
            return self.wan_ip if self.wan_ip and not is_private(self.wan_ip) else ""
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
