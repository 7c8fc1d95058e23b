"""natd's desired NAT1 set and its port allocator (pure: no kernel, no sockets).

Every binding is keyed by controld's mapping id (``mid``) and, for packets, by
(protocol, WAN port). Each IGD mapping gets its own WAN port, so two mappings to the
same LAN endpoint stay two distinct PCP internal tuples (docs/requirements.md IWF-48).
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from shared import idindex
from shared.config import default
from shared.const import PCP_PORTS, PROTO_NAMES, UDP
from shared.wire import Binding

# Never hand out the PCP ports themselves (RFC 6887 §11.3) nor the well-known range
# by chance; an explicitly requested low port is still honoured when free.
ALLOC_RANGE = (1024, 65535)
RESERVED_UDP = PCP_PORTS
LAN_CACHE_MAX = 70_000  # addresses whose LAN check is remembered (bounded)


class PolicyError(ValueError):
    """A request natd refuses; ``code`` goes back in the error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Limits:
    """natd's own policy; it trusts nothing controld sends (docs/architecture.md, Trust)."""

    max_total: int = default("max-bindings")
    max_per_host: int = default("max-per-host")


@dataclass
class BindingTable:
    lan_subnets: list[ipaddress.IPv4Network] = field(default_factory=list)
    router_ips: set[str] = field(default_factory=set)
    limits: Limits = field(default_factory=Limits)
    by_mid: dict[int, Binding] = field(default_factory=dict)
    # The indexes are nested dicts keyed by the binding's own port ints, not a key tuple per forward,
    # and hold a single mid as itself: ~170 bytes less per forward than tuples (10k: 1.7 MiB).
    by_port: dict[int, dict[int, int]] = field(default_factory=dict)  # proto -> WAN port -> mid
    per_host: dict[str, int] = field(default_factory=dict)
    # (LAN ip, proto) -> LAN port -> mid, or mids when several forwards share the endpoint (IWF-48):
    # who owns the endpoint's SNAT, in O(1)
    by_endpoint: dict[tuple[str, int], dict[int, idindex.Held]] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.SystemRandom)
    _lan_ok: dict[str, tuple] = field(default_factory=dict, repr=False)

    def check_lan(self, ip: str) -> None:
        """The internal address must be a LAN host: not the router, not loopback, not the WAN."""
        key = (ip, tuple(self.lan_subnets), frozenset(self.router_ips))
        if self._lan_ok.get(ip) == key:
            return  # checked before against the same subnets and router addresses
        self._check_lan(ip)
        if len(self._lan_ok) >= LAN_CACHE_MAX:
            self._lan_ok.clear()
        self._lan_ok[ip] = key

    def _check_lan(self, ip: str) -> None:
        addr = ipaddress.IPv4Address(ip)
        if ip in self.router_ips or addr.is_loopback or addr.is_multicast or addr.is_unspecified:
            raise PolicyError("not-lan", f"{ip} is not a LAN host")
        if not any(addr in net for net in self.lan_subnets):
            raise PolicyError("not-lan", f"{ip} is outside the LAN subnets")
        net = next(n for n in self.lan_subnets if addr in n)
        if addr in (net.network_address, net.broadcast_address) and net.prefixlen < 31:
            raise PolicyError("not-lan", f"{ip} is a network or broadcast address")

    def free(self, proto: int, port: int) -> bool:
        return port not in self.by_port.get(proto, idindex.EMPTY) and not (proto == UDP and port in RESERVED_UDP)

    def allocate(self, proto: int, want: int, exact: bool, mid: int | None = None) -> int:
        """The wanted port if free (or already mapping ``mid``'s), else (unless ``exact``) a random free one."""
        if want and (self.free(proto, want)
                     or (mid is not None and self.by_port.get(proto, idindex.EMPTY).get(want) == mid)):
            return want
        if exact:
            raise PolicyError("port-in-use", f"{PROTO_NAMES.get(proto, str(proto)).lower()}/{want} is taken")
        lo, hi = ALLOC_RANGE
        start = self.rng.randint(lo, hi)
        for i in range(hi - lo + 1):  # bounded: one pass over the range
            port = lo + (start - lo + i) % (hi - lo + 1)
            if self.free(proto, port):
                return port
        raise PolicyError("no-ports", "no free NAT1 port")

    def add(self, b: Binding) -> None:
        """Insert a checked binding; the caller has already chosen ``wan_port``."""
        self.check_lan(b.lan_ip)
        if b.proto == UDP and b.wan_port in RESERVED_UDP:
            raise PolicyError("reserved-port", f"udp/{b.wan_port} is the PCP relay's own port (RFC 6887 §19.1)")
        old = self.by_mid.get(b.mid)  # a re-bind replaces it: it must not count against itself
        if old is None and len(self.by_mid) >= self.limits.max_total:
            raise PolicyError("quota", "total binding limit reached")
        if self.per_host.get(b.lan_ip, 0) - (old is not None and old.lan_ip == b.lan_ip) >= self.limits.max_per_host:
            raise PolicyError("quota", f"binding limit for {b.lan_ip} reached")
        owner = self.by_port.get(b.proto, idindex.EMPTY).get(b.wan_port)
        if owner is not None and owner != b.mid:
            raise PolicyError("port-in-use", f"WAN port {b.wan_port} belongs to mapping {owner}")
        self.remove(b.mid)
        self.by_mid[b.mid] = b
        self.by_port.setdefault(b.proto, {})[b.wan_port] = b.mid
        self.per_host[b.lan_ip] = self.per_host.get(b.lan_ip, 0) + 1
        idindex.add(self.by_endpoint, (b.lan_ip, b.proto), b.lan_port, b.mid)  # (b.mid left it: removed above)

    def remove(self, mid: int) -> Binding | None:
        b = self.by_mid.pop(mid, None)
        if b is not None:
            del self.by_port[b.proto][b.wan_port]
            self.per_host[b.lan_ip] -= 1
            if not self.per_host[b.lan_ip]:
                del self.per_host[b.lan_ip]
            idindex.discard(self.by_endpoint, (b.lan_ip, b.proto), b.lan_port, b.mid)
        return b

    def replace_all(self, bindings: Iterable[Binding]) -> list[tuple[Binding, str]]:
        """Swap in a whole new set (sync). A malformed set (duplicates, port clashes) is refused
        whole; a binding whose host is no longer on the LAN, or that goes over a limit (lowered
        since), is left out and returned with the reason, so it cannot block the rest."""
        trial = BindingTable(self.lan_subnets, self.router_ips, self.limits, rng=self.rng, _lan_ok=self._lan_ok)
        skipped: list[tuple[Binding, str]] = []
        for b in bindings:
            if self.by_mid.get(b.mid) == b:  # keep the one held: the copy just read (a sync's packed
                b = self.by_mid[b.mid]  # bindings are read one at a time) is freed at once, its memory reused
            else:
                b = compact(b.mid, b.proto, b.lan_ip, b.lan_port, b.wan_port)
            if b.mid in trial.by_mid:
                raise PolicyError("duplicate", f"mapping {b.mid} listed twice")
            try:
                trial.check_lan(b.lan_ip)
                trial.add(b)
            except PolicyError as exc:
                if exc.code not in ("not-lan", "quota"):
                    raise
                skipped.append((b, str(exc)))
        self.by_mid, self.by_port, self.per_host = trial.by_mid, trial.by_port, trial.per_host
        self.by_endpoint = trial.by_endpoint
        return skipped

    def snat_owner(self, ep: tuple[str, int, int]) -> Binding | None:
        """The binding whose WAN port the LAN endpoint's outbound traffic uses (lowest mid,
        as natd.nft.expected decides for a whole set)."""
        mid = idindex.lowest(self.by_endpoint, (ep[0], ep[1]), ep[2])
        return None if mid is None else self.by_mid[mid]

    def by_wan_port(self, proto: int, port: int) -> Binding | None:
        mid = self.by_port.get(proto, idindex.EMPTY).get(port)
        return None if mid is None else self.by_mid[mid]


def compact(mid: int, proto: int, lan_ip: str, lan_port: int, wan_port: int) -> Binding:
    """A binding as the table keeps it: one int object for both ports when they are equal (32 bytes
    a forward). The LAN address needs nothing here: the wire decoder interns every string."""
    return Binding(mid, proto, lan_ip, lan_port, lan_port if wan_port == lan_port else wan_port)


def endpoint(b: Binding) -> tuple[str, int, int]:
    """A binding's LAN endpoint as the SNAT map keys it: (lan ip, proto, lan port)."""
    return (b.lan_ip, b.proto, b.lan_port)
