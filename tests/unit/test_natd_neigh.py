"""natd's neighbour-table answer to neigh.same_host (natd/neigh.py), on dumps captured from a kernel.

The captures: router 02:00:00:00:00:0a (192.168.1.1, 2001:db8:1::1) and a host 02:00:00:00:00:0b
(192.168.1.2, 2001:db8:1::2) on one veth (ifindex 10), after natd's solicitation of .2, ::2 and
the absent 192.168.1.9 (INCOMPLETE), plus a PERMANENT 2001:db8:1::7 -> 02:00:00:00:00:0c and the
kernel's NOARP multicast entries.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from natd import neigh
from shared import netlink as nl
from shared import wire

DUMP4 = bytes.fromhex(
    "4c0000001c00020001000000b2760000020000000a0000000200000108000100c0a801020a00020002000000000b0000"
    "08000400040000001400030040000000400000004000000001000000400000001c00020001000000b276000002000000"
    "0a0000000100000108000100c0a80109080004000400000014000300b0170000400000004000000001000000140000000300"
    "020001000000b276000000000000")
DUMP6 = bytes.fromhex(
    "580000001c00020001000000b67600000a0000000a0000004000000514000100ff0200000000000000000000000000160a00"
    "02003333000000160000080004000000000014000300cd1800005d0100005d01000000000000580000001c00020001000000"
    "b67600000a0000000a000000020000011400010020010db80001000000000000000000020a00020002000000000b00000800"
    "0400040000001400030052000000520000005200000001000000580000001c00020001000000b67600000a0000000a000000"
    "4000000514000100ff0200000000000000000001ff00000a0a0002003333ff00000a00000800040000000000140003008718"
    "0000170100001701000000000000580000001c00020001000000b67600000a0000000a0000004000000514000100ff020000"
    "0000000000000001ff0000020a0002003333ff0000020000080004000000000014000300c217000052000000520000000000"
    "0000580000001c00020001000000b67600000a0000000a000000800000011400010020010db8000100000000000000000007"
    "0a00020002000000000c00000800040000000000140003002a0000002a0000002a00000000000000580000001c0002000100"
    "0000b67600000a0000000a0000004000000514000100ff0200000000000000000000000000020a0002003333000000020000"
    "08000400000000001400030020180000b0000000b000000000000000140000000300020001000000b676000000000000")
ip = ipaddress.ip_address
HOST = b"\x02\x00\x00\x00\x00\x0b"


def test_decodes_a_captured_dump_keeping_only_usable_entries_of_the_interface() -> None:
    msgs = [*nl.messages(DUMP4), *nl.messages(DUMP6)]
    decoded = [n for n in map(neigh.decode, msgs) if n is not None]
    states = {str(n.ip): n.state for n in decoded}
    assert states["192.168.1.2"] == neigh.NUD_REACHABLE and states["192.168.1.9"] == neigh.NUD_INCOMPLETE
    assert states["2001:db8:1::7"] == neigh.NUD_PERMANENT and states["ff02::16"] == neigh.NUD_NOARP
    table = neigh.usable_table(msgs, 10)
    assert table == {ip("192.168.1.2"): HOST, ip("2001:db8:1::2"): HOST, ip("2001:db8:1::7"): b"\x02\0\0\0\0\x0c"}
    assert neigh.usable_table(msgs, 11) == {}  # another interface's entries never count


@pytest.mark.parametrize(("a", "b", "same"), [
    ("192.168.1.2", "2001:db8:1::2", True),  # one MAC: the host's IPv4 and IPv6 addresses
    ("192.168.1.2", "2001:db8:1::7", False),  # another host
    ("192.168.1.9", "2001:db8:1::2", None),  # INCOMPLETE: not known yet
    ("192.168.1.2", "2001:db8:1::99", None),  # no entry
])
def test_verdict(a: str, b: str, same: bool | None) -> None:
    table = neigh.usable_table([*nl.messages(DUMP4), *nl.messages(DUMP6)], 10)
    assert neigh.verdict(table, ip(a), ip(b)) is same


def test_failed_and_zero_lladdr_entries_are_not_usable() -> None:
    assert not neigh.Neighbour(10, ip("192.168.1.2"), HOST, neigh.NUD_FAILED).usable
    assert not neigh.Neighbour(10, ip("192.168.1.2"), b"\0" * 6, neigh.NUD_REACHABLE).usable
    assert not neigh.Neighbour(10, ip("192.168.1.2"), b"", neigh.NUD_PERMANENT).usable
    for state in (neigh.NUD_STALE, neigh.NUD_DELAY, neigh.NUD_PROBE, neigh.NUD_PERMANENT):
        assert neigh.Neighbour(10, ip("192.168.1.2"), HOST, state).usable


def test_truncated_or_foreign_messages_decode_to_nothing() -> None:
    assert list(nl.messages(DUMP4[:-5]))[-1].type == neigh.RTM_NEWNEIGH  # the cut DONE is dropped
    assert neigh.decode(nl.Msg(neigh.RTM_NEWNEIGH, 0, 1, b"\x02\0")) is None  # shorter than ndmsg
    bridge = nl.Msg(neigh.RTM_NEWNEIGH, 0, 1, bytes([socket.AF_BRIDGE]) + next(nl.messages(DUMP4)).payload[1:])
    assert neigh.decode(bridge) is None  # an FDB entry, not an IP neighbour
    wrong_len = nl.Msg(neigh.RTM_NEWNEIGH, 0, 1, next(nl.messages(DUMP6)).payload[:12] + nl.attr(neigh.NDA_DST, b"\1"))
    assert neigh.decode(wrong_len) is None
    (req,) = nl.messages(neigh.dump_request(socket.AF_INET6))
    assert req.type == neigh.RTM_GETNEIGH and req.flags & nl.NLM_F_DUMP == nl.NLM_F_DUMP and req.payload[0] == 10


def test_equal_addresses_answer_at_once_and_mapped_ipv4_is_ipv4() -> None:
    check = neigh.SameHostCheck(lambda: "lo", lambda: [])
    assert check.handle(wire.SameHost("2001:db8:1:0::2", "2001:db8:1::2")) == wire.SameHostReply(True)
    assert check.handle(wire.SameHost("::ffff:192.168.1.2", "192.168.1.2")) == wire.SameHostReply(True)


def test_unknown_addresses_are_solicited_once_inside_the_lan_within_budget(monkeypatch) -> None:
    now = [0.0]
    check = neigh.SameHostCheck(lambda: "lo", lambda: [ipaddress.ip_network("2001:db8:1::/64")], lambda: now[0])
    assert check._may_solicit(ip("2001:db8:1::2"))
    assert not check._may_solicit(ip("2001:db8:1::2"))  # once per SOLICIT_AGAIN_S
    assert not check._may_solicit(ip("2001:db8:2::2")) and not check._may_solicit(ip("192.168.1.2"))  # not LAN
    now[0] += neigh.SOLICIT_AGAIN_S
    assert check._may_solicit(ip("2001:db8:1::2"))
    allowed = sum(check._may_solicit(ip(f"2001:db8:1::{i + 16:x}")) for i in range(100))
    assert allowed == neigh.SOLICIT_BURST - 1  # the overall budget per window
    now[0] += 100
    monkeypatch.setattr(neigh, "MAX_RECENT", 40)
    check.limit = neigh.RateLimit(1000, 1.0)
    assert sum(check._may_solicit(ip(f"2001:db8:1::1:{i:x}")) for i in range(100)) == 40  # bounded memory
    assert len(check.recent) == 40


def test_a_dump_on_this_machine_is_read_and_bounded() -> None:
    """A real dump through the loop (loopback has no neighbours), within its timeout."""
    table = asyncio.run(neigh.read_table(socket.if_nametoindex("lo"), (socket.AF_INET, socket.AF_INET6)))
    assert table == {}
    reply = asyncio.run(_answer(neigh.SameHostCheck(lambda: "no-such-if0", lambda: []), "192.168.1.2", "::2"))
    assert reply == wire.SameHostReply(False)


async def _answer(check: neigh.SameHostCheck, a: str, b: str) -> wire.Message:
    out = check.handle(wire.SameHost(a, b))
    return out if isinstance(out, wire.Message) else await out


@pytest.mark.parametrize("raw", [
    {"v": 2, "op": "neigh.same_host", "a": "192.168.1.2", "b": "not-an-ip"},
    {"v": 2, "op": "neigh.same_host", "a": "192.168.1.2"},
    {"v": 2, "op": "neigh.same_host", "a": 3, "b": "::1"},
    {"v": 2, "op": "neigh.same_host", "a": "192.168.1.2", "b": "::1", "mac": "aa"},
    {"v": 2, "op": "neigh.same_host.reply", "same": "yes"},
])
def test_malformed_requests_are_typed_wire_errors(raw: dict) -> None:
    import msgpack

    with pytest.raises(wire.WireError) as err:
        wire.decode(msgpack.packb(raw))
    assert err.value.code == "bad-field"
    assert wire.decode(wire.encode(wire.SameHost("192.168.1.2", "2001:db8:1::2"), 7)) == \
        (wire.SameHost("192.168.1.2", "2001:db8:1::2"), 7)
