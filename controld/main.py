"""igdpcp-controld: the unprivileged control daemon (UPnP IGD + RFC 6970 IWF + PCP client).

It needs no WAN route and may live in a network namespace of its own whose only
interface is a LAN leg; everything upstream goes through natd over ZeroMQ.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import uuid

from controld.description import ROOT_PATH, Device
from controld.http import UpnpHttpServer
from controld.igd import IgdActions
from controld.iwf import MODES, Iwf, IwfConfig
from controld.natd_link import NatdError, NatdLink
from controld.ssdp import SsdpServer
from controld.table import MappingTable
from shared.config import parse_args_with_config
from shared.daemon import install_stop_signals, setup_logging
from shared.netif import if_addrs

log = logging.getLogger("controld")

LAN_WAIT_S = 30.0
NATD_WAIT_S = 60.0


def _stable_uuid(table: MappingTable, key: str) -> str:
    """Device UUIDs survive restarts, so control points keep recognising the router."""
    value = table.get_meta(key)
    if value is None:
        value = str(uuid.uuid4())
        table.set_meta(key, value)
    return value


async def _lan_addresses(lan_if: str) -> tuple[str, list[str]]:
    deadline = asyncio.get_running_loop().time() + LAN_WAIT_S
    while True:
        a = await if_addrs(lan_if)
        if a.addresses:
            return a.addresses[0], list(a.subnets)
        if asyncio.get_running_loop().time() > deadline:
            raise SystemExit(f"controld: {lan_if} has no IPv4 address")
        await asyncio.sleep(0.5)


async def run(args: argparse.Namespace) -> None:
    """Start every part, serve until SIGTERM, then say ssdp:byebye and stop."""
    lan_ip, subnets = await _lan_addresses(args.lan_if)
    table = MappingTable(args.state_dir)
    cfg = IwfConfig(mode=args.mode, pcp_server=args.pcp_server, pcp_timeout=args.pcp_timeout,
                    secure_mode=args.secure_mode)
    iwf: Iwf | None = None

    async def on_event(msg):  # type: ignore[no-untyped-def]
        if iwf is not None:
            await iwf.on_natd_event(msg)

    link = NatdLink(args.rpc, args.events, on_event)
    link_task = asyncio.create_task(link.run())
    iwf = Iwf(cfg, table, link)
    deadline = asyncio.get_running_loop().time() + NATD_WAIT_S
    while True:
        try:
            await iwf.start()
            break
        except NatdError as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise SystemExit(f"controld: natd at {args.rpc} does not answer: {exc}") from None
            log.info("waiting for natd at %s", args.rpc)
    device = Device(_stable_uuid(table, "uuid_root"), _stable_uuid(table, "uuid_wan"),
                    _stable_uuid(table, "uuid_wcd"), igd_version=args.igd_version)
    http = UpnpHttpServer(device, IgdActions(iwf, device), lambda: subnets)
    port = await http.start(lan_ip, args.http_port)
    location = f"http://{lan_ip}:{port}{ROOT_PATH}"
    ssdp = SsdpServer(device, lan_ip, location, lambda: subnets)
    await ssdp.start()
    notify_task = asyncio.create_task(ssdp.run_notify())
    log.info("controld up: %s on %s, IGD:%d at %s, state in %s", lan_ip, args.lan_if,
             args.igd_version, location, args.state_dir)
    stop = asyncio.Event()
    install_stop_signals(stop)
    await stop.wait()
    log.info("controld stopping")
    notify_task.cancel()
    ssdp.close()
    http.close()
    await iwf.stop()
    link_task.cancel()
    link.close()
    table.close()
    log.info("controld stopped; %d mappings kept for the next start", table.count())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="igdpcp-controld", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="UCI config file (section 'controld'); flags win")
    p.add_argument("--lan-if", required=True, help="LAN interface to serve UPnP on")
    p.add_argument("--rpc", required=True, help="natd's request endpoint (ipc://PATH or tcp://HOST:PORT)")
    p.add_argument("--events", required=True, help="natd's event endpoint")
    p.add_argument("--state-dir", required=True, help="where the mapping table (SQLite) lives")
    p.add_argument("--mode", default="auto", choices=MODES, help="auto picks from the WAN address and PCP")
    p.add_argument("--pcp-server", default=None, help="PCP server address (default: the WAN default router)")
    p.add_argument("--pcp-timeout", type=float, default=10.0,
                   help="seconds a UPnP action waits for NAT2 before answering 501")
    p.add_argument("--http-port", type=int, default=0, help="UPnP HTTP port on the LAN address (0: any)")
    p.add_argument("--igd-version", type=int, default=1, choices=(1, 2), help="IGD device version to describe")
    p.add_argument("--secure-mode", action=argparse.BooleanOptionalAction, default=True,
                   help="InternalClient must be the caller's own address")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``igdpcp-controld``."""
    args = parse_args_with_config(build_parser(), argv, "controld")
    setup_logging("controld", args.log_level)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
