"""The upstream edge of the core: PCP exchanges through natd, renewals, recovery, epochs.

:class:`controld.core.service.Iwf` holds the protocol-neutral operations (create,
refresh, delete, find, list, host left); this is the I/O they and the background work
run on. It drives the sans-I/O pieces: the PCP client (:class:`controld.pcp.client.PcpClient`:
Transmit events become natd ``pcp.exchange`` requests, natd's answers and ``pcp.rx``
events go back into :meth:`PcpClient.receive`) and the deadlines
(:class:`controld.core.upstream.UpstreamTimers`), with ONE asyncio timer for both (see
:meth:`UpstreamIO._arm`). It also follows natd (restart: NAT1 re-sync) and the WAN
(address change: mode decided again, mappings re-created).

Requirement map (docs/requirements.md IWF-N; RFC 6970 sections):
- modes nat1-only / cascaded / no-nat1, auto (IWF-2, IWF-12, IWF-33 to IWF-39; §5.4, §5.5)
- short-error retry, configurable and off by default (IWF-46, IWF-51; RFC 6970 §5.6)
- the find probe (IWF-56 to IWF-60; §5.7); deletes with the stored nonce (IWF-61 to IWF-67; §5.8)
- leases: infinite by renewal, expiry (IWF-68 to IWF-76; §5.9)
- per client external address (IWF-14, IWF-77, IWF-78; §4.1)
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
from controld.core.model import Address, CoreError, Endpoint, ErrorKind, Mapping
from controld.core.stats import Stats
from controld.core.store import MappingTable, PendingDelete
from controld.core.upstream import (
    DELETE_RETRY_BATCH,
    REDECIDE_S,
    DeleteRetryDue,
    EpochPollDue,
    MappingDue,
    RecoveryGate,
    RedecideDue,
    TimerEvent,
    UpstreamTimers,
    choose_mode,
    delete_retry_due,
    is_private,
    needs_probe,
    recovery_due,
)
from controld.natd_link import NatdError, NatdLink
from controld.pcp import client as pcpc
from controld.pcp.discovery import ServerFile, choose_server
from shared import pcp, wire
from shared.config import default
from shared.const import DISCARD_PORT, PROBE_LIFETIME, TCP

log = logging.getLogger("controld.core.upstream")

MAX_CP_ADDRESSES = 4096  # per-CP ExternalIPAddress entries kept (bounded)
MAX_PENDING_DELETES = 4096  # unconfirmed upstream deletes kept for retries (bounded)
NATD_MARGIN_S = 5.0  # a PCP exchange's natd request may take this much longer than its wait


@dataclass
class IwfConfig:
    """The core's settings; every default is the option table's (shared/config.py OPTIONS)."""

    mode: str = default("mode")
    pcp_server: str | None = None  # None: DHCP option 158 file, else the WAN default router (RFC 6887 §8.1)
    pcp_server_file: str | None = None  # written by the DHCP client hook (packaging/hooks/); None: not read
    pcp_timeout: float = default("pcp-timeout")  # bound on one exchange inside a SOAP action (IWF-13)
    service_wait: float = default("pcp-service-wait")  # on start, re-assert after RAND(0, this) s (docs/core.md)
    recovery_window: int = default("pcp-recovery-window")  # background renewals/re-creations in flight at once
    short_error_retry: float = default("pcp-short-error-retry")  # IWF-46, IWF-51, §18 item 4: seconds, 0 = off
    cpe_retries: int = default("pcp-cpe-retries")  # CANNOT_PROVIDE_EXTERNAL retries when the above is on
    epoch_poll: float = default("pcp-epoch-poll")  # solicited ANNOUNCE period upstream (RFC 6887 §14.1); 0 = off
    external_ip: str | None = None  # configured external address (an outer NAT forwarded by hand)

    @classmethod
    def from_args(cls, args: Any) -> IwfConfig:
        """The settings from controld's parsed command line (argparse names per shared/config.py)."""
        return cls(mode=args.mode, pcp_server=args.pcp_server, pcp_timeout=args.pcp_timeout,
                   pcp_server_file=args.pcp_server_file or None,
                   service_wait=args.pcp_service_wait, recovery_window=args.pcp_recovery_window,
                   short_error_retry=args.pcp_short_error_retry, cpe_retries=args.pcp_cpe_retries,
                   epoch_poll=args.pcp_epoch_poll, external_ip=args.external_ip)


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


class UpstreamIO:
    """The core's upstream state and I/O: natd, the PCP server, the one timer."""

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
        self.ext_ip_by_cp: dict[str, str] = {}  # docs/requirements.md IWF-14: per control point
        self.server_file = ServerFile(cfg.pcp_server_file)
        self._server_seen: str | None = None
        self._waiters: dict[Hashable, asyncio.Future[pcp.Response | None]] = {}
        self._timer: asyncio.TimerHandle | None = None  # the one timer (see _arm)
        self._timer_at: float | None = None  # its loop time
        self._wan_task: asyncio.Task[None] | None = None
        self._may_move: set[int] = set()  # mappings allowed a new external port (docs/requirements.md IWF-81)
        self.timers = UpstreamTimers()  # renewals, lease ends, redecide, epoch poll: one timer drives all
        self.recovery = RecoveryGate()  # epoch losses and ANNOUNCEs: one recovery at a time
        self._recovering_server: str | None = None
        self._probe_seq = 0
        self._epoch_seq = 0
        self._probe_lock = asyncio.Lock()  # probes share one internal tuple (discard port): one at a time
        self._slots = asyncio.Semaphore(max(1, cfg.recovery_window))
        self._no_new_until: dict[str, float] = {}  # NO_RESOURCES: no new mappings there (RFC 6887 §11.4)
        self._pf_keys: dict[tuple[bytes, int, int], Hashable] = {}  # outstanding PREFER_FAILURE requests
        self._bg: set[asyncio.Task[object]] = set()
        self._loss_watchers: list[Callable[[str], None]] = []  # LAN servers announcing a reset (docs/lan-pcp.md)
        self.restored_all = False  # at start: every stored mapping came back (the LAN epoch goes on)
        self._restart_seen: str | None = None
        self.stats = Stats()  # operators' counters (docs/operating.md): counted where each thing happens
        self.stun: wire.StunResult | None = None  # natd's last STUN answer (docs/stun.md)

    async def _remove(self, m: Mapping, why: str) -> CoreError | None:
        """Delete ``m`` everywhere (the service's operation; lease ends and natd refusals end in it)."""
        raise NotImplementedError

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

    # --- natd and WAN events ------------------------------------------------------------

    async def sync_nat1(self) -> None:
        """Send natd the whole NAT1 set (after our start or natd's restart)."""
        # Unfinished rows too: a create in flight or a delete after a crash still needs its
        # binding for natd to relay the PCP request (RFC 6970 §5.5).
        self._arm_delete_retry()  # upstream deletes a previous run could not finish
        bindings = wire.PackedBindings.pack((m.id, m.proto, m.int_client, m.int_port, m.nat1_port)
                                            for m in self.table.by_id.values() if m.nat1_port and m.mode != "no-nat1")
        self.stats.resyncs += 1
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
                    self.table.publish("mode")
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
            self.table.publish("external address")

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
                if msg.boot_id != self._restart_seen:
                    self.stats.natd_restarts += 1
                    self._restart_seen = msg.boot_id  # a failed re-sync retried at the next heartbeat counts once
                await self.sync_nat1()  # raises on failure: the next heartbeat tries again
                now = self.wall()
                for mid, (_, attempt) in list(self.timers.due.items()):
                    m = self.table.by_id.get(mid)
                    if attempt > 0 and m is not None:  # renewals that failed while natd was away
                        self._schedule(m, now)
            self.natd_boot = msg.boot_id
        elif isinstance(msg, wire.StunResult):
            self._on_stun(msg)
        elif isinstance(msg, wire.WanChanged):
            old = self.wan_ip
            self.wan_ip, self.gateway = msg.wan_ip, msg.gateway
            if msg.wan_ip != old:
                log.info("WAN address %s -> %s; re-deciding mode and re-creating upstream", old, msg.wan_ip)
                if self._wan_task is not None:
                    self._wan_task.cancel()  # a newer address supersedes a reaction still running
                self._wan_task = asyncio.create_task(self._wan_changed())
                self._state_lost(f"WAN address {old} -> {msg.wan_ip}")

    def _state_lost(self, why: str) -> None:
        for callback in self._loss_watchers:
            callback(why)

    def _on_stun(self, msg: wire.StunResult) -> None:
        """natd's STUN answer (repeated every few seconds): a changed address re-events ExternalIPAddress."""
        if msg.wan_ip != self.wan_ip:  # asked from an address we no longer have: stale
            return
        before = self._fallback_external()
        self.stun = msg
        if self._fallback_external() != before:
            log.info("external address without PCP is now %r (STUN %s: %s)", self._fallback_external(),
                     msg.server, msg.external_ip or msg.error)
            self.table.publish()

    def set_config(self, cfg: IwfConfig) -> None:
        """Reload: take over ``cfg``; a changed external address override is evented at once."""
        before = self._fallback_external()
        self.cfg = cfg
        if self._fallback_external() != before:
            self.table.publish()

    def _fallback_external(self) -> str:
        """The external address when PCP gave none: configured, else STUN's answer from the current WAN
        address (an error clears it), else the WAN address when it is public."""
        if self.cfg.external_ip:
            return self.cfg.external_ip
        if self.stun is not None and self.stun.external_ip and self.stun.wan_ip == self.wan_ip:
            return self.stun.external_ip
        return self.wan_ip if self.wan_ip and not is_private(self.wan_ip) else ""

    async def _wan_changed(self) -> None:
        """docs/requirements.md IWF-81: NAT2 keyed the old mappings on the old address; re-create them
        from the new one (the old ones expire there) and re-learn the external address."""
        self.server_ext_ip = None
        self.ext_ip_by_cp.clear()
        self.client.epochs.clear()
        await self.decide_mode()
        self._recover_all(None, 0.0, may_move=True)
        self.table.publish("WAN address")

    # --- the PCP edge ------------------------------------------------------------------

    def _map_request(self, nonce: bytes, proto: int, iport: int, eport: int, lifetime: int,
                     ext_ip: Address | None = None, prefer_failure: bool = False,
                     third_party: Address | None = None, description: str | None = None,
                     remote: Address | None = None) -> pcp.Request:
        """A MAP request; natd fills in the client address (and the NAT1 port) on the way out."""
        eip = ext_ip if ext_ip is not None and lifetime else pcp.any_address(4)
        filters: tuple[pcp.Filter, ...] = ()
        if remote is not None and lifetime:
            # RemoteHost -> FILTER, one host, all its ports (docs/requirements.md IWF-20: prefix 96 + 32).
            filters = (pcp.Filter(128, 0, remote),)
        opts = pcp.Options(
            third_party=third_party,
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
                self._recover_coalesced(ev.server, delay)
                self._state_lost(f"PCP server {ev.server} lost its state")
            elif isinstance(ev, pcpc.Unsolicited):
                self._unsolicited(ev)

    async def _transmit(self, ev: pcpc.Transmit) -> None:
        """One transmission = one natd request; its reply carries the matched response, if any."""
        wait_ms = min(wire.MAX_WAIT_MS, int(ev.wait * 1000))
        sent = self.clock()
        try:
            reply = await self.link.call(wire.PcpExchange(ev.server, ev.packet, ev.via, wait_ms),
                                         timeout=ev.wait + NATD_MARGIN_S)
        except NatdError as exc:
            log.warning("PCP send to %s failed: %s", ev.server, exc)
            return
        if isinstance(reply, wire.PcpAnswer) and reply.packet is not None:
            self.stats.rtt(self.clock() - sent)
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
            if not self._update_trusted(ev, m):
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

    def _update_trusted(self, ev: pcpc.Unsolicited, m: Mapping) -> bool:
        """A Mapping Update matched to ``m`` by nonce: only now is its epoch processed (RFC 6887
        §8.4, §8.5), and it may not move ``m`` onto a port another row holds (no two rows on one port)."""
        resp = ev.response
        assert resp.map is not None
        self._dispatch(self.client.check_epoch(ev.server, resp.epoch, self.clock()))
        holder = self.table.find(resp.map.external_port, m.proto)
        if resp.lifetime and holder is not None and holder.id != m.id and holder.state in LISTED:
            log.warning("mapping update from %s refused for %s: port %d is %s's", ev.server, m.describe(),
                        resp.map.external_port, holder.describe())
            return False
        return True

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
        elif isinstance(ev, DeleteRetryDue):
            self._spawn(self._retry_deletes())

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
        self._spawn(self._renew_step(m, attempt))

    def _recover_coalesced(self, server: str | None, delay: float) -> None:
        """A server lost its state: recover, one recovery at a time (RecoveryGate); triggers
        during one restart it once when it is over, however many came (an ANNOUNCE flood)."""
        if self.recovery.trigger(self._recoverable(server), self.clock(), delay):
            self._recovering_server = server
            self._recover_all(server, delay)
        else:
            log.info("PCP server %s: a recovery is under way; it runs once more when over", server)

    def _recoverable(self, server: str | None) -> list[int]:
        return [m.id for m in self.table.listed()
                if m.mode != "nat1-only" and (server is None or m.pcp_server in (None, server))]

    async def _renew_step(self, m: Mapping, attempt: int) -> None:
        """A renewal; when it was the last of a recovery that was triggered again, recover again."""
        try:
            await self._renew(m, attempt)
        finally:
            self._recovery_step_done(m.id)

    def _recovery_step_done(self, mid: int) -> None:
        """Mapping ``mid`` was renewed or re-created (by a recovery, a refresh or a retry)."""
        delay = self.recovery.finished(mid, self.clock())
        if delay is not None:
            server = self._recovering_server
            log.info("PCP server %s: recovering once more in %.1f s (coalesced triggers)", server, delay)
            self.recovery.begin(self._recoverable(server), self.clock() + delay)
            self._recover_all(server, delay)

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
            req = self._request_for(m, lifetime, strict, m.description)
            now = self.wall()
            if m.state == State.RENEWING and m.pcp_expiry:
                bound = max(pcpc.MIN_RENEW_GAP, m.pcp_expiry - now)
            else:
                bound = max(pcpc.MIN_RENEW_GAP, self.cfg.pcp_timeout)
            self.stats.renewals += 1
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
            moved = Endpoint(resp.map.external_ip, resp.map.external_port) != m.external
            m = self.table.apply(m, **self._grant(resp), state=next_state(m.state, Ev.UPSTREAM_OK))
            self._granted(m)
            # docs/requirements.md IWF-75: renewal answers never reach the CP; a moved mapping is evented.
            log.info("renewed %s for %d s%s", m.describe(), resp.lifetime, " (moved)" if moved else "")
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
        self._recovery_step_done(m.id)  # (a refresh may have re-created it before its recovery turn)

    def _note_cp_address(self, m: Mapping) -> None:
        """docs/requirements.md IWF-14, IWF-78: the CP's ExternalIPAddress is its last PCP answer's address."""
        if m.ext_ip is None:
            return
        if m.cp not in self.ext_ip_by_cp and len(self.ext_ip_by_cp) >= MAX_CP_ADDRESSES:
            self.ext_ip_by_cp.pop(next(iter(self.ext_ip_by_cp)))
        if self.ext_ip_by_cp.get(m.cp) != m.ext_ip:
            self.ext_ip_by_cp[m.cp] = m.ext_ip
            self.table.publish("client's external address")

    def _requested_lifetime(self, m: Mapping) -> int:
        """docs/requirements.md IWF-69 to IWF-71: infinite -> 0xFFFFFFFF; never past the UPnP lease."""
        if m.lease_end is None:
            return pcp.MAX_LIFETIME
        return max(1, int(m.lease_end - self.wall()))

    def _third_party(self, m: Mapping) -> Address | None:
        """THIRD_PARTY only without NAT1 (docs/requirements.md IWF-33, IWF-39), never our own address (§13.1)."""
        client = m.internal.ip
        wan = ipaddress.ip_address(self.wan_ip) if self.wan_ip else None
        return client if m.mode == "no-nat1" and client != wan else None

    def _request_for(self, m: Mapping, lifetime: int, prefer_failure: bool = False,
                     description: str | None = None) -> pcp.Request:
        """The MAP for ``m``: its nonce and internal side, suggesting the external side it holds
        (or asks for), its remote host as a FILTER; lifetime 0 makes it the delete."""
        ext = m.external
        return self._map_request(m.nonce or b"\0" * 12, m.proto, m.internal.port, m.ext_port, lifetime,
                                 ext.ip if ext is not None else None, prefer_failure, self._third_party(m),
                                 description, m.remote)

    # --- exchanges on behalf of the operations ---------------------------------------

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

    def _retry_delete_later(self, m: Mapping, error: CoreError | None) -> None:
        """NAT2 did not answer ``m``'s delete: it still holds the port, so the delete stays ours,
        persisted and retried (paced, bounded) until NAT2 confirms or the grant has run out there."""
        if error is None or error.kind != ErrorKind.UNAVAILABLE or m.mode == "nat1-only" or not m.nonce:
            return
        now = self.wall()
        until = m.pcp_expiry if m.pcp_expiry is not None else now + pcpc.MAX_SANE_LIFETIME
        server = m.pcp_server or self.server
        if server is None or until <= now:
            return
        if len(self.table.pending_deletes()) >= MAX_PENDING_DELETES:
            log.error("upstream delete of %s not kept: %d unconfirmed deletes already", m.describe(),
                      MAX_PENDING_DELETES)
            return
        port = m.nat1_port if m.mode == "cascaded" and m.nat1_port else m.int_port  # what NAT2 knows
        tp = self._third_party(m)
        d = PendingDelete(m.id, server, m.nonce, m.proto, port, str(tp) if tp else None, until, 0,
                          delete_retry_due(now, 0, self.rng))
        try:
            self.table.save_pending_delete(d)
        except CoreError as exc:
            log.error("cannot keep the upstream delete of %s for a retry: %s", m.describe(), exc)
            return
        log.warning("upstream delete of %s unconfirmed; retrying until NAT2 confirms", m.describe())
        self._arm_delete_retry()

    def _arm_delete_retry(self) -> None:
        pending = self.table.pending_deletes()
        self.timers.delete_retry_at = pending[0].due if pending else None
        self._arm()

    async def _retry_deletes(self) -> None:
        """Send the due upstream deletes again (at most DELETE_RETRY_BATCH at once); each goes
        once NAT2 answered it or the mapping's NAT2 lifetime passed."""
        try:
            now = self.wall()
            due = [d for d in self.table.pending_deletes() if d.due <= now][:DELETE_RETRY_BATCH]

            async def one(d: PendingDelete) -> None:
                if d.until <= now or d.server != self.server:
                    self.table.drop_pending_delete(d.id)  # expired there, or that server is not ours now
                    return
                tp = ipaddress.ip_address(d.third_party) if d.third_party else None
                req = self._map_request(d.nonce, d.proto, d.int_port, 0, 0, third_party=tp)
                try:
                    resp = await self._exchange(("delete-retry", d.id), req, None, self.cfg.pcp_timeout)
                except _Superseded:
                    return
                if resp is not None:
                    log.info("upstream delete of mapping %d confirmed by %s: %s", d.id, d.server,
                             _result_name(resp.result))
                    self.table.drop_pending_delete(d.id)
                else:
                    self.table.save_pending_delete(dataclasses.replace(
                        d, attempt=d.attempt + 1, due=delete_retry_due(self.wall(), d.attempt + 1, self.rng)))

            results = await asyncio.gather(*(one(d) for d in due), return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    log.warning("upstream delete retry failed: %s", r)
        finally:
            self._arm_delete_retry()

    async def _delete_upstream(self, m: Mapping) -> CoreError | None:
        """MAP lifetime 0 with the stored nonce, port 0, all-zeros address (RFC 6887 §15.1, erratum 3621)."""
        if m.mode == "nat1-only" or not m.nonce:
            return None
        req = self._request_for(m, 0)
        try:
            resp = await self._exchange(("map", m.id), req, m, self.cfg.pcp_timeout)
        except _Superseded:
            resp = None
        if resp is None:
            return CoreError(ErrorKind.UNAVAILABLE, "the PCP server did not answer the delete")
        if resp.result != pcp.Result.SUCCESS:
            return CoreError(ErrorKind.UPSTREAM, f"PCP {_result_name(resp.result)}", resp.result)
        return None
