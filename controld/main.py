"""igdpcp-controld: the unprivileged control daemon (UPnP IGD + RFC 6970 IWF + PCP client).

It needs no WAN route and may live in a network namespace of its own whose only
interface is a LAN leg; everything upstream goes through natd over ZeroMQ.
"""

# ruff: noqa: E402  (the imports follow the ssl block below on purpose)
from __future__ import annotations

import sys

if __name__ == "__main__":  # the daemon, not a test importing it: it never speaks TLS, and asyncio's
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]  # optional import of ssl costs ~4.5 MiB RSS

import argparse
import asyncio
import dataclasses
import gc
import ipaddress
import logging
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from controld.adminapi.core_backend import CoreBackend
from controld.adminapi.server import AdminServer, SocketInUse
from controld.core.pinhole import PinholePolicy, Pinholes
from controld.core.pinhole_natd import NatdPinholeBackend, PinholeResync
from controld.core.pinhole_store import PinholeStore
from controld.core.policy import Permissions, Policy, RuleError
from controld.core.service import MODES, Iwf, IwfConfig
from controld.core.store import MappingTable
from controld.natd_link import NatdError, NatdLink
from controld.pcpserver.pcp import ServerPolicy
from controld.pcpserver.server import LanPcpServer, LanServerConfig, lan6_hosts
from controld.upnp.description import ROOT_PATH, Gateway, gateway
from controld.upnp.gena import GenaServer
from controld.upnp.http import UpnpHttpServer
from controld.upnp.igd import IgdActions
from controld.upnp.ssdp import SsdpServer
from controld.web.handler import WebApp, WebConfig
from shared import config, wire
from shared.config import parse_args_with_config
from shared.const import PCP_SERVER_PORT
from shared.daemon import (
    QuietTrim,
    hold_mmap_threshold,
    install_stop_signals,
    release_memory,
    reread_args,
    setup_logging,
)
from shared.netif import if_addrs, read_addrs

log = logging.getLogger("controld")

LAN_WAIT_S = 30.0
LAN_POLL_S = 5.0  # how often the LAN address is checked for a change
NATD_WAIT_S = 60.0
WEB_PREFIX = "/igdpcp"  # the LAN page's path: presentationURL http://LAN:PORT/igdpcp/


def _stable_uuid(table: MappingTable, key: str) -> str:
    """Device UUIDs survive restarts, so control points keep recognising the router."""
    value = table.get_meta(key)
    if value is None:
        value = str(uuid.uuid4())
        table.set_meta(key, value)
    return value


def _uuid5(namespace: uuid.UUID, name: str) -> uuid.UUID:
    """``uuid.uuid5``, the same UUIDs, from the interpreter's builtin SHA-1: hashlib's is OpenSSL's,
    and loading libcrypto for three digests at start cost controld ~3.7 MiB RSS for good."""
    try:
        from _sha1 import sha1
    except ImportError:  # an interpreter built without it
        from hashlib import sha1
    return uuid.UUID(bytes=sha1(namespace.bytes + name.encode()).digest()[:16], version=5)


def _device_uuids(configured: str | None, table: MappingTable) -> tuple[str, str, str]:
    """Root, WANDevice and WANConnectionDevice UUIDs: from ``option uuid`` when set (the embedded
    devices' derived from it, uuid5, so the config alone fixes every UDN), else kept in the table."""
    if configured is None:
        return _stable_uuid(table, "uuid_root"), _stable_uuid(table, "uuid_wan"), _stable_uuid(table, "uuid_wcd")
    root = uuid.UUID(configured)
    return str(root), str(_uuid5(root, "WANDevice")), str(_uuid5(root, "WANConnectionDevice"))


def _device(args: argparse.Namespace, table: MappingTable) -> Gateway:
    """The IGD root devices from the options (versions, UUID, friendly name, presentation URL)."""
    root, wan, wcd = _device_uuids(args.uuid, table)
    fixed = {"uuid_root": root, "uuid_wan": wan, "uuid_wcd": wcd}

    def uuid_of(key: str) -> str:  # the IGD:2 root of --igd-version both: derived the same way
        if key in fixed:
            return fixed[key]
        return str(_uuid5(uuid.UUID(root), key)) if args.uuid else _stable_uuid(table, key)

    gw = gateway(args.igd_version, uuid_of, args.friendly_name)
    gw.override_presentation(args.presentation_url or "")
    return gw


async def _lan_addresses(lan_if: str) -> tuple[str, list[str]]:
    deadline = asyncio.get_running_loop().time() + LAN_WAIT_S
    while True:
        a = await if_addrs(lan_if)
        if a.addresses:
            return a.addresses[0], list(a.subnets)
        if asyncio.get_running_loop().time() > deadline:
            raise SystemExit(f"controld: {lan_if} has no IPv4 address")
        await asyncio.sleep(0.5)


# Options a running controld cannot take over on SIGHUP (sockets, storage, identity).
RESTART_ONLY = config.restart_only("controld")


def _iwf_config(args: argparse.Namespace) -> IwfConfig:
    return IwfConfig.from_args(args)


@dataclass
class _Lan:
    """Where UPnP is served now; the LAN watch moves it (HTTP, SSDP and the subnets follow)."""

    if_name: str
    ip: str
    subnets: list[str]
    port: int = 0


def _make_iwf(args: argparse.Namespace, table: MappingTable,
              also: list[Callable[[wire.Message], Awaitable[None]]] | None = None) -> tuple[Iwf, NatdLink]:
    """The core and its natd link, not started yet; ``also`` hear natd's events after the core."""
    holder: list[Iwf] = []

    async def on_event(msg: wire.Message) -> None:
        if holder:
            await holder[0].on_natd_event(msg)
        for handler in also or ():
            await handler(msg)

    link = NatdLink(args.rpc, args.events, on_event, curve_dir=args.curve_dir)
    iwf = Iwf(_iwf_config(args), table, link, policy=_policy(args))
    holder.append(iwf)
    return iwf, link


async def _start_iwf(args: argparse.Namespace, iwf: Iwf, link: NatdLink) -> asyncio.Task[None]:
    """Run the natd link and start the core once natd answered (waits up to NATD_WAIT_S)."""
    link_task = asyncio.create_task(link.run())
    deadline = asyncio.get_running_loop().time() + NATD_WAIT_S
    while True:
        try:
            await iwf.start()
            return link_task
        except NatdError as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise SystemExit(f"controld: natd at {args.rpc} does not answer: {exc}") from None
            log.info("waiting for natd at %s", args.rpc)


async def _watch_lan(lan: _Lan, http: UpnpHttpServer, ssdp: SsdpServer, device: Gateway) -> None:
    """LAN address change: listen on the new address, then ssdp:update + alive there.

    The old listener closes only once the new one is up; a failed bind is retried at
    the next poll instead of leaving UPnP without a server."""
    while True:
        await asyncio.sleep(LAN_POLL_S)
        try:
            a = await if_addrs(lan.if_name)
        except Exception as exc:  # netlink trouble: try again at the next poll
            log.warning("reading %s failed: %s", lan.if_name, exc)
            continue
        if not a.addresses or a.addresses[0] == lan.ip:
            continue
        old = http.server
        try:
            new_port = await http.start(a.addresses[0], lan.port)
        except OSError as exc:
            http.server = old
            log.warning("cannot listen on the new LAN address %s:%d yet (%s); retrying",
                        a.addresses[0], lan.port, exc)
            continue
        if old is not None:
            old.close()
        lan.subnets, lan.port, lan.ip = list(a.subnets), new_port, a.addresses[0]
        device.present_at(f"http://{lan.ip}:{lan.port}{WEB_PREFIX}/")
        ssdp.relocate(lan.ip, f"http://{lan.ip}:{lan.port}{ROOT_PATH}")


async def _start_lan_pcp(args: argparse.Namespace, iwf: Iwf, lan_ip: str, pinholes: Pinholes) -> LanPcpServer | None:
    """PCP and NAT-PMP for LAN hosts on UDP 5351 (docs/lan-pcp.md), unless both are off; PCP
    also on the LAN interface's IPv6 addresses, its IPv6 MAPs as pinholes (docs/pinholes.md)."""
    if not (args.enable_pcp or args.enable_natpmp):
        return None
    try:
        managers = frozenset(ipaddress.ip_address(a) for a in args.pcp_manager or [])
    except ValueError as exc:
        raise SystemExit(f"controld: pcp-manager: {exc}") from None
    # PEER is not served: outbound pins are not in the core yet (docs/lan-pcp.md)
    policy = ServerPolicy(pcp=args.enable_pcp, natpmp=args.enable_natpmp, peer=False, managers=managers)
    server = LanPcpServer(iwf, LanServerConfig(policy, args.pcp_rate, args.pcp_burst, args.pcp_max_lifetime),
                          pinholes=pinholes)
    address = args.pcp_listen or lan_ip
    try:
        if args.enable_pcp:  # before the IPv4 start, so its first ANNOUNCE reaches ff02::1 too
            await _listen_lan6(server, args.lan_if)
        await server.start(address)
    except OSError as exc:  # UPnP still works without it
        server.close_sockets()
        log.warning("no PCP/NAT-PMP server on %s: %s", address, exc)
        return None
    log.info("PCP %s, NAT-PMP %s on %s:%d", "on" if args.enable_pcp else "off",
             "on" if args.enable_natpmp else "off", address, PCP_SERVER_PORT)
    return server


async def _listen_lan6(server: LanPcpServer, lan_if: str) -> None:
    """PCP on the LAN interface's IPv6 addresses as they are now (NAT-PMP is IPv4 only, RFC 6886)."""
    await server.listen6(lan6_hosts(read_addrs(lan_if, socket.AF_INET6).addresses, lan_if), lan_if)


async def _watch_lan6(server: LanPcpServer, lan_if: str) -> None:
    """Follow the LAN's IPv6 addresses (a delegated prefix comes and goes): PCP sockets with them."""
    while True:
        await asyncio.sleep(LAN_POLL_S)
        try:
            await _listen_lan6(server, lan_if)
        except OSError as exc:  # the interface is gone for now: try again at the next poll
            log.warning("reading the IPv6 addresses of %s failed: %s", lan_if, exc)


async def _start_admin(args: argparse.Namespace, backend: CoreBackend) -> AdminServer | None:
    """The admin API's socket (igdpcp, rpcd, the DHCP-release hook), if configured.

    Bound before anything else starts: a second controld finds the first one's socket
    answering and stops here with one line, before it touches natd or the table."""
    if not args.admin_socket:
        return None
    admin = AdminServer(args.admin_socket, backend)
    try:
        await admin.start()
    except SocketInUse:
        raise SystemExit(f"controld: another controld is running (its admin socket {args.admin_socket} "
                         "answers); not starting") from None
    except OSError as exc:  # the CLI and hooks then cannot reach us; UPnP still works
        log.warning("no admin socket at %s: %s", args.admin_socket, exc)
        return None
    return admin


def _reload(args: argparse.Namespace, reparse: Callable[[], argparse.Namespace], iwf: Iwf,
            web: WebApp) -> argparse.Namespace:
    """SIGHUP: the re-read arguments in force afterwards (the old ones if nothing could change)."""
    new = reread_args(reparse, args, RESTART_ONLY, log)
    if new is None:
        return args
    try:
        policy = _policy(new)
    except SystemExit as exc:  # a bad rule: keep the running policy
        log.warning("reload: %s; keeping the running rules", exc)
        return args
    iwf.policy = policy
    iwf.set_config(dataclasses.replace(_iwf_config(new), mode=iwf.cfg.mode))
    web.config = _web_config(new)  # sessions stay: a changed password applies to the next login
    log.info("reload: configuration re-read; %d rules, quotas %d/host %d total; %d mappings kept",
             len(policy.permissions.rules), policy.max_per_host, policy.max_total, iwf.table.count())
    return new


async def run(args: argparse.Namespace, reparse: Callable[[], argparse.Namespace] | None = None) -> None:
    """Start every part, serve until SIGTERM, then say ssdp:byebye and stop.

    SIGHUP re-reads flags and config (``reparse``) and applies what can change live:
    permission rules, quotas, managers, PCP settings, log level; no mapping is touched.
    """
    lan_ip, subnets = await _lan_addresses(args.lan_if)
    lan = _Lan(args.lan_if, lan_ip, subnets)
    table = MappingTable(args.state_dir)
    pinhole_events: list[Callable[[wire.Message], Awaitable[None]]] = []  # the resync, once built
    iwf, link = _make_iwf(args, table, pinhole_events)

    def reload() -> None:
        nonlocal args
        if reparse is not None:
            args = _reload(args, reparse, iwf, web)
            pinholes.set_policy(_pinhole_policy(args, iwf.policy))
            _share_quotas(iwf.policy, pinholes)

    backend = CoreBackend(iwf, reload)
    web = WebApp(backend, _web_config(args))
    try:
        admin = await _start_admin(args, backend)
    except SystemExit:
        table.close()
        raise
    link_task = await _start_iwf(args, iwf, link)
    device = _device(args, table)
    pinhole_backend = NatdPinholeBackend(link.call)
    pinhole_store = PinholeStore(table.db)
    pinholes = Pinholes(pinhole_backend, _pinhole_policy(args, iwf.policy), table.owned_by, table.count,
                        store=pinhole_store)
    _share_quotas(iwf.policy, pinholes)
    await pinholes.refresh()
    resync = PinholeResync(pinhole_backend, pinholes)
    if await resync.sync():  # the stored rows, with their remaining leases (docs/pinholes.md "Restart")
        resync.boot = iwf.natd_boot
    pinhole_events.append(resync.on_natd_event)  # natd restarted or restored: sync again
    actions = IgdActions(iwf, device, pinholes)
    gena = GenaServer(device, actions.evented)
    table.subscribe(actions.changed)  # SystemUpdateID first, then one coalesced GENA round
    table.subscribe(gena.changed)
    pinholes.on_change = gena.changed  # FirewallEnabled, InboundPinholeAllowed
    http = UpnpHttpServer(device, actions, lambda: lan.subnets, gena, web=(WEB_PREFIX, web.handle))
    lan.port = await http.start(lan.ip, args.http_port)
    device.present_at(f"http://{lan.ip}:{lan.port}{WEB_PREFIX}/")
    location = f"http://{lan.ip}:{lan.port}{ROOT_PATH}"
    ssdp = SsdpServer(device, lan.ip, location, lambda: lan.subnets, args.notify_interval)
    await ssdp.start()
    # after a burst of table writes: the WAL into the database (its fsync off the request path),
    # then the heap's free pages back
    trim = QuietTrim(tidy=table.checkpoint)
    table.subscribe(trim.note)
    pinhole_store.on_write = trim.note  # pinholes write into the same database
    tasks = [asyncio.create_task(ssdp.run_notify()), asyncio.create_task(gena.run_expiry()),
             asyncio.create_task(_watch_lan(lan, http, ssdp, device)), asyncio.create_task(trim.run())]
    lan_pcp = await _start_lan_pcp(args, iwf, lan.ip, pinholes)
    if lan_pcp is not None and args.enable_pcp:
        tasks.append(asyncio.create_task(_watch_lan6(lan_pcp, args.lan_if)))
    log.info("controld up: %s on %s, IGD version %s at %s, state in %s", lan.ip, args.lan_if,
             args.igd_version, location, args.state_dir)
    gc.collect()
    gc.freeze()  # what start-up made lives on: later collections need not walk it (10k rows)
    release_memory()  # start-up's garbage (parsing, loading) leaves holes in the heap

    stop = asyncio.Event()
    install_stop_signals(stop)
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    log.info("controld stopping")
    for t in tasks:
        t.cancel()
    if admin is not None:
        await admin.close()
    if lan_pcp is not None:
        lan_pcp.close()
    gena.close()
    ssdp.close()
    http.close()
    await iwf.stop()
    link_task.cancel()
    link.close()
    table.close()
    log.info("controld stopped; %d mappings kept for the next start", table.count())


def _web_config(args: argparse.Namespace) -> WebConfig:
    """The LAN page's settings: its path and the admin password's hash (empty: admin login off)."""
    return WebConfig(prefix=WEB_PREFIX, password_hash=args.web_password_hash or "")


def _policy(args: argparse.Namespace) -> Policy:
    """The core's permission rules, quotas, secure mode and managers from flags/config; bad ones stop the start."""
    try:
        perms = Permissions.parse(args.permission or [])
        managers = tuple(ipaddress.IPv4Network(n, strict=False) for n in args.manage_host or [])
    except (RuleError, ValueError) as exc:
        raise SystemExit(f"controld: {exc}") from None
    return Policy(perms, args.max_mappings_per_host, args.max_mappings, managers, args.secure_mode)


def _pinhole_policy(args: argparse.Namespace, policy: Policy) -> PinholePolicy:
    """Pinholes share secure mode and the mapping quotas (docs/upnp.md "IPv6 pinholes")."""
    return PinholePolicy(args.inbound_pinholes, args.secure_mode, policy.max_per_host, policy.max_total,
                         permissions=policy.permissions)


def _share_quotas(policy: Policy, pinholes: Pinholes) -> None:
    """A host's pinholes count against its IPv4 mapping quota too (and the other way round)."""
    policy.pinholes_of, policy.pinholes_total = pinholes.count_of, lambda: len(pinholes.rows)


def build_parser() -> argparse.ArgumentParser:
    """controld's command line, from the option table in shared/config.py."""
    return config.build_parser("controld", "igdpcp-controld", __doc__.splitlines()[0], choices={"mode": MODES})


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``igdpcp-controld``."""
    def parse() -> argparse.Namespace:
        return parse_args_with_config(build_parser(), argv, "controld")

    args = parse()
    setup_logging("controld", args.log_level)
    hold_mmap_threshold()
    asyncio.run(run(args, parse))


if __name__ == "__main__":
    main()
