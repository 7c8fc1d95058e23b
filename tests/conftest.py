"""Shared pytest fixtures: the network-namespace test bed (see shared/testbed.py).

Tests that use ``testbed`` or ``make_testbed`` (or carry ``@pytest.mark.netns``) are
marked ``netns`` and skipped when the bed cannot run here (not root, no ``ip netns``).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterator

import pytest

from tests.bed.testbed import MINIUPNPD, Testbed, netns_available

_BED_FIXTURES = {"testbed", "make_testbed"}


@functools.cache
def _netns_skip_reason() -> str | None:
    return netns_available()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "netns: needs root and ip netns (namespace test bed)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _BED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.netns)
        if item.get_closest_marker("netns") is not None:
            reason = _netns_skip_reason()
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"netns test bed: {reason}"))


@pytest.fixture
def make_testbed() -> Iterator[Callable[..., Testbed]]:
    """Factory: ``make_testbed(start_nat2=True, **Testbed_kwargs)`` returns a set-up bed
    (NAT2's miniupnpd started unless ``start_nat2=False``).  Every bed it made is torn
    down when the test ends, pass or fail."""
    reason = _netns_skip_reason()
    if reason:
        pytest.skip(f"netns test bed: {reason}")
    beds: list[Testbed] = []

    def factory(start_nat2: bool = True, **kwargs: Any) -> Testbed:
        if start_nat2 and not os.access(MINIUPNPD, os.X_OK):
            pytest.skip(f"{MINIUPNPD} not installed (miniupnpd-nftables)")
        bed = Testbed(**kwargs)
        beds.append(bed)
        bed.setup()
        if start_nat2:
            bed.start_nat2()
        return bed

    try:
        yield factory
    finally:
        for bed in reversed(beds):
            bed.teardown()


@pytest.fixture
def testbed(make_testbed: Callable[..., Testbed]) -> Testbed:
    """A fresh bed for one test, NAT2 running with default lifetimes (120..86400 s)."""
    return make_testbed()
from tests.stack_fixtures import make_stack  # noqa: E402,F401  (daemon fixtures)
