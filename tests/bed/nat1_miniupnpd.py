"""Debian's miniupnpd run as the bed's router (NAT1), for the benchmarks in bench/ that compare with it.

Its nftables chains are made the way its nft_init.sh would; the bed's WAN is 100.64/10,
which miniupnpd refuses, so a public ext_ip is asserted instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

from tests.bed import testbed as tb

CHAINS = """
table inet mupnp {
    chain forward { type filter hook forward priority filter; policy accept; jump mupnp_fwd; }
    chain mupnp_fwd { }
    chain prerouting { type nat hook prerouting priority dstnat; policy accept; jump mupnp_dnat; }
    chain mupnp_dnat { }
    chain postrouting { type nat hook postrouting priority srcnat; policy accept; jump mupnp_snat; }
    chain mupnp_snat { }
}
"""


def start(bed: tb.Testbed, http_port: int, upnp: bool, natpmp: bool, uuid: str) -> Callable[[], None]:
    """Start miniupnpd in the router namespace; returns the function that stops it and
    removes its chains."""
    bed.nft("cpe", CHAINS)
    conf = bed.path("nat1-miniupnpd.conf")
    yes = {True: "yes", False: "no"}
    with open(conf, "w") as f:
        f.write("\n".join([
            f"ext_ifname={tb.ROUTER_WAN_IF}", f"listening_ip={tb.ROUTER_LAN_IF}", f"http_port={http_port}",
            "ext_ip=198.20.0.2", f"enable_natpmp={yes[natpmp]}", f"enable_upnp={yes[upnp]}", "secure_mode=yes",
            "system_uptime=no", "ipv6_disable=yes", f"uuid={uuid}",
            "upnp_table_name=mupnp", "upnp_nat_table_name=mupnp", "upnp_forward_chain=mupnp_fwd",
            "upnp_nat_chain=mupnp_dnat", "upnp_nat_postrouting_chain=mupnp_snat",
            f"allow 1024-65535 {tb.LAN_SUBNET} 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535", ""]))
    pidfile = bed.path("nat1-miniupnpd.pid")
    wrapper = bed._script("reaper", tb._REAPER_SCRIPT)
    bed.popen("cpe", [sys.executable, wrapper, tb.MINIUPNPD, "-f", conf, "-P", pidfile],
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not os.path.exists(pidfile) and time.monotonic() < deadline:  # bounded
        time.sleep(0.05)
    time.sleep(0.5)

    def stop() -> None:
        try:
            with open(pidfile) as f:
                os.kill(int(f.read().strip()), 15)
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
        bed.run("cpe", ["nft", "delete", "table", "inet", "mupnp"], check=False)

    return stop
