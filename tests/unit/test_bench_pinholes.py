"""Unit tests of the benchmark's pinholes phase, its pure parts: the SOAP client agent, speed-ups, the
results schema and the Markdown section. No timing is asserted (the benchmark runs by hand, bench/run).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from xml.etree import ElementTree

import pytest

from bench import agents, harness, report
from tests.bed.benchdoc import make_doc, stat

DESC = f"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><device><serviceList><service>
<serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType><controlURL>/ctl/L3F</controlURL>
</service></serviceList><deviceList><device><deviceList><device><serviceList><service>
<serviceType>{agents.FC6_NS}</serviceType><controlURL> /ctl/IP6FCtl </controlURL>
</service></serviceList></device></deviceList></device></deviceList></device></root>""".encode()


def pinhole_row(add: float, delete: float, n: int, kernel: int, errors: int = 0, refused: int = 0,
                packets: float | None = None) -> dict[str, Any]:
    row = {"add": stat(add, add * n / 1e3, n), "delete": stat(delete, delete * n / 1e3, n), "add_errors": errors,
           "add_refused": 0, "delete_errors": 0, "delete_refused": refused,
           "kernel": {"after_adds": kernel, "after_deletes": 0}, "faults": []}
    if packets is not None:  # runs from before GetPinholePackets was timed have none
        row.update(packets=stat(packets, packets * 100 / 1e3, 100), packets_errors=0, packets_refused=0)
    return row


def pinholes_doc() -> dict[str, Any]:
    p = {"lease_s": 3600,
         "igdpcp": {"100": pinhole_row(1.0, 0.5, 100, 100, packets=0.25),
                    "1000": pinhole_row(2.0, 1.0, 1000, 1000, refused=7)},
         "miniupnpd": {"100": pinhole_row(3.0, 2.0, 100, 100, errors=2, packets=1.0)}}
    p["speedup"] = harness.speedups(p, ["100.add", "100.packets", "100.delete", "1000.add", "1000.packets"])
    return {**make_doc(), "pinholes": p}


# ------------------------------------------------------------------ SOAP by hand
def test_control_url_from_a_nested_description() -> None:
    assert agents.control_url(DESC, "http://[2001:db8:1::1]:5001/rootDesc.xml", agents.FC6_NS) == \
        "http://[2001:db8:1::1]:5001/ctl/IP6FCtl"
    with_base = DESC.replace(b"<device>", b"<URLBase>http://192.168.1.1:5000/</URLBase><device>", 1)
    assert agents.control_url(with_base, "http://x/igd2/rootDesc.xml", agents.FC6_NS) == \
        "http://192.168.1.1:5000/ctl/IP6FCtl"
    with pytest.raises(ValueError, match="WANIPConnection"):
        agents.control_url(DESC, "http://x/", "urn:schemas-upnp-org:service:WANIPConnection:2")


def test_soap_body_and_answers() -> None:
    body = agents.soap_body(agents.FC6_NS, "DeletePinhole", {"UniqueID": 7})
    action = ElementTree.fromstring(body).find(f".//{{{agents.FC6_NS}}}DeletePinhole")
    assert action is not None and action.findtext("UniqueID") == "7"
    answer = (b'<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
              b'<u:AddPinholeResponse xmlns:u="x"><UniqueID>42</UniqueID></u:AddPinholeResponse></s:Body></s:Envelope>')
    assert agents.soap_out(answer, "UniqueID") == "42"
    assert agents.soap_out(answer.replace(b"UniqueID", b"Other"), "UniqueID") is None
    assert agents.soap_out(b"<html>not xml", "UniqueID") is None


class FakeFirewall(BaseHTTPRequestHandler):
    """A stand-in IGD for the agent's own logic: numbered pinholes, a fault for port 20002, the first
    DeletePinhole refused with 503 as a per-host rate limit does."""

    calls: list[tuple[str, str]] = []
    asked: list[str] = []  # the UniqueIDs of GetPinholePackets and DeletePinhole, in order

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(200, DESC)

    def do_POST(self) -> None:
        req = ElementTree.fromstring(self.rfile.read(int(self.headers["Content-Length"])))
        action = self.headers["SOAPACTION"].strip('"').rpartition("#")[2]
        self.calls.append((self.path, action))
        if action != "AddPinhole":
            self.asked.append(req.findtext(".//UniqueID") or "")
        if action == "AddPinhole":
            port = req.findtext(".//InternalPort") or ""
            if port == "20002":
                self._send(500, b"<s:Fault><errorCode>701</errorCode></s:Fault>")
            else:
                self._send(200, f"<r><UniqueID>{int(port) - 19000}</UniqueID></r>".encode())
        elif action == "GetPinholePackets":
            self._send(200, b"<r><PinholePackets>0</PinholePackets></r>")
        elif ("/ctl/IP6FCtl", "DeletePinhole") not in self.calls[:-1]:
            self.send_response(503)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(200, f"<r><deleted>{req.findtext('.//UniqueID')}</deleted></r>".encode())


@pytest.fixture
def fake_igd() -> Iterator[str]:
    FakeFirewall.calls = []
    FakeFirewall.asked = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeFirewall)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/rootDesc.xml"
    finally:
        srv.shutdown()
        srv.server_close()


def test_pinhole_agent_adds_then_deletes_what_it_added(fake_igd: str) -> None:
    cmds = [{"op": "add", "first": 20000, "count": 4, "client": "2001:db8:1::2", "lease": 3600},
            {"op": "packets", "count": 2}, {"op": "delete"}, {"op": "delete"}]
    res = subprocess.run([sys.executable, "-m", "bench.agents", "pinholes", fake_igd], capture_output=True, text=True,
                         input="".join(json.dumps(c) + "\n" for c in cmds), timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    hello, add, packets, rm, again = (json.loads(line) for line in res.stdout.splitlines())
    assert hello == {"control_url": fake_igd.replace("/rootDesc.xml", "/ctl/IP6FCtl")}
    assert len(add["lat"]) == 4 and add["errors"] == 1 and "AddPinhole 500" in add["faults"][0]
    assert (len(packets["lat"]), packets["errors"]) == (2, 0)
    assert (len(rm["lat"]), rm["errors"], rm["refused"]) == (3, 0, 1)  # the three it got an id for; 503 retried
    assert again == {"lat": [], "errors": 0, "faults": [], "refused": 0}  # and each only once
    assert FakeFirewall.calls == ([("/ctl/IP6FCtl", "AddPinhole")] * 4 + [("/ctl/IP6FCtl", "GetPinholePackets")] * 2
                                  + [("/ctl/IP6FCtl", "DeletePinhole")] * 4)
    # the counters of two of the three spread through them; then each deleted (the first after its 503)
    assert FakeFirewall.asked == ["1000", "1001", "1000", "1000", "1001", "1003"]


# ------------------------------------------------------------------ harness, schema, Markdown
def test_a_call_refused_with_503_is_retried_and_only_the_served_attempt_counts(monkeypatch: Any) -> None:
    answers = [(503, b"", "2"), (503, b"", "soon"), (200, b"<UniqueID>1</UniqueID>", None)]
    slept: list[float] = []
    monkeypatch.setattr(agents, "soap_post", lambda *a, **k: answers.pop(0))
    _, status, body, refused = agents.timed_call("http://x/", agents.FC6_NS, "AddPinhole", {}, sleep=slept.append)
    assert (status, refused, slept) == (200, 2, [2.0, 1.0])
    monkeypatch.setattr(agents, "soap_post", lambda *a, **k: (503, b"", "60"))
    slept.clear()
    _, status, _, refused = agents.timed_call("http://x/", agents.FC6_NS, "AddPinhole", {}, sleep=slept.append)
    assert (status, refused) == (503, agents.MAX_REFUSALS) and slept == [5.0] * agents.MAX_REFUSALS  # bounded


def test_speedups_are_theirs_over_ours_where_both_ran() -> None:
    sp = pinholes_doc()["pinholes"]["speedup"]
    assert sp == {"100_add": pytest.approx(3.0), "100_packets": pytest.approx(4.0),
                  "100_delete": pytest.approx(4.0)}  # 1000: igdpcp only


def test_phase_options() -> None:
    quick, _ = harness.parse_args(["--quick"])
    assert quick.pinhole_ns and max(quick.pinhole_ns) <= 100
    full, _ = harness.parse_args(["--pinhole-n", "1000", "100", "--skip", "pinholes"])
    assert full.pinhole_ns == [100, 1000] and "pinholes" in full.skip
    assert harness.Config().pinhole_ns == [100, 1000]


def test_schema_takes_the_section_present_skipped_or_absent() -> None:
    doc = pinholes_doc()
    assert report.validate(json.loads(json.dumps(doc))) == []
    assert report.validate({**doc, "pinholes": None}) == []
    assert report.validate(make_doc()) == []  # results from before the phase existed
    doc["pinholes"]["igdpcp"]["100"].pop("kernel")
    doc["pinholes"]["miniupnpd"]["100"]["add"].pop("p99_ms")
    errs = report.validate(doc)
    assert "pinholes.igdpcp.100: missing kernel" in errs and "pinholes.miniupnpd.100.add: missing p99_ms" in errs
    assert report.validate({**doc, "pinholes": []}) == ["pinholes: not an object"]


def test_markdown_puts_both_systems_and_the_ratio_side_by_side() -> None:
    md = report.render_markdown(pinholes_doc()).split("### IPv6 pinholes through UPnP")[1].split("###")[0]
    assert "lease 3600 s" in md
    assert ("| 100 | igdpcp | 1.00 / 2.00 ms | 0.100 s | 0.25 / 0.50 ms | 0.025 s | 0.50 / 1.00 ms | 0.050 s "
            "| 100 / 0 |") in md
    assert ("| 100 | miniupnpd | 3.00 / 6.00 ms (2 errors) | 0.300 s | 1.00 / 2.00 ms | 0.100 s | 2.00 / 4.00 ms "
            "| 0.200 s | 100 / 0 |") in md
    assert ("| 100 | miniupnpd / igdpcp | 3.00 / 3.00 x | 3.00 x | 4.00 / 4.00 x | 4.00 x | 4.00 / 4.00 x "
            "| 4.00 x | |") in md
    # a row from a run before GetPinholePackets was timed keeps its place in the columns
    assert "| 1000 | igdpcp | 2.00 / 4.00 ms | 2.000 s | — | — | 1.00 / 2.00 ms (7 503 retried) |" in md
    assert "| 1000 | miniupnpd" not in md
    assert "IPv6 pinholes" not in report.render_markdown(make_doc())


def test_control_table_shows_failed_operations() -> None:
    doc = make_doc()
    doc["control"][0].update(add_errors=534, delete_errors=648)  # e.g. a per-host rate limit's 503s
    doc["control"][0]["list"]["refused"] = 7
    md = report.render_markdown(doc)
    assert "| 1000 | igdpcp | 0.80 / 1.60 ms (534 errors) |" in md and "(0.80) (648 errors) |" in md
    assert "| 0.200 s (0.200 ms) (7 503 retried) |" in md
    assert "errors)" not in report.render_markdown(make_doc())


def test_the_binding_client_retries_only_what_the_binding_reports_as_an_http_error() -> None:
    slept: list[float] = []
    answers: list[Any] = [Exception("Miniupnpc HTTP error"), None]
    took, res, refused = agents.timed_retry(lambda: answers.pop(0), agents._binding_refusal, slept.append)
    assert (res, refused, slept) == (None, 1, [1.0])
    conflict = Exception("ConflictInMappingEntry")  # a UPnP fault: an answer, not a refusal
    assert agents.timed_retry(lambda: conflict, agents._binding_refusal, slept.append)[1:] == (conflict, 0)
    assert agents._attempt(int, "x").__class__ is ValueError and agents._attempt(int, "7") == 7
    assert agents._list_refusal(True, None) == 1.0 and agents._list_refusal(False, None) is None  # 713 at the end
