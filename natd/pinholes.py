"""natd's desired IPv6 pinhole set and its policy (pure: no kernel, no sockets; time passed in).

Keyed by controld's pinhole id (``pid``) and, for packets, by the nft element key
(LAN address, protocol, LAN port, remote host or None). natd trusts nothing controld sends
(docs/architecture.md, Trust): the LAN address must sit in one of the LAN interface's global
IPv6 prefixes, and the total and per-address limits hold (docs/pinholes.md, Policy).
"""

from __future__ import annotations

import heapq
import ipaddress
import math
from dataclasses import dataclass, field

from natd.bindings import PolicyError
from natd.nft import PinKey
from shared.config import default
from shared.wire import Pinhole


@dataclass
class PinholeLimits:
    max_total: int = default("max-pinholes")
    max_per_host: int = default("max-pinholes-per-host")
    grace: int = default("pinhole-grace")


@dataclass
class PinholeTable:
    """The pinholes natd holds, each with its absolute expiry (monotonic seconds)."""

    lan_prefixes: list[ipaddress.IPv6Network] = field(default_factory=list)
    router_ips: set[ipaddress.IPv6Address] = field(default_factory=set)
    limits: PinholeLimits = field(default_factory=PinholeLimits)
    by_pid: dict[int, tuple[Pinhole, PinKey, float]] = field(default_factory=dict)
    by_key: dict[PinKey, int] = field(default_factory=dict)
    per_host: dict[str, int] = field(default_factory=dict)
    _heap: list[tuple[float, int]] = field(default_factory=list, repr=False)  # (expiry, pid): O(log n) sweep

    def check_lan(self, ip: str) -> str:
        """The canonical text of ``ip`` if it is a LAN host's global address, else PolicyError."""
        addr = ipaddress.IPv6Address(ip)
        if addr.is_link_local or addr.is_multicast or addr.is_loopback or addr.is_unspecified \
                or addr in self.router_ips or addr.ipv4_mapped is not None:
            raise PolicyError("not-lan", f"{ip} is not a LAN host's global IPv6 address")
        # Documentation and ULA prefixes are fine when they are the LAN's: is_global is not the test.
        net = next((n for n in self.lan_prefixes if addr in n), None)
        if net is None:
            raise PolicyError("not-lan", f"{ip} is outside the LAN's IPv6 prefixes "
                                         f"({', '.join(map(str, self.lan_prefixes)) or 'none'})")
        if addr == net.network_address and net.prefixlen < 127:
            raise PolicyError("not-lan", f"{ip} is the subnet-router anycast address (RFC 4291 §2.6.1)")
        return str(addr)

    def key(self, p: Pinhole) -> PinKey:
        """The nft element key of ``p``, its addresses checked and in canonical form."""
        lan = self.check_lan(p.lan_ip)
        remote = None
        if p.remote is not None:
            r = ipaddress.IPv6Address(p.remote)
            if r.is_multicast or r.is_unspecified or r.is_loopback:
                raise PolicyError("bad-remote", f"{p.remote} cannot be a remote host")
            remote = str(r)
        return (lan, p.proto, p.lan_port, remote)

    def add(self, p: Pinhole, now: float) -> tuple[PinKey, int]:
        """Insert or replace ``p``; returns its key and the kernel timeout (lease + grace)."""
        k = self.key(p)
        owner = self.by_key.get(k)
        if owner is not None and owner != p.pid:
            raise PolicyError("duplicate", f"pinhole {owner} already opens {describe(k)}")
        old = self.by_pid.get(p.pid)
        if old is None and len(self.by_pid) >= self.limits.max_total:
            raise PolicyError("quota", "total pinhole limit reached")
        if self.per_host.get(k[0], 0) - (old is not None and old[1][0] == k[0]) >= self.limits.max_per_host:
            raise PolicyError("quota", f"pinhole limit for {k[0]} reached")
        self.remove(p.pid)
        timeout = p.lease + self.limits.grace
        self.put((p, k, now + timeout))
        return k, timeout

    def put(self, entry: tuple[Pinhole, PinKey, float]) -> None:
        """Insert a checked entry as it is (an add, or the undo of a failed kernel write)."""
        p, k, expiry = entry
        self.remove(p.pid)
        self.by_pid[p.pid] = entry
        self.by_key[k] = p.pid
        self.per_host[k[0]] = self.per_host.get(k[0], 0) + 1
        heapq.heappush(self._heap, (expiry, p.pid))
        if len(self._heap) > 4 * len(self.by_pid) + 1024:  # re-leases leave stale entries: bound them
            self._heap = [(e[2], pid) for pid, e in self.by_pid.items()]
            heapq.heapify(self._heap)

    def remove(self, pid: int) -> PinKey | None:
        entry = self.by_pid.pop(pid, None)
        if entry is None:
            return None
        k = entry[1]
        del self.by_key[k]
        self.per_host[k[0]] -= 1
        if not self.per_host[k[0]]:
            del self.per_host[k[0]]
        return k

    def expire(self, now: float) -> list[tuple[int, PinKey]]:
        """Forget pinholes whose kernel timeout has passed (the kernel dropped them itself)."""
        gone: list[tuple[int, PinKey]] = []
        while self._heap and self._heap[0][0] <= now:
            expiry, pid = heapq.heappop(self._heap)
            e = self.by_pid.get(pid)
            if e is not None and e[2] == expiry:  # else a stale entry of a re-leased or removed pinhole
                self.remove(pid)
                gone.append((pid, e[1]))
        return gone

    def wanted(self, now: float) -> dict[PinKey, int]:
        """{key: remaining timeout in whole seconds (>= 1)}: what the kernel should hold now."""
        # (now + t) - now is t plus a rounding error: 1 ms of slack keeps a fresh pinhole at its
        # whole timeout instead of ceil() making it a second longer
        return {e[1]: max(1, math.ceil(e[2] - now - 1e-3)) for e in self.by_pid.values() if e[2] > now}

    def replace_all(self, pinholes: list[Pinhole], now: float) -> tuple[PinholeTable, list[tuple[Pinhole, str]]]:
        """A new table for a sync; pinholes off the LAN or over a limit are left out with the reason,
        a malformed set (a pid twice, two pids one key) is refused whole."""
        trial = PinholeTable(self.lan_prefixes, self.router_ips, self.limits)
        skipped: list[tuple[Pinhole, str]] = []
        for p in pinholes:
            if p.pid in trial.by_pid:
                raise PolicyError("duplicate", f"pinhole {p.pid} listed twice")
            try:
                trial.add(p, now)
            except PolicyError as exc:
                if exc.code not in ("not-lan", "quota", "bad-remote"):
                    raise
                skipped.append((p, str(exc)))
        return trial, skipped


def describe(k: PinKey) -> str:
    lan, proto, port, remote = k
    return f"[{lan}]:{port}/{'tcp' if proto == 6 else 'udp'} from {remote or 'any'}"


