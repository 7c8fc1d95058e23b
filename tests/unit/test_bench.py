"""Unit tests of the benchmark harness's pure parts: statistics, goals, schema, Markdown, README block.

No timing is asserted here: the benchmark itself runs only by hand (bench/run), never in CI.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import agents, goals, harness, procs, report, stats, systems
from bench.progress import Progress
from tests.bed.benchdoc import make_doc


def by_id(verdicts: list[goals.Verdict], gid: str) -> list[goals.Verdict]:
    return [v for v in verdicts if v.gid == gid]


# ------------------------------------------------------------------ statistics
def test_quantile_nearest_rank() -> None:
    values = [float(i) for i in range(100, 0, -1)]  # 1..100, unsorted
    assert stats.quantile(values, 0.5) == 50.0
    assert stats.quantile(values, 0.99) == 99.0
    assert stats.quantile(values, 1.0) == 100.0
    assert stats.quantile(values, 0.0) == 1.0
    assert stats.quantile([7.0], 0.99) == 7.0
    assert stats.quantile([], 0.5) == 0.0
    with pytest.raises(ValueError):
        stats.quantile(values, 1.5)


def test_summarize_units_and_totals() -> None:
    s = stats.summarize([0.001, 0.002, 0.003, 0.010])
    assert s["n"] == 4
    assert s["p50_ms"] == pytest.approx(2.0)
    assert s["p99_ms"] == pytest.approx(10.0)
    assert s["max_ms"] == pytest.approx(10.0)
    assert s["mean_ms"] == pytest.approx(4.0)
    assert s["total_s"] == pytest.approx(0.016)
    assert stats.summarize([])["n"] == 0


def test_minus_and_cpu_per_1k() -> None:
    assert stats.minus([5.0, 6.0, 7.0], [4.0, 4.5]) == [1.0, 1.5]
    assert stats.cpu_per_1k(2.0, 500) == pytest.approx(4.0)
    assert stats.cpu_per_1k(1.0, 0) is None


# ------------------------------------------------------------------ goals
def test_goal_table_is_well_formed() -> None:
    ids = [g.gid for g in goals.GOALS]
    assert len(ids) == len(set(ids))
    for g in goals.GOALS:
        assert g.cmp in ("le", "ge"), g.gid
        assert g.kind in ("each_n", "growth", "each_n_ratio", "vs_miniupnpd", "scalar"), g.gid
        assert (g.path if g.kind == "scalar" else g.metric), g.gid


def test_every_goal_is_na_on_an_empty_run() -> None:
    verdicts = goals.evaluate({"control": []})
    assert {v.gid for v in verdicts} == {g.gid for g in goals.GOALS}
    assert all(v.status == "n/a" and v.ratio is None for v in verdicts)


def test_goals_met_and_short_with_ratio() -> None:
    verdicts = goals.evaluate(make_doc())
    delete = {v.where: v for v in by_id(verdicts, "delete-p50")}
    assert set(delete) == {"N=1000", "N=3000", "N=10000"}  # unpinned rows only
    assert delete["N=1000"].status == "met" and delete["N=1000"].ratio == pytest.approx(0.9)
    assert delete["N=3000"].status == "short" and delete["N=3000"].ratio == pytest.approx(1.5)
    flat = by_id(verdicts, "delete-flat-n")[0]
    assert flat.where == "N=10000 vs 1000" and flat.value == pytest.approx(1.0 / 0.9)
    vs = {v.where: v for v in by_id(verdicts, "delete-vs-miniupnpd")}
    assert vs["N=1000"].value == pytest.approx(15.0) and vs["N=1000"].status == "met"
    assert vs["N=3000"].value == pytest.approx(8.0) and vs["N=3000"].status == "short"
    listing = {v.where: v.status for v in by_id(verdicts, "list-vs-miniupnpd")}
    assert listing == {"N=1000": "met", "N=3000": "met"}
    ct = {v.where: v.value for v in by_id(verdicts, "delete-flat-ct")}
    assert ct["N=3000"] == pytest.approx(1.5)


def test_scalar_goals_name_their_n_and_handle_missing() -> None:
    verdicts = goals.evaluate(make_doc())
    start = by_id(verdicts, "start-controld")[0]
    assert (start.where, start.status) == ("N=10000", "met")
    assert by_id(verdicts, "start-natd")[0].status == "short"
    assert by_id(verdicts, "start-flush")[0].status == "n/a"
    mem = by_id(verdicts, "mem-loaded")[0]
    assert (mem.where, mem.status) == ("N=10000", "met")
    assert by_id(verdicts, "mem-controld-idle")[0].status == "short"
    assert by_id(verdicts, "cascaded-ours")[0].value == pytest.approx(0.5)


def test_ge_goal_ratio_direction() -> None:
    v = goals.Verdict("x", "x", "", 5.0, 10.0, "ge", "x")
    assert (v.status, v.ratio) == ("short", 0.5)
    assert goals.Verdict("x", "x", "", 0.5, 1.0, "le", "ms").status == "met"


# ------------------------------------------------------------------ schema and rendering
def test_schema_accepts_a_full_run_and_json_round_trip() -> None:
    doc = json.loads(json.dumps(make_doc()))
    assert report.validate(doc) == []


@pytest.mark.parametrize("breakage, expected", [
    (lambda d: d.pop("meta"), "missing meta"),
    (lambda d: d.update(schema=99), "schema 99"),
    (lambda d: d["control"][0].pop("delete"), "control[0]: missing delete"),
    (lambda d: d["control"][0]["add"].pop("p50_ms"), "control[0].add: missing p50_ms"),
    (lambda d: d.update(dataplane=[{"n": 1}]), "dataplane[0]"),
    (lambda d: d.update(natpmp={}), "natpmp: missing available"),
    (lambda d: d.update(control={}), "control: wrong type"),
    (lambda d: d.update(errors="x"), "errors: not a list"),
])
def test_schema_names_what_is_wrong(breakage: Any, expected: str) -> None:
    doc = make_doc()
    breakage(doc)
    assert any(expected in e for e in report.validate(doc)), report.validate(doc)
    assert report.validate([]) == ["not an object"]


def test_markdown_has_every_section_and_goal() -> None:
    md = report.render_markdown(make_doc())
    for heading in ("### Control plane", "### Cascaded", "### NAT-PMP", "### Data plane", "### Restart",
                    "### Memory", "### Goals"):
        assert heading in md
    assert "| 1000 | igdpcp (pinned) |" in md
    assert "| 10000 | igdpcp | 0.95 / 1.90 ms |" in md
    assert "no, skipped (no answer)" in md
    assert md.count("**met**") + md.count("**short**") + md.count("**n/a**") == len(make_doc()["goals"])
    assert "`nft flush ruleset`: all forwards back in – s" in md
    assert "failed" not in md
    failed = report.render_markdown({**make_doc(), "errors": ["cascaded: NAT2 did not start"]})
    assert "### Phases that failed\n\n- cascaded: NAT2 did not start" in failed


def test_memory_shows_natds_conntrack_worker_after_the_deletes_and_when_it_goes() -> None:
    doc = make_doc()
    row = {"system": "igdpcp", "n": 10000, "memory": {}, "memory_ctworker": {"rss_mib": 12.5, "pss_mib": 9.4}}
    harness._fold_row(doc, row, first=False, top=True)
    assert doc["memory"]["igdpcp"]["after deletes"]["ctworker"] == {"rss_mib": 12.5, "pss_mib": 9.4}
    assert doc["control"].pop() is row  # its other figures are not this test's
    md = report.render_markdown(doc)
    assert "| igdpcp | after deletes (N=10000) | conntrack worker | 12.5 | 9.4 |" in md
    assert f"it exits after {harness.CT_IDLE_S:.0f} s idle" in md
    assert "conntrack worker" not in report.render_markdown(make_doc())  # runs before it had none


def test_memory_names_the_state_files_beside_the_processes(tmp_path) -> None:
    """controld's SQLite files are RAM on OpenWrt: the loaded row carries their size (read from the
    state dir), the Markdown says it; miniupnpd keeps none in this bed."""
    bed = type("Bed", (), {"path": staticmethod(lambda name: str(tmp_path / name))})()
    (tmp_path / "state").mkdir()
    for name, size in (("mappings.sqlite3", 3072), ("mappings.sqlite3-wal", 0), ("mappings.sqlite3-shm", 1024),
                       ("other", 99_999)):
        (tmp_path / "state" / name).write_bytes(b"x" * size)
    system = systems.Igdpcp.__new__(systems.Igdpcp)
    system.bed = bed
    assert system.state_files_kib() == 4.0
    assert systems.Miniupnpd.state_files_kib(systems.Miniupnpd.__new__(systems.Miniupnpd)) is None
    doc = make_doc()
    row = {"system": "igdpcp", "n": 10000, "memory": {"total": {"rss_mib": 59.0}}, "state_files_kib": 2560.0}
    harness._fold_row(doc, row, first=False, top=True)
    assert doc["memory"]["igdpcp"]["loaded"]["files_kib"] == 2560.0
    assert doc["control"].pop() is row  # its other figures are not this test's
    md = report.render_markdown(doc)
    assert "igdpcp's files in its state dir at loaded (N=10000): 2.50 MiB" in md
    assert by_id(goals.evaluate(doc), "mem-loaded")[0].value == 59.0  # the goal reads the processes' total


def test_memory_after_the_restart_phase_is_shown_and_held_to_the_loaded_goal() -> None:
    """Both daemons started with their 10k (a router after a reboot) hold what they held after the
    adds, or the goal says short: a start used to leave both ~7 MiB larger."""
    doc = make_doc()
    mem = {"natd": {"rss_mib": 29.2, "pss_mib": 22.3}, "controld": {"rss_mib": 31.1, "pss_mib": 24.1},
           "total": {"rss_mib": 60.3, "pss_mib": 46.4}}
    row = {"system": "igdpcp", "n": 10000, "memory": {"total": {"rss_mib": 59.5}},
           "restart": {"n": 10000, "controld_first_soap_s": 0.5, "memory": mem}}
    harness._fold_row(doc, row, first=False, top=True)
    assert doc["memory"]["igdpcp"]["restarted"] == {"n": 10000, **mem}
    assert "memory" not in doc["restart"] and doc["restart"]["controld_first_soap_s"] == 0.5
    assert doc["control"].pop() is row
    verdict = by_id(goals.evaluate(doc), "mem-restarted")[0]
    assert (verdict.value, verdict.status) == (60.3, "short")
    assert by_id(goals.evaluate(doc), "mem-loaded")[0].status == "met"
    md = report.render_markdown(doc)
    assert "| igdpcp | restarted (N=10000) | total | 60.3 | 46.4 |" in md
    assert "what a router holds after a reboot" in md


def test_children_memory_reads_a_processs_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert child.pid in procs.children(os.getpid())
        m = procs.children_memory(os.getpid())
        assert m is not None and m["rss_mib"] > 1 and m["pss_mib"] > 0
    finally:
        child.communicate(timeout=10)


# ------------------------------------------------------------------ README block
README = f"# x\n\nintro\n\n## Performance\n\n{report.README_BEGIN}\nold figures\n{report.README_END}\n\n## After\n"


def test_update_readme_replaces_only_the_block() -> None:
    new = report.update_readme(README, "new figures\n")
    assert new.startswith("# x\n\nintro\n\n## Performance\n\n")
    assert new.endswith(f"{report.README_END}\n\n## After\n")
    assert "new figures" in new and "old figures" not in new
    assert report.update_readme(new, "new figures\n") == new  # idempotent


@pytest.mark.parametrize("text", ["no markers", README + report.README_BEGIN,
                                  f"{report.README_END}\n{report.README_BEGIN}\n"])
def test_update_readme_refuses_bad_markers(text: str) -> None:
    with pytest.raises(ValueError):
        report.update_readme(text, "x")


def test_readme_command_writes_the_block_from_a_results_file(tmp_path: Any) -> None:
    res = tmp_path / "bench-x.json"
    res.write_text(json.dumps(make_doc()))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert harness.main(["readme", str(res), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "Generated from `bench/results/bench-x.json` (`bench/run`, run on 2026-12-04)" in text
    assert "### Goals (issue 12)" in text and text.endswith("## After\n")
    assert "![" not in text  # no plots beside this results file
    (tmp_path / "bench-x-latency.png").write_bytes(b"png")
    doc = make_doc()
    doc["meta"]["argv"] = ["-n", "1000", "--out", "/tmp/elsewhere"]
    res.write_text(json.dumps(doc))
    assert harness.main(["readme", str(res), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "(`bench/run -n 1000`, run on" in text
    assert "![bench-x-latency.png](bench/results/bench-x-latency.png)" in text and "memory.png" not in text
    assert text.count(report.README_BEGIN) == 1 and text.startswith("# x\n\nintro\n")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="missing"):
        harness.main(["readme", str(bad), "--readme", str(readme)])


# ------------------------------------------------------------------ small pure helpers
def test_progress_bar_renders_without_a_tty() -> None:
    out = io.StringIO()
    with Progress("adds", 4, stream=out) as bar:
        for _ in range(4):
            bar.step()
    assert out.getvalue().count("\n") == 1  # one line per phase in a log
    assert "[" + "#" * 30 + "] 4/4" in out.getvalue()


def _pcp_frame(sport: int, dport: int, opcode: int, nonce: bytes) -> bytes:
    pcp = bytes([2, opcode]) + bytes(22) + nonce + bytes(24)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(pcp), 0)
    ip = bytes([0x45, 0]) + struct.pack("!H", 20 + len(udp) + len(pcp)) + bytes(5) + bytes([17]) + bytes(10)
    return ip + udp + pcp


def test_pcp_sniffer_parses_map_requests_and_responses() -> None:
    nonce = bytes(range(12))
    assert agents._pcp_of(_pcp_frame(40000, 5351, 1, nonce)) == ("req", nonce)
    assert agents._pcp_of(_pcp_frame(5351, 40000, 0x81, nonce)) == ("resp", nonce)
    assert agents._pcp_of(_pcp_frame(40000, 5351, 0, nonce)) is None  # ANNOUNCE, not MAP
    assert agents._pcp_of(_pcp_frame(40000, 53, 1, nonce)) is None
    assert agents._pcp_of(b"\x60" + bytes(60)) is None  # IPv6


def _tcp_frame(sport: int, dport: int, payload: bytes) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 5 << 4, 0x18, 65535, 0, 0)
    return bytes([0x45, 0]) + struct.pack("!H", 20 + len(tcp) + len(payload)) + bytes(5) + bytes([6]) \
        + bytes(10) + tcp + payload


def test_sniffers_pair_requests_with_answers() -> None:
    nonce_a, nonce_b = bytes(12), bytes(range(12))
    pcp_packets = [(1.0, _pcp_frame(40000, 5351, 1, nonce_a)), (1.5, _pcp_frame(40000, 5351, 1, nonce_a)),
                   (2.0, _pcp_frame(40000, 5351, 1, nonce_b)), (2.25, _pcp_frame(5351, 40000, 0x81, nonce_b)),
                   (3.0, _pcp_frame(5351, 40000, 0x81, nonce_a))]  # a retransmission counts from the first
    assert agents.pcp_rtts(pcp_packets) == [2.0, 0.25]
    soap = [(0.5, _tcp_frame(50000, 5000, b"GET /rootDesc.xml HTTP/1.1\r\n")), (0.6, _tcp_frame(5000, 50000, b"HTTP")),
            (1.0, _tcp_frame(50001, 5000, b"POST /ctl/IPConn HTTP/1.1\r\n")), (1.1, _tcp_frame(50001, 5000, b"<s:E")),
            (1.2, _tcp_frame(5000, 50001, b"")),  # a bare ACK is no answer
            (1.4, _tcp_frame(5000, 50001, b"HTTP/1.1 200 OK")), (1.5, _tcp_frame(5000, 50001, b"<s:E"))]
    assert agents.soap_times(soap, 5000) == pytest.approx([0.4])


def test_cascaded_quarters_show_our_share_as_nat2_fills() -> None:
    ms = [0.001 * v for v in (1, 3, 2, 5, 4, 6, 9, 8, 7)]  # a ninth value left out: 4 quarters of 2
    assert harness.quarter_p50s(ms) == pytest.approx([1.0, 2.0, 4.0, 8.0])
    assert harness.quarter_p50s(ms[:3]) == []
    doc = make_doc()
    doc["cascaded"]["quarters_p50_ms"] = {"nat2": [4.0, 5.0, 6.0, 7.0], "ours": [0.5, 0.6, 0.7, 0.8]}
    assert "NAT2 4.00 / 5.00 / 6.00 / 7.00 ms; ours 0.50 / 0.60 / 0.70 / 0.80 ms" in report.render_markdown(doc)


@pytest.mark.skipif(os.geteuid() != 0, reason="a packet socket needs CAP_NET_RAW")
def test_pcp_sniffer_times_a_batch_by_kernel_stamps(tmp_path: Path) -> None:
    """The sniffer reads in batches: a request and its answer 50 ms apart, read together after
    SIGTERM, still give a 50 ms round trip (the kernel's stamps, not the reading time)."""
    out = tmp_path / "rtt.json"
    root = Path(__file__).resolve().parents[2]
    sniffer = subprocess.Popen([sys.executable, "-m", "bench.agents", "sniff", "lo", str(out), "30"], cwd=root,
                               stdout=subprocess.PIPE, text=True)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # ports without binding 5351
    try:
        assert sniffer.stdout is not None and "ready" in sniffer.stdout.readline()
        nonce = os.urandom(12)
        for sport, dport, opcode in ((40000, 5351, 1), (5351, 40000, 0x81)):
            frame = bytearray(_pcp_frame(sport, dport, opcode, nonce))
            frame[8], frame[12:20] = 64, socket.inet_aton("127.0.0.1") * 2  # TTL, source and destination
            raw.sendto(bytes(frame), ("127.0.0.1", 0))
            time.sleep(0.05)
        sniffer.terminate()
        assert sniffer.wait(10) == 0
    finally:
        raw.close()
        if sniffer.poll() is None:
            sniffer.kill()
            sniffer.wait(5)
    rtts = json.loads(out.read_text())
    assert len(rtts) == 1 and 0.04 <= rtts[0] < 0.2, rtts


def test_quick_config_and_overrides() -> None:
    cfg, _ = harness.parse_args(["--quick", "--conntrack-flows", "30000", "--skip", "pinned"])
    assert cfg.quick and max(cfg.ns) < 1000 and cfg.conntrack_flows == 30000 and cfg.skip == ("pinned",)
    full, _ = harness.parse_args(["-n", "3000", "1000"])
    assert full.ns == [1000, 3000] and not full.quick and full.conntrack_flows >= 30000
