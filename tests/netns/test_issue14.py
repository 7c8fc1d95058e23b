"""Issue 14's numbered findings, each reproduced from outside the daemons (a hostile LAN host, a
forger on the WAN, an unlucky operator) on the namespace bed.

A finding not fixed yet is ``xfail(strict=True)``: main stays green, and the fix makes it
pass, which fails the run until the marker is removed. Only public interfaces are used
(tests/netns/faults_helpers.py), so the tests survive the daemons' rewrite.
"""

from __future__ import annotations

import os
import time

import pytest

from shared import pcp
from tests.netns import faults_helpers as h

pytestmark = pytest.mark.netns


def _cp_stack(igd, control_point, n: int = 0, **kw):
    st = igd(**kw)
    cp = control_point(st.bed)
    for i in range(n):
        assert cp.add(8100 + i, 9100 + i) == (200, None)
    return st, cp


def test_1_unknown_xml_encodings_do_not_end_upnp(igd, control_point) -> None:
    """70 requests whose XML declaration names an encoding Python cannot look up: each is
    refused, and the 71st, normal one is still served (the slots are freed)."""
    st, cp = _cp_stack(igd, control_point)
    for i, enc in enumerate(("x-unknown", "rot13", "no-such-codec") * 24):
        resp = cp.client.tcp(h.tb.ROUTER_LAN_IP, h.HTTP_PORT, h.encoded_soap("GetExternalIPAddress", enc),
                             timeout=5)[0]
        assert h.status_of(resp) in (400, 500), (i, enc, resp[:200])
    status, body = cp.soap("GetExternalIPAddress")
    assert status == 200, body
    assert st.procs["controld"].poll() is None


def test_2_one_slow_host_does_not_starve_another(igd) -> None:
    """A LAN host holds 80 connections sending one header byte a second (the issue saw 64 end
    service; tests/netns/test_floods.py holds 1,000); another LAN host's every request is
    served within 1 s."""
    st = igd()
    slow = h.Background(st.bed, "lan", {"op": "slowloris", "host": h.tb.ROUTER_LAN_IP, "port": h.HTTP_PORT,
                                        "n": 80, "drip": 1.0, "duration": 8.0, "limit": 30})
    try:
        assert slow.first_line()["ready"] >= 64
        res = h.probe(st.bed, "ctl", duration=4.0, interval=0.2, timeout=3.0).result()["results"]
    finally:
        slow.stop()
    assert res and all(s == 200 for s, _ in res), res
    assert max(t for _, t in res) < 1.0, res


def test_3_disk_full_leaves_nothing_half_made(igd, control_point) -> None:
    """controld's state dir is full: adds fail with an error, nothing they half-made stays in
    NAT1, NAT2 or the table; once space returns the same ports can be added (no restart)."""
    st = igd(state_kib=1024)
    cp = control_point(st.bed)
    assert cp.add(8100, 9100) == (200, None)
    st.tmpfs.fill(leave_kib=8)  # room for a first save, not a second
    results = {port: cp.add(port, port + 1000) for port in range(8200, 8240)}
    failed = [p for p, (s, _) in results.items() if s != 200]
    assert failed, "the disk never got full"
    st.tmpfs.free()
    listed, problems = h.wait_agree(st, cp, 10)
    assert not problems, problems
    for port in failed:
        assert cp.add(port, port + 1000) == (200, None), port
    assert not h.agreement(st, cp)[1]
    assert h.reaches(st.bed, failed[-1] + 1000, failed[-1])
    assert st.procs["controld"].poll() is None


def test_4_delete_while_nat2_unreachable_is_retried(igd, control_point) -> None:
    """NAT2 is away during DeletePortMapping; once it is back (with its leases) the mapping is
    deleted there too, without the control point asking again."""
    st, cp = _cp_stack(igd, control_point, n=2, controld_args=["--pcp-timeout", "3"])
    assert set(h.nat2_map(st.bed)) == {("tcp", 8100), ("tcp", 8101)}
    st.bed.stop_nat2()  # keeps its lease file: it comes back holding both mappings
    cp.delete(8100)
    st.bed.start_nat2()
    assert h.wait_for(lambda: ("tcp", 8100) not in h.nat2_map(st.bed), 20), h.nat2_map(st.bed)
    assert ("tcp", 8101) in h.nat2_map(st.bed)


def test_5_forged_response_with_wrong_nonce_causes_no_recovery(igd, control_point) -> None:
    """A MAP response for a real NAT1 binding with an unknown nonce and a lost-state Epoch, from
    the PCP server's address to natd's PCP socket, is dropped before any epoch processing
    (RFC 6887 §8.4, §8.5): no MAP reaches NAT2."""
    st, cp = _cp_stack(igd, control_point, n=5)
    h.count_pcp_at_nat2(st.bed)
    port = h.natd_wan_port(st)
    nat1_port = next(p for (proto, p), lan in st.nat1_forwards().items() if lan == (h.LAN, 9100))
    # An Epoch far ahead of the time passed is a server that lost state (RFC 6887 §8.5) if it is believed.
    forged = h.map_response(os.urandom(12), pcp.PROTO_TCP, nat1_port, 8100, epoch=h.nat2_epoch(st.bed) + 1000)
    h.forge(st.bed, "isp", (h.SERVER, pcp.SERVER_PORT), (h.WAN, port), [forged], count=3, interval=0.2)
    time.sleep(7)
    assert h.pcp_seen(st.bed, "maps") == 0, st.log("controld")[-2000:]
    assert not h.agreement(st, cp)[1]


def test_6_forged_unsupp_version_does_not_turn_pcp_off(igd, control_point) -> None:
    """UNSUPP_VERSION answers (they carry no nonce) forged while an AddPortMapping is in
    flight may spoil that one add, not PCP: once the forger stops, the next add succeeds."""
    st, cp = _cp_stack(igd, control_point, n=1)
    port = h.natd_wan_port(st)
    flood = h.forge_background(st.bed, "isp", (h.SERVER, pcp.SERVER_PORT), (h.WAN, port),
                               [h.unsupp_version(h.nat2_epoch(st.bed))], count=1500, interval=0.001)
    time.sleep(0.3)
    for i in range(3):
        cp.add(8201 + i, 9201 + i)  # raced by the forgeries: either answer is fine
    flood.result(30)
    assert cp.add(8200, 9200) == (200, None), st.log("controld")[-2000:]
    assert h.reaches(st.bed, 9200, 8200)


def test_7_announce_from_a_lan_host_is_ignored(igd, control_point) -> None:
    """An ANNOUNCE forged by a LAN host with the PCP server's address and port, sent to the
    router's client port 5350 on either address, starts no recovery (it did not arrive on the WAN)."""
    st, _ = _cp_stack(igd, control_point, n=5)
    h.count_pcp_at_nat2(st.bed)
    for dst in (h.tb.ROUTER_LAN_IP, h.WAN):
        h.forge(st.bed, "lan", (h.SERVER, pcp.SERVER_PORT), (dst, h.CLIENT_PORT),
                [h.announce(h.nat2_epoch(st.bed) + 1000)])
    time.sleep(7)  # a real ANNOUNCE is acted on after a random 0-5 s (RFC 6887 §14.1.3)
    assert h.pcp_seen(st.bed, "maps") == 0, st.log("controld")[-2000:]


def test_8_mapping_update_onto_another_mappings_port(igd, control_point) -> None:
    """An on-path Mapping Update (right nonce, read here from the table) moving mapping A's
    external port onto mapping B's: no port is listed twice and deleting B removes B."""
    st, cp = _cp_stack(igd, control_point, n=2)
    rows = {r["ext_port"]: r for r in h.table_rows(st) or []}
    a = rows[8100]
    update = h.map_response(a["nonce"], pcp.PROTO_TCP, a["nat1_port"], 8101, epoch=h.nat2_epoch(st.bed))
    h.forge(st.bed, "isp", (h.SERVER, pcp.SERVER_PORT), (h.WAN, h.CLIENT_PORT), [update])
    time.sleep(1)
    listed = cp.listing()
    assert len({(p, e) for p, e, _, _ in listed}) == len(listed), listed
    assert cp.delete(8101) == (200, None)
    assert [(e, ip, ip_port) for _, e, ip, ip_port in cp.listing()] == [(8100, h.LAN, 9100)]


def test_9_natd_answers_promptly_while_deleting_with_conntrack_entries(igd, control_point) -> None:
    """20 UDP mappings with ~1,000 conntrack entries each are deleted while a second API client
    says Hello to natd every 10 ms: natd's p99 stays under 50 ms, as it would with no kernel
    walk on natd's loop (the issue measured 210-246 ms with 2,000 entries; main's batched
    dump hides that at 2,000, and 20,000 shows 0.66-0.96 s on the bed)."""
    st, cp = _cp_stack(igd, control_point)
    for i in range(20):
        assert cp.add(8100 + i, 9100 + i, "UDP") == (200, None)
    wan_ports = [p for (proto, p) in st.nat1_forwards() if proto == "udp"]
    h.agent(st.bed, "isp", {"op": "spray", "host": h.WAN, "ports": wan_ports, "per": 1000}, timeout=60)
    assert int(st.bed.run("cpe", ["conntrack", "-C"]).stdout.strip() or 0) >= 15000
    c = h.natd_client(st)
    lat: list[float] = []
    try:
        dels = h.Background(st.bed, "lan", {"op": "requests", "host": h.tb.ROUTER_LAN_IP, "port": h.HTTP_PORT,
                                            "data": [_delete_req(8100 + i, "UDP").hex() for i in range(20)],
                                            "timeout": 10})
        end = time.monotonic() + 30
        while dels.proc.poll() is None and time.monotonic() < end:
            lat.append(h.natd_hello(c))
            time.sleep(0.01)
        settle = time.monotonic() + 2  # natd may forget the flows after answering the deletes
        while time.monotonic() < settle:
            lat.append(h.natd_hello(c))
            time.sleep(0.01)
        assert all(s == 200 for s, _, _ in dels.result(30)["results"])
    finally:
        c.close()
    assert h.p99(lat) < 0.05, (h.p99(lat), max(lat), len(lat))


def _delete_req(port: int, proto: str = "TCP") -> bytes:
    headers = {"SOAPACTION": f'"{h.WANIP1}#DeletePortMapping"', "Content-Type": "text/xml"}
    return h.http_request("POST", "/ctl/WANIPCn", h.HOST, headers, h.soap_envelope(
        "DeletePortMapping", {"NewRemoteHost": "", "NewExternalPort": str(port), "NewProtocol": proto}))


def test_10a_bare_lf_in_request_target_forges_no_log_line(igd, control_point) -> None:
    st, cp = _cp_stack(igd, control_point)
    before = h.log_size(st, "controld")
    marker = "FORGED-BY-LAN:deleted-every-mapping"
    req = f"GET /x\n{marker} HTTP/1.1\r\nHost: {h.HOST}\r\n\r\n".encode()
    resp = cp.client.tcp(h.tb.ROUTER_LAN_IP, h.HTTP_PORT, req)[0]
    assert h.status_of(resp) in (400, 404)
    time.sleep(0.3)
    lines = [ln for ln in h.log_lines(st, "controld", before) if marker in ln]
    assert all(" controld[" in ln and h.LAN in ln for ln in lines), lines


def test_10b_ssdp_listens_on_the_lan_only(igd) -> None:
    st = igd()
    socks = h.udp_listeners(st.bed, st.controld_ns, 1900)
    assert socks and not any(a.startswith(("0.0.0.0:", "*:")) for a in socks), socks


def test_10c_forged_pcp_packets_do_not_flood_natds_log(igd, control_point) -> None:
    """500 malformed and forged packets from the server's address at natd's PCP sockets leave
    at most a few dozen log lines."""
    st, _ = _cp_stack(igd, control_point, n=1)
    port = h.natd_wan_port(st)
    before = h.log_size(st, "natd")
    junk = [b"\x02\x81\x00\x00" + os.urandom(20), os.urandom(60), h.map_response(os.urandom(12), 6, 1, 1, 0)]
    for dst in ((h.WAN, port), (h.WAN, h.CLIENT_PORT)):
        h.forge(st.bed, "isp", (h.SERVER, pcp.SERVER_PORT), dst, junk, count=250)
    time.sleep(0.5)
    assert len(h.log_lines(st, "natd", before)) <= 50, h.log_lines(st, "natd", before)[-5:]
    assert len(h.log_lines(st, "controld", 0)) < 500
    assert st.procs["natd"].poll() is None


def test_10d_announce_flood_is_coalesced(igd, control_point) -> None:
    """20 genuine-looking ANNOUNCEs in 2 s (allowed by RFC 6887 §14.1.3) make at least one and at
    most two recoveries of the 5 mappings (one, and at most one restart of it)."""
    st, _ = _cp_stack(igd, control_point, n=5)
    h.count_pcp_at_nat2(st.bed)
    epoch = h.nat2_epoch(st.bed)
    h.forge(st.bed, "isp", (h.SERVER, pcp.SERVER_PORT), (h.WAN, h.CLIENT_PORT),
            [h.announce(epoch + 1000 * (i + 1)) for i in range(20)], count=20, interval=0.1)
    time.sleep(8)
    assert 5 <= h.pcp_seen(st.bed, "maps") <= 2 * 5, (h.pcp_seen(st.bed, "maps"), st.log("controld")[-3000:])


# ------------------------------------------------------------------ held: keep them held
CALLBACK_FORMS = [  # every form names a target other than the subscriber (192.168.1.2) itself
    f"<http://{h.tb.INET_HOST_IP}/>", f"<http://{h.OTHER_LAN}:4000/>", f"<http://{h.tb.ROUTER_LAN_IP}:5000/>",
    "<http://127.0.0.1:5000/>", "<http://0.0.0.0/>", "<http://192.168.1.255/>", "<http://attacker.example/>",
    f"<http://{h.LAN}.nip.io/>", f"<http://{h.LAN}@{h.tb.INET_HOST_IP}/>", "<http://3323461642/>",
    "<http://0xc6.0x14.0x0.0xa/>", "<http://0306.024.0.012/>", f"<http://[::ffff:{h.tb.INET_HOST_IP}]/>",
    f"<https://{h.tb.INET_HOST_IP}/>", "<file:///etc/passwd>", f"<gopher://{h.tb.INET_HOST_IP}:25/>",
    f"<http://{h.LAN}:4000/><http://{h.tb.INET_HOST_IP}/>",
]


def test_held_callstranger_every_callback_form_is_refused(igd) -> None:
    """Held in issue 14: 17 CALLBACK forms aimed anywhere but the subscriber are refused
    (412, or 400 for those that are not a callback at all); a list whose first URL is the
    subscriber may be accepted, but no NOTIFY ever reaches the Internet host."""
    st = igd()
    inet = st.bed.tcp_listen("inet", 80, timeout=30)
    c = h.NsClient(st.bed, "lan")
    try:
        for cb in CALLBACK_FORMS:
            req = h.http_request("SUBSCRIBE", "/evt/WANIPCn", h.HOST, {"NT": "upnp:event", "CALLBACK": cb,
                                                                       "TIMEOUT": "Second-300"})
            resp = c.tcp(h.tb.ROUTER_LAN_IP, h.HTTP_PORT, req)[0]
            if cb.startswith(f"<http://{h.LAN}:"):
                assert h.status_of(resp) in (200, 400, 412), (cb, resp[:200])
            else:
                assert h.status_of(resp) in (400, 412) and b"SID:" not in resp.upper(), (cb, resp[:200])
        time.sleep(2)  # the initial NOTIFY of an accepted subscription goes out at once
    finally:
        c.close()
    assert inet.received(timeout=0.5) == b"" and inet.peer(timeout=0.5) is None
