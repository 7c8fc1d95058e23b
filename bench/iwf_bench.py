"""Cascaded AddPortMapping latency and re-assert time, with NAT2's own share (prints figures).

Usage (root, the namespace test bed): ``.venv/bin/python bench/iwf_bench.py [--n 100 1000]``

For each N, on a fresh test bed (real miniupnpd as NAT2, natd + controld in the router):
1. NAT2 alone: N sequential PCP MAP requests from the router's WAN address straight to
   miniupnpd (new mapping each), then the same N again (a refresh, what a re-assert
   costs NAT2). This is NAT2's own share, measured in the same run.
2. NAT2 is restarted clean; controld then takes N AddPortMapping SOAP requests from the
   LAN host, one at a time: the UPnP latency including NAT1 and the PCP round trip.
3. controld is stopped and started again: the time until all N mappings are re-asserted
   upstream with their stored nonces (from controld's start to its last "renewed" line).

Figures only: no pass/fail here (timed asserts do not belong in tests).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.bed import testbed as tb  # noqa: E402
from tests.bed.stack import Stack  # noqa: E402

BASE_PORT = 10000

SOAP_CLIENT = r"""
import http.client, json, sys, time
host, n, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
svc = "urn:schemas-upnp-org:service:WANIPConnection:1"
out = []
for i in range(n):
    body = ('<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
            's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
            f'<u:AddPortMapping xmlns:u="{svc}"><NewRemoteHost></NewRemoteHost>'
            f'<NewExternalPort>{base + i}</NewExternalPort><NewProtocol>TCP</NewProtocol>'
            f'<NewInternalPort>{base + i}</NewInternalPort><NewInternalClient>192.168.1.2</NewInternalClient>'
            '<NewEnabled>1</NewEnabled><NewPortMappingDescription>bench</NewPortMappingDescription>'
            '<NewLeaseDuration>0</NewLeaseDuration></u:AddPortMapping></s:Body></s:Envelope>').encode()
    t0 = time.perf_counter()
    c = http.client.HTTPConnection(host, 5000, timeout=30)
    c.request("POST", "/ctl/WANIPCn", body=body,
              headers={"SOAPACTION": f'"{svc}#AddPortMapping"', "Content-Type": 'text/xml; charset="utf-8"'})
    r = c.getresponse(); r.read(); c.close()
    out.append(time.perf_counter() - t0)
    if r.status != 200:
        print(json.dumps({"error": f"mapping {i}: HTTP {r.status}"})); sys.exit(1)
print(json.dumps(out))
"""

PCP_CLIENT = r"""
import json, os, socket, sys, time
from shared import const, pcp
import ipaddress
wan, server, n, base = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((wan, 0)); s.settimeout(5)
s.connect((server, const.PCP_SERVER_PORT))
nonces = [os.urandom(12) for _ in range(n)]
res = {}
for phase in ("create", "refresh"):
    out = []
    for i in range(n):
        req = pcp.Request(pcp.Opcode.MAP, 3600, ipaddress.IPv4Address(wan),
                          pcp.MapData(nonces[i], const.TCP, base + i, base + i), pcp.Options(prefer_failure=True))
        t0 = time.perf_counter()
        s.send(pcp.encode_request(req))
        while True:
            resp = pcp.decode_response(s.recv(1100))
            if resp.map is not None and resp.map.nonce == nonces[i]:
                break
        out.append(time.perf_counter() - t0)
        if resp.result != 0:
            print(json.dumps({"error": f"NAT2 refused {i}: {resp.result}"})); sys.exit(1)
    res[phase] = out
print(json.dumps(res))
"""


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``values``, in milliseconds."""
    s = sorted(values)
    return 1000 * s[min(len(s) - 1, max(0, int(round(q * len(s))) - 1))]


def run_json(bed: tb.Testbed, ns: str, code: str, *args: str, timeout: float) -> object:
    res = bed.run(ns, [sys.executable, "-c", code, *args], check=False, timeout=timeout)
    try:
        data = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SystemExit(f"bench helper in {ns} failed: {res.stderr[-2000:]}") from None
    if isinstance(data, dict) and "error" in data:
        raise SystemExit(f"bench helper in {ns}: {data['error']}")
    return data


def _stamp(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def bench(n: int) -> dict[str, float]:
    """One N on a fresh bed; returns the figures in milliseconds / seconds."""
    bed = tb.Testbed()
    st = Stack(bed, controld_args=["--pcp-service-wait", "0", "--max-mappings-per-host", "0",
                                   "--max-mappings", "0", "--pcp-epoch-poll", "0", "--log-level", "info"])
    try:
        bed.setup()
        bed.start_nat2()
        nat2 = run_json(bed, "cpe", PCP_CLIENT, tb.ROUTER_WAN_IP, tb.ISP_INT_IP, str(n), str(BASE_PORT),
                        timeout=600)
        assert isinstance(nat2, dict)
        bed.restart_nat2()
        st.start()
        lat = run_json(bed, "lan", SOAP_CLIENT, st.controld_ip, str(n), str(BASE_PORT), timeout=1200)
        assert isinstance(lat, list)
        st.stop("controld")
        mark = len(st.log("controld"))
        t0 = time.time()
        st.start_controld()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # bounded wait for every re-assert
            renewed = [ln for ln in st.log("controld")[mark:].splitlines() if " renewed mapping " in ln]
            if len(renewed) >= n:
                break
            time.sleep(0.2)
        else:
            raise SystemExit(f"only {len(renewed)} of {n} mappings re-asserted in 600 s")
        reassert = _stamp(renewed[n - 1]) - t0
        up = next(ln for ln in st.log("controld")[mark:].splitlines() if "controld up:" in ln)
        return {"p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "total": sum(lat),
                "nat2_p50": pct(nat2["create"], 0.5), "nat2_p99": pct(nat2["create"], 0.99),
                "nat2_total": sum(nat2["create"]), "nat2_refresh_total": sum(nat2["refresh"]),
                "reassert": reassert, "start": _stamp(up) - t0}
    finally:
        st.close()
        bed.teardown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[100, 1000])
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("iwf_bench: needs root (network namespaces)")
    print(f"{'N':>5} | {'AddPortMapping p50/p99 (ms)':>28} | {'NAT2 alone p50/p99 (ms)':>24} | "
          f"{'all N adds (s)':>14} | {'NAT2 share (s)':>14} | {'re-assert N (s)':>15} | {'NAT2 refresh N (s)':>18}")
    for n in args.n:
        r = bench(n)
        print(f"{n:>5} | {r['p50']:>12.1f} / {r['p99']:<13.1f} | {r['nat2_p50']:>10.1f} / {r['nat2_p99']:<11.1f} | "
              f"{r['total']:>14.2f} | {r['nat2_total']:>14.2f} | {r['reassert']:>15.2f} | "
              f"{r['nat2_refresh_total']:>18.2f}", flush=True)
    print("NAT2 = real miniupnpd 2.3.1 as the provider's PCP server, same bed, same run; its share is its "
          "own sequential MAP round trip from the router namespace. Re-assert counts from controld's start "
          "(includes its start-up) and runs up to --pcp-recovery-window requests in flight.")


if __name__ == "__main__":
    main()
