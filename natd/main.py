"""igdpcp-natd: the privileged NAT daemon (NAT1 in nftables, WAN watch, PCP relay).

It serves controld over ZeroMQ (ROUTER for requests, PUB for events) and trusts
none of it: every message is schema-checked (shared.wire) and policy-checked
(natd.bindings) before anything reaches the kernel.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import uuid

import zmq
import zmq.asyncio

from natd import wan
from natd.bindings import BindingTable, Limits, PolicyError
from natd.nft import Nft, NftError
from natd.relay import PcpRelay
from shared import pcp, wire
from shared.config import parse_args_with_config
from shared.daemon import install_stop_signals, prepare_ipc, restrict_ipc, setup_logging

log = logging.getLogger("natd")

HEARTBEAT_S = 1.0


class Natd:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.boot_id = uuid.uuid4().hex
        self.ctx = zmq.asyncio.Context()
        self.nft = Nft(args.table)
        self.table = BindingTable(limits=Limits(args.max_bindings, args.max_per_host))
        self.relay = PcpRelay(self._pcp_received)
        self.ifs = wan.IfState(None, None, (), ())
        self.synced = False  # adopted kernel forwards are kept until controld's first sync

    # --- interface facts ---------------------------------------------------------

    def _apply_ifs(self, ifs: wan.IfState) -> None:
        self.ifs = ifs
        self.table.lan_subnets = [ipaddress.IPv4Network(n) for n in ifs.lan_subnets]
        self.table.router_ips = set(ifs.lan_ips) | ({ifs.wan_ip} if ifs.wan_ip else set())

    async def _on_ifs(self, ifs: wan.IfState) -> None:
        old = self.ifs.wan_ip
        self._apply_ifs(ifs)
        log.info("interfaces changed: wan=%s gateway=%s lan=%s", ifs.wan_ip, ifs.gateway, ",".join(ifs.lan_ips))
        if ifs.wan_ip != old:
            await self.relay.open(ifs.wan_ip)
            self._program()  # bindings follow the new WAN address
        self._publish(wire.WanChanged(ifs.wan_ip, ifs.gateway))

    # --- kernel ------------------------------------------------------------------

    def _program(self) -> None:
        added, removed = self.nft.apply(self.table.by_mid.values(), self.ifs.wan_ip)
        if added or removed:
            log.debug("nft: +%d -%d forwards (%d live)", added, removed, len(self.table.by_mid))

    def _adopt(self) -> None:
        """Keep what an earlier natd left in the kernel until controld syncs (no traffic gap)."""
        for i, ((proto, wport), (lip, lport)) in enumerate(sorted(self.nft.state.fwd.items())):
            b = wire.Binding(-1 - i, proto, lip, lport, wport)
            try:
                self.table.add(b)
            except PolicyError as exc:
                log.warning("not adopting forward %s/%d -> %s:%d: %s", proto, wport, lip, lport, exc)

    # --- PCP relay -----------------------------------------------------------------

    def _pcp_received(self, server: str, data: bytes) -> None:
        try:
            resp = pcp.decode_response(data)
        except pcp.PcpDecodeError as exc:
            log.info("dropped malformed PCP packet from %s: %s", server, exc)
            return
        mid = lan_ip = None
        if resp.map is not None:
            b = self.table.by_wan_port(resp.map.protocol, resp.map.internal_port)
            if b is not None:
                mid, lan_ip = b.mid, b.lan_ip
                data = pcp.rewrite_response_port(data, b.lan_port)
        self._publish(wire.PcpReceived(server, data, mid, lan_ip))

    def _pcp_send(self, msg: wire.PcpSend) -> wire.Message:
        if self.ifs.wan_ip is None:
            raise PolicyError("no-wan", "the WAN interface has no IPv4 address")
        try:
            req = pcp.decode_request(msg.packet)
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
            # the only other unbound MAP is the discard-port probe (rfc6970-iwf item 25).
            tp = req.options.third_party
            if tp is not None:
                self.table.check_lan(str(tp))
            elif req.map.internal_port != 9:
                raise PolicyError("no-binding", "unbound MAP must use THIRD_PARTY or the discard port")
        self.relay.send(msg.server, pcp.rewrite_request(msg.packet, wan_ip, port))
        return wire.Ok()

    # --- RPC ---------------------------------------------------------------------

    def _handle(self, msg: wire.Message) -> wire.Message:
        t = self.table
        if isinstance(msg, wire.Hello):
            i = self.ifs
            return wire.HelloReply(self.boot_id, i.wan_ip, i.gateway, list(i.lan_ips), list(i.lan_subnets))
        if isinstance(msg, wire.Bind):
            t.check_lan(msg.lan_ip)
            cur = t.by_mid.get(msg.mid)
            if cur and (cur.proto, cur.lan_ip, cur.lan_port) == (msg.proto, msg.lan_ip, msg.lan_port):
                return wire.BindReply(self.ifs.wan_ip or "", cur.wan_port)
            owner = t.by_wan_port(msg.proto, msg.want_port)
            if owner is not None and owner.mid < 0 and (owner.lan_ip, owner.lan_port) == (msg.lan_ip, msg.lan_port):
                t.remove(owner.mid)  # controld claims a forward natd adopted at start
            port = t.allocate(msg.proto, msg.want_port, msg.exact)
            b = wire.Binding(msg.mid, msg.proto, msg.lan_ip, msg.lan_port, port)
            t.add(b)
            self._program_or_undo(lambda: t.remove(b.mid))
            log.info("bind mid=%d %s/%d -> %s:%d", b.mid, _pname(b.proto), port, b.lan_ip, b.lan_port)
            return wire.BindReply(self.ifs.wan_ip or "", port)
        if isinstance(msg, wire.Unbind):
            b = t.remove(msg.mid)
            if b is not None:
                self._program_or_undo(lambda: t.add(b))
                log.info("unbind mid=%d %s/%d -> %s:%d", b.mid, _pname(b.proto), b.wan_port, b.lan_ip, b.lan_port)
            return wire.Ok()
        if isinstance(msg, wire.PcpSend):
            return self._pcp_send(msg)
        if isinstance(msg, wire.GetCounters):
            return _counters(self.args.wan_if)
        if isinstance(msg, wire.Sync):
            before = dict(t.by_mid)
            t.replace_all(msg.bindings)
            try:
                added, removed = self.nft.apply(t.by_mid.values(), self.ifs.wan_ip)
            except NftError:
                t.replace_all(list(before.values()))
                raise
            self.synced = True
            log.info("sync: %d bindings, +%d -%d forwards", len(t.by_mid), added, removed)
            return wire.SyncReply(added, removed)
        raise PolicyError("bad-op", f"{msg.OP} is not a request")

    def _program_or_undo(self, undo: callable) -> None:  # type: ignore[valid-type]
        try:
            self._program()
        except NftError:
            undo()
            raise

    def _publish(self, msg: wire.Message) -> None:
        topic = msg.OP.encode()
        self.pub.send_multipart([topic, wire.encode(msg)])

    async def _serve(self) -> None:
        while True:
            frames = await self.router.recv_multipart()
            if len(frames) != 2:
                log.warning("dropped request with %d frames", len(frames))
                continue
            ident, payload = frames
            rid = None
            try:
                msg, rid = wire.decode(payload)
                reply = self._handle(msg)
            except wire.WireError as exc:
                log.warning("refused message: %s: %s", exc.code, exc)
                reply = wire.Error(exc.code, str(exc))
            except PolicyError as exc:
                log.warning("refused %s: %s", type(msg).__name__, exc)
                reply = wire.Error(exc.code, str(exc))
            except (NftError, OSError) as exc:
                log.error("failed %s: %s", type(msg).__name__, exc)
                reply = wire.Error("failed", str(exc))
            except Exception as exc:  # a bug must cost one request, never the daemon
                log.exception("internal error on a request")
                reply = wire.Error("internal", type(exc).__name__)
            await self.router.send_multipart([ident, wire.encode(reply, rid)])

    async def _heartbeat(self) -> None:
        while True:
            self._publish(wire.Heartbeat(self.boot_id, len(self.table.by_mid)))
            if not self.nft.table_intact():
                log.warning("nft table ip %s vanished or changed; restoring %d forwards",
                            self.nft.table, len(self.table.by_mid))
                self.nft.setup()
                self._program()
            await asyncio.sleep(HEARTBEAT_S)

    async def run(self) -> None:
        """Start everything, serve until SIGTERM, then close sockets (forwards stay in the kernel)."""
        self._apply_ifs(await wan.snapshot(self.args.wan_if, self.args.lan_if))
        self.nft.setup()
        self._adopt()
        self._program()
        await self.relay.open(self.ifs.wan_ip)
        for ep in (self.args.rpc, self.args.events):
            prepare_ipc(ep)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE)
        self.router.bind(self.args.rpc)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(self.args.events)
        for ep in (self.args.rpc, self.args.events):
            restrict_ipc(ep, self.args.ipc_group)
        log.info("natd up: boot=%s wan=%s (%s) lan=%s rpc=%s events=%s", self.boot_id, self.ifs.wan_ip,
                 self.args.wan_if, ",".join(self.ifs.lan_subnets), self.args.rpc, self.args.events)
        stop = asyncio.Event()
        install_stop_signals(stop)
        tasks = [asyncio.create_task(c) for c in (
            self._serve(), self._heartbeat(),
            wan.watch(self.args.wan_if, self.args.lan_if, self._on_ifs, self.ifs))]
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in tasks + [waiter]:
            t.cancel()
        for t in done:
            if t is not waiter and t.exception():
                raise t.exception()  # type: ignore[misc]
        self.relay.close()
        self.router.close()
        self.pub.close()
        self.ctx.term()
        log.info("natd stopped; %d forwards left in place for the next start", len(self.table.by_mid))


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


def _pname(proto: int) -> str:
    return {6: "tcp", 17: "udp"}.get(proto, str(proto))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="igdpcp-natd", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="UCI config file (section 'natd'); flags win")
    p.add_argument("--wan-if", required=True, help="WAN interface (NAT1's outside)")
    p.add_argument("--lan-if", required=True, help="LAN interface (NAT1's inside)")
    p.add_argument("--rpc", required=True, help="ZeroMQ endpoint for requests (ipc://PATH or tcp://HOST:PORT)")
    p.add_argument("--events", required=True, help="ZeroMQ endpoint for events")
    p.add_argument("--table", default="igdpcp", help="nftables table name (family ip)")
    p.add_argument("--ipc-group", default=None, help="group owning the ipc:// socket files (mode 0660)")
    p.add_argument("--max-bindings", type=int, default=65536, help="total NAT1 forwards allowed")
    p.add_argument("--max-per-host", type=int, default=4096, help="NAT1 forwards allowed per LAN host")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``igdpcp-natd``."""
    args = parse_args_with_config(build_parser(), argv, "natd")
    setup_logging("natd", args.log_level)
    asyncio.run(Natd(args).run())


if __name__ == "__main__":
    main()
