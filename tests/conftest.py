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


# CI's second run (.ci/run, `-m "not once"`) repeats the suite with Debian 12's own pyzmq and
# msgpack; both venvs see the same Debian libnftables binding, so only tests on those two can
# differ. It keeps the unit modules that name zmq, msgpack or the wire schema built on it, and the
# namespace suites below, which between them send every controld <-> natd message over the real
# link (natd's whole API and hostile messages, cascaded creates and renewals, pinholes and
# neighbours, the LAN server, natd restarts, a 10k sync). Everything else is marked ``once``.
_DEPS = re.compile(rb"zmq|msgpack|wire")
LINK_SUITES = ("test_natd_api.py", "test_iwf_e2e.py", "test_pinhole_wiring.py", "test_lan_pcp.py",
               "test_stop_start.py", "test_natd_dataplane.py")


@cache
def _once(path: Path) -> bool:
    if path.parent.name == "unit":
        return not _DEPS.search(path.read_bytes())
    return path.name not in LINK_SUITES


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _once(item.path):
            item.add_marker(pytest.mark.once)
        if _BED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.netns)
        if item.get_closest_marker("netns") is not None:
            reason = netns_skip_reason()
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"netns test bed: {reason}"))
