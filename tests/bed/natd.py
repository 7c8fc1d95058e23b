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
