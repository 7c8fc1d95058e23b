"""One benchmark run as a user wants it: builds the bed, measures igdpcp and miniupnpd, writes the results.

Phases (each can be skipped with ``--skip``): ``control`` (add / list / delete at every N, both systems,
memory and CPU), ``dataplane`` (new TCP connections per second at N = 1 and the largest N), ``restart``
(controld's first SOAP answer, forwards back after a natd restart and after ``nft flush ruleset``),
``cascaded`` (AddPortMapping through real NAT2, NAT2's round trip timed at natd's WAN side),
``natpmp`` (only once a NAT-PMP/PCP server answers on the gateway), ``pinholes`` (IPv6 AddPinhole /
DeletePinhole through UPnP, both systems in the same IPv6 bed), ``pinned`` (the key figures with the
daemons pinned to one core) and ``miniupnpd`` (the comparison columns).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import procs, report, stats
from bench._bed import HTTP_PORT, StackError, ct_count, tb
from bench.goals import lookup as report_lookup
from bench.systems import Igdpcp, Miniupnpd, System, pin_all
from natd.ctlink import CT_IDLE_S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "bench", "results")
FIRST_PORT = 20000
PHASES = ("control", "dataplane", "restart", "cascaded", "natpmp", "pinholes", "pinned", "miniupnpd")
PINHOLE_LEASE = 3600  # s: outlives the longest run, so no pinhole ends while it is counted
PINHOLE_PACKETS_CALLS = 100  # GetPinholePackets calls at each N, spread through the pinholes open


@dataclass
class Config:
    """What one run measures (``--quick`` picks smaller figures)."""

    ns: list[int] = field(default_factory=lambda: [100, 1000, 3000, 10000])
    miniupnpd_max: int = 3000  # miniupnpd's cost grows with N^2: bounded by default
    conntrack_flows: int = 32000
    cascaded_n: int = 1000
    pinned_n: int = 1000
    natpmp_ns: list[int] = field(default_factory=lambda: [100, 1000])  # NAT-PMP and PCP maps at each
    pinhole_ns: list[int] = field(default_factory=lambda: [100, 1000])  # UPnP pinholes at each
    dataplane_secs: float = 3.0
    dataplane_runs: int = 3
    skip: tuple[str, ...] = ()
    quick: bool = False

    @classmethod
    def quick_run(cls) -> Config:
        """The smoke run: under 3 minutes on 2 cores."""
        return cls(ns=[100, 200], miniupnpd_max=200, conntrack_flows=30500, cascaded_n=100, pinned_n=0,
                   natpmp_ns=[50], pinhole_ns=[100], dataplane_secs=1.0, dataplane_runs=1, quick=True)


def say(msg: str) -> None:
    """One progress line on stderr."""
    sys.stderr.write(f"bench: {msg}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------- agents in the namespaces
def agent_argv(*args: object) -> list[str]:
    return [sys.executable, "-m", "bench.agents", *(str(a) for a in args)]


def agent_run(bed: tb.Testbed, ns: str, *args: object, timeout: float = 120) -> Any:
    """Run an agent to its end; its last stdout line as JSON."""
    res = bed.run(ns, agent_argv(*args), check=False, timeout=timeout)
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"agent {args[0]} in {ns} failed: {res.stderr[-1500:]}") from None


def _readline(p: subprocess.Popen, timeout: float) -> str:
    assert p.stdout is not None
    if not select.select([p.stdout], [], [], timeout)[0]:
        raise TimeoutError(f"no answer from agent pid {p.pid} in {timeout:.0f} s")
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"agent pid {p.pid} ended early (exit {p.wait(5)})")
    return line


class Agent:
    """A long-running agent (stdout JSON lines; stderr, e.g. progress bars, goes to ours)."""

    def __init__(self, bed: tb.Testbed, ns: str, *args: object, ready: float = 15.0) -> None:
        self.proc = bed.popen(ns, agent_argv(*args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = json.loads(_readline(self.proc, ready))

    def ask(self, cmd: dict[str, Any], timeout: float = 7200) -> Any:
        """Send one command, wait for its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(_readline(self.proc, timeout))

    def result(self, timeout: float) -> Any:
        """The next answer line (agents that answer once)."""
        return json.loads(_readline(self.proc, timeout))

    def close(self) -> None:
        """Stop it (SIGTERM, then SIGKILL)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --------------------------------------------------------------------- conntrack load
def load_conntrack(bed: tb.Testbed, flows: int) -> int:
    """A bounded UDP burst from the LAN host to the Internet host through both NATs: ``flows`` unrelated
    conntrack entries in the router (kept for 15 min so they outlive the deletes). Returns the count."""
    for ns in ("cpe", "isp"):
        bed.run(ns, ["sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=900"], check=False)
    agent_run(bed, "lan", "burst", tb.INET_HOST_IP, flows, timeout=300)
    time.sleep(0.3)
    return ct_count(bed)


# --------------------------------------------------------------------- data plane
def conn_rate(bed: tb.Testbed, port: int, cfg: Config) -> float:
    """New TCP connections per second from the provider side to the router's WAN ``port`` (best of runs)."""
    best = 0.0
    for secs in (0.3, *([cfg.dataplane_secs] * cfg.dataplane_runs)):  # a short warm-up first
        bed.run("cpe", ["conntrack", "-F"], check=False)
        r = agent_run(bed, "isp", "connect", tb.ROUTER_WAN_IP, port, secs, timeout=secs + 30)
        if secs == cfg.dataplane_secs:
            best = max(best, float(r["rate"]))
    return best


# --------------------------------------------------------------------- control plane
def control_plane(bed: tb.Testbed, system: System, n: int, cfg: Config, *, pinned: bool = False,
                  dataplane: bool = False, restart: bool = False) -> dict[str, Any]:
    """Add N, list them, (data plane, restart,) delete a tenth quietly, load conntrack, delete the rest."""
    label = f"{system.name} N={n}{' pinned' if pinned else ''}"
    say(f"{label}: starting")
    system.start()
    if pinned:
        pin_all(system)
    bed.run("cpe", ["conntrack", "-F"], check=False)
    row: dict[str, Any] = {"system": system.name, "n": n, "pinned": pinned,
                           "memory_idle": procs.memory_of(system.pids())}
    client = Agent(bed, "lan", "client")
    server = Agent(bed, "lan", "accept", 36000, FIRST_PORT, FIRST_PORT + n - 1) if dataplane else None
    extra: dict[str, Any] = {}
    try:
        cpu0 = procs.cpu_seconds(system.pids().values())
        first = client.ask({"op": "add", "first": FIRST_PORT, "count": 1, "label": f"{label} add"})
        timed_adds = n
        if server is not None:
            extra["dataplane_1"] = conn_rate(bed, FIRST_PORT, cfg)
            cpu0, timed_adds = procs.cpu_seconds(system.pids().values()), n - 1  # the rate loop is not an add
        rest = client.ask({"op": "add", "first": FIRST_PORT + 1, "count": n - 1, "label": f"{label} add"})
        cpu1 = procs.cpu_seconds(system.pids().values())
        adds = first["lat"] + rest["lat"]
        listing = client.ask({"op": "list", "max": n + 1, "expect": n, "label": f"{label} list"})
        cpu2 = procs.cpu_seconds(system.pids().values())
        time.sleep(1.0)  # let allocators settle before reading memory
        row["memory"] = procs.memory_of(system.pids())
        row["state_files_kib"] = system.state_files_kib()
        if server is not None:
            extra["dataplane_n"] = conn_rate(bed, FIRST_PORT + n - 1, cfg)
        if restart and isinstance(system, Igdpcp):
            extra["restart"] = restart_recovery(bed, system, n)
        quiet_n = max(20, n // 10)
        cpu3 = procs.cpu_seconds(system.pids().values())
        quiet = client.ask({"op": "delete", "first": FIRST_PORT, "count": quiet_n, "label": f"{label} del quiet"})
        cpu4 = procs.cpu_seconds(system.pids().values())
        ct_before = load_conntrack(bed, cfg.conntrack_flows)
        cpu5 = procs.cpu_seconds(system.pids().values())
        loaded = client.ask({"op": "delete", "first": FIRST_PORT + quiet_n, "count": n - quiet_n,
                             "label": f"{label} del loaded"})
        cpu6 = procs.cpu_seconds(system.pids().values())
        ct_after = ct_count(bed)
        if isinstance(system, Igdpcp):
            row["memory_ctworker"] = ctworker_memory(system)
    finally:
        client.close()
        if server is not None:
            server.close()
        system.stop()
    list_stats = {"total_s": listing["total"], "entries": listing["entries"], "refused": listing["refused"],
                  "per_entry_ms": 1e3 * listing["total"] / max(1, listing["entries"])}
    row.update({
        "add": stats.summarize(adds), "add_errors": first["errors"] + rest["errors"],
        "add_refused": first["refused"] + rest["refused"], "list": list_stats,
        "delete_quiet": stats.summarize(quiet["lat"]), "delete": stats.summarize(loaded["lat"]),
        "delete_all_total_s": sum(quiet["lat"]) + sum(loaded["lat"]),
        "delete_errors": quiet["errors"] + loaded["errors"], "delete_refused": quiet["refused"] + loaded["refused"],
        "conntrack": {"before": ct_before, "after": ct_after},
        "cpu_s_per_1k": {"add": stats.cpu_per_1k(cpu1 - cpu0, timed_adds),
                         "list": stats.cpu_per_1k(cpu2 - cpu1, listing["entries"]),
                         "delete": stats.cpu_per_1k((cpu4 - cpu3) + (cpu6 - cpu5), n)},
        **extra})
    say(f"{label}: add p50 {row['add']['p50_ms']:.2f} ms, list {list_stats['total_s']:.3f} s, "
        f"delete p50 {row['delete']['p50_ms']:.2f} ms (quiet {row['delete_quiet']['p50_ms']:.2f}) "
        f"with {ct_before} conntrack entries")
    return row


def ctworker_memory(system: Igdpcp) -> dict[str, float] | None:
    """natd's conntrack worker process after the deletes, while it runs (it exits CT_IDLE_S after its
    last batch, natd/ctlink.py); None if natd has no child (then it never ran, or already went)."""
    natd = system.pids().get("natd")
    time.sleep(0.5)  # the last burst's batch (CT_BATCH_S after the last delete) is done
    for _ in range(20):  # bounded: it is there at once, or the deletes never reached it
        m = procs.children_memory(natd) if natd else None
        if m:
            return m
        time.sleep(0.1)
    return None


# --------------------------------------------------------------------- restart recovery
def restart_recovery(bed: tb.Testbed, system: Igdpcp, n: int) -> dict[str, Any]:
    """With N mappings: controld's first SOAP answer after its start; N forwards back in the kernel after a
    natd restart (its table removed while it was down) and after ``nft flush ruleset``."""
    st = system.stack
    out: dict[str, Any] = {"n": n}
    say(f"restart recovery with {n} mappings")
    st.stop("controld")
    probe = Agent(bed, "lan", "soap-probe", st.controld_ip, HTTP_PORT, "/ctl/WANIPCn", 120)
    t0 = time.monotonic()
    st.start_controld(timeout=120)
    r = probe.result(130)
    probe.close()
    out["controld_first_soap_s"] = r["t"] - t0 if r.get("t") else None

    st.stop("natd")
    bed.run("cpe", ["nft", "delete", "table", "ip", "igdpcp"], check=False)
    poll = Agent(bed, "cpe", "fwd-count", n, 60)
    t0 = time.monotonic()
    st.start_natd(timeout=60)
    r = poll.result(70)
    poll.close()
    out["natd_restart_s"] = r["t"] - t0 if r.get("t") else None

    from natd.client import NatdClient  # only this phase talks to natd directly

    c = NatdClient(st.rpc, st.events, timeout=30)
    try:
        time.sleep(0.5)  # SUB needs a moment to join
        while c.next_event("restored", 0.05):
            pass
        t0 = time.monotonic()
        bed.run("cpe", ["nft", "flush", "ruleset"])
        ev = c.next_event("restored", 30.0)
        took = time.monotonic() - t0
    finally:
        c.close()
    back = agent_run(bed, "cpe", "fwd-count", n, 5)
    out["nft_flush_s"] = took if ev is not None and back.get("t") else None
    # the flush took the bed's own router masquerade too: put it back as the bed made it
    bed.nft("cpe", f"table ip {tb.ROUTER_FW_TABLE} {{\n chain srcnat {{\n type nat hook postrouting priority srcnat;"
                   f' policy accept;\n oifname "{tb.ROUTER_WAN_IF}" ip saddr {tb.LAN_SUBNET} masquerade\n }}\n}}\n')
    time.sleep(1.0)  # let allocators settle, as before the loaded figure
    # both daemons started with N in their tables: what a router holds after a reboot
    out["memory"] = procs.memory_of(system.pids())
    both = (out["memory"].get("total") or {}).get("rss_mib")
    say(f"restart: controld first SOAP {out['controld_first_soap_s']}, natd {out['natd_restart_s']}, "
        f"flush {out['nft_flush_s']}, both {'?' if both is None else f'{both:.1f}'} MiB RSS")
    return out


# --------------------------------------------------------------------- cascaded
def _json_list(path: str) -> list[float]:
    """A sniffer's output (empty when it wrote none)."""
    try:
        with open(path) as f:
            return list(json.load(f))
    except (OSError, ValueError):
        return []


def quarter_p50s(seconds: list[float]) -> list[float]:
    """p50 in ms of each quarter of a series, in order (empty for fewer than 4 values)."""
    k = len(seconds) // 4
    return [1e3 * stats.quantile(seconds[i * k:(i + 1) * k], 0.5) for i in range(4)] if k else []


def cascaded(cfg: Config) -> dict[str, Any]:
    """N AddPortMapping through NAT1 and real NAT2, NAT2's own round trip timed at natd's WAN interface
    and the router's time per call at its LAN side (so the LAN client's own time shows apart)."""
    n = cfg.cascaded_n
    with tb.Testbed() as bed:
        bed.start_nat2()
        system = Igdpcp(bed, mode="auto", extra_controld=["--pcp-service-wait", "0", "--pcp-epoch-poll", "0"])
        system.start()
        sniff_out, soap_out = bed.path("pcp-sniff.json"), bed.path("soap-sniff.json")
        sniffers = [Agent(bed, "cpe", "sniff", tb.ROUTER_WAN_IF, sniff_out, 3600),
                    Agent(bed, "cpe", "sniff-soap", tb.ROUTER_LAN_PORT_LAN, HTTP_PORT, soap_out, 3600)]
        client = Agent(bed, "lan", "client")
        try:
            r = client.ask({"op": "add", "first": FIRST_PORT, "count": n, "label": f"cascaded N={n} add"})
        finally:
            client.close()
            for sniffer in sniffers:
                sniffer.close()
            system.stop()
        nat2, router = _json_list(sniff_out), _json_list(soap_out)
    res: dict[str, Any] = {"n": n, "add": stats.summarize(r["lat"]), "add_errors": r["errors"],
                           "nat2": stats.summarize(nat2) if nat2 else None, "ours": None, "router": None}
    if len(nat2) == n:  # one MAP per add, in order: our share of each add is its whole time minus NAT2's
        ours = stats.minus(r["lat"], nat2)
        res["ours"] = stats.summarize(ours)
        # By quarter of the run, as NAT2's own table fills: miniupnpd's work per MAP grows with it and
        # runs on the bed's CPUs during and right after its answer, when ours does.
        res["quarters_p50_ms"] = {"nat2": quarter_p50s(nat2), "ours": quarter_p50s(ours)}
        if len(router) >= n:  # of our share, the router's part (POST in to answer out, minus NAT2); the
            # last n answers are the adds' (the client's IGD discovery made a few SOAP calls before)
            res["router"] = stats.summarize(stats.minus(router[len(router) - n:], nat2))
    else:
        res["note"] = f"{len(nat2)} PCP round trips seen for {n} adds: no per-add split"
    say(f"cascaded N={n}: add p50 {res['add']['p50_ms']:.2f} ms; NAT2 "
        f"{res['nat2']['p50_ms'] if res['nat2'] else '?'} ms; ours {res['ours']['p50_ms'] if res['ours'] else '?'} ms"
        f" (router {res['router']['p50_ms'] if res['router'] else '?'} ms)"
        + "".join(f"; {k} by quarter " + " / ".join(f"{v:.2f}" for v in q)
                  for k, q in res.get("quarters_p50_ms", {}).items()))
    return res


# --------------------------------------------------------------------- NAT-PMP / PCP
def natpmp_probe(bed: tb.Testbed) -> dict[str, Any]:
    """Does anything answer NAT-PMP/PCP on the gateway's UDP 5351?"""
    return agent_run(bed, "lan", "natpmp", tb.ROUTER_LAN_IP, 0, timeout=30)


def natpmp_phase(cfg: Config) -> dict[str, Any]:
    """NAT-PMP and PCP map round trips at each N for both systems (a fresh start per N), or "not
    available" while igdpcp does not serve UDP 5351. ``speedup``: miniupnpd's total / ours."""
    out: dict[str, Any] = {"available": False}
    with tb.Testbed() as bed:
        # igdpcp's per-host rate limit lifted: the bench is one host mapping as fast as it is answered
        candidates: list[System] = [Igdpcp(bed, extra_controld=["--pcp-rate", "1000000", "--pcp-burst", "1000000"]),
                                    Miniupnpd(bed)]
        for system in candidates:
            if system.name == "miniupnpd" and ("miniupnpd" in cfg.skip or not out["available"]):
                continue
            for n in cfg.natpmp_ns:
                system.start()
                try:
                    probe = natpmp_probe(bed)
                    if system.name == "igdpcp" and not probe.get("available"):
                        out["reason"] = probe.get("reason", "not available")
                        say(f"NAT-PMP/PCP on the gateway: {out['reason']}: skipped")
                        break
                    out["available"] = True
                    for agent in ("natpmp", "pcp"):
                        r = agent_run(bed, "lan", agent, tb.ROUTER_LAN_IP, n,
                                      FIRST_PORT if agent == "natpmp" else FIRST_PORT + n, timeout=1800)
                        out.setdefault(system.name, {}).setdefault(agent, {})[str(n)] = \
                            {**stats.summarize(r["lat"]), "errors": r["errors"]}
                finally:
                    system.stop()
    speedup = speedups(out, [f"{agent}.{n}" for agent in ("natpmp", "pcp") for n in cfg.natpmp_ns])
    if speedup:
        out["speedup"] = speedup
    return out


def speedups(out: dict[str, Any], keys: list[str]) -> dict[str, float]:
    """miniupnpd's ``total_s`` / igdpcp's at each dotted key both measured ("pcp.100" -> "pcp_100")."""
    res = {}
    for key in keys:
        ours = report_lookup(out, f"igdpcp.{key}.total_s")
        theirs = report_lookup(out, f"miniupnpd.{key}.total_s")
        if ours and theirs:
            res[key.replace(".", "_")] = theirs / ours
    return res


# --------------------------------------------------------------------- IPv6 pinholes
def pinholes_phase(cfg: Config) -> dict[str, Any]:
    """AddPinhole, GetPinholePackets with the N open, then DeletePinhole, one by one through UPnP
    (WANIPv6FirewallControl:1), igdpcp and miniupnpd in the same IPv6 bed with the same raw SOAP client
    (``pinholes`` agent), a fresh start per N. ``speedup``: miniupnpd's total / ours ("1000_add")."""
    out: dict[str, Any] = {"lease_s": PINHOLE_LEASE}
    with tb.Testbed(ipv6=True) as bed:
        systems: list[System] = [Igdpcp.for_pinholes(bed)]
        if "miniupnpd" not in cfg.skip:
            systems.append(Miniupnpd(bed, ipv6=True))
        for system in systems:
            for n in cfg.pinhole_ns:
                out.setdefault(system.name, {})[str(n)] = pinholes_at(bed, system, n)
    out["speedup"] = speedups(out, [f"{n}.{op}" for n in cfg.pinhole_ns for op in ("add", "packets", "delete")])
    return out


def pinholes_at(bed: tb.Testbed, system: System, n: int) -> dict[str, Any]:
    """One system at one N: the adds, the pinholes in the kernel, GetPinholePackets of some of them (the
    counter of one pinhole among N), the deletes, the kernel again."""
    label = f"{system.name} pinholes N={n}"
    say(f"{label}: starting")
    system.start()
    try:
        client = Agent(bed, "lan", "pinholes", system.pinhole_desc_url)
        try:  # one untimed add and delete first: the first call's one-off costs are not a pinhole's
            client.ask({"op": "add", "first": FIRST_PORT - 1, "count": 1, "client": tb.LAN_HOST_IP6,
                        "lease": PINHOLE_LEASE, "label": f"{label} warm-up"})
            client.ask({"op": "delete", "label": f"{label} warm-up"})
            add = client.ask({"op": "add", "first": FIRST_PORT, "count": n, "client": tb.LAN_HOST_IP6,
                              "lease": PINHOLE_LEASE, "label": f"{label} AddPinhole"})
            opened = system.pinholes()
            packets = client.ask({"op": "packets", "count": min(n, PINHOLE_PACKETS_CALLS),
                                  "label": f"{label} GetPinholePackets"})
            rm = client.ask({"op": "delete", "label": f"{label} DeletePinhole"})
            left = system.pinholes()
        finally:
            client.close()
    finally:
        system.stop()
    row = {"add": stats.summarize(add["lat"]), "add_errors": add["errors"], "add_refused": add["refused"],
           "packets": stats.summarize(packets["lat"]), "packets_errors": packets["errors"],
           "packets_refused": packets["refused"],
           "delete": stats.summarize(rm["lat"]), "delete_errors": rm["errors"], "delete_refused": rm["refused"],
           "kernel": {"after_adds": opened, "after_deletes": left},
           "faults": add["faults"] + packets["faults"] + rm["faults"]}
    say(f"{label}: AddPinhole p50 {row['add']['p50_ms']:.2f} ms ({add['errors']} errors, {add['refused']} "
        f"503 retried), GetPinholePackets p50 {row['packets']['p50_ms']:.2f} ms ({packets['errors']} errors), "
        f"DeletePinhole p50 {row['delete']['p50_ms']:.2f} ms ({rm['errors']} errors, "
        f"{rm['refused']} 503 retried); in the kernel {opened} after the adds, {left} after the deletes"
        + "".join(f"\n  {f}" for f in row["faults"]))
    return row


# --------------------------------------------------------------------- the run
PHASE_ERRORS = (StackError, RuntimeError, TimeoutError, OSError, subprocess.SubprocessError)


def run(cfg: Config, argv: list[str]) -> dict[str, Any]:
    """Every phase not skipped; returns the results document (goals included). A phase that fails is
    recorded under "errors" and the run goes on with the next one."""
    os.environ["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    doc: dict[str, Any] = {"schema": report.SCHEMA_VERSION, "meta": report.machine_facts(argv, cfg.quick),
                           "control": [], "memory": {}, "dataplane": [], "cascaded": None,
                           "natpmp": {"available": False, "reason": "phase skipped"}, "restart": None,
                           "pinholes": None, "errors": []}

    def phase(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except PHASE_ERRORS as exc:
            say(f"{name} failed: {exc}")
            doc["errors"].append(f"{name}: {str(exc)[-500:]}")

    top = max(cfg.ns)
    if "control" not in cfg.skip:
        for n in cfg.ns:
            phase(f"control N={n}", functools.partial(_control_at, doc, cfg, n, top))
        if "dataplane" not in cfg.skip and top > cfg.miniupnpd_max and "miniupnpd" not in cfg.skip:
            phase("miniupnpd rule-shape data plane", lambda: _fold_miniupnpd_smaller_dataplane(doc, cfg))
    if "pinned" not in cfg.skip and cfg.pinned_n:
        phase("pinned", lambda: _pinned(doc, cfg))
    if "cascaded" not in cfg.skip:
        phase("cascaded", lambda: doc.update(cascaded=cascaded(cfg)))
    if "natpmp" not in cfg.skip:
        phase("natpmp", lambda: doc.update(natpmp=natpmp_phase(cfg)))
    if "pinholes" not in cfg.skip:
        phase("pinholes", lambda: doc.update(pinholes=pinholes_phase(cfg)))
    return report.with_goals(doc)


def _control_at(doc: dict[str, Any], cfg: Config, n: int, top: int) -> None:
    """Both systems at one N, on a bed of their own."""
    with tb.Testbed() as bed:
        systems: list[System] = [Igdpcp(bed)]
        if "miniupnpd" not in cfg.skip and n <= cfg.miniupnpd_max:
            systems.append(Miniupnpd(bed))
        for system in systems:
            row = control_plane(bed, system, n, cfg, dataplane="dataplane" not in cfg.skip and n == top,
                                restart="restart" not in cfg.skip and n == top)
            _fold_row(doc, row, n == cfg.ns[0], n == top)


def _pinned(doc: dict[str, Any], cfg: Config) -> None:
    """The key control-plane figures with every daemon pinned to one core."""
    with tb.Testbed() as bed:
        systems: list[System] = [Igdpcp(bed), *([] if "miniupnpd" in cfg.skip else [Miniupnpd(bed)])]
        for system in systems:
            doc["control"].append(control_plane(bed, system, cfg.pinned_n, cfg, pinned=True))


def _fold_row(doc: dict[str, Any], row: dict[str, Any], first: bool, top: bool) -> None:
    """Move a control-plane row's side figures into their own sections of the document."""
    system = row["system"]
    mem = doc["memory"].setdefault(system, {})
    if first:
        mem["idle"] = row["memory_idle"]
    if top:
        mem["loaded"] = {"n": row["n"], **row["memory"], "files_kib": row.get("state_files_kib")}
        if row.get("memory_ctworker"):
            mem["after deletes"] = {"n": row["n"], "idle_exit_s": CT_IDLE_S, "ctworker": row["memory_ctworker"]}
    for key, n in (("dataplane_1", 1), ("dataplane_n", row["n"])):
        if key in row:
            doc["dataplane"].append({"system": system, "n": n, "conn_per_s": row.pop(key)})
    if "restart" in row:
        doc["restart"] = row.pop("restart")
        if doc["restart"].get("memory"):
            mem["restarted"] = {"n": row["n"], **doc["restart"].pop("memory")}
    doc["control"].append(row)


def _fold_miniupnpd_smaller_dataplane(doc: dict[str, Any], cfg: Config) -> None:
    """miniupnpd is not run at the largest N (its adds grow with N^2); its data plane at N = 1 and there is
    measured on the rule shape it builds, one DNAT rule and one filter rule per forward, loaded in one go."""
    for n in (1, max(cfg.ns)):
        with tb.Testbed() as bed:
            lines = ["add table inet mup", "add chain inet mup pre { type nat hook prerouting priority dstnat; }",
                     "add chain inet mup filt { type filter hook forward priority filter; }"]
            for i in range(n):
                port = FIRST_PORT + i
                lines.append(f'add rule inet mup pre iif "{tb.ROUTER_WAN_IF}" tcp dport {port} '
                             f"dnat ip to {tb.LAN_HOST_IP}:{port}")
                lines.append(f'add rule inet mup filt iif "{tb.ROUTER_WAN_IF}" ip daddr {tb.LAN_HOST_IP} '
                             f"tcp dport {port} accept")
            bed.run("cpe", ["nft", "-f", "-"], input="\n".join(lines), timeout=300)
            server = Agent(bed, "lan", "accept", 600, FIRST_PORT + n - 1)
            try:
                rate = conn_rate(bed, FIRST_PORT + n - 1, cfg)
            finally:
                server.close()
        doc["dataplane"].append({"system": "miniupnpd rule shape", "n": n, "conn_per_s": rate})


def write_outputs(doc: dict[str, Any], out_dir: str, plots: bool = True) -> str:
    """JSON, Markdown and (if matplotlib is there) PNG plots under ``out_dir``; returns the JSON path."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = doc["meta"]["date"].replace(":", "").replace("-", "").replace("+0000", "Z")
    base = os.path.join(out_dir, f"bench-{stamp}{'-quick' if doc['meta']['quick'] else ''}")
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    md = report.render_markdown(doc)
    with open(base + ".md", "w") as f:
        f.write(md)
    if plots:
        try:
            from bench import plots as plotting
        except ImportError:
            say("no matplotlib (pip install '.[bench]' or apt install python3-matplotlib): no plots")
        else:
            for path in plotting.draw(doc, base):
                say(f"wrote {path}")
    return base + ".json"


def parse_args(argv: list[str]) -> tuple[Config, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0],
                                 epilog="bench/run readme RESULTS.json [--readme README.md]: write README's "
                                        "performance block from one run; bench/run render RESULTS.json [--plots]: "
                                        "its Markdown (goals re-evaluated) and plots again.")
    ap.add_argument("--quick", action="store_true", help="smoke run, under 3 minutes (smaller N, fewer phases)")
    ap.add_argument("-n", type=int, nargs="+", help="mapping counts (default 100 1000 3000 10000)")
    ap.add_argument("--miniupnpd-max", type=int, help="no miniupnpd control-plane run above this N (3000)")
    ap.add_argument("--conntrack-flows", type=int, help="unrelated conntrack entries made before deletes (32000)")
    ap.add_argument("--cascaded-n", type=int, help="adds in the cascaded phase (1000)")
    ap.add_argument("--pinned-n", type=int, help="N of the pinned-to-one-core phase (1000; 0: none)")
    ap.add_argument("--natpmp-n", type=int, nargs="+", help="NAT-PMP and PCP maps at each of these N (100 1000)")
    ap.add_argument("--pinhole-n", type=int, nargs="+", help="UPnP AddPinhole / DeletePinhole at each N (100 1000)")
    ap.add_argument("--skip", nargs="+", default=[], choices=PHASES, help="phases to leave out")
    ap.add_argument("--out", default=RESULTS_DIR, help="results directory (bench/results)")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    cfg = Config.quick_run() if a.quick else Config()
    for key in ("miniupnpd_max", "conntrack_flows", "cascaded_n", "pinned_n"):
        if getattr(a, key) is not None:
            setattr(cfg, key, getattr(a, key))
    if a.n:
        cfg.ns = sorted(a.n)
    if a.natpmp_n:
        cfg.natpmp_ns = sorted(a.natpmp_n)
    if a.pinhole_n:
        cfg.pinhole_ns = sorted(a.pinhole_n)
    cfg.skip = tuple(a.skip)
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    """``python -m bench [options]``: the run; ``python -m bench readme RESULTS.json``: README's block."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["readme"]:
        return readme_main(argv[1:])
    if argv[:1] == ["render"]:  # render RESULTS.json [--plots]: Markdown (goals re-evaluated), PNGs redrawn
        doc = report.with_goals(report.load(argv[1]))
        sys.stdout.write(report.render_markdown(doc))
        if "--plots" in argv:
            from bench import plots as plotting

            for path in plotting.draw(doc, argv[1].removesuffix(".json")):
                say(f"wrote {path}")
        return 0
    cfg, a = parse_args(argv)
    reason = tb.netns_available()
    if reason:
        say(reason)
        return 2
    t0 = time.monotonic()
    try:
        doc = run(cfg, argv)
    except PHASE_ERRORS as exc:
        say(f"run failed: {exc}")
        return 1
    doc["meta"]["seconds"] = round(time.monotonic() - t0, 1)
    errs = report.validate(doc)
    if errs:
        say("results do not match the schema: " + "; ".join(errs))
        return 1
    path = write_outputs(doc, a.out, plots=not a.no_plots)
    sys.stdout.write(report.render_markdown(doc))
    say(f"results: {path} ({doc['meta']['seconds']} s)")
    return 0


def readme_main(argv: list[str]) -> int:
    """Write README's performance block from one results JSON (nothing else in README changes)."""
    ap = argparse.ArgumentParser(prog="python -m bench readme")
    ap.add_argument("results")
    ap.add_argument("--readme", default=os.path.join(REPO, "README.md"))
    a = ap.parse_args(argv)
    doc = report.with_goals(report.load(a.results))
    with open(a.readme) as f:
        text = f.read()
    stem = a.results.removesuffix(".json")
    plots = [os.path.basename(f"{stem}-{kind}.png") for kind in ("latency", "memory")
             if os.path.exists(f"{stem}-{kind}.png")]
    new = report.update_readme(text, report.readme_block(doc, os.path.basename(a.results), plots))
    with open(a.readme, "w") as f:
        f.write(new)
    say(f"{a.readme}: performance block from {a.results}")
    return 0
