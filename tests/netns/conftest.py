"""Fixtures of the fault, flood, issue-14 and fuzz suites: the whole stack on the namespace
bed (tests/conftest.py's ``make_testbed``), control points on LAN hosts, a tmpfs state dir.
Helpers live in tests/netns/faults_helpers.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.netns import faults_helpers as h


@pytest.fixture
def igd(make_testbed: Callable[..., Any]) -> Iterator[Callable[..., h.Stack]]:
    """Factory: ``igd(controld_args=[...], natd_args=[...], state_kib=N)`` starts natd and
    controld (router layout) on a fresh bed with NAT2 running; ``state_kib`` puts controld's
    state dir on a tmpfs of that size. Everything is stopped and unmounted at the end."""
    stacks: list[h.Stack] = []
    mounts: list[h.Tmpfs] = []

    def factory(controld_args: list[str] | None = None, natd_args: list[str] | None = None,
                state_kib: int | None = None, start: bool = True) -> h.Stack:
        bed = make_testbed()
        st = h.Stack(bed, controld_args=controld_args or [], natd_args=natd_args or [])
        stacks.append(st)
        if state_kib is not None:
            fs = h.Tmpfs(bed.path("state"), state_kib)
            fs.mount()
            mounts.append(fs)
            st.tmpfs = fs  # type: ignore[attr-defined]
        if start:
            st.start()
        return st

    try:
        yield factory
    finally:
        for st in stacks:
            st.close()
        for fs in mounts:
            fs.umount()


@pytest.fixture
def control_point() -> Iterator[Callable[..., h.ControlPoint]]:
    """Factory: ``control_point(bed, ns="lan", ip=LAN)``: a UPnP control point on a LAN host."""
    made: list[h.ControlPoint] = []

    def factory(bed: Any, ns: str = "lan", ip: str = h.LAN) -> h.ControlPoint:
        cp = h.ControlPoint(bed, ns, ip)
        made.append(cp)
        return cp

    try:
        yield factory
    finally:
        for cp in made:
            cp.close()
