"""The two systems under test as the router's IGD in one bed: igdpcp (natd + controld) and Debian's miniupnpd."""

from __future__ import annotations

import compileall
import json
import os
import signal
import subprocess
import sys
import time

from bench import procs
from bench._bed import HTTP_PORT, Stack, tb

MINIUPNPD_HTTP_PORT = 5001
LIMITS_CONTROLD = ["--max-mappings", "0", "--max-mappings-per-host", "0"]  # the bench maps N ports from one host
# a configured device UUID, as the OpenWrt init script and the systemd units always pass one
UUID_CONTROLD = ["--uuid", "3f1e3d3c-0000-4000-8000-0000000000a1"]
LIMITS_NATD = ["--max-bindings", "65535", "--max-per-host", "65535"]
# the pinholes phase (docs/pinholes.md): natd owns the inbound IPv6 drop and lets one host open N pinholes
PINHOLES_NATD = ["--ipv6-firewall", "own", "--max-pinholes", "65535", "--max-pinholes-per-host", "65535"]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_bytecode() -> None:
    """The daemons' bytecode, as both packages compile it at install: a caller's PYTHONDONTWRITEBYTECODE
    would otherwise have each start compile from source (slower, and ~1.5 MiB more RSS in each daemon)."""
    for pkg in ("controld", "natd", "shared"):
        compileall.compile_dir(os.path.join(ROOT, pkg), quiet=1)


def nft_count(bed: tb.Testbed, argv: list[str], kind: str) -> int:
    """How many ``kind`` objects ("elem" of a set, "rule") ``nft -j`` lists (0 if the object is gone)."""
    res = bed.run("cpe", ["nft", "-j", *argv], check=False)
    if res.returncode != 0:
        return 0
    items = json.loads(res.stdout)["nftables"]
    if kind == "rule":
        return sum(1 for item in items if "rule" in item)
    return sum(len(item["set"].get("elem", [])) for item in items if "set" in item)


def natd_pinholes(bed: tb.Testbed) -> int:
    """Pinholes natd holds in the kernel: elements of its any-remote set (``--ipv6-firewall own``)."""
    return nft_count(bed, ["list", "set", "ip6", "igdpcp", "pin6"], "elem")


class Igdpcp:
    """natd + controld in the router namespace (nat1-only unless ``mode`` says otherwise)."""

    name = "igdpcp"

    def __init__(self, bed: tb.Testbed, mode: str = "nat1-only", extra_controld: list[str] | None = None,
                 extra_natd: list[str] | None = None) -> None:
        self.bed = bed
        self.stack = Stack(bed, mode=mode, controld_args=[*LIMITS_CONTROLD, *UUID_CONTROLD, *(extra_controld or [])],
                           natd_args=[*LIMITS_NATD, *(extra_natd or [])])
        # controld serves UPnP on its LAN IPv4 address; the IGD:2 device carries WANIPv6FirewallControl
        self.pinhole_desc_url = f"http://{tb.ROUTER_LAN_IP}:{HTTP_PORT}/igd2/rootDesc.xml"

    @classmethod
    def for_pinholes(cls, bed: tb.Testbed) -> Igdpcp:
        """natd with its own IPv6 firewall, secure mode as shipped: the client calls from its IPv4
        address, which natd's neighbour table ties to its IPv6 one (docs/pinholes.md "Policy")."""
        return cls(bed, extra_natd=PINHOLES_NATD)

    def pinholes(self) -> int:
        """Pinholes in the kernel (natd's set elements)."""
        return natd_pinholes(self.bed)

    def start(self) -> None:
        """Start both daemons (their bytecode compiled first) and wait for their "up" lines."""
        compile_bytecode()
        self.stack.start()

    def pids(self) -> dict[str, int]:
        """The daemons' pids by name."""
        return {name: p.pid for name, p in self.stack.procs.items()}

    def state_files_kib(self) -> float | None:
        """What controld's SQLite table takes in its state dir (database, WAL, shared index): RAM on
        OpenWrt, where the state dir is under /var (tmpfs)."""
        return sum(e.stat().st_size for e in os.scandir(self.bed.path("state"))
                   if e.name.startswith("mappings.sqlite3")) / 1024

    def stop(self) -> None:
        """Stop both and remove their kernel objects and table, so the next system starts clean."""
        self.stack.close()
        self.bed.run("cpe", ["nft", "delete", "table", "ip", "igdpcp"], check=False)
        self.bed.run("cpe", ["nft", "delete", "table", "ip6", "igdpcp"], check=False)
        for name in ("mappings.sqlite3", "mappings.sqlite3-wal", "mappings.sqlite3-shm"):
            try:
                os.unlink(os.path.join(self.bed.path("state"), name))
            except OSError:
                pass


class Miniupnpd:
    """Debian's miniupnpd as the router's IGD (NAT1), its chains made the way nft_init.sh would.

    ``ipv6``: IPv6 on (its IGD:2 description with WANIPv6FirewallControl, HTTP on the router's LAN IPv6
    address only); it then serves no IPv4 control point, so only the pinholes phase uses it."""

    name = "miniupnpd"

    def __init__(self, bed: tb.Testbed, ipv6: bool = False) -> None:
        self.bed = bed
        self.ipv6 = ipv6
        # 2.3.1 refuses AddPinhole unless the caller's own IPv6 address is InternalClient (always,
        # whatever secure_mode says): the client speaks to it over IPv6
        self.pinhole_desc_url = f"http://[{tb.ROUTER_LAN_IP6}]:{MINIUPNPD_HTTP_PORT}/rootDesc.xml"
        self.pidfile = bed.path("nat1-miniupnpd.pid")
        self.pid: int | None = None

    def start(self) -> None:
        """Make its chains, write its config, start it and wait for its pid file."""
        self.bed.nft("cpe", """
table inet mupnp {
    chain forward { type filter hook forward priority filter; policy accept; jump mupnp_fwd; }
    chain mupnp_fwd { }
    chain prerouting { type nat hook prerouting priority dstnat; policy accept; jump mupnp_dnat; }
    chain mupnp_dnat { }
    chain postrouting { type nat hook postrouting priority srcnat; policy accept; jump mupnp_snat; }
    chain mupnp_snat { }
}
""")
        conf = self.bed.path("nat1-miniupnpd.conf")
        with open(conf, "w") as f:
            f.write("\n".join([
                f"ext_ifname={tb.ROUTER_WAN_IF}", f"listening_ip={tb.ROUTER_LAN_IF}",
                f"http_port={MINIUPNPD_HTTP_PORT}",
                # the bed's WAN is 100.64/10, which miniupnpd refuses; assert a public address instead
                "ext_ip=198.20.0.2", "enable_natpmp=yes", "enable_upnp=yes", "secure_mode=yes",
                "system_uptime=no", *self._ip_version_options(), "uuid=3f1e3d3c-0000-4000-8000-000000000001",
                "upnp_table_name=mupnp", "upnp_nat_table_name=mupnp", "upnp_forward_chain=mupnp_fwd",
                "upnp_nat_chain=mupnp_dnat", "upnp_nat_postrouting_chain=mupnp_snat",
                f"allow 1024-65535 {tb.LAN_SUBNET} 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535", ""]))
        wrapper = self.bed._script("reaper", tb._REAPER_SCRIPT)
        self.bed.popen("cpe", [sys.executable, wrapper, tb.MINIUPNPD, "-f", conf, "-P", self.pidfile],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # bounded wait for its pid file
            try:
                with open(self.pidfile) as f:
                    self.pid = int(f.read().strip())
                break
            except (OSError, ValueError):
                time.sleep(0.05)
        if self.pid is None:
            raise RuntimeError("miniupnpd wrote no pid file in 10 s")
        time.sleep(0.5)  # its HTTP socket comes up after the pid file

    def _ip_version_options(self) -> list[str]:
        if not self.ipv6:
            return ["ipv6_disable=yes"]
        return ["ipv6_disable=no", f"ipv6_listening_ip={tb.ROUTER_LAN_IP6}", "force_igd_desc_v1=no"]

    def pinholes(self) -> int:
        """Pinholes in the kernel: its accept rules in the forward chain (one per pinhole, IPv6 only here)."""
        return nft_count(self.bed, ["list", "chain", "inet", "mupnp", "mupnp_fwd"], "rule")

    def pids(self) -> dict[str, int]:
        """Its pid by name."""
        return {"miniupnpd": self.pid} if self.pid else {}

    def state_files_kib(self) -> float | None:
        """None: it keeps its rules in the kernel only (no lease_file in this bed)."""
        return None

    def stop(self) -> None:
        """SIGTERM it and remove its chains."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 5
            while tb.pid_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.pid = None
        self.bed.run("cpe", ["nft", "delete", "table", "inet", "mupnp"], check=False)


System = Igdpcp | Miniupnpd


def pin_all(system: System) -> None:
    """Pin the system's daemons to core 0."""
    procs.pin(system.pids().values())
