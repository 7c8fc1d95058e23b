"""The suite's configuration: the fixtures come from the plugins in tests/bed/ (the namespace
bed, the daemon stack, natd alone); tests are ``tests/unit/`` (no namespaces) and
``tests/netns/`` (a bed each). Tests that use a bed fixture (or carry ``@pytest.mark.netns``)
are marked ``netns`` and skipped when the bed cannot run here (not root, no ``ip netns``).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.bed")  # the plugins' asserts report like the tests' own

from tests.bed.fixtures import netns_skip_reason  # noqa: E402

pytest_plugins = ["tests.bed.fixtures", "tests.bed.natd"]

_BED_FIXTURES = {"testbed", "make_testbed", "make_stack", "natd_only"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "netns: needs root and ip netns (namespace test bed)")


# What CI's Debian-packages run (.ci/run) re-checks differs from the main run only in pyzmq and
# msgpack (both venvs see Debian's libnftables binding); a unit module that names neither, nor the
# wire schema built on msgpack, gives the same outcome in both and is marked ``pure``.
_DEPS = re.compile(rb"zmq|msgpack|wire")


@cache
def _pure(path: Path) -> bool:
    return path.parent.name == "unit" and not _DEPS.search(path.read_bytes())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _pure(item.path):
            item.add_marker(pytest.mark.pure)
        if _BED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.netns)
        if item.get_closest_marker("netns") is not None:
            reason = netns_skip_reason()
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"netns test bed: {reason}"))
