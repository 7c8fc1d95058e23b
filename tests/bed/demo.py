"""The demo (README command 1, ``scripts/demo`` = ``python -m tests.bed demo``).

It builds the namespace test bed (LAN host, router, provider NAT2 with real miniupnpd as
its PCP server, Internet host), starts natd and controld, maps a port from the LAN host
with the real ``upnpc`` and proves that an Internet host reaches the LAN host through
both NATs, printing what happened at each hop.
"""

from __future__ import annotations

import glob
import os
import sys
import tempfile
import time
from pathlib import Path

from tests.bed import testbed as tb
from tests.bed.stack import Stack

ROOT = Path(__file__).resolve().parents[2]
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
                  f"Logs in {bed.workdir}. Tear down with (in {ROOT}):\n"
                  f"  .venv/bin/python -m tests.bed teardown {bed.prefix}")
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
    found = [ns for ns in tb.list_namespaces() if ns.startswith(prefix + "-")]
    bed = tb.Testbed(prefix=prefix)
    dirs = glob.glob(os.path.join(tempfile.gettempdir(), f"{prefix}-*"))
    bed.workdir = dirs[0] if dirs else None
    bed.teardown()
    print(f"removed {len(found)} namespaces of {prefix}")
    return 0
