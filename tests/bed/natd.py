"""Shared pieces (no tests) of the natd namespace tests (tests/netns/test_natd_*.py): natd alone in a bed,
driven through its real ZeroMQ API with natd.client, checked in the real ruleset."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from natd.client import NatdClient
from natd.nft import Layout
from tests.bed.stack import Stack
from tests.bed.testbed import Testbed

PAYLOAD = b"igdpcp natd: bytes through NAT1"


@pytest.fixture
def natd_only(make_testbed: Callable[..., Testbed]) -> Iterator[Callable[..., tuple[Stack, NatdClient]]]:
    """Factory: a bed without NAT2, natd started in the router with ``natd_args``; returns
    (stack, API client subscribed to events). ``before(bed)`` runs before natd starts."""
    made: list[tuple[Stack, NatdClient | None]] = []

    def factory(natd_args: list[str] | None = None, before: Callable[[Testbed], Any] | None = None,
                client: bool = True, **stack_kw: Any) -> tuple[Stack, NatdClient]:
        bed = make_testbed(start_nat2=False)
        if before is not None:
            before(bed)
        st = Stack(bed, natd_args=natd_args or [], **stack_kw)
        made.append((st, None))
        st.start_natd()
        c = NatdClient(st.rpc, st.events, curve_dir=st.curve_dir) if client else None
        made[-1] = (st, c)
        return st, c  # type: ignore[return-value]

    try:
        yield factory
    finally:
        for st, c in made:
            if c is not None:
                c.close()
            st.close()


def elements(bed: Testbed, name: str, layout: str = "standalone") -> dict:
    """A map's elements ({key tuple: value tuple}) or a set's ({elem: None}) as the kernel has them."""
    lay = Layout.make(layout)
    kind = "map" if name in ("fwd4", "snat4") else "set"
    out = bed.run("cpe", ["nft", "-j", "list", kind, lay.family, lay.table, lay.obj(name)], check=False)
    if out.returncode != 0:
        return {}
    res: dict = {}
    for item in json.loads(out.stdout)["nftables"]:
        for e in item.get(kind, {}).get("elem", []):
            if kind == "map":
                k, v = e
                res[tuple(k["concat"])] = tuple(v["concat"])
            else:
                res[json.dumps(e, sort_keys=True)] = None
    return res


def reaches(bed: Testbed, src: str, dst_ip: str, dst_port: int, lan_port: int, lan_ns: str = "lan",
            timeout: float = 3.0) -> tuple[str, int] | None:
    """Connect from ``src`` to ``dst_ip:dst_port``; the LAN listener's view of the peer if the
    payload arrived on ``lan_port``, else None."""
    listener = bed.tcp_listen(lan_ns, lan_port, timeout=timeout + 2)
    sent = bed.tcp_send(src, dst_ip, dst_port, PAYLOAD, timeout=timeout)
    got = listener.received(timeout=timeout if sent else 0.3)
    peer = listener.peer(timeout=0.5) if got == PAYLOAD else None
    listener.close()
    return tuple(peer) if peer else None  # type: ignore[return-value]


def conntrack(bed: Testbed, *args: str) -> str:
    """``conntrack -L`` in the router (only the entry lines)."""
    res = bed.run("cpe", ["conntrack", "-L", *args], check=False)
    return res.stdout


def wait_until(pred: Callable[[], Any], timeout: float, step: float = 0.02) -> float | None:
    """Seconds until ``pred()`` was true, or None after ``timeout`` (bounded poll)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(step)
    return None


HOLD_SCRIPT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"before|")
sys.stdout.write("connected\n"); sys.stdout.flush()
sys.stdin.readline()  # the test says when to go on
s.sendall(b"after")
s.shutdown(socket.SHUT_WR)
s.close()
"""


def python() -> str:
    return sys.executable


def here(*parts: str) -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), *parts)  # from tests/


# `conntrack -I` for many entries at once (one process, 500 per datagram): UDP flows that
# have nothing to do with natd's forwards, as a busy router's NATed traffic would be.
# Self-contained (struct only) so it runs in the router with any interpreter. argv: count.
CT_FILL_SCRIPT = r"""
import socket, struct, sys
n = int(sys.argv[1])
def attr(t, d):
    l = 4 + len(d); return struct.pack("=HH", l, t) + d + b"\0" * ((-l) % 4)
def tup(t, src, dst, sp, dp):
    ip = attr(0x8001, attr(1, socket.inet_aton(src)) + attr(2, socket.inet_aton(dst)))
    pr = attr(0x8002, attr(1, bytes([17])) + attr(2, struct.pack("!H", sp)) + attr(3, struct.pack("!H", dp)))
    return attr(0x8000 | t, ip + pr)
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
made, batch = 0, []
for i in range(n):
    src, sp = "10.200.%d.%d" % ((i >> 8) & 255, i & 255), 1024 + (i >> 16)
    body = struct.pack("!BBH", socket.AF_INET, 0, 0) + tup(1, src, "198.51.100.1", sp, 53) \
        + tup(2, "198.51.100.1", src, 53, sp) + attr(7, struct.pack("!I", 600))
    batch.append(struct.pack("=IHHII", 16 + len(body), 0x100, 0x1 | 0x400, i + 1, 0) + body)
    if len(batch) == 500 or i == n - 1:
        s.send(b"".join(batch)); batch = []
print("filled", n)
"""


def ct_count(bed: Testbed) -> int:
    """How many conntrack entries the router holds."""
    return int(bed.run("cpe", ["cat", "/proc/sys/net/netfilter/nf_conntrack_count"]).stdout)


def ct_fill(bed: Testbed, n: int) -> None:
    """Put ``n`` unrelated UDP entries into the router's conntrack table."""
    bed.run("cpe", [python(), "-c", CT_FILL_SCRIPT, str(n)], timeout=120)
