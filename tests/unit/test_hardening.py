"""Issue 14's sans-I/O pieces, without namespaces: the guard, safe log lines, per-host HTTP
fairness, PCP trust (RFC 6887 §8.4, §9), coalesced recoveries, the store on a full disk."""

from __future__ import annotations

import ipaddress
import logging
import sqlite3
from typing import Any

import pytest

from controld.core.lifecycle import State
from controld.core.model import CoreError, Mapping
from controld.core.store import MappingTable
from controld.core.upstream import RECOVERY_BOUND_S, RecoveryGate
from controld.pcp import client as c
from controld.upnp import soap
from controld.upnp.fairness import Fairness
from shared import pcp
from shared.guard import Guard, SafeFormatter, escape

V4 = ipaddress.IPv4Address
SERVER = "100.64.0.1"
NONCE = b"n" * 12


def _req() -> pcp.Request:
    return pcp.Request(pcp.Opcode.MAP, 600, V4("100.64.0.2"), pcp.MapData(NONCE, 6, 80, 8080))


def _resp(nonce: bytes = NONCE, epoch: int = 100) -> bytes:
    return pcp.encode_response(pcp.Response(pcp.Opcode.MAP, 0, 600, epoch,
                                            pcp.MapData(nonce, 6, 80, 8080, V4("198.20.0.1"))))


def test_unknown_xml_encoding_is_a_soap_error() -> None:
    """An encoding Python cannot look up is malformed input (402 fault), not a LookupError."""
    body = b'<?xml version="1.0" encoding="x-unknown"?><s:Envelope xmlns:s="x"/>'
    for enc in (b"x-unknown", b"rot13"):
        with pytest.raises(soap.SoapError):
            soap.parse_request(body.replace(b"x-unknown", enc),
                               '"urn:schemas-upnp-org:service:WANIPConnection:1#GetExternalIPAddress"')


def test_guard_logs_unexpected_exceptions_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    g = Guard(logging.getLogger("t.guard"), "http", burst=3, window=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, "t.guard"):
        for _ in range(100):
            assert g.run("192.168.1.9", lambda: 1 // 0, default=-1) == -1
        now[0] = 61.0
        g.unexpected("192.168.1.9", ValueError("again"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and all("192.168.1.9" in ln for ln in lines) and g.count == 101
    assert "97 more not logged" in lines[-1]


def test_log_lines_cannot_be_forged() -> None:
    rec = logging.LogRecord("x", logging.INFO, "f", 1, "http %s: no %s", ("192.168.1.2", "/x\nFORGED\r"), None)
    out = SafeFormatter("%(name)s: %(message)s").format(rec)
    assert "\n" not in out and "\r" not in out and "\\x0aFORGED\\x0d" in out
    assert escape("a\x1b[2Jb") == "a\\x1b[2Jb"


def test_fairness_one_host_cannot_starve_another() -> None:
    f = Fairness(total=64, per_host=16, reserve=8, burst=1000, rate=1000)
    assert sum(f.admit("192.168.1.66", 0.0) for _ in range(1000)) == 16
    for i in range(3):  # other hosts fill up to the reserve
        for _ in range(16):
            f.admit(f"192.168.1.{10 + i}", 0.0)
    assert f.active == 64 - 8 and not f.admit("192.168.1.12", 0.0)  # the reserve is not theirs
    assert f.admit("192.168.1.2", 0.0)  # a host under its share gets a reserved slot
    f.release("192.168.1.66")
    assert f.held["192.168.1.66"] == 15


def test_fairness_rate_limits_new_connections_per_host() -> None:
    f = Fairness(total=1000, per_host=1000, reserve=0, burst=5, rate=1)
    got = [f.admit("192.168.1.66", 0.0) for _ in range(10)]
    assert got.count(True) == 6 and f.admit("192.168.1.2", 0.0)  # the first, then the burst
    assert f.admit("192.168.1.66", 1.0) and not f.admit("192.168.1.66", 1.0)


def test_fairness_never_refuses_a_host_that_waits_for_each_answer() -> None:
    """A listing by miniupnpc opens one connection per entry, each after the last one closed."""
    f = Fairness(total=16, per_host=4, reserve=0, burst=5, rate=1)
    for _ in range(10_000):
        assert f.admit("192.168.1.66", 0.0)
        f.release("192.168.1.66")
    assert f.active == 0 and not f.held


def test_unmatched_map_response_changes_no_epoch() -> None:
    """RFC 6887 §8.4: an unmatched response (a forgery with a wrong nonce) is not epoch-processed;
    the owner checks the epoch only once it matched the response to a mapping it holds."""
    cl = c.PcpClient()
    cl.request("a", SERVER, _req(), now=0.0)
    assert [type(e) for e in cl.receive(SERVER, _resp(epoch=100), 1.0)] == [c.Answer]
    evs = cl.receive(SERVER, _resp(nonce=b"f" * 12, epoch=100_000), 2.0)
    assert [type(e) for e in evs] == [c.Unsolicited]
    assert cl.epochs[SERVER].server_time == 100
    assert cl.check_epoch(SERVER, 100_000, 3.0) == [c.EpochLost(SERVER)]


def test_forged_unsupp_version_from_a_v2_server_turns_nothing_off() -> None:
    """RFC 6887 §9: UNSUPP_VERSION carries no nonce; from a server that answered version 2 it
    is not believed, so a forgery cannot hold PCP off for 30 minutes."""
    import struct
    cl = c.PcpClient()
    cl.request("a", SERVER, _req(), now=0.0)
    cl.receive(SERVER, _resp(), 1.0)
    cl.request("b", SERVER, _req(), now=2.0)
    forged = struct.pack("!BBBBII12s", 1, 0x81, 0, pcp.Result.UNSUPP_VERSION, 1800, 100, b"\0" * 12)
    assert cl.receive(SERVER, forged, 2.5) == [] and SERVER not in cl.refused and "b" in cl.exchanges


def test_recovery_gate_coalesces_a_flood_of_triggers() -> None:
    g = RecoveryGate(min_gap=10.0)
    assert g.trigger([1, 2], 0.0, delay=2.0)
    assert not any(g.trigger([1, 2], 0.1 * i) for i in range(20))  # coalesced
    assert g.finished(1, 2.5) is None and g.finished(2, 3.0) == 9.0  # over: once more, 10 s after it began
    g.begin([1, 2], 12.0)
    assert not g.trigger([1, 2], 5.0)  # into the restart
    assert g.finished(1, 12.5) is None and g.finished(2, 13.0) == 9.0
    g.begin([1, 2], 22.0)
    assert g.finished(1, 22.5) is None and g.finished(2, 23.0) is None  # nothing came: over
    assert g.trigger([3], 30.0) and not g.trigger([3], 31.0) and g.trigger([3], 31.0 + RECOVERY_BOUND_S)
    assert g.trigger([4, 5], 200.0) and g.trigger([6], 201.0)  # 4 and 5 were removed: that one is over


class _FullDisk:
    """A connection whose writes fail as on a full disk (reads still work)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db, self.full = db, True

    def execute(self, sql: str, *a: Any) -> Any:
        if self.full and not sql.lstrip().upper().startswith("SELECT"):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *a)

    def executemany(self, sql: str, *a: Any) -> Any:
        if self.full:
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.executemany(sql, *a)


def _row(mid: int, port: int) -> Mapping:
    return Mapping(id=mid, cp="192.168.1.2", igd=1, remote_host="", ext_port=port, proto=6,
                   int_client="192.168.1.2", int_port=port, description="t", lease=0, lease_end=None,
                   state=State.ACTIVE, created=0.0, nonce=b"n" * 12, pcp_server=SERVER, prefer_failure=True,
                   mode="cascaded")


def test_store_on_a_full_disk_keeps_nothing_it_could_not_save(tmp_path: Any) -> None:
    t = MappingTable(str(tmp_path))
    t.apply(_row(1, 8100))
    disk = _FullDisk(t.db)
    t.db = disk  # type: ignore[assignment]
    with pytest.raises(CoreError):
        t.apply(_row(2, 8101))
    assert t.find(8101, 6) is None and 2 not in t.by_id  # memory holds no unsaved row
    t.delete(t.by_id[1])  # a clean-up on a full disk still forgets the row (the caller goes on)
    assert t.find(8100, 6) is None and t.count() == 0
    disk.full = False  # space is back: the next write also saves the held-back delete
    t.apply(_row(3, 8102))
    t.db = disk.db
    t2 = MappingTable(str(tmp_path))
    assert sorted(t2.by_id) == [3]


def test_unsupp_version_echoing_our_request_answers_it() -> None:
    """A version 2 UNSUPP_VERSION that copies our request (nonce and fields) is the answer to it
    (RFC 6887 §8.2, §8.4), even from a server that answered version 2; a copy with another
    nonce answers nothing."""
    cl = c.PcpClient()
    cl.request("a", SERVER, _req(), now=0.0)
    cl.receive(SERVER, _resp(), 1.0)
    cl.request("b", SERVER, _req(), now=2.0)

    def unsupp(nonce: bytes) -> bytes:
        raw = bytearray(_resp(nonce=nonce))
        raw[3] = pcp.Result.UNSUPP_VERSION
        return bytes(raw)
    assert cl.receive(SERVER, unsupp(b"f" * 12), 2.5) == [] and "b" in cl.exchanges
    (ev,) = cl.receive(SERVER, unsupp(NONCE), 2.6)
    assert isinstance(ev, c.Answer) and ev.key == "b" and ev.response.result == pcp.Result.UNSUPP_VERSION
