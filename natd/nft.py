"""NAT1 in nftables: natd's own table, forwards as map elements, atomic batches.

Layout (standalone): ``table ip igdpcp`` with
- ``map fwd4``  proto . wan port -> lan addr . lan port    (DNAT, one O(1) lookup per packet)
- ``map snat4`` lan addr . proto . lan port -> wan addr . wan port (endpoint-independent
  SNAT so traffic the LAN host starts from a mapped port leaves from the mapped port)
- ``set wan4``  the WAN addresses the forwards answer on
and four base chains whose rules never change with the number of forwards. Every
change is one libnftables transaction: it applies whole or not at all. Explicit IPv4
selectors (``ip daddr``, family ``ip``) keep IPv6 from ever matching an IPv4 forward.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import nftables

from shared.wire import Binding

log = logging.getLogger("natd.nft")

PROTO_NAMES = {6: "tcp", 17: "udp"}
PROTO_NUMBERS = {v: k for k, v in PROTO_NAMES.items()}

FwdKey = tuple[int, int]  # proto, wan port
FwdVal = tuple[str, int]  # lan ip, lan port
SnatKey = tuple[str, int, int]  # lan ip, proto, lan port
SnatVal = tuple[str, int]  # wan ip, wan port


class NftError(RuntimeError):
    """libnftables refused a command; the message is nft's own."""


@dataclass
class KernelState:
    """What natd believes its maps hold; re-read from the kernel when in doubt."""

    fwd: dict[FwdKey, FwdVal]
    snat: dict[SnatKey, SnatVal]
    wan: set[str]


def _chains(table: str) -> str:
    dnat = "ip daddr @wan4 dnat ip to meta l4proto . th dport map @fwd4"
    return f"""
add chain ip {table} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}
add chain ip {table} output {{ type nat hook output priority -100; policy accept; }}
add chain ip {table} postrouting {{ type nat hook postrouting priority srcnat - 1; policy accept; }}
add chain ip {table} forward {{ type filter hook forward priority filter; policy accept; }}
flush chain ip {table} prerouting
flush chain ip {table} output
flush chain ip {table} postrouting
flush chain ip {table} forward
add rule ip {table} prerouting {dnat}
add rule ip {table} output {dnat}
add rule ip {table} postrouting meta l4proto {{ tcp, udp }} snat ip to ip saddr . meta l4proto . th sport map @snat4
add rule ip {table} forward ct status dnat accept
"""


class Nft:
    """natd's nftables objects; the only code that writes them."""

    def __init__(self, table: str = "igdpcp") -> None:
        self.table = table
        self._nft = nftables.Nftables()
        self._nft.set_json_output(False)
        self.state = KernelState({}, {}, set())

    def run(self, script: str) -> str:
        """Run one batch of nft commands as a single transaction."""
        rc, out, err = self._nft.cmd(script)
        if rc != 0:
            raise NftError(err.strip() or f"nft failed ({rc})")
        return out

    def _list_json(self, what: str) -> list[dict]:
        self._nft.set_json_output(True)
        try:
            rc, out, err = self._nft.cmd(f"list {what}")
        finally:
            self._nft.set_json_output(False)
        if rc != 0:
            raise NftError(err.strip())
        return json.loads(out).get("nftables", [])

    def table_intact(self) -> bool:
        """True when our table and its four rules are present (fw4 reloads and flushes remove them)."""
        try:
            items = self._list_json(f"table ip {self.table}")
        except NftError:
            return False
        rules = [i["rule"]["chain"] for i in items if "rule" in i]
        return sorted(rules) == ["forward", "output", "postrouting", "prerouting"]

    def setup(self) -> None:
        """Create the table if needed and adopt the elements already in it (no traffic gap)."""
        t = self.table
        self.run(f"""
add table ip {t}
add map ip {t} fwd4 {{ type inet_proto . inet_service : ipv4_addr . inet_service; }}
add map ip {t} snat4 {{ type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }}
add set ip {t} wan4 {{ type ipv4_addr; }}
{_chains(t)}""")
        self.state = self.read()
        log.info("nft table ip %s ready, adopted %d forwards", t, len(self.state.fwd))

    def read(self) -> KernelState:
        """Read the maps back from the kernel."""
        st = KernelState({}, {}, set())
        for item in self._list_json(f"table ip {self.table}"):
            obj = item.get("map") or item.get("set")
            if not obj:
                continue
            for elem in obj.get("elem", []):
                if obj["name"] == "wan4":
                    st.wan.add(elem if isinstance(elem, str) else elem.get("elem", {}).get("val", ""))
                    continue
                key, val = elem
                k, v = key["concat"], val["concat"]
                if obj["name"] == "fwd4":
                    st.fwd[(_proto(k[0]), int(k[1]))] = (v[0], int(v[1]))
                elif obj["name"] == "snat4":
                    st.snat[(k[0], _proto(k[1]), int(k[2]))] = (v[0], int(v[1]))
        return st

    def apply(self, bindings: Iterable[Binding], wan_ip: str | None) -> tuple[int, int]:
        """Make the kernel hold exactly ``bindings`` on ``wan_ip``; returns (added, removed) forwards.

        Only the difference is written, as one transaction. If our picture of the
        kernel was wrong (someone else changed it), re-read and try once more.
        """
        for attempt in (1, 2):
            script, added, removed = self._diff(bindings, wan_ip)
            if not script:
                return 0, 0
            try:
                self.run(script)
                self.state = self.read() if attempt == 2 else self._expected(bindings, wan_ip)
                return added, removed
            except NftError as exc:
                if attempt == 2:
                    raise
                log.warning("nft state drifted (%s); re-reading and retrying", exc)
                if not self.table_intact():
                    self.setup()
                self.state = self.read()
        raise AssertionError("unreachable")

    @staticmethod
    def _expected(bindings: Iterable[Binding], wan_ip: str | None) -> KernelState:
        fwd: dict[FwdKey, FwdVal] = {}
        snat: dict[SnatKey, SnatVal] = {}
        # One SNAT per LAN tuple: the oldest mapping (lowest mid) owns the source port.
        for b in sorted(bindings, key=lambda b: b.mid):
            fwd[(b.proto, b.wan_port)] = (b.lan_ip, b.lan_port)
            if wan_ip:
                snat.setdefault((b.lan_ip, b.proto, b.lan_port), (wan_ip, b.wan_port))
        return KernelState(fwd, snat, {wan_ip} if wan_ip else set())

    def _diff(self, bindings: Iterable[Binding], wan_ip: str | None) -> tuple[str, int, int]:
        want = self._expected(bindings, wan_ip)
        have = self.state
        t = self.table
        lines: list[str] = []

        def fk(k: FwdKey) -> str:
            return f"{PROTO_NAMES[k[0]]} . {k[1]}"

        def sk(k: SnatKey) -> str:
            return f"{k[0]} . {PROTO_NAMES[k[1]]} . {k[2]}"

        for name, w, h, key in (("fwd4", want.fwd, have.fwd, fk), ("snat4", want.snat, have.snat, sk)):
            gone = [k for k in h if w.get(k) != h[k]]
            new = [k for k in w if h.get(k) != w[k]]
            if gone:
                lines.append(f"delete element ip {t} {name} {{ {', '.join(key(k) for k in gone)} }}")
            if new:
                elems = ", ".join(f"{key(k)} : {w[k][0]} . {w[k][1]}" for k in new)
                lines.append(f"add element ip {t} {name} {{ {elems} }}")
        if want.wan != have.wan:
            if have.wan:
                lines.append(f"delete element ip {t} wan4 {{ {', '.join(sorted(have.wan))} }}")
            if want.wan:
                lines.append(f"add element ip {t} wan4 {{ {', '.join(sorted(want.wan))} }}")
        added = sum(1 for k in want.fwd if have.fwd.get(k) != want.fwd[k])
        removed = sum(1 for k in have.fwd if k not in want.fwd)
        return "\n".join(lines), added, removed

    def teardown(self) -> None:
        """Remove natd's table (used on explicit uninstall, not on restart)."""
        self.run(f"delete table ip {self.table}")


def _proto(value: str | int) -> int:
    return value if isinstance(value, int) else PROTO_NUMBERS[value]
