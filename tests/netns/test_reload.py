"""SIGHUP = reload (procd's reload_signal, systemd's ExecReload): the config file is read
again and applied live, and no mapping or forward is dropped (issue #6)."""

from __future__ import annotations

import signal
import time

import pytest

from tests.bed import testbed as tb
from tests.bed.stack import Stack

pytestmark = pytest.mark.netns

CONTROLD_CONF = """config controld 'controld'
\tlist permission 'allow 9000-9100 192.168.1.0/24 1024-65535'
\tlist permission 'deny 0-65535 0.0.0.0/0 0-65535'
"""
NATD_CONF = """config natd 'natd'
\toption max_per_host '{limit}'
"""


def _sighup_and_wait(st: Stack, name: str, marker: str, timeout: float = 5.0) -> str:
    before = len(st.log(name))
    st.procs[name].send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tail = st.log(name)[before:]
        if marker in tail:
            return tail
        time.sleep(0.05)
    raise AssertionError(f"{name} did not log {marker!r} after SIGHUP:\n{st.log(name)[before:]}")


def test_sighup_rereads_config_and_keeps_mappings(make_testbed) -> None:
    bed = make_testbed()
    cconf, nconf = bed.path("controld.conf"), bed.path("natd.conf")
    with open(cconf, "w") as f:
        f.write(CONTROLD_CONF)
    with open(nconf, "w") as f:
        f.write(NATD_CONF.format(limit=100))
    st = Stack(bed, controld_args=["--config", cconf], natd_args=["--config", nconf]).start()
    try:
        assert st.upnpc("-a", tb.LAN_HOST_IP, "9000", "9000", "TCP").returncode == 0
        refused = st.upnpc("-a", tb.LAN_HOST_IP, "8000", "8000", "TCP")
        assert refused.returncode != 0 and ("606" in refused.stdout or "718" in refused.stdout)

        # Allow 8000 too, and change a restart-only option: the rules apply now, the other waits.
        with open(cconf, "w") as f:
            f.write(CONTROLD_CONF.replace("9000-9100", "8000-9100") + "\toption igd_version '2'\n")
        tail = _sighup_and_wait(st, "controld", "reload: configuration re-read")
        assert "igd_version changed; it takes effect at the next start" in tail
        assert st.upnpc("-a", tb.LAN_HOST_IP, "8000", "8000", "TCP").returncode == 0
        assert bed.internet_reaches(9000, 9000, b"still here"), "the mapping made before the reload must keep working"

        # A broken file on reload: logged, the running configuration stays, the daemon lives.
        with open(cconf, "w") as f:
            f.write("config controld\n\toption 'unterminated\n")
        _sighup_and_wait(st, "controld", "configuration not usable")
        assert st.procs["controld"].poll() is None
        assert len(st.nat1_forwards()) == 2

        # natd: a lower per-host limit applies to new forwards only; existing ones stay.
        with open(nconf, "w") as f:
            f.write(NATD_CONF.format(limit=2))
        _sighup_and_wait(st, "natd", "re-reading config")
        over = st.upnpc("-a", tb.LAN_HOST_IP, "9001", "9001", "TCP")
        assert over.returncode != 0 and "728" in over.stdout, over.stdout
        assert len(st.nat1_forwards()) == 2 and bed.internet_reaches(8000, 8000, b"still here")
    finally:
        st.close()
