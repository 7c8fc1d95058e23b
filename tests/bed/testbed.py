"""Network-namespace test bed for igdpcp: a LAN, a router, a provider CGN and the Internet.

The bed reproduces the cascaded NAT scenario igdpcp is written for, entirely inside
network namespaces (nothing is left in the root namespace, all traffic stays between
the test hosts' own addresses)::

    {p}-lan   eth0 192.168.1.2/24 (default via 192.168.1.1)      -- a LAN host
    {p}-ctl   eth0 192.168.1.3/24 (no default route)             -- controld's own namespace
    {p}-cpe   br-lan 192.168.1.1/24 (ports: veth-lan, veth-ctl)  -- the router (NAT1)
              wan0 100.64.0.2/24, default via 100.64.0.1, masquerade (table ip testbed_fw)
    {p}-isp   int0 100.64.0.1/24, ext0 198.20.0.1/24              -- provider NAT2 (CGN):
              masquerade 100.64.0.0/10 out of ext0 (table ip testbed_cgn) and a real
              miniupnpd as PCP / NAT-PMP server (table inet miniupnpd)
    {p}-inet  eth0 198.20.0.10/24 (connected route only)          -- an Internet host

``p`` is ``"ig"`` plus six random hex digits, so runs can overlap.

Use it as a context manager (``with Testbed() as bed: ...``) or call :meth:`Testbed.setup`
and :meth:`Testbed.teardown` yourself; teardown is idempotent and also runs when setup
fails halfway.  ``python -m tests.bed.testbed`` builds a bed, starts NAT2 and waits for
Ctrl-C, for poking at it by hand.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any, BinaryIO, NamedTuple

from shared import const

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# Addresses and interface names (the same in every bed; only namespace names differ).
# --------------------------------------------------------------------------------------
LAN_SUBNET = "192.168.1.0/24"
LAN_HOST_IP = "192.168.1.2"
ROUTER_LAN_IP = "192.168.1.1"
CTL_IP = "192.168.1.3"
ROUTER_WAN_IP = "100.64.0.2"
ISP_INT_IP = "100.64.0.1"
NAT2_PUBLIC_IP = "198.20.0.1"
INET_HOST_IP = "198.20.0.10"
CGN_SUBNET = "100.64.0.0/10"
WAN_SUBNET = "100.64.0.0/24"
INET_SUBNET = "198.20.0.0/24"
SSDP_GROUP = const.SSDP_GROUP
# IPv6 (opt-in: Testbed(ipv6=True) or bed.setup_ipv6()): routed end to end, no NAT, as a
# provider delegating a prefix to the router. Documentation prefixes (RFC 3849), reachable only
# inside the bed's namespaces; nothing in igdpcp may refuse them for not being global.
LAN6_PREFIX = "2001:db8:1::/64"
LAN_HOST_IP6 = "2001:db8:1::2"
ROUTER_LAN_IP6 = "2001:db8:1::1"
ROUTER_WAN_IP6 = "2001:db8:64::2"
ISP_INT_IP6 = "2001:db8:64::1"
ISP_EXT_IP6 = "2001:db8:20::1"
INET_HOST_IP6 = "2001:db8:20::10"

ROUTER_LAN_IF = "br-lan"
ROUTER_WAN_IF = "wan0"
CTL_IF = "eth0"
LAN_HOST_IF = "eth0"
INET_HOST_IF = "eth0"
ISP_INT_IF = "int0"
ISP_EXT_IF = "ext0"
ROUTER_LAN_PORT_LAN = "veth-lan"  # bridge port towards the LAN host
ROUTER_LAN_PORT_CTL = "veth-ctl"  # bridge port towards the ctl namespace

PCP_PORT = const.PCP_SERVER_PORT

# nft objects the bed creates.
ROUTER_FW_TABLE = "testbed_fw"  # family ip, in {p}-cpe
CGN_TABLE = "testbed_cgn"  # family ip, in {p}-isp
NAT2_TABLE = "miniupnpd"  # family inet, in {p}-isp, driven by miniupnpd
NAT2_FORWARD_CHAIN = "miniupnpd"
NAT2_DNAT_CHAIN = "prerouting_miniupnpd"
NAT2_SNAT_CHAIN = "postrouting_miniupnpd"

HOSTS = ("lan", "cpe", "ctl", "isp", "inet")
MINIUPNPD = "/usr/sbin/miniupnpd"

_PROTO_NAMES = {num: name.lower() for num, name in const.PROTO_NAMES.items()}  # nft spelling
_PROTO_NUMBERS = {name: num for num, name in _PROTO_NAMES.items()}


class CommandError(subprocess.CalledProcessError):
    """A command failed; unlike CalledProcessError its message includes stderr."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip() if isinstance(self.stderr, str) else self.stderr
        return f"{super().__str__()} stderr: {err!r}"


class TestbedError(RuntimeError):
    """The bed could not be built or a helper process misbehaved."""

    __test__ = False  # not a pytest test class


class DnatRule(NamedTuple):
    """One port mapping as NAT2's miniupnpd installed it (a DNAT rule)."""

    proto: str  # "tcp" or "udp"
    ext_port: int
    int_ip: str
    int_port: int


def new_prefix() -> str:
    """A fresh bed prefix: ``"ig"`` plus six random hex digits."""
    return "ig" + secrets.token_hex(3)


def list_namespaces() -> list[str]:
    """Names of all network namespaces known to ``ip netns`` (root namespace view)."""
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10,
                         check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def netns_available() -> str | None:
    """Return None when namespace beds can run here, else a human-readable reason."""
    if os.geteuid() != 0:
        return "the namespace test bed needs root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed"
    try:
        res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"'ip netns' unavailable: {exc}"
    if res.returncode != 0:
        return f"'ip netns' unavailable: {res.stderr.strip()}"
    return None


# --------------------------------------------------------------------------------------
# Small helper programs run inside the namespaces (with this interpreter).
# --------------------------------------------------------------------------------------
_LISTEN_SCRIPT = r"""
import json, os, signal, socket, struct, sys, time
mode, host, port, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
timeout, group = float(sys.argv[5]), sys.argv[6]
def _stop(signum, frame):
    raise SystemExit(0)
signal.signal(signal.SIGTERM, _stop)
result = {"peer": None, "data": "", "error": None}
chunks = []
try:
    deadline = time.monotonic() + timeout
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    if mode == "tcp":
        s = socket.socket(fam, socket.SOCK_STREAM)
    else:
        s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    if mode == "tcp":
        s.listen(1)
    elif group:
        mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("0.0.0.0"))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    s.settimeout(timeout)
    if mode == "tcp":
        c, peer = s.accept()
        result["peer"] = [peer[0], peer[1]]
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            c.settimeout(left)
            b = c.recv(65536)
            if not b:
                break
            chunks.append(b)
    else:
        b, peer = s.recvfrom(65535)
        result["peer"] = [peer[0], peer[1]]
        chunks.append(b)
except (OSError, SystemExit) as exc:
    if not isinstance(exc, SystemExit):
        result["error"] = repr(exc)
finally:
    result["data"] = b"".join(chunks).hex()
    with open(out + ".tmp", "w") as f:
        json.dump(result, f)
    os.rename(out + ".tmp", out)
"""

_SEND_SCRIPT = r"""
import socket, sys
host, port, timeout, source = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
data = sys.stdin.buffer.read()
try:
    s = socket.create_connection((host, port), timeout=timeout,
                                 source_address=(source, 0) if source else None)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    s.close()
except OSError as exc:
    sys.stderr.write(repr(exc) + "\n")
    sys.exit(1)
"""

_UDP_SCRIPT = r"""
import socket, sys
host, port, timeout, bhost, bport = (sys.argv[1], int(sys.argv[2]), float(sys.argv[3]),
                                     sys.argv[4], int(sys.argv[5]))
data = bytes.fromhex(sys.stdin.read().strip())
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::" if ":" in host and bhost == "0.0.0.0" else bhost, bport))
s.settimeout(timeout)
s.sendto(data, (host, port))
if timeout <= 0:
    sys.exit(0)
try:
    reply, peer = s.recvfrom(65535)
except socket.timeout:
    sys.exit(3)
sys.stdout.write(reply.hex() + "\n")
"""


_REAPER_SCRIPT = r"""
# Launch a daemonizing program as a child subreaper, so the daemon becomes our child
# when its launcher exits, and reap it when it ends.  SIGTERM/SIGINT are ignored: the
# daemon is stopped by its own pid; we exit once no child is left.
import ctypes, os, signal, subprocess, sys
PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
launcher = subprocess.Popen(sys.argv[1:], restore_signals=True,
                            preexec_fn=lambda: (signal.signal(signal.SIGTERM, signal.SIG_DFL),
                                                signal.signal(signal.SIGINT, signal.SIG_DFL)))
rc = launcher.wait()
if rc != 0:
    sys.stderr.write(f"launcher exited with {rc}\n")
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
    except InterruptedError:
        continue
sys.exit(rc)
"""


class Listener:
    """A one-shot receiver inside a namespace (see :meth:`Testbed.tcp_listen` and
    :meth:`Testbed.udp_listen`)."""

    def __init__(self, proc: subprocess.Popen, result_path: str, ns: str, host: str,
                 port: int) -> None:
        self.proc = proc
        self.result_path = result_path
        self.ns = ns
        self.host = host
        self.port = port
        self._result: dict[str, Any] | None = None

    def _finish(self, timeout: float) -> dict[str, Any]:
        if self._result is not None:
            return self._result
        try:
            self.proc.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            self.proc.terminate()  # the script writes what it has on SIGTERM
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=3)
        try:
            with open(self.result_path) as f:
                self._result = json.load(f)
        except (OSError, ValueError):
            self._result = {"peer": None, "data": "", "error": "listener left no result"}
        if self._result.get("error"):
            log.debug("listener %s:%s in %s: %s", self.host, self.port, self.ns,
                      self._result["error"])
        return self._result

    def received(self, timeout: float = 5.0) -> bytes:
        """TCP: the bytes the one accepted connection delivered (until EOF or the
        listener's own timeout); UDP: the first datagram.  b"" when nothing came.
        Waits at most ``timeout`` seconds for the listener to finish, then stops it."""
        return bytes.fromhex(self._finish(timeout).get("data") or "")

    def peer(self, timeout: float = 5.0) -> tuple[str, int] | None:
        """(address, port) of the connecting client as this namespace saw it, or None."""
        p = self._finish(timeout).get("peer")
        return (p[0], int(p[1])) if p else None

    def close(self) -> None:
        """Stop the listener now (idempotent)."""
        self._finish(0)


class TcpListener(Listener):
    """One-shot TCP server: accepts ONE connection and records what it sends."""


class UdpListener(Listener):
    """One-shot UDP receiver: records the first datagram (optionally multicast)."""


# Beds still alive at interpreter exit are torn down (e.g. after KeyboardInterrupt).
_LIVE: set[Testbed] = set()


@atexit.register
def _teardown_leftovers() -> None:
    for bed in list(_LIVE):
        try:
            bed.teardown()
        except Exception:  # pragma: no cover - best effort at exit
            log.exception("teardown at exit failed for %s", bed.prefix)


class Testbed:
    """The five-namespace cascaded-NAT bed (see the module docstring).

    ``prefix`` defaults to :func:`new_prefix`; ``workdir`` is the parent directory of
    the bed's own temporary directory (default: the system temp dir), which holds the
    miniupnpd config, pid and lease files and helper output, and is removed at teardown.
    ``nat2_min_lifetime``/``nat2_max_lifetime`` become miniupnpd's ``min_lifetime`` /
    ``max_lifetime`` (PCP and NAT-PMP lifetimes are clamped into that range).
    ``nat2_debug`` runs miniupnpd with ``-d`` (foreground, debug log in the temp dir):
    for debugging only, it is two orders of magnitude slower.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, prefix: str | None = None, workdir: str | None = None,
                 nat2_min_lifetime: int = 120, nat2_max_lifetime: int = 86400,
                 nat2_debug: bool = False, ipv6: bool = False) -> None:
        self.prefix = prefix or new_prefix()
        if len(self.prefix) > 20:
            raise ValueError("prefix too long")
        if nat2_min_lifetime < 1 or nat2_max_lifetime <= nat2_min_lifetime:
            raise ValueError("need 1 <= nat2_min_lifetime < nat2_max_lifetime")
        self._workdir_parent = workdir
        self.workdir: str | None = None
        self.nat2_min_lifetime = nat2_min_lifetime
        self.nat2_max_lifetime = nat2_max_lifetime
        self.nat2_debug = nat2_debug
        self.ipv6 = ipv6
        self._ipv6_up = False
        self.nat2_uuid = str(uuid.uuid4())
        self._procs: list[subprocess.Popen] = []
        self._procs_lock = threading.Lock()
        self._nat2_pid: int | None = None
        self._nat2_proc: subprocess.Popen | None = None
        self._nat2_log: BinaryIO | None = None
        self._set_up = False
        self._torn_down = False
        self._seq = 0

    # ---------------------------------------------------------------- basics
    def __enter__(self) -> Testbed:
        self.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def __repr__(self) -> str:
        return f"<Testbed {self.prefix}>"

    def ns(self, name: str) -> str:
        """Full namespace name for ``"lan"``, ``"cpe"``, ``"ctl"``, ``"isp"`` or ``"inet"``
        (a full name of this bed is returned unchanged)."""
        if name in HOSTS:
            return f"{self.prefix}-{name}"
        if name.startswith(self.prefix + "-") and name[len(self.prefix) + 1:] in HOSTS:
            return name
        raise ValueError(f"unknown test bed host {name!r} (expected one of {HOSTS})")

    @property
    def namespaces(self) -> list[str]:
        """All five namespace names of this bed."""
        return [self.ns(h) for h in HOSTS]

    def path(self, name: str) -> str:
        """A path inside the bed's temporary directory."""
        if self.workdir is None:
            raise TestbedError("bed not set up")
        return os.path.join(self.workdir, name)

    def _host_run(self, argv: Sequence[str], check: bool = True, timeout: float = 30,
                  input: str | None = None) -> subprocess.CompletedProcess:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                             input=input, check=False)
        if check and res.returncode != 0:
            raise CommandError(res.returncode, list(argv), res.stdout, res.stderr)
        return res

    def run(self, name: str, argv: Sequence[str], check: bool = True, timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` in namespace ``name`` via ``ip netns exec``; text output captured.

        Raises :class:`CommandError` (a CalledProcessError) on a non-zero exit when
        ``check``, and subprocess.TimeoutExpired after ``timeout`` seconds."""
        return self._host_run(["ip", "netns", "exec", self.ns(name), *argv], check=check,
                              timeout=timeout, input=input)

    def nft(self, name: str, script: str, check: bool = True) -> subprocess.CompletedProcess:
        """Load an nft script (``nft -f -``) in namespace ``name``."""
        return self.run(name, ["nft", "-f", "-"], check=check, input=script)

    def popen(self, name: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start ``argv`` in namespace ``name``; the process (and its process group: a
        new session is the default) is killed at teardown."""
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(name), *argv], **kw)
        with self._procs_lock:
            self._procs.append(proc)
        log.debug("%s: started pid %d in %s: %s", self.prefix, proc.pid, name, list(argv))
        return proc

    # ---------------------------------------------------------------- setup
    def setup(self) -> Testbed:
        """Build the namespaces, links, addresses, routes and firewalls (NAT2's miniupnpd
        is started separately by :meth:`start_nat2`).  On failure everything made so far
        is torn down and the error re-raised."""
        if self._set_up:
            return self
        if self._torn_down:
            raise TestbedError("a torn-down bed cannot be set up again")
        t0 = time.monotonic()
        _LIVE.add(self)
        try:
            self.workdir = tempfile.mkdtemp(prefix=f"{self.prefix}-", dir=self._workdir_parent)
            self._setup_namespaces()
            self._setup_links()
            self._setup_addresses()
            self._setup_firewalls()
            self._wait_links_up()
            if self.ipv6:
                self.setup_ipv6()
        except BaseException:
            log.error("%s: setup failed, tearing down", self.prefix)
            self.teardown()
            raise
        self._set_up = True
        log.info("%s: test bed up in %.2fs (workdir %s)", self.prefix, time.monotonic() - t0,
                 self.workdir)
        return self

    def _setup_namespaces(self) -> None:
        for ns in self.namespaces:
            self._host_run(["ip", "netns", "add", ns])

    def _ip(self, name: str, *args: str) -> None:
        self._host_run(["ip", "-n", self.ns(name), *args])

    def _setup_links(self) -> None:
        # Each veth is created inside one namespace with its peer created directly in
        # the other: nothing ever appears in the root namespace.  Explicit, distinct
        # ifindexes: a veth whose ifindex equals its peer's (both would be 2 in fresh
        # namespaces) counts as a non-urgent link-watch event, and the kernel then
        # activates it only up to a second later, dropping packets meanwhile.
        veths = [  # (host, ifname, index, peer host, peer ifname, peer index)
            ("lan", LAN_HOST_IF, 10, "cpe", ROUTER_LAN_PORT_LAN, 11),
            ("ctl", CTL_IF, 12, "cpe", ROUTER_LAN_PORT_CTL, 13),
            ("cpe", ROUTER_WAN_IF, 14, "isp", ISP_INT_IF, 15),
            ("isp", ISP_EXT_IF, 16, "inet", INET_HOST_IF, 17),
        ]
        for host, ifname, index, peer_host, peer_ifname, peer_index in veths:
            self._ip(host, "link", "add", ifname, "index", str(index), "type", "veth",
                     "peer", "name", peer_ifname, "index", str(peer_index),
                     "netns", self.ns(peer_host))
        self._ip("cpe", "link", "add", ROUTER_LAN_IF, "index", "20", "type", "bridge",
                 "stp_state", "0", "forward_delay", "0")
        # SSDP multicast must cross the bridge between the LAN host and ctl.
        self._ip("cpe", "link", "set", ROUTER_LAN_IF, "type", "bridge", "mcast_snooping", "0")
        for port in (ROUTER_LAN_PORT_LAN, ROUTER_LAN_PORT_CTL):
            self._ip("cpe", "link", "set", port, "master", ROUTER_LAN_IF)

    def _setup_addresses(self) -> None:
        links = {
            "lan": [LAN_HOST_IF],
            "ctl": [CTL_IF],
            "cpe": [ROUTER_LAN_PORT_LAN, ROUTER_LAN_PORT_CTL, ROUTER_LAN_IF, ROUTER_WAN_IF],
            "isp": [ISP_INT_IF, ISP_EXT_IF],
            "inet": [INET_HOST_IF],
        }
        for name, ifs in links.items():
            self._ip(name, "link", "set", "lo", "up")
            for ifname in ifs:
                self._ip(name, "link", "set", ifname, "up")
        self._ip("lan", "addr", "add", f"{LAN_HOST_IP}/24", "dev", LAN_HOST_IF)
        self._ip("lan", "route", "add", "default", "via", ROUTER_LAN_IP)
        self._ip("lan", "route", "add", "224.0.0.0/4", "dev", LAN_HOST_IF)
        self._ip("ctl", "addr", "add", f"{CTL_IP}/24", "dev", CTL_IF)
        self._ip("ctl", "route", "add", "224.0.0.0/4", "dev", CTL_IF)
        self._ip("cpe", "addr", "add", f"{ROUTER_LAN_IP}/24", "dev", ROUTER_LAN_IF)
        self._ip("cpe", "addr", "add", f"{ROUTER_WAN_IP}/24", "dev", ROUTER_WAN_IF)
        self._ip("cpe", "route", "add", "default", "via", ISP_INT_IP)
        self._ip("isp", "addr", "add", f"{ISP_INT_IP}/24", "dev", ISP_INT_IF)
        self._ip("isp", "addr", "add", f"{NAT2_PUBLIC_IP}/24", "dev", ISP_EXT_IF)
        self._ip("inet", "addr", "add", f"{INET_HOST_IP}/24", "dev", INET_HOST_IF)
        for name in ("cpe", "isp"):
            self.run(name, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])

    def _setup_firewalls(self) -> None:
        # The router's ordinary outbound NAT, as fw4 would do it.
        self.nft("cpe", f"""
table ip {ROUTER_FW_TABLE} {{
    chain srcnat {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{ROUTER_WAN_IF}" ip saddr {LAN_SUBNET} masquerade
    }}
}}
""")
        # Provider NAT2: masquerade the CGN range, forward outbound, inbound only for
        # established flows and what miniupnpd's filter chain accepts.
        self.nft("isp", f"""
table ip {CGN_TABLE} {{
    chain srcnat {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{ISP_EXT_IF}" ip saddr {CGN_SUBNET} masquerade
    }}
}}
table inet {NAT2_TABLE} {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "{ISP_INT_IF}" oifname "{ISP_EXT_IF}" accept
        jump {NAT2_FORWARD_CHAIN}
    }}
    chain {NAT2_FORWARD_CHAIN} {{
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        jump {NAT2_DNAT_CHAIN}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        jump {NAT2_SNAT_CHAIN}
    }}
    chain {NAT2_DNAT_CHAIN} {{
    }}
    chain {NAT2_SNAT_CHAIN} {{
    }}
}}
""")

    def setup_ipv6(self) -> None:
        """Add IPv6 (see LAN6_PREFIX): the LAN host's global address routed by the router, the
        provider routing the prefix to the router and forwarding IPv6 unfiltered (no CGN for
        IPv6), the Internet host reaching the LAN only through whatever the router allows.
        Idempotent; the router itself has no IPv6 firewall here (natd's or fw4's is the test)."""
        if self._ipv6_up:
            return
        for name, addr, dev in (("lan", LAN_HOST_IP6, LAN_HOST_IF), ("cpe", ROUTER_LAN_IP6, ROUTER_LAN_IF),
                                ("cpe", ROUTER_WAN_IP6, ROUTER_WAN_IF), ("isp", ISP_INT_IP6, ISP_INT_IF),
                                ("isp", ISP_EXT_IP6, ISP_EXT_IF), ("inet", INET_HOST_IP6, INET_HOST_IF)):
            self._ip(name, "-6", "addr", "add", f"{addr}/64", "dev", dev, "nodad")
        for name, via in (("lan", ROUTER_LAN_IP6), ("cpe", ISP_INT_IP6), ("inet", ISP_EXT_IP6)):
            self._ip(name, "-6", "route", "add", "default", "via", via)
        self._ip("isp", "-6", "route", "add", LAN6_PREFIX, "via", ROUTER_WAN_IP6)
        for name in ("cpe", "isp"):
            self.run(name, ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
        # NAT2's forward chain drops what miniupnpd does not open; IPv6 is routed, not its business.
        self.nft("isp", f'insert rule inet {NAT2_TABLE} forward meta nfproto ipv6 accept comment "routed IPv6"\n')
        self._wait_ipv6_ready()
        self._ipv6_up = True

    def _wait_ipv6_ready(self, timeout: float = 5.0) -> None:
        """Until link-local addresses leave DAD (tentative) a host cannot solicit neighbours,
        and the first SYN of a test gets lost."""
        deadline = time.monotonic() + timeout
        for name in HOSTS:
            while self._host_run(["ip", "-n", self.ns(name), "-6", "addr", "show", "tentative"]).stdout.strip():
                if time.monotonic() > deadline:
                    raise TestbedError(f"IPv6 addresses in {name} still tentative after {timeout}s")
                time.sleep(0.05)

    def _wait_links_up(self, timeout: float = 5.0) -> None:
        """Wait until every link is operationally UP.  Carrier (LOWER_UP) is not enough:
        until the kernel's link watch (rate-limited to about once a second) activates a
        device, its qdisc drops packets, which costs the first TCP SYN a 1 s retransmit."""
        deadline = time.monotonic() + timeout
        pending = list(HOSTS)
        while True:
            still: list[str] = []
            for name in pending:
                out = self._host_run(["ip", "-n", self.ns(name), "-j", "link", "show"])
                down = [i["ifname"] for i in json.loads(out.stdout)
                        if i["ifname"] != "lo" and i.get("operstate") != "UP"]
                if down:
                    still.append(f"{name}:{','.join(down)}")
            if not still:
                return
            if time.monotonic() > deadline:
                raise TestbedError(f"links not up after {timeout}s: {still}")
            pending = [p.split(":", 1)[0] for p in still]
            time.sleep(0.02)

    # ---------------------------------------------------------------- NAT2 (miniupnpd)
    def nat2_config(self) -> str:
        """The miniupnpd config NAT2 runs with."""
        return "\n".join([
            f"ext_ifname={ISP_EXT_IF}",
            f"listening_ip={ISP_INT_IF}",
            "enable_upnp=no",
            "http_port=0",
            "enable_natpmp=yes",  # PCP and NAT-PMP (2.3.1 has no separate PCP switch)
            "secure_mode=no",
            "system_uptime=no",
            "ipv6_disable=yes",  # IPv4-only bed (no IPv6 PCP socket, no v6 ANNOUNCE)
            f"min_lifetime={self.nat2_min_lifetime}",
            f"max_lifetime={self.nat2_max_lifetime}",
            "pcp_allow_thirdparty=yes",
            f"uuid={self.nat2_uuid}",
            f"lease_file={self.path('nat2.leases')}",
            f"upnp_table_name={NAT2_TABLE}",
            f"upnp_nat_table_name={NAT2_TABLE}",
            f"upnp_forward_chain={NAT2_FORWARD_CHAIN}",
            f"upnp_nat_chain={NAT2_DNAT_CHAIN}",
            f"upnp_nat_postrouting_chain={NAT2_SNAT_CHAIN}",
            f"allow 1024-65535 {CGN_SUBNET} 1-65535",
            "deny 0-65535 0.0.0.0/0 0-65535",
            "",
        ])

    @property
    def nat2_pid(self) -> int | None:
        """Pid of the running NAT2 miniupnpd, or None."""
        if self._nat2_pid is not None and pid_alive(self._nat2_pid):
            return self._nat2_pid
        return None

    def nat2_running(self) -> bool:
        """True while NAT2's miniupnpd process exists."""
        return self.nat2_pid is not None

    def start_nat2(self, timeout: float = 10.0) -> int:
        """Start miniupnpd as NAT2's PCP/NAT-PMP server in ``{p}-isp``; return its pid
        once it listens on UDP 5351.  No-op (returns the pid) when already running.

        miniupnpd has no foreground mode without ``-d`` (debug logging), so it
        daemonizes; a small wrapper that is a child subreaper launches it, so the daemon
        is reaped as soon as it exits instead of lingering as a zombie of PID 1.  The
        daemon is tracked by its pid file."""
        if not self._set_up:
            raise TestbedError("bed not set up")
        if self.nat2_running():
            return self._nat2_pid  # type: ignore[return-value]
        self._nat2_reap()
        conf = self.path("nat2.conf")
        pidfile = self.path("nat2.pid")
        with open(conf, "w") as f:
            f.write(self.nat2_config())
        if os.path.exists(pidfile):
            os.unlink(pidfile)
        wrapper = self._script("reaper", _REAPER_SCRIPT)
        argv = [sys.executable, wrapper, MINIUPNPD, "-f", conf, "-P", pidfile]
        if self.nat2_debug:
            argv.append("-d")
        t0 = time.monotonic()
        deadline = t0 + timeout
        self._nat2_log = open(self.path("nat2.log"), "ab")
        self._nat2_proc = self.popen("isp", argv, stdin=subprocess.DEVNULL,
                                     stdout=self._nat2_log, stderr=subprocess.STDOUT)
        pid = None
        while pid is None or not _udp_bound(pid, PCP_PORT):
            if pid is None:
                pid = _read_pidfile(pidfile)
                self._nat2_pid = pid
            if (pid is not None and not pid_alive(pid)) or (
                    pid is None and self._nat2_proc.poll() is not None):
                self._signal_nat2(signal.SIGKILL, 3.0)
                raise TestbedError("miniupnpd exited during start-up" + self._nat2_log_tail())
            if time.monotonic() > deadline:
                self._signal_nat2(signal.SIGKILL, 3.0)
                raise TestbedError(f"miniupnpd not listening on {PCP_PORT} after {timeout}s"
                                   + self._nat2_log_tail())
            time.sleep(0.005)
        log.info("%s: NAT2 miniupnpd pid %d up in %.3fs", self.prefix, pid,
                 time.monotonic() - t0)
        return pid

    def _nat2_log_tail(self) -> str:
        text = ""
        if self.workdir is not None:
            try:
                with open(self.path("nat2.log"), errors="replace") as f:
                    text = " | ".join(f.read().splitlines()[-10:])
            except OSError:
                pass
        hint = "" if self.nat2_debug else " (miniupnpd logs to syslog; nat2_debug=True shows it)"
        return (f": {text}" if text else "") + hint

    def stop_nat2(self, timeout: float = 5.0) -> None:
        """Stop NAT2's miniupnpd with SIGTERM and wait (SIGKILL after ``timeout``).
        Its nft rules and lease file stay as miniupnpd leaves them (a later
        :meth:`start_nat2` reloads the leases); :meth:`restart_nat2` wipes them."""
        self._signal_nat2(signal.SIGTERM, timeout)

    def kill_nat2(self) -> None:
        """Kill NAT2's miniupnpd with SIGKILL (a crash: its rules stay in nft)."""
        self._signal_nat2(signal.SIGKILL, 3.0)

    def _signal_nat2(self, sig: int, timeout: float) -> None:
        pid = self.nat2_pid
        if pid is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
            if not _wait_gone(pid, timeout) and sig != signal.SIGKILL:
                log.warning("%s: miniupnpd %d ignored signal %d, killing", self.prefix, pid,
                            sig)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _wait_gone(pid, 3.0)
        self._nat2_pid = None
        self._nat2_reap()

    def _nat2_reap(self) -> None:
        """Collect the wrapper (it exits once the daemon is gone) and close the log."""
        if self._nat2_proc is not None:
            try:
                self._nat2_proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                _stop_proc(self._nat2_proc)
            with self._procs_lock:
                if self._nat2_proc in self._procs:
                    self._procs.remove(self._nat2_proc)
            self._nat2_proc = None
        if self._nat2_log is not None:
            self._nat2_log.close()
            self._nat2_log = None

    def restart_nat2(self) -> int:
        """Restart NAT2 with total state loss, like a CGN reboot: stop miniupnpd, remove
        its lease file, flush its nft chains, start it again (new PCP epoch, no mappings).
        Returns the new pid."""
        self.stop_nat2()
        self.flush_nat2_rules()
        try:
            os.unlink(self.path("nat2.leases"))
        except FileNotFoundError:
            pass
        return self.start_nat2()

    def flush_nat2_rules(self) -> None:
        """Empty miniupnpd's three chains in ``{p}-isp``."""
        self.nft("isp", "".join(f"flush chain inet {NAT2_TABLE} {c}\n" for c in
                                (NAT2_FORWARD_CHAIN, NAT2_DNAT_CHAIN, NAT2_SNAT_CHAIN)))

    def nat2_dnat_rules(self) -> list[DnatRule]:
        """NAT2's current port mappings, parsed from miniupnpd's DNAT chain
        (``nft -j list chain``): DnatRule(proto, ext_port, int_ip, int_port) tuples."""
        res = self.run("isp", ["nft", "-j", "list", "chain", "inet", NAT2_TABLE,
                               NAT2_DNAT_CHAIN])
        return parse_dnat_rules(json.loads(res.stdout))

    # ---------------------------------------------------------------- traffic helpers
    def _script(self, name: str, body: str) -> str:
        path = self.path(f"{name}.py")
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write(body)
        return path

    def _listen(self, mode: str, name: str, port: int, host: str, timeout: float,
                group: str | None) -> tuple[subprocess.Popen, str]:
        script = self._script("listen", _LISTEN_SCRIPT)
        self._seq += 1
        out = self.path(f"listen-{self._seq}.json")
        proc = self.popen(name, [sys.executable, script, mode, host, str(port), out,
                                 str(timeout), group or ""],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10.0)
        line = proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            proc.kill()
            _, err = proc.communicate(timeout=5)
            raise TestbedError(f"{mode} listener {host}:{port} in {name} failed: "
                               f"{err.decode(errors='replace').strip()}")
        return proc, out

    def tcp_listen(self, name: str, port: int, host: str = "0.0.0.0",
                   timeout: float = 30.0) -> TcpListener:
        """Listen on ``host:port`` (TCP) in namespace ``name``; accept ONE connection and
        record what it sends.  Returns once the socket listens.  The listener gives up
        after ``timeout`` seconds; read the result with ``handle.received(timeout)`` and
        the client's address with ``handle.peer()``."""
        proc, out = self._listen("tcp", name, port, host, timeout, None)
        return TcpListener(proc, out, self.ns(name), host, port)

    def udp_listen(self, name: str, port: int, host: str = "0.0.0.0",
                   group: str | None = None, timeout: float = 30.0) -> UdpListener:
        """Bind UDP ``host:port`` in namespace ``name`` (joining multicast ``group`` if
        given, e.g. SSDP's 239.255.255.250) and record the first datagram."""
        proc, out = self._listen("udp", name, port, host, timeout, group)
        return UdpListener(proc, out, self.ns(name), host, port)

    def internet_reaches(self, lan_port: int, ext_port: int, payload: bytes = b"hello through both NATs",
                         timeout: float = 3.0) -> bool:
        """Does a TCP connection from the Internet host to NAT2's public address and
        ``ext_port`` deliver ``payload`` to a listener on the LAN host's ``lan_port``?"""
        listener = self.tcp_listen("lan", lan_port, timeout=timeout + 2)
        sent = self.tcp_send("inet", NAT2_PUBLIC_IP, ext_port, payload, timeout=timeout)
        got = listener.received(timeout=timeout if sent else 0.5)
        listener.close()
        return sent and got == payload

    def tcp_in6(self, port: int, dst: str = LAN_HOST_IP6, src: str = "inet",
                payload: bytes = b"through the pinhole", timeout: float = 2.0) -> bool:
        """Does a TCP connection from ``src`` (the Internet host) to a LAN host's global IPv6
        address ``dst``:``port`` deliver ``payload`` to a listener on the LAN host?"""
        listener = self.tcp_listen("lan", port, host="::", timeout=timeout + 2)
        sent = self.tcp_send(src, dst, port, payload, timeout=timeout)
        got = listener.received(timeout=timeout if sent else 0.3)
        listener.close()
        return sent and got == payload

    def tcp_send(self, name: str, host: str, port: int, payload: bytes,
                 timeout: float = 5.0, source: str | None = None) -> bool:
        """Connect from namespace ``name`` to ``host:port``, send ``payload`` and close.
        True on success, False on refusal, unreachability or timeout; never takes much
        longer than ``timeout`` (the helper is killed at ``timeout``)."""
        script = self._script("tcp_send", _SEND_SCRIPT)
        inner = max(0.1, timeout - 0.5) if timeout > 1 else max(0.05, timeout * 0.7)
        argv = ["ip", "netns", "exec", self.ns(name), sys.executable, script, host,
                str(port), str(inner), source or ""]
        try:
            res = subprocess.run(argv, input=payload, capture_output=True, timeout=timeout,
                                 check=False)
        except subprocess.TimeoutExpired:
            log.debug("tcp_send %s -> %s:%d timed out", name, host, port)
            return False
        if res.returncode != 0:
            log.debug("tcp_send %s -> %s:%d failed: %s", name, host, port,
                      res.stderr.decode(errors="replace").strip())
        return res.returncode == 0

    def udp_exchange(self, name: str, host: str, port: int, payload: bytes,
                     bind: tuple[str, int] = ("0.0.0.0", 0),
                     timeout: float = 2.0) -> bytes | None:
        """Send one UDP datagram from namespace ``name`` (socket bound to ``bind``) to
        ``host:port`` and return the first reply, or None when none came in ``timeout``."""
        return self._udp(name, host, port, payload, bind, timeout)

    def udp_send(self, name: str, host: str, port: int, payload: bytes,
                 bind: tuple[str, int] = ("0.0.0.0", 0)) -> None:
        """Send one UDP datagram (unicast or multicast) from namespace ``name``."""
        self._udp(name, host, port, payload, bind, 0.0)

    def _udp(self, name: str, host: str, port: int, payload: bytes, bind: tuple[str, int],
             timeout: float) -> bytes | None:
        script = self._script("udp_exchange", _UDP_SCRIPT)
        argv = ["ip", "netns", "exec", self.ns(name), sys.executable, script, host,
                str(port), str(timeout), bind[0], str(bind[1])]
        try:
            res = subprocess.run(argv, input=payload.hex(), capture_output=True, text=True,
                                 timeout=timeout + 5, check=False)
        except subprocess.TimeoutExpired:
            return None
        if res.returncode == 3:
            return None
        if res.returncode != 0:
            raise TestbedError(f"UDP to {host}:{port} from {name} failed: "
                               f"{res.stderr.strip()}")
        return bytes.fromhex(res.stdout.strip()) if timeout > 0 else None

    # ---------------------------------------------------------------- teardown
    def teardown(self) -> None:
        """Kill every tracked process and anything still running in the bed's namespaces,
        delete the namespaces and the temporary directory.  Idempotent; safe after a
        half-done setup."""
        if self._torn_down:
            return
        self._torn_down = True
        t0 = time.monotonic()
        try:
            self._signal_nat2(signal.SIGTERM, 2.0)
        except Exception:
            log.exception("%s: stopping NAT2 failed", self.prefix)
        with self._procs_lock:
            procs, self._procs = self._procs, []
        for proc in procs:
            _stop_proc(proc)
        for ns in self.namespaces:
            try:
                self._kill_ns_pids(ns)
            except Exception:
                log.exception("%s: killing processes in %s failed", self.prefix, ns)
            res = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True,
                                 timeout=10, check=False)
            if res.returncode != 0 and "No such file" not in res.stderr:
                log.warning("%s: ip netns del %s: %s", self.prefix, ns, res.stderr.strip())
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self._set_up = False
        _LIVE.discard(self)
        log.info("%s: torn down in %.2fs", self.prefix, time.monotonic() - t0)

    def _kill_ns_pids(self, ns: str, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        sig = signal.SIGTERM
        while True:
            res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                 timeout=10, check=False)
            pids = [int(p) for p in res.stdout.split() if p.isdigit() and int(p) != os.getpid()]
            if res.returncode != 0 or not pids:
                return
            for pid in pids:
                log.debug("%s: %s pid %d still in %s", self.prefix,
                          "terminating" if sig == signal.SIGTERM else "killing", pid, ns)
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                log.warning("%s: processes %s survive in %s", self.prefix, pids, ns)
                return
            time.sleep(0.05)
            sig = signal.SIGKILL


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie.  (The daemonized miniupnpd is reparented
    to PID 1, which may reap it late: a dead NAT2 can linger as a zombie.)"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` is gone (or a zombie); False on timeout."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _read_pidfile(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _udp_bound(pid: int | None, port: int) -> bool:
    """True if the network namespace of ``pid`` has a UDP socket bound to ``port``."""
    if pid is None:
        return False
    want = f":{port:04X}"
    try:
        with open(f"/proc/{pid}/net/udp") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[1].endswith(want) for line in lines if len(line.split()) > 1)


def _stop_proc(proc: subprocess.Popen, timeout: float = 2.0) -> None:
    """Terminate a process we started (its process group if it leads one), then kill."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 3.0)):
            try:
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, sig)
                else:
                    proc.send_signal(sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def parse_dnat_rules(nft_json: dict) -> list[DnatRule]:
    """Extract DnatRule tuples from ``nft -j list chain ...`` output of a miniupnpd DNAT
    chain (rules matching a protocol and destination port and ending in ``dnat``)."""
    rules: list[DnatRule] = []
    for item in nft_json.get("nftables", []):
        rule = item.get("rule")
        if not rule:
            continue
        proto: str | None = None
        dport: int | None = None
        to_ip: str | None = None
        to_port: int | None = None
        for expr in rule.get("expr", []):
            if "match" in expr:
                m = expr["match"]
                left, right = m.get("left"), m.get("right")
                if not isinstance(left, dict):
                    continue
                if "payload" in left:
                    p = left["payload"]
                    if p.get("field") == "dport" and isinstance(right, int):
                        dport = right
                        if p.get("protocol") in _PROTO_NUMBERS:
                            proto = p["protocol"]
                    elif p.get("protocol") == "ip" and p.get("field") == "protocol":
                        proto = _proto_name(right)
                    elif (p.get("base") == "nh" and p.get("offset") == 72
                          and p.get("len") == 8):
                        proto = _proto_name(right)  # raw "@nh,72,8": the IPv4 protocol
                elif "meta" in left and left["meta"].get("key") in ("l4proto", "protocol"):
                    proto = _proto_name(right)
            elif "dnat" in expr:
                d = expr["dnat"] or {}
                to_ip = d.get("addr")
                to_port = d.get("port")
        if dport is not None and to_ip is not None and proto is not None:
            rules.append(DnatRule(proto, int(dport), str(to_ip),
                                  int(to_port) if to_port is not None else int(dport)))
    return rules


def _proto_name(value: Any) -> str | None:
    if isinstance(value, str):
        return value if value in _PROTO_NUMBERS else None
    if isinstance(value, int):
        return _PROTO_NAMES.get(value)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.bed.testbed``: build a bed with NAT2, log its names, wait for
    Ctrl-C (or ``--seconds N``), tear down."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--nat2-debug", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    reason = netns_available()
    if reason:
        log.error("%s", reason)
        return 2
    with Testbed(prefix=args.prefix, nat2_debug=args.nat2_debug) as bed:
        bed.start_nat2()
        log.info("namespaces: %s", " ".join(bed.namespaces))
        log.info("e.g. ip netns exec %s bash", bed.ns("lan"))
        try:
            deadline = None if args.seconds is None else time.monotonic() + args.seconds
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
