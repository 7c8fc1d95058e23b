"""natd's netlink seam and conntrack cleanup: stdlib codec, no pyroute2, kernel-filtered deletes
(issues #11, #12, #14 item 9)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from natd import conntrack, ctnetlink
from natd.nft import CT_MARK
from shared import netlink as nl
from shared import wire
from shared.netif import read_addrs
from tests.bed import testbed as tb
from tests.bed.natd import conntrack as ct_list
from tests.bed.natd import ct_count, ct_fill, elements, python, reaches, wait_until

LAN = tb.LAN_HOST_IP
WAN = tb.ROUTER_WAN_IP


def test_daemons_import_no_pyroute2() -> None:
    """Neither daemon loads pyroute2 (its version differs per distribution; its import is ~22 MB)."""
    code = ("import sys, natd.main, controld.main, shared.netif; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pyroute2'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_netif_reads_loopback_and_absent_interfaces() -> None:
    lo = read_addrs("lo")
    assert "127.0.0.1" in lo.addresses and "127.0.0.0/8" in lo.subnets and lo.gateway is None
    assert read_addrs("no-such-if0") == read_addrs("") == type(lo)((), (), None)


def test_ct_tuple_codec_round_trip_and_dump_asks_the_kernel_to_filter_on_the_mark() -> None:
    t = ctnetlink.CtTuple(6, "100.64.0.1", "100.64.0.2", 40000, 20000)
    assert ctnetlink.decode_tuple(nl.attrs(ctnetlink.encode_tuple(ctnetlink.CTA_TUPLE_ORIG, t))[1]) == t
    t6 = ctnetlink.CtTuple(17, "2001:db8::1", "2001:db8::2", 1, 65535)
    assert ctnetlink.decode_tuple(nl.attrs(ctnetlink.encode_tuple(ctnetlink.CTA_TUPLE_REPLY, t6))[2]) == t6
    (m,) = nl.messages(ctnetlink.dump_request(socket.AF_INET, CT_MARK, CT_MARK))
    assert m.type == ctnetlink.IPCTNL_MSG_CT_GET and m.flags & nl.NLM_F_DUMP == nl.NLM_F_DUMP
    at = nl.attrs(m.payload, 4)
    assert at[ctnetlink.CTA_MARK] == at[ctnetlink.CTA_MARK_MASK] == CT_MARK.to_bytes(4, "big")
    # Truncated or hostile bytes end the walk, never raise.
    raw = ctnetlink.dump_request(socket.AF_INET, 1, 1)
    assert list(nl.messages(raw[:-3])) == [] and nl.attrs(b"\xff\xff\x01") == {}
    assert ctnetlink.decode_tuple(b"") is None and ctnetlink.decode_entry(m) is None


def test_doomed_takes_exactly_the_deleted_forwards_flows() -> None:
    T, E = ctnetlink.CtTuple, ctnetlink.CtEntry
    inbound = E(2, T(6, "198.51.100.7", WAN, 5555, 20000), T(6, LAN, "198.51.100.7", 8000, 5555))
    outbound = E(2, T(6, LAN, "198.51.100.7", 8000, 443), T(6, "198.51.100.7", WAN, 443, 20000))
    same_wan_port_new_forward = E(2, T(6, "198.51.100.7", WAN, 5556, 20000), T(6, "192.168.1.9", "198.51.100.7",
                                                                                 8000, 5556))
    other = E(2, T(17, "198.51.100.7", WAN, 5555, 20000), T(17, LAN, "198.51.100.7", 8000, 5555))
    flows = [conntrack.Flow(6, WAN, 20000, LAN, 8000)]
    assert conntrack.doomed([inbound, outbound, same_wan_port_new_forward, other], flows) == [inbound, outbound]


UDP_FROM = ("import socket,sys\nfor p in sys.argv[3:]:\n s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            " s.bind(('',int(p))); s.sendto(b'x',(sys.argv[1],int(sys.argv[2]))); s.close()")
UDP_SEND = ("import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); "
            "[s.sendto(b'x',(sys.argv[1],int(p))) for p in sys.argv[2:]]")


@pytest.mark.netns
def test_delete_ends_its_flows_among_30k_unrelated_entries_and_keeps_the_rest(natd_only) -> None:
    """30,000 unrelated flows in conntrack: a delete still ends the forward's established flows
    (found by the kernel through the forwards' conntrack mark), keeps another forward's flow
    and every unrelated entry."""
    st, c = natd_only()
    bed = st.bed
    assert c.call(wire.Bind(1, 6, LAN, 8000, 20000)) == wire.BindReply(WAN, 20000)
    assert c.call(wire.Bind(2, 17, LAN, 8001, 20001)) == wire.BindReply(WAN, 20001)
    assert c.call(wire.Bind(3, 17, LAN, 8002, 20002)) == wire.BindReply(WAN, 20002)
    ct_fill(bed, 30_000)
    assert reaches(bed, "isp", WAN, 20000, 8000) is not None
    bed.run("isp", [python(), "-c", UDP_SEND, WAN, "20001", "20002"])
    assert wait_until(lambda: "dport=20002" in ct_list(bed, "-p", "udp"), 2.0) is not None
    before = ct_count(bed)
    assert before >= 30_003
    # From the LAN: out of mapped port 8002 (SNAT through forward 3) and out of unmapped 7777.
    bed.run("lan", [python(), "-c", UDP_FROM, tb.ISP_INT_IP, "9999", "8002", "7777"])
    assert wait_until(lambda: "sport=7777" in ct_list(bed, "-p", "udp", "--orig-port-src", "7777"), 2.0) is not None
    marked = ct_list(bed, "-m", f"{CT_MARK}/{CT_MARK}")
    assert "dport=20000" in marked and "dport=20001" in marked and "sport=8002 dport=9999" in marked
    assert "sport=7777" not in marked and "198.51.100.1" not in marked  # only what a forward translated

    assert c.call(wire.Unbind(1)) == wire.Ok() and c.call(wire.Unbind(2)) == wire.Ok()
    gone = lambda: "dport=20000" not in ct_list(bed, "-p", "tcp") and "dport=20001" not in ct_list(bed, "-p", "udp")  # noqa: E731
    assert wait_until(gone, 3.0) is not None, ct_list(bed, "-m", str(CT_MARK))
    assert "dport=20002" in ct_list(bed, "-p", "udp") and "sport=8002 dport=9999" in ct_list(bed, "-p", "udp")
    assert ct_count(bed) >= 30_003
    assert elements(bed, "fwd4") == {("udp", 20002): (LAN, 8002)}
