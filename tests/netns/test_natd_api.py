"""natd's ZeroMQ API under attack and its transport guards (issue #5, docs/core.md Trust).

Random and mutated messages at a running natd: each gets a typed error reply, nothing
reaches the kernel, and natd keeps answering. ipc:// socket files are mode 0660 with
a dedicated group; tcp:// only with CURVE, refusing unauthenticated peers.
"""

from __future__ import annotations

import os
import random
import stat
import time

import msgpack
import pytest

from natd.client import NatdCallError
from shared import wire
from tests.bed import fuzz
from tests.bed import testbed as tb
from tests.bed.natd import elements, python

pytestmark = pytest.mark.netns

LAN = tb.LAN_HOST_IP


def _raw(**body: object) -> bytes:
    return msgpack.packb({"v": wire.SCHEMA_VERSION, **body}, use_bin_type=True)


def _refused(c, msg: wire.Message, code: str) -> None:
    with pytest.raises(NatdCallError) as exc:
        c.call(msg)
    assert exc.value.code == code, exc.value


def test_hostile_messages_get_typed_errors_and_natd_keeps_answering(natd_only) -> None:
    st, c = natd_only(natd_args=["--max-per-host", "2", "--max-bindings", "3"])
    bed = st.bed
    c.call(wire.Bind(1, 6, LAN, 80, 20080))
    kernel = elements(bed, "fwd4")

    # Policy: LAN subnets only (never the router, the WAN, loopback), TCP/UDP, limits.
    for ip in (tb.ROUTER_LAN_IP, tb.ROUTER_WAN_IP, "127.0.0.1", "10.1.2.3", "192.168.1.255", "192.168.1.0"):
        _refused(c, wire.Bind(2, 6, ip, 80, 20081), "not-lan")
    _refused(c, wire.Sync([wire.Binding(2, 17, LAN, 53, 5351)]), "reserved-port")
    c.call(wire.Bind(2, 6, LAN, 81, 20081))
    _refused(c, wire.Bind(3, 6, LAN, 82, 20082), "quota")  # per host
    c.call(wire.Bind(3, 6, "192.168.1.7", 82, 20082))
    _refused(c, wire.Bind(4, 6, "192.168.1.8", 83, 20083), "quota")  # total
    _refused(c, wire.Bind(5, 6, "192.168.1.8", 84, 20080, exact=True), "port-in-use")
    _refused(c, wire.Sync([wire.Binding(7, 6, LAN, 1, 30000), wire.Binding(7, 6, LAN, 2, 30001)]), "duplicate")
    with pytest.raises(NatdCallError) as exc:
        c.call(wire.Unbind(1), deadline_ms=int(time.time() * 1000) - 1000)
    assert exc.value.code == "deadline"
    kernel = elements(bed, "fwd4")
    assert set(kernel) == {("tcp", 20080), ("tcp", 20081), ("tcp", 20082)}  # the stale Unbind did nothing

    # Schema: every malformed request gets an Error reply carrying its id when readable.
    cases = [
        (_raw(op="bind", id=11, mid=9, proto=1, lan_ip=LAN, lan_port=1, want_port=1), "bad-field", 11),
        (_raw(op="bind", id=12, mid=0, proto=6, lan_ip=LAN, lan_port=1, want_port=1), "bad-field", 12),
        (_raw(op="bind", id=13, mid=9, proto=6, lan_ip="::1", lan_port=1, want_port=1), "bad-field", 13),
        (_raw(op="rm -rf", id=14), "bad-op", 14),
        (msgpack.packb({"v": 7, "op": "hello", "id": 15}), "version", 15),
        (_raw(op="sync", id=16, bindings=[{"mid": 1}] * 10), "bad-field", 16),
        (_raw(op="hello.reply", id=17, boot_id="x", wan_ip=None, gateway=None, lan_ips=[], lan_subnets=[]),
         "bad-op", 17),
        (b"\x91" * 5000, "bad-msgpack", None),  # deep nesting
        (b"", "bad-msgpack", None),
        (msgpack.packb([1, 2, 3]), "bad-msgpack", None),
    ]
    for data, code, rid in cases:
        c.send_raw(data)
        reply, got = wire.decode(c.recv_raw(5))
        assert isinstance(reply, wire.Error) and reply.code == code and got == rid, (data[:40], reply)
    c.send_raw(b"a", b"b")  # two frames
    assert wire.decode(c.recv_raw(5))[0] == wire.Error("bad-frames", "a request is exactly one frame")

    # Fuzz: random bytes and mutations of valid requests; every one answered, none applied.
    rng = random.Random(6)
    good = [wire.encode(m, 99) for m in (wire.Bind(9, 6, "192.168.1.9", 9, 29999), wire.Unbind(1),
                                         wire.Sync([wire.Binding(9, 6, "192.168.1.9", 9, 29999)]))]
    sent = 0
    for data in fuzz.cases(rng, good, 600):
        c.send_raw(data)
        sent += 1
    answered = sum(1 for _ in range(sent) if c.recv_raw(5) is not None)
    assert answered == sent
    assert st.procs["natd"].poll() is None
    assert c.call(wire.Hello()).wan_ip == tb.ROUTER_WAN_IP
    # Mutations may form valid requests; whatever the kernel holds obeys the policy.
    for (_proto, _port), (ip, _lport) in elements(bed, "fwd4").items():
        assert ip.startswith("192.168.1.") and ip not in (tb.ROUTER_LAN_IP, "192.168.1.0", "192.168.1.255")
    assert "Traceback" not in st.log("natd")


CLIENT = r"""
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0)
keys = sys.argv[2] if len(sys.argv) > 2 else ""
if keys:
    import zmq.auth
    pub, sec = zmq.auth.load_certificate(keys + "/client.key_secret")
    s.curve_publickey, s.curve_secretkey = pub, sec
    s.curve_serverkey = zmq.auth.load_certificate(keys + "/natd.key")[0]
s.connect(sys.argv[1])
sys.path.insert(0, sys.argv[3] if len(sys.argv) > 3 else ".")
from shared import wire
s.setsockopt(zmq.SNDTIMEO, 1500)  # DEALER send blocks while no handshake ever completes
try:
    s.send(wire.encode(wire.Hello(), 1))
    print("answered" if s.poll(1500) else "silent")
except zmq.Again:
    print("silent")
"""


def test_ipc_socket_is_0660_with_its_group(natd_only) -> None:
    st, c = natd_only(natd_args=["--ipc-group", "daemon"])
    for ep in (st.rpc, st.events):
        info = os.stat(ep[len("ipc://"):])
        assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == 1, oct(info.st_mode)
    # The bed's directory is private (mkdtemp); open it so only the socket file's mode decides.
    os.chmod(os.path.dirname(st.rpc[len("ipc://"):]), 0o755)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    as_user = ["setpriv", "--reuid=65534", "--regid=65534"]
    outsider = st.bed.run("cpe", [*as_user, "--clear-groups", python(), "-c", CLIENT, st.rpc, "", root])
    member = st.bed.run("cpe", [*as_user, "--groups=1", python(), "-c", CLIENT, st.rpc, "", root])
    assert (outsider.stdout.strip(), member.stdout.strip()) == ("silent", "answered"), outsider.stderr


def test_tcp_needs_curve_and_refuses_unknown_peers(natd_only, tmp_path) -> None:
    """controld in its own namespace reaches natd over tcp:// only with the installed keys."""
    import zmq.auth

    from shared.daemon import gen_keys
    from tests.bed.stack import StackError

    keys = str(tmp_path / "curve")
    gen_keys(keys)
    with pytest.raises(StackError, match="CURVE"):  # no keys: natd will not listen on tcp:// at all
        natd_only(transport="tcp", client=False)
    st, _ = natd_only(transport="tcp", curve_dir=keys, client=False)
    # A key natd never saw, a plain client without CURVE, and the installed controld key.
    stranger, known = str(tmp_path / "stranger"), str(tmp_path / "known")
    os.makedirs(stranger)
    os.makedirs(known)
    zmq.auth.create_certificates(stranger, "client")
    os.link(os.path.join(keys, "natd.key"), os.path.join(stranger, "natd.key"))
    for src, dst in (("controld.key_secret", "client.key_secret"), ("natd.key", "natd.key")):
        os.link(os.path.join(keys, src), os.path.join(known, dst))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def hello(key_dir: str) -> str:
        return st.bed.run("ctl", [python(), "-c", CLIENT, st.rpc, key_dir, root]).stdout.strip()

    assert (hello(""), hello(stranger), hello(known)) == ("silent", "silent", "answered")
    assert st.procs["natd"].poll() is None
    assert "natd up:" in st.log("natd")


def test_controld_in_its_own_namespace_maps_over_tcp_curve(make_testbed, tmp_path) -> None:
    """The split layout over tcp:// + CURVE: a real upnpc mapping still lands in NAT1."""
    from shared.daemon import gen_keys
    from tests.bed.stack import Stack

    keys = str(tmp_path / "curve")
    gen_keys(keys)
    st = Stack(make_testbed(), layout="split", transport="tcp", curve_dir=keys)
    try:
        st.start()
        add = st.upnpc("-a", LAN, "8010", "8090", "TCP")
        assert add.returncode == 0, add.stdout + st.log("controld")[-1500:]
        assert list(st.nat1_forwards().values()) == [(LAN, 8010)]
    finally:
        st.close()
