"""igdpcp: the command-line tool. ``igdpcp demo`` shows the whole product working.

The demo builds the namespace test bed (LAN host, router, provider NAT2 with real
miniupnpd as its PCP server, Internet host), starts natd and controld, maps a port
from the LAN host with the real ``upnpc`` and proves that an Internet host reaches
the LAN host through both NATs, printing what happened at each hop.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

try:  # the bed is not installed (tests/bed): demo and teardown work from a checkout only
    from tests.bed import testbed as tb
    from tests.bed.stack import Stack
except ImportError:
    tb = Stack = None  # type: ignore[assignment]

LAN_PORT, EXT_PORT = 8000, 8080
PAYLOAD = b"hello from the Internet, through NAT2 and NAT1"


def _say(step: str, text: str) -> None:
    print(f"  {step:<10} {text}", flush=True)


def _pcp_lines(st: Stack) -> list[str]:
    """natd's log lines for the mapping's PCP request and answer (not the start-up probe)."""
    lines = [ln.split("natd: pcp ", 1)[-1] for ln in st.log("natd").splitlines()
             if "natd: pcp " in ln and "(mapping " in ln]
    return [ln.replace("-> ", "request  to ", 1) if ln.startswith("->") else ln.replace("<- ", "response from ", 1)
            for ln in lines]


def demo(keep: bool, layout: str) -> int:
    """Run the demo; returns the process exit code (0 = bytes crossed both NATs)."""
    if os.geteuid() != 0:
        print("igdpcp demo: needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    bed = tb.Testbed()
    st = Stack(bed, layout=layout)
    ok = False
    try:
        print(f"igdpcp demo: test bed {bed.prefix} (layout: {layout})")
        bed.setup()
        bed.start_nat2()
        _say("NAT2", f"provider NAT at {tb.ISP_INT_IP}, public {tb.NAT2_PUBLIC_IP}: real miniupnpd as PCP server")
        st.start()
        _say("router", f"natd (nftables, WAN {tb.ROUTER_WAN_IP}) and controld (UPnP on {st.controld_ip}) up")
        add = st.upnpc("-a", tb.LAN_HOST_IP, str(LAN_PORT), str(EXT_PORT), "TCP")
        answer = next((line for line in add.stdout.splitlines() if "redirected" in line or "failed" in line),
                      add.stdout.strip().splitlines()[-1] if add.stdout.strip() else add.stderr.strip())
        _say("UPnP", f"LAN host {tb.LAN_HOST_IP}: upnpc -a {tb.LAN_HOST_IP} {LAN_PORT} {EXT_PORT} TCP -> {answer}")
        for (proto, port), (ip, iport) in st.nat1_forwards().items():
            _say("NAT1", f"nft map igdpcp/fwd4: {proto} {tb.ROUTER_WAN_IP}:{port} -> {ip}:{iport}")
        for line in _pcp_lines(st):
            _say("PCP", line)
        for r in bed.nat2_dnat_rules():
            _say("NAT2", f"miniupnpd DNAT: {r.proto} {tb.NAT2_PUBLIC_IP}:{r.ext_port} -> {r.int_ip}:{r.int_port}")
        listener = bed.tcp_listen("lan", LAN_PORT)
        time.sleep(0.2)
        sent = bed.tcp_send("inet", tb.NAT2_PUBLIC_IP, EXT_PORT, PAYLOAD)
        got = listener.received(timeout=5)
        peer = listener.peer(timeout=0)
        ok = sent and got == PAYLOAD
        _say("Internet", f"{tb.INET_HOST_IP} -> {tb.NAT2_PUBLIC_IP}:{EXT_PORT}: "
             + (f"LAN host received {len(got)} bytes {got!r} (peer {peer[0] if peer else '?'})" if ok
                else "NOT delivered"))
        print("igdpcp demo: " + ("SUCCESS: an Internet host reached the LAN host through both NATs" if ok
                                 else "FAILED"), flush=True)
        if keep:
            print(f"\nLeft running. Explore with e.g.\n  ip netns exec {bed.ns('lan')} upnpc -u {st.root_url} -l\n"
                  f"  ip netns exec {bed.ns('cpe')} nft list table ip igdpcp\n"
                  f"Logs in {bed.workdir}. Tear down with:\n  igdpcp teardown {bed.prefix}")
            return 0 if ok else 1
        return 0 if ok else 1
    except Exception as exc:
        print(f"igdpcp demo: FAILED: {exc}", file=sys.stderr)
        for name in ("natd", "controld"):
            if st.log(name):
                print(f"--- {name} log (tail)\n{st.log(name)[-2000:]}", file=sys.stderr)
        return 1
    finally:
        if not keep:
            st.close()
            bed.teardown()
        else:
            tb._LIVE.discard(bed)  # keep it past interpreter exit


def teardown(prefix: str) -> int:
    """Remove a bed left by ``demo --keep``: the bed's own teardown (processes in its
    namespaces terminated then killed, namespaces deleted, temporary directory removed)."""
    import glob
    import tempfile

    found = [ns for ns in tb.list_namespaces() if ns.startswith(prefix + "-")]
    bed = tb.Testbed(prefix=prefix)
    dirs = glob.glob(os.path.join(tempfile.gettempdir(), f"{prefix}-*"))
    bed.workdir = dirs[0] if dirs else None
    bed.teardown()
    print(f"removed {len(found)} namespaces of {prefix}")
    return 0


def host_left(socket_path: str, ip: str) -> int:
    """``igdpcp host-left IP``: controld removes IP's mappings (RFC 6970 §5.10); 0 on success."""
    import asyncio

    from controld.admin import send_host_left

    try:
        answer = asyncio.run(send_host_left(socket_path, ip))
    except (OSError, asyncio.TimeoutError) as exc:
        print(f"igdpcp host-left: controld at {socket_path}: {exc}", file=sys.stderr)
        return 1
    print(answer)
    return 0 if answer.startswith("ok") else 1


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``igdpcp``."""
    p = argparse.ArgumentParser(prog="igdpcp", description="igdpcp tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="build the namespace test bed and map a port through both NATs")
    d.add_argument("--keep", action="store_true", help="leave everything running for exploration")
    d.add_argument("--layout", choices=("router", "split"), default="router",
                   help="split: controld in its own namespace")
    t = sub.add_parser("teardown", help="remove a bed left by demo --keep")
    t.add_argument("prefix")
    h = sub.add_parser("host-left", help="tell controld a LAN host left (DHCP release): remove its mappings")
    h.add_argument("ip", help="the host's IPv4 address")
    h.add_argument("--socket", default="/var/run/igdpcp/controld.sock", help="controld's --admin-socket")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "host-left":
        sys.exit(host_left(args.socket, args.ip))
    sys.exit(demo(args.keep, args.layout) if args.cmd == "demo" else teardown(args.prefix))


if __name__ == "__main__":
    main()
