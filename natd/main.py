"""igdpcp-natd: the privileged NAT daemon (NAT1 in nftables, WAN watch, PCP relay).

It serves controld over ZeroMQ (ROUTER for requests, PUB for events) and trusts
none of it: every message is schema-checked (shared.wire) and policy-checked
(natd.bindings) before anything reaches the kernel.
"""

# ruff: noqa: E402  (the imports follow the ssl block below on purpose)
from __future__ import annotations

import sys

if __name__ == "__main__":  # the daemon, not a test importing it: it never speaks TLS, and asyncio's
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]  # optional import of ssl costs ~4.5 MiB RSS

import argparse
import asyncio
import functools
import ipaddress
import itertools
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import zmq

from natd import conntrack, neigh, nftmon, stun, wan
from natd.bindings import BindingTable, Limits, PolicyError, compact, endpoint
from natd.ctlink import CtWorker
from natd.nft import (
    LAYOUTS,
    Change,
    FwNotReady,
    Layout,
    Nft,
    NftError,
    PinholeNft,
    PinholePlace,
    PinKey,
)
from natd.pinholes import PinholeLimits, PinholeTable, describe
from natd.relay import Answer, MatchKey, PcpRelay, match_key
from shared import config, pcp, wire
from shared.config import parse_args_with_config
from shared.const import DISCARD_PORT, PROTO_NAMES
from shared.daemon import (
    AUTHORIZED_DIR,
    QuietTrim,
    bind_endpoint,
    curve_server,
    gen_keys,
    hold_mmap_threshold,
    install_stop_signals,
    needs_curve,
    release_memory,
    reread_args,
    setup_logging,
)
from shared.guard import Guard, RateLimit
from shared.zio import ZPump

log = logging.getLogger("natd")

HEARTBEAT_S = 1.0
# Right after a start controld's SUB socket has not reconnected yet and ZeroMQ drops what a PUB
# sends to nobody: early beats let controld see the new boot id (and re-sync) within ~0.1 s of joining.
START_BEATS_S = (0.1, 0.1, 0.1, 0.1, 0.1, 0.25, 0.25)
MAX_WAITS = 70_000  # PCP exchanges waiting for their answer at once (one per mapping or probe)
HEAL_DEBOUNCE_S = 0.05  # coalesce the burst of netlink events one foreign commit makes
HEAL_RETRY_S = 1.0
CT_BATCH_S = 0.25  # one conntrack dump (it blocks ~10 ms in the kernel) per burst of deletes
STOP_CT_S = 2.0  # bound on the conntrack clean-up a stop waits for
MAX_CT_PENDING = 1_000_000  # bound on queued conntrack work (a sync of 65k forgets 130k tuples)


# Options a running natd cannot take over on SIGHUP (sockets, kernel object names).
RESTART_ONLY = config.restart_only("natd")


class Later:
    """A reply that comes once ``fut`` is done (or cancelled at its deadline): ``finish(fut)``
    builds it. natd sends it from the future's done callback, so a PCP answer from NAT2 is
    relayed one loop turn after it arrived, with no task and no ``asyncio.wait`` around it."""

    __slots__ = ("fut", "finish")

    def __init__(self, fut: asyncio.Future[Any], finish: Callable[[asyncio.Future[Any]], wire.Message]) -> None:
        self.fut = fut
        self.finish = finish


# What a request handler returns: the reply, one that comes later, or a coroutine making it.
Reply = wire.Message | Later | Coroutine[Any, Any, wire.Message]


class Natd:
    def __init__(self, args: argparse.Namespace,
                 reparse: Callable[[], argparse.Namespace] | None = None) -> None:
        self.args = args
        self.reparse = reparse
        self.boot_id = uuid.uuid4().hex
        self.ctx = zmq.Context()
        self.nft = Nft(Layout.make(args.layout, args.table), args.wan_if, args.lan_if)
        self.table = BindingTable(limits=Limits(args.max_bindings, args.max_per_host))
        self.relay = PcpRelay(self._pcp_received, self._pcp_servers, args.wan_if)
        self.pcp_guard = Guard(log, "pcp relay")
        self.pcp_log_limit = RateLimit(burst=10, window=60.0)
        self.stun = stun.StunProbe(lambda: (self.args.stun_server, self.args.stun_port, self.args.stun_interval),
                                   lambda: self.ifs.wan_ip, self._publish)
        # One handler per request type (controld -> natd): a reply; for a PCP exchange that waits
        # for its answer, a Later; for a check that awaits the kernel, a coroutine run in a task.
        self.handlers: dict[type[wire.Message], Callable[[Any], Reply]] = {
            wire.Hello: self._hello, wire.Bind: self._bind, wire.Unbind: self._unbind,
            wire.PcpExchange: self._pcp_exchange, wire.GetCounters: self._counters, wire.Sync: self._sync}
        self._waits: set[asyncio.Future[Any]] = set()  # replies still to come (PCP exchanges waiting)
        self.trim = QuietTrim()  # the heap's free pages back after a burst of requests
        self.ifs = wan.IfState(None, None, (), ())
        self._gen: int | None = None  # ruleset generation last known to match our state
        self._gen_due = False  # natd wrote; the monitor has not yet shown the commit's generation
        self._dirty = asyncio.Event()
        self._ct_pending: list[conntrack.Flow] = []
        self._ct_wake = asyncio.Event()
        self._init_pinholes(args)
        self.neigh = neigh.SameHostCheck(lambda: self.args.lan_if,
                                         lambda: [*self.table.lan_subnets, *self.pins.lan_prefixes])
        self.handlers[wire.SameHost] = self.neigh.handle
        self.ct = CtWorker()

    # --- interface facts ---------------------------------------------------------

    def _apply_ifs(self, ifs: wan.IfState) -> None:
        self.ifs = ifs
        self.table.lan_subnets = [ipaddress.IPv4Network(n, strict=False) for n in ifs.lan_subnets]
        self.table.router_ips = set(ifs.lan_ips) | ({ifs.wan_ip} if ifs.wan_ip else set())
        self._apply_ifs6(ifs)

    async def _on_ifs(self, ifs: wan.IfState) -> None:
        old = self.ifs.wan_ip
        self._apply_ifs(ifs)
        log.info("interfaces changed: wan=%s gateway=%s lan=%s", ifs.wan_ip, ifs.gateway, ",".join(ifs.lan_ips))
        if ifs.wan_ip != old:
            await self.relay.open(ifs.wan_ip)
            self.stun.kick()
        for b in list(self.table.by_mid.values()):  # policy holds for what is already in place too
            try:
                self.table.check_lan(b.lan_ip)
            except PolicyError as exc:
                self.table.remove(b.mid)
                log.warning("dropped forward of mapping %d %s/%d -> %s:%d: %s", b.mid, _pname(b.proto),
                            b.wan_port, b.lan_ip, b.lan_port, exc)
        try:
            self._program()  # bindings follow the new WAN address (snat4, wan4, lan4)
        except NftError as exc:
            log.error("cannot move %d forwards to WAN %s: %s", len(self.table.by_mid), ifs.wan_ip, exc)
            self._kick()
        self._pinholes_follow_lan()
        self._publish(wire.WanChanged(ifs.wan_ip, ifs.gateway))

    # --- kernel ------------------------------------------------------------------

    def _program(self) -> Change:
        """Make the kernel match the binding table; forget conntrack of what went away."""
        ch = self.nft.apply(self.table.by_mid.values(), self.ifs.wan_ip, self.ifs.lan_subnets)
        if ch.added or ch.removed:
            log.debug("nft: +%d -%d forwards (%d live)", ch.added, ch.removed, len(self.table.by_mid))
        self._known_generation()  # a bulk write: its many events may overflow the monitor
        self._after_write(ch)
        return ch

    def _program_delta(self, *changed: wire.Binding | None) -> Change:
        """Bind/Unbind: rewrite only the keys ``changed`` bindings touch, O(1) in the table size."""
        t, wan_ip = self.table, self.ifs.wan_ip
        fwd: dict = {}
        snat: dict = {}
        for b in changed:
            if b is None:
                continue
            cur = t.by_wan_port(b.proto, b.wan_port)
            fwd[(b.proto, b.wan_port)] = (cur.lan_ip, cur.lan_port) if cur else None
            owner = t.snat_owner(endpoint(b))
            snat[endpoint(b)] = (wan_ip, owner.wan_port) if owner and wan_ip else None
        ch = self.nft.apply_delta(fwd, snat)
        self._generation_due()
        self._after_write(ch)
        return ch

    def _after_write(self, ch: Change) -> None:
        flows = [conntrack.Flow(proto, wip, wport, lip, lport)
                 for (proto, wport), (lip, lport) in ch.gone_fwd for wip in ch.old_wan]
        flows += [conntrack.Flow(proto, wip, wport, lip, lport) for (lip, proto, lport), (wip, wport) in ch.gone_snat]
        if flows and len(self._ct_pending) < MAX_CT_PENDING:
            self._ct_pending.extend(flows)
            self._ct_wake.set()

    async def _conntrack_worker(self) -> None:
        """Forget conntrack entries of deleted forwards, batched: one table dump per burst of deletes,
        run by the worker process (natd.ctworker), so this loop never waits on a kernel walk."""
        while True:
            await self._ct_wake.wait()
            await asyncio.sleep(CT_BATCH_S)
            self._ct_wake.clear()
            flows, self._ct_pending = self._ct_pending, []
            try:
                n = await self.ct.forget(flows)  # in the worker process: no kernel walk on this loop
            except Exception as exc:  # conntrack trouble must not cost the daemon
                log.warning("conntrack cleanup for %d removed NAT entries failed: %s", len(flows), exc)
                continue
            if n:
                log.info("conntrack: removed %d entries of %d removed NAT entries", n, len(flows))

    def _adopt(self) -> None:
        """Keep what an earlier natd left in the kernel until controld syncs (no traffic gap).

        The forward that owns a LAN endpoint's SNAT element in the kernel gets the lowest
        id, so recomputing the SNAT map changes nothing (docs/requirements.md IWF-48: one WAN port
        per mapping, several mappings may share a LAN endpoint).
        """
        st = self.nft.state
        items = sorted(st.fwd.items(), key=lambda kv: (
            st.snat.get((kv[1][0], kv[0][0], kv[1][1]), ("", -1))[1] != kv[0][1], kv[0]))
        for i, ((proto, wport), (lip, lport)) in enumerate(items):
            b = wire.Binding(i - len(items), proto, lip, lport, wport)
            try:
                self.table.add(b)
            except PolicyError as exc:
                log.warning("not adopting forward %s/%d -> %s:%d: %s", _pname(proto), wport, lip, lport, exc)

    async def _on_hup(self, hup: asyncio.Event) -> None:
        """SIGHUP (procd reload, the WAN hotplug after fw4's reload): re-read the interfaces
        and verify every nft object now, forwards kept."""
        while True:
            await hup.wait()
            hup.clear()
            log.info("SIGHUP: re-reading config and interfaces, verifying %d forwards", len(self.table.by_mid))
            new = reread_args(self.reparse, self.args, RESTART_ONLY, log) if self.reparse else None
            if new is not None:
                self.args = new
                self.stun.kick()
                self.table.limits = Limits(new.max_bindings, new.max_per_host)
                self.pins.limits = _pinhole_limits(new)
            try:
                ifs = await wan.snapshot(self.args.wan_if, self.args.lan_if)
                if ifs != self.ifs:
                    await self._on_ifs(ifs)
            except Exception as exc:  # a reload must never stop the daemon
                log.warning("SIGHUP: reading interfaces failed: %s", exc)
            self._gen = None
            self._kick()

    def _generation_due(self) -> None:
        """A write on a request's path (a Bind, an Unbind, a pinhole): its generation comes with
        the commit's own NEWGEN on the monitor (_own_generation), not by a netlink round trip
        before the reply."""
        self._gen_due = True

    def _own_generation(self, gen: int) -> None:
        """The nft monitor saw natd's own commit: the generation that matches our state."""
        self._gen, self._gen_due = gen, False

    def _known_generation(self) -> None:
        """Read the generation now, after a write natd waited for (a netlink round trip)."""
        self._gen, self._gen_due = nftmon.generation(), False

    def _check_generation(self) -> None:
        """The periodic safety net: verify only if the ruleset changed since natd's last write or check.
        A write whose NEWGEN the monitor has not read yet (writes are coming) takes the generation
        now: the monitor, which lost nothing, reports a foreign batch itself."""
        if self._gen_due:
            self._known_generation()
        elif nftmon.generation() != self._gen:
            self._kick()

    def _events_lost(self) -> None:
        """The monitor lost events (ENOBUFS, often natd's own big commit): verify unless the
        generation is still the one natd's own last write made."""
        if self._gen_due or nftmon.generation() != self._gen:  # (due: that write's is not known)
            self._kick()

    def _kick(self) -> None:
        """Ask the healer to verify our kernel objects soon."""
        self._dirty.set()

    async def _healer(self) -> None:
        """Verify and restore natd's nftables objects whenever they may have changed."""
        while True:
            await self._dirty.wait()
            await asyncio.sleep(HEAL_DEBOUNCE_S)
            self._dirty.clear()
            try:
                self._heal()
            except FwNotReady as exc:
                log.warning("fw4 layout: %s; forwards wait for fw4", exc)
                self._known_generation()  # retried when the ruleset changes again
            except NftError as exc:
                log.error("restoring nft objects failed: %s; retrying in %.0f s", exc, HEAL_RETRY_S)
                await asyncio.sleep(HEAL_RETRY_S)
                self._kick()
            except Exception:  # a bug here must not stop healing for good
                log.exception("healer failed")
                await asyncio.sleep(HEAL_RETRY_S)

    def _heal(self) -> None:
        self._heal_pinholes()
        gen = nftmon.generation()
        want = self.nft.expected(self.table.by_mid.values(), self.ifs.wan_ip, self.ifs.lan_subnets)
        if self.nft.holds(want):
            self.nft.state = want  # what natd holds as well, built again from the bindings: it shares their ints
            self._gen, self._gen_due = gen, False
            return
        del want
        intact, have = self.nft.snapshot()
        reason = "rules or chains missing" if not intact else "map elements changed"
        t0 = time.monotonic()
        if intact:
            self.nft.state = have
        else:
            self.nft.setup()
            if self.args.pcp_steer_to:
                self.nft.steer_lan_pcp(self.args.pcp_steer_to)
        self._program()
        log.warning("nft objects in %s changed under natd (%s); restored %d forwards in %.0f ms",
                    self.nft.layout.where, reason, len(self.table.by_mid), (time.monotonic() - t0) * 1000)
        self._publish(wire.Restored(self.boot_id, reason, len(self.table.by_mid)))
        self.trim.soon()

    # --- PCP relay -----------------------------------------------------------------

    def _pcp_servers(self, servers: list[str]) -> None:
        """fw4: the input chain lets ANNOUNCE in from exactly the servers natd talks to."""
        self.nft.pcp_servers = set(servers)
        if self.nft.layout.own_table:
            return
        try:
            self._program()
        except NftError as exc:
            log.warning("cannot update the PCP server set %s: %s", ",".join(servers), exc)
            self._kick()

    def _pcp_received(self, server: str, data: bytes) -> None:
        """A packet from a known server: the answer to a waiting request, else an event."""
        try:
            self._pcp_relay_in(server, data)
        except Exception as exc:  # the guard (shared/guard.py): a datagram never ends the relay
            self.pcp_guard.unexpected(server, exc)

    def _pcp_relay_in(self, server: str, data: bytes) -> None:
        try:
            resp = pcp.decode_response(data)  # the one decode on this hop
        except pcp.PcpDecodeError as exc:
            self._pcp_note(logging.DEBUG, "dropped malformed PCP packet from %s: %s", server, exc)
            return
        mid = lan_ip = None
        if resp.map is not None:
            b = self.table.by_wan_port(resp.map.protocol, resp.map.internal_port)
            if b is not None:
                mid, lan_ip = b.mid, b.lan_ip
                data = pcp.rewrite_response_port(data, b.lan_port)  # in place, no re-encode
        key = match_key(server, resp.opcode, resp.map.nonce if resp.map is not None else None)
        if self.relay.settle(key, (data, lan_ip)):
            log.info("pcp <- %s: %s", server, _describe_response(resp, mid))
            return
        # Unsolicited (a Mapping Update, an ANNOUNCE) or forged: anyone on the path can send
        # these, so they are logged rate limited (controld decides what they are worth).
        self._pcp_note(logging.INFO, "pcp <- %s (unsolicited): %s", server, _describe_response(resp, mid))
        self._publish(wire.PcpReceived(server, data, mid, lan_ip))

    def _pcp_note(self, level: int, fmt: str, *args: object) -> None:
        """A log line about a WAN packet nobody asked for: at most a few per minute."""
        ok, held = self.pcp_log_limit.allow(time.monotonic())
        if ok:
            log.log(level, fmt + (f" ({held} more not logged)" if held else ""), *args)

    def _pcp_exchange(self, msg: wire.PcpExchange) -> wire.Message | Later:
        """Check, rewrite and send one PCP request; the reply (now, or once the answer came or
        ``wait_ms`` passed) carries the matching response."""
        packet, req = self._pcp_outgoing(msg)
        key = match_key(msg.server, req.opcode, req.map.nonce if req.map is not None else None)
        fut = self.relay.expect(key) if msg.wait_ms else None
        try:
            self.relay.send(msg.server, packet)
        except OSError:
            if fut is not None:
                self.relay.forget(key, fut)
            raise
        if fut is None:
            return wire.PcpAnswer()
        # No answer in time, or a newer request for the same key took over: the future is cancelled.
        timer = asyncio.get_running_loop().call_later(msg.wait_ms / 1000, fut.cancel)
        return Later(fut, functools.partial(self._pcp_answer, key, timer))

    def _pcp_answer(self, key: MatchKey, timer: asyncio.TimerHandle, fut: asyncio.Future[Answer]) -> wire.Message:
        """The reply to an exchange whose wait is over: the answer, or none."""
        timer.cancel()
        self.relay.forget(key, fut)
        if fut.cancelled():
            return wire.PcpAnswer()
        data, lan_ip = fut.result()
        return wire.PcpAnswer(data, lan_ip)

    def _pcp_outgoing(self, msg: wire.PcpExchange) -> tuple[bytes, pcp.Request]:
        """The request as it leaves the WAN (client address, NAT1 port), after natd's checks."""
        if self.ifs.wan_ip is None:
            raise PolicyError("no-wan", "the WAN interface has no IPv4 address")
        try:
            req = pcp.decode_request(msg.packet)  # the one decode on this hop
        except pcp.PcpDecodeError as exc:
            raise PolicyError("bad-pcp", f"not a valid PCP request: {exc}") from None
        if req.opcode not in (pcp.Opcode.MAP, pcp.Opcode.ANNOUNCE):
            raise PolicyError("bad-pcp", "only MAP and ANNOUNCE are relayed")
        wan_ip = ipaddress.IPv4Address(self.ifs.wan_ip)
        port = None
        if msg.mid is not None:
            b = self.table.by_mid.get(msg.mid)
            if b is None or req.map is None or req.options.third_party is not None:
                raise PolicyError("no-binding", f"no NAT1 binding for mapping {msg.mid}")
            if (req.map.protocol, req.map.internal_port) != (b.proto, b.lan_port):
                raise PolicyError("no-binding", "packet does not match its binding")
            port = b.wan_port
        elif req.map is not None:
            # Without NAT1 (no-nat1 mode) the LAN host must be named by THIRD_PARTY;
            # the only other unbound MAP is the discard-port probe (docs/requirements.md IWF-25).
            tp = req.options.third_party
            if tp is not None:
                if tp.version != 4:
                    raise PolicyError("bad-pcp", "THIRD_PARTY must name an IPv4 LAN host")
                self.table.check_lan(str(tp))
            elif req.map.internal_port != DISCARD_PORT and req.lifetime != 0:
                # A delete may go unbound: its NAT1 binding is gone, the mapping upstream is not
                # yet (controld retries deletes NAT2 did not confirm); a delete creates nothing.
                raise PolicyError("no-binding", "unbound MAP must use THIRD_PARTY or the discard port")
        log.info("pcp -> %s: %s", msg.server, _describe_request(req, msg.mid, str(wan_ip), port))
        return pcp.rewrite_request(msg.packet, wan_ip, port), req  # in place, no re-encode

    # --- RPC ---------------------------------------------------------------------

    def _handle(self, msg: wire.Message) -> Reply:
        """Run one request by its type (the table in :attr:`handlers`); PolicyError for the rest."""
        handler = self.handlers.get(type(msg))
        if handler is None:
            raise PolicyError("bad-op", f"{msg.OP} is not a request")
        return handler(msg)

    def _hello(self, msg: wire.Hello) -> wire.Message:
        i = self.ifs
        return wire.HelloReply(self.boot_id, i.wan_ip, i.gateway, list(i.lan_ips), list(i.lan_subnets))

    def _bind(self, msg: wire.Bind) -> wire.Message:
        t = self.table
        t.check_lan(msg.lan_ip)
        cur = t.by_mid.get(msg.mid)
        if cur and (cur.proto, cur.lan_ip, cur.lan_port) == (msg.proto, msg.lan_ip, msg.lan_port):
            return wire.BindReply(self.ifs.wan_ip or "", cur.wan_port)
        owner = t.by_wan_port(msg.proto, msg.want_port)
        adopted = None
        if owner is not None and owner.mid < 0 and (owner.lan_ip, owner.lan_port) == (msg.lan_ip, msg.lan_port):
            adopted = t.remove(owner.mid)  # controld claims a forward natd adopted at start
        try:
            port = t.allocate(msg.proto, msg.want_port, msg.exact, mid=msg.mid)
            b = compact(msg.mid, msg.proto, msg.lan_ip, msg.lan_port, port)
            t.add(b)
        except PolicyError:
            if adopted is not None:
                t.add(adopted)
            raise

        def undo() -> None:
            t.remove(b.mid)
            for old in (cur, adopted):
                if old is not None:
                    t.add(old)

        self._delta_or_undo(undo, cur, adopted, b)
        log.info("bind mid=%d %s/%d -> %s:%d", b.mid, _pname(b.proto), port, b.lan_ip, b.lan_port)
        return wire.BindReply(self.ifs.wan_ip or "", port)

    def _unbind(self, msg: wire.Unbind) -> wire.Message:
        t = self.table
        b = t.remove(msg.mid)
        if b is not None:
            self._delta_or_undo(lambda: t.add(b), b)
            log.info("unbind mid=%d %s/%d -> %s:%d", b.mid, _pname(b.proto), b.wan_port, b.lan_ip, b.lan_port)
        return wire.Ok()

    def _counters(self, msg: wire.GetCounters) -> wire.Message:
        return _counters(self.args.wan_if)

    def _sync(self, msg: wire.Sync) -> wire.Message:
        t = self.table
        before = list(t.by_mid.values())
        skipped = t.replace_all(msg.bindings)
        for b, why in skipped:
            log.warning("sync: left out mapping %d %s/%d -> %s:%d: %s", b.mid, _pname(b.proto), b.wan_port,
                        b.lan_ip, b.lan_port, why)
        try:
            ch = self._program()
        except NftError:
            t.replace_all(before)
            raise
        if len(msg.bindings) > 1000:
            self.trim.soon()
        log.info("sync: %d bindings, +%d -%d forwards", len(t.by_mid), ch.added, ch.removed)
        return wire.SyncReply(ch.added, ch.removed, [b.mid for b, _ in skipped])

    def _delta_or_undo(self, undo: Callable[[], object], *changed: wire.Binding | None) -> None:
        try:
            self._program_delta(*changed)
        except NftError:
            undo()
            raise

    def _publish(self, msg: wire.Message) -> None:
        topic = msg.OP.encode()
        try:
            self.pub.send_multipart([topic, wire.encode(msg)], zmq.NOBLOCK)
        except zmq.Again:  # PUB drops rather than blocks; a subscriber that is behind misses it
            pass

    def _answer(self, payload: bytes) -> tuple[Reply, int | None]:
        """One request in, one reply out (or one that comes later); every failure becomes a typed Error reply."""
        rid = None
        name = "message"
        try:
            env = wire.decode_envelope(payload)
            rid, name = env.rid, type(env.msg).__name__
            if env.deadline_ms is not None and time.time() * 1000 > env.deadline_ms:
                log.warning("dropped %s id=%s: its deadline passed before natd read it", name, rid)
                return wire.Error("deadline", "request arrived after its deadline; nothing done"), rid
            return self._handle(env.msg), rid
        except wire.WireError as exc:
            log.warning("refused message id=%s: %s: %s", exc.rid, exc.code, exc)
            return wire.Error(exc.code, str(exc)), exc.rid
        except PolicyError as exc:
            log.warning("refused %s id=%s: %s", name, rid, exc)
            return wire.Error(exc.code, str(exc)), rid
        except (NftError, OSError) as exc:
            log.error("failed %s id=%s: %s", name, rid, exc)
            return wire.Error("failed", str(exc)[:wire.MAX_STR]), rid
        except Exception as exc:  # a bug must cost one request, never the daemon
            log.exception("internal error on %s id=%s", name, rid)
            return wire.Error("internal", type(exc).__name__), rid

    def _serve(self, frames: list[bytes]) -> None:
        """One request from the ROUTER socket (shared/zio.py calls this from the loop's reader)."""
        if len(frames) != 2:
            log.warning("refused request of %d frames (one expected)", len(frames) - 1)
            if frames and len(frames[0]) <= 256:
                self.rpc.send([frames[0], wire.encode(wire.Error("bad-frames", "a request is exactly one frame"))])
            return
        ident, payload = frames
        self.trim.note()
        reply, rid = self._answer(payload)
        if isinstance(reply, wire.Message):
            self.rpc.send([ident, wire.encode(reply, rid)])
        elif len(self._waits) >= MAX_WAITS:  # bounded: shed load rather than queue without end
            if isinstance(reply, Later):
                reply.fut.cancel()
                reply.finish(reply.fut)  # (its timer and its relay entry go)
            else:
                reply.close()
            self.rpc.send([ident, wire.encode(wire.Error("busy", "too many PCP waits"), rid)])
        elif isinstance(reply, Later):
            self._waits.add(reply.fut)
            reply.fut.add_done_callback(functools.partial(self._send_later, ident, rid, reply))
        else:
            task = asyncio.create_task(self._reply_later(ident, reply, rid))
            self._waits.add(task)
            task.add_done_callback(self._waits.discard)

    def _send_later(self, ident: bytes, rid: int | None, later: Later, fut: asyncio.Future[Any]) -> None:
        """A Later's future is done: build its reply and send it."""
        self._waits.discard(fut)
        try:
            reply = later.finish(fut)
        except Exception as exc:  # a bug must cost one request, never the daemon
            log.exception("internal error on request id=%s", rid)
            reply = wire.Error("internal", type(exc).__name__)
        self.rpc.send([ident, wire.encode(reply, rid)])

    async def _reply_later(self, ident: bytes, work: Coroutine[Any, Any, wire.Message], rid: int | None) -> None:
        """Finish a request that awaits (the same-host check), then send its reply."""
        try:
            reply = await work
        except Exception as exc:  # a bug must cost one request, never the daemon
            log.exception("internal error on request id=%s", rid)
            reply = wire.Error("internal", type(exc).__name__)
        self.rpc.send([ident, wire.encode(reply, rid)])

    async def _heartbeat(self) -> None:
        """Heartbeat with the boot id every second; also the periodic safety-net check."""
        for pause in itertools.chain(START_BEATS_S, itertools.repeat(HEARTBEAT_S)):
            self._publish(wire.Heartbeat(self.boot_id, len(self.table.by_mid)))
            self._check_generation()  # the periodic safety net
            await asyncio.sleep(pause)

    def _socket(self, kind: int, endpoint: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE)
        if needs_curve(endpoint):
            curve_server(sock, self.args.curve_dir)
        bind_endpoint(sock, endpoint, self.args.ipc_group)
        return sock

    def _start_auth(self) -> Any:
        """ZAP handler: only clients whose public key is in CURVE_DIR/authorized/ get in."""
        if not any(needs_curve(ep) for ep in (self.args.rpc, self.args.events)):
            return None
        if not self.args.curve_dir:
            raise SystemExit("natd: tcp:// endpoints need CURVE keys: pass --curve-dir "
                             "(create them with igdpcp-natd --gen-keys DIR)")
        import zmq.asyncio
        from zmq.auth.asyncio import AsyncioAuthenticator

        auth = AsyncioAuthenticator(zmq.asyncio.Context.shadow(self.ctx.underlying))  # ZAP on the same context
        auth.start()
        auth.configure_curve(domain="*", location=os.path.join(self.args.curve_dir, AUTHORIZED_DIR))
        return auth

    async def run(self) -> None:
        """Start everything, serve until SIGTERM, then close every forward and the sockets."""
        # Sockets first: controld's reconnect (every 0.1 s while natd is down) then
        # overlaps the kernel set-up below, and its re-sync follows the first heartbeat at once.
        # Requests meanwhile wait in the socket until the server loop starts.
        auth = self._start_auth()
        self.router = self._socket(zmq.ROUTER, self.args.rpc)
        self.pub = self._socket(zmq.PUB, self.args.events)
        self._apply_ifs(await wan.snapshot(self.args.wan_if, self.args.lan_if))
        try:
            self.nft.setup()
            if self.args.pcp_steer_to:
                self.nft.steer_lan_pcp(self.args.pcp_steer_to)
            self._adopt()
            self._program()
        except FwNotReady as exc:
            log.warning("fw4 layout: %s; forwards are applied once fw4 is loaded", exc)
        self._setup_pinholes()
        monitor = nftmon.NftMonitor(self.nft.layout.family, self.nft.layout.table, self._kick, self._events_lost,
                                    self._own_generation)
        monitor.start()
        await self.relay.open(self.ifs.wan_ip)
        self.rpc = ZPump(self.router, self._serve)  # requests that came during the set-up are served now
        log.info("natd up: boot=%s wan=%s (%s) lan=%s layout=%s rpc=%s events=%s", self.boot_id, self.ifs.wan_ip,
                 self.args.wan_if, ",".join(self.ifs.lan_subnets), self.nft.layout.name, self.args.rpc,
                 self.args.events)
        release_memory()  # start-up's garbage (parsing, loading) leaves holes in the heap
        stop = asyncio.Event()
        install_stop_signals(stop)
        hup = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hup.set)
        tasks = [asyncio.create_task(c) for c in (
            self._heartbeat(), self._healer(), self._conntrack_worker(), self._on_hup(hup),
            self._pinhole_sweeper(), self._pinhole_ct_worker(), self.trim.run(),
            self.stun.run(), wan.watch(self.args.wan_if, self.args.lan_if, self._on_ifs, self.ifs))]
        waiter: asyncio.Task[Any] = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in [*tasks, waiter]:
            t.cancel()
        monitor.close()
        for t in done:
            if t is not waiter and t.exception():
                raise t.exception()  # type: ignore[misc]
        await self._close_forwards()
        self._close_pinholes()
        await self.ct.stop()
        self.relay.close()
        if auth is not None:
            auth.stop()
        self.rpc.close()
        self.pub.close()
        self.ctx.term()
        log.info("natd stopped")

    async def _close_forwards(self) -> None:
        """A stop closes every port, as miniupnpd's does; a crash (no SIGTERM) leaves them for
        the next natd to adopt. controld keeps the mappings: it re-syncs on the new boot id."""
        n = len(self.table.by_mid)
        self.table.replace_all([])
        try:
            self._program()
            await asyncio.wait_for(self.ct.forget(self._ct_pending), STOP_CT_S)  # in the worker, as always
        except (TimeoutError, NftError, OSError) as exc:
            log.error("stop: closing %d forwards failed: %s", n, exc)
            return
        log.info("stop: closed %d forwards (controld restores them at the next start)", n)

    # --- IPv6 pinholes (docs/pinholes.md) ------------------------------------------

    def _init_pinholes(self, args: argparse.Namespace) -> None:
        try:
            place = PinholePlace.make(args.ipv6_firewall, self.nft.layout)
        except ValueError as exc:
            raise SystemExit(f"natd: {exc}") from None
        self.pins = PinholeTable(limits=_pinhole_limits(args))
        self.pin_nft = PinholeNft(self.nft, place, args.wan_if) if place else None
        self._pin_ct_pending: list[PinKey] = []
        self._pin_ct_wake = asyncio.Event()
        self.handlers.update({
            wire.PinholeAdd: self._pinhole_add, wire.PinholeDelete: self._pinhole_delete,
            wire.PinholeSync: self._pinhole_sync, wire.PinholeCounters: self._pinhole_counters,
            wire.PinholeStatus: self._pinhole_status,
        })

    def _apply_ifs6(self, ifs: wan.IfState) -> None:
        self.pins.lan_prefixes = [ipaddress.IPv6Network(n, strict=False) for n in ifs.lan6_prefixes]
        self.pins.router_ips = {ipaddress.IPv6Address(a) for a in ifs.lan6_ips}

    def _setup_pinholes(self) -> None:
        if self.pin_nft is None:
            return
        try:
            self.pin_nft.setup()
        except FwNotReady as exc:
            log.warning("pinholes: %s; they are applied once fw4 is loaded", exc)
            return
        self._adopt_pinholes()

    def _adopt_pinholes(self) -> None:
        """Keep the pinholes an earlier natd left (a crash) with their remaining timeout, under
        negative ids, until controld's PinholeSync or PinholeAdd claims them (no gap in between)."""
        assert self.pin_nft is not None
        now, gone = time.monotonic(), []
        for i, key in enumerate(sorted(self.pin_nft.have, key=str)):
            left = self.pin_nft.expires.get(key, 0)
            try:
                self.pins.check_lan(key[0])
            except PolicyError as exc:
                gone.append(key)
                log.warning("not adopting pinhole %s: %s", describe(key), exc)
                continue
            lease = max(1, left - self.pins.limits.grace)
            self.pins.put((wire.Pinhole(-1 - i, key[1], key[0], key[2], lease, key[3]), key, now + left))
        if gone:
            self._pin_write(dict.fromkeys(gone))
        if self.pins.by_pid:
            log.info("adopted %d pinholes left by an earlier natd", len(self.pins.by_pid))

    def _pin(self) -> PinholeNft:
        if self.pin_nft is None:
            raise PolicyError("pinholes-off", "IPv6 pinholes are off (--ipv6-firewall off)")
        return self.pin_nft

    def _pin_write(self, delta: dict[PinKey, int | None]) -> None:
        self._pin().apply_delta(delta)
        self._generation_due()
        self._forget_later([k for k, t in delta.items() if t is None])

    def _forget_later(self, closed: list[PinKey]) -> None:
        if closed and len(self._pin_ct_pending) < MAX_CT_PENDING:
            self._pin_ct_pending.extend(closed)
            self._pin_ct_wake.set()

    async def _pinhole_ct_worker(self) -> None:
        """One conntrack dump per burst of closed pinholes (a dump per delete would cost each
        delete a table walk)."""
        while True:
            await self._pin_ct_wake.wait()
            await asyncio.sleep(CT_BATCH_S)
            self._pin_ct_wake.clear()
            keys, self._pin_ct_pending = self._pin_ct_pending, []
            await self._forget_pinhole_flows(keys)

    async def _forget_pinhole_flows(self, keys: list[PinKey]) -> None:
        """A closed pinhole ends its flows too, as a deleted forward does (the pinhole rules mark
        them with CT_MARK): the kernel-filtered dump runs in the conntrack worker (natd.ctworker),
        so this loop never walks the conntrack table."""
        try:
            n = await self.ct.forget_pinholes(keys)
        except Exception as exc:  # conntrack trouble must not cost the daemon
            log.warning("conntrack cleanup for %d closed pinholes failed: %s", len(keys), exc)
            return
        if n:
            log.info("conntrack: removed %d flows of %d closed pinholes", n, len(keys))

    def _pinhole_add(self, msg: wire.PinholeAdd) -> wire.Message:
        self._pin()
        p, now = msg.pinhole, time.monotonic()
        owner = self.pins.by_key.get(self.pins.key(p))
        adopted = self.pins.by_pid.get(owner) if owner is not None and owner < 0 else None
        if adopted is not None:  # controld claims a pinhole natd adopted at start
            self.pins.remove(adopted[0].pid)
        old = self.pins.by_pid.get(p.pid)
        try:
            key, timeout = self.pins.add(p, now)
        except PolicyError:
            if adopted is not None:
                self.pins.put(adopted)
            raise
        delta: dict[PinKey, int | None] = {key: timeout}
        if old is not None and old[1] != key:
            delta = {old[1]: None, **delta}
        try:
            self._pin_write(delta)
        except NftError:
            self.pins.remove(p.pid)
            for entry in (old, adopted):
                if entry is not None:
                    self.pins.put(entry)
            raise
        log.info("pinhole %s pid=%d %s lease %d s", "renew" if old or adopted else "open", p.pid, describe(key),
                 p.lease)
        return wire.PinholeReply(p.pid, timeout)

    def _pinhole_delete(self, msg: wire.PinholeDelete) -> wire.Message:
        self._pin()
        old = self.pins.by_pid.get(msg.pid)
        if old is None:
            return wire.Ok()
        self.pins.remove(msg.pid)
        try:
            self._pin_write({old[1]: None})
        except NftError:
            self.pins.put(old)
            raise
        log.info("pinhole close pid=%d %s", msg.pid, describe(old[1]))
        return wire.Ok()

    def _pinhole_sync(self, msg: wire.PinholeSync) -> wire.Message:
        pin, now = self._pin(), time.monotonic()
        trial, skipped = self.pins.replace_all(msg.pinholes, now)
        for p, why in skipped:
            log.warning("pinhole sync: left out pid=%d [%s]:%d: %s", p.pid, p.lan_ip, p.lan_port, why)
        added, removed = pin.apply(trial.wanted(now), refresh=True)
        self._known_generation()
        self._forget_later([k for k in self.pins.by_key if k not in trial.by_key])
        self.pins = trial
        log.info("pinhole sync: %d pinholes, +%d -%d", len(trial.by_pid), added, removed)
        return wire.SyncReply(added, removed, [p.pid for p, _ in skipped])

    def _pinhole_counters(self, msg: wire.PinholeCounters) -> wire.Message:
        pids = msg.pids or sorted(self.pins.by_pid)
        known = [pid for pid in pids if pid in self.pins.by_pid]
        keys = [self.pins.by_pid[pid][1] for pid in known]
        have = self._pin().packets(keys)
        return wire.PinholeCountersReply(known, [have.get(k, 0) for k in keys])

    def _pinhole_status(self, _msg: wire.PinholeStatus) -> wire.Message:
        lim, pl = self.pins.limits, self.pin_nft.place if self.pin_nft else None
        return wire.PinholeStatusReply(pl is not None, pl.mode if pl else "off",
                                       [str(n) for n in self.pins.lan_prefixes], len(self.pins.by_pid),
                                       lim.max_total, lim.max_per_host)

    def _pinholes_follow_lan(self) -> None:
        """A LAN prefix went away: its pinholes close (policy holds for what is in place too)."""
        gone = []
        for pid, (p, key, _exp) in list(self.pins.by_pid.items()):
            try:
                self.pins.check_lan(p.lan_ip)
            except PolicyError as exc:
                self.pins.remove(pid)
                gone.append(key)
                log.warning("closed pinhole pid=%d %s: %s", pid, describe(key), exc)
        if gone and self.pin_nft is not None:
            try:
                self._pin_write(dict.fromkeys(gone))
            except NftError as exc:
                log.error("cannot close %d pinholes off the LAN: %s", len(gone), exc)
                self._kick()

    def _heal_pinholes(self) -> None:
        """Restore the pinhole rules and elements after a flush or a fw4 reload."""
        if self.pin_nft is None:
            return
        try:
            self._restore_pinholes()
        except FwNotReady:
            pass  # the IPv4 half says so and waits for fw4 too
        except NftError as exc:  # must not keep the IPv4 half from its own restore
            log.error("restoring pinholes failed: %s; retrying at the next check", exc)
            self._gen = None

    def _restore_pinholes(self) -> None:
        assert self.pin_nft is not None
        now = time.monotonic()
        self.pins.expire(now)
        intact, have = self.pin_nft.snapshot()
        want = self.pins.wanted(now)
        if intact and set(have) == set(want):
            self.pin_nft.have = set(have)
            return
        t0 = time.monotonic()
        if intact:
            self.pin_nft.have = set(have)
        else:
            self.pin_nft.setup()
        self.pin_nft.apply(want)
        log.warning("pinholes in %s changed under natd (%s); restored %d in %.0f ms", self.pin_nft.place.where,
                    "rules or sets missing" if not intact else "elements changed", len(want),
                    (time.monotonic() - t0) * 1000)

    async def _pinhole_sweeper(self) -> None:
        """Forget pinholes the kernel timed out itself (controld gone past lease + grace)."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            for pid, key in self.pins.expire(time.monotonic()):
                if self.pin_nft is not None:
                    self.pin_nft.have.discard(key)
                log.info("pinhole expired pid=%d %s (lease + grace over, no renewal)", pid, describe(key))

    def _close_pinholes(self) -> None:
        """A stop closes every pinhole, as it closes every forward; controld re-syncs them."""
        if self.pin_nft is None or not self.pin_nft.have:
            return
        n = len(self.pin_nft.have)
        try:
            self.pin_nft.apply({})
        except NftError as exc:
            log.error("stop: closing %d pinholes failed: %s", n, exc)
            return
        log.info("stop: closed %d pinholes", n)


def _pinhole_limits(args: argparse.Namespace) -> PinholeLimits:
    return PinholeLimits(args.max_pinholes, args.max_pinholes_per_host, args.pinhole_grace)


def _counters(ifname: str) -> wire.CountersReply:
    """The WAN interface's kernel counters (sysfs: no netlink round trip needed)."""
    base = f"/sys/class/net/{ifname}/statistics/"
    vals = []
    for name in ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets"):
        try:
            with open(base + name) as f:
                vals.append(int(f.read()))
        except (OSError, ValueError):
            vals.append(0)
    return wire.CountersReply(*vals)


def _result(code: int) -> str:
    return pcp.Result(code).name if code in pcp.Result._value2member_map_ else f"result {code}"


def _describe_request(req: pcp.Request, mid: int | None, wan_ip: str, port: int | None) -> str:
    """One log line for a relayed request, as it left (after the NAT1 rewrite)."""
    who = f"mapping {mid}" if mid is not None else "unbound"
    if req.map is None:
        return f"{pcp.Opcode(req.opcode).name} ({who})"
    m, o = req.map, req.options
    what = "delete" if req.lifetime == 0 else f"lifetime {req.lifetime}"
    return (f"MAP {_pname(m.protocol)} internal {wan_ip}:{port or m.internal_port} suggest "
            f"{m.external_ip}:{m.external_port} {what} nonce {m.nonce.hex()[:8]}"
            + (" PREFER_FAILURE" if o.prefer_failure else "")
            + (f" THIRD_PARTY {o.third_party}" if o.third_party else "") + f" ({who})")


def _describe_response(resp: pcp.Response, mid: int | None) -> str:
    """One log line for a PCP answer: result, assigned external endpoint, lifetime, epoch."""
    who = f"mapping {mid}" if mid is not None else "unbound"
    head = f"{pcp.Opcode(resp.opcode).name if resp.opcode in (0, 1, 2) else resp.opcode} {_result(resp.result)}"
    if resp.map is None:
        return f"{head} epoch {resp.epoch} ({who})"
    return (f"{head} external {resp.map.external_ip}:{resp.map.external_port} lifetime {resp.lifetime}"
            f" epoch {resp.epoch} nonce {resp.map.nonce.hex()[:8]} ({who})")


def _pname(proto: int) -> str:
    return PROTO_NAMES.get(proto, str(proto)).lower()


def build_parser() -> argparse.ArgumentParser:
    """natd's command line, from the option table in shared/config.py."""
    return config.build_parser("natd", "igdpcp-natd", __doc__.splitlines()[0], choices={"layout": LAYOUTS})


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``igdpcp-natd``; ``--gen-keys DIR`` only writes the CURVE keys and exits."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--gen-keys"]:
        if len(argv) != 2:
            raise SystemExit("usage: igdpcp-natd --gen-keys DIR")
        for path in gen_keys(argv[1]):
            print(path)
        return
    def parse() -> argparse.Namespace:
        return parse_args_with_config(build_parser(), argv, "natd")

    args = parse()
    setup_logging("natd", args.log_level)
    hold_mmap_threshold()
    asyncio.run(Natd(args, parse).run())


if __name__ == "__main__":
    main()
