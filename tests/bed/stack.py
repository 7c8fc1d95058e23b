"""Run igdpcp's two daemons inside a :class:`tests.bed.testbed.Testbed` (demo and tests).

Two layouts, as the router may run them:
- ``router``: natd and controld both in the router namespace (controld on br-lan);
- ``split``: controld in a namespace of its own whose only interface is a LAN leg
  (no default route), talking to natd over ZeroMQ ipc:// through a socket file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tests.bed import testbed as tb

HTTP_PORT = 5000
NATD_TCP_PORTS = (7001, 7002)  # rpc, events when transport == "tcp"
LAYOUTS = ("router", "split")


class StackError(RuntimeError):
    """A daemon did not come up; the message carries the tail of its log."""


def daemon_argv(name: str) -> list[str]:
    """How to start ``natd`` or ``controld`` with this interpreter."""
    return [sys.executable, "-m", f"{name}.main"]


@dataclass
class Stack:
    bed: tb.Testbed
    layout: str = "router"
    mode: str = "auto"
    controld_args: Sequence[str] = ()
    natd_args: Sequence[str] = ()
    transport: str = "ipc"  # "tcp": natd on tcp://ROUTER_LAN_IP with CURVE keys in curve_dir
    curve_dir: str | None = None
    argv: dict[str, list[str]] = field(default_factory=lambda: {n: daemon_argv(n) for n in ("natd", "controld")})
    env: dict[str, str] = field(default_factory=dict)  # added to the daemons' environment (installed launchers)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def controld_ns(self) -> str:
        return "ctl" if self.layout == "split" else "cpe"

    @property
    def controld_ip(self) -> str:
        return tb.CTL_IP if self.layout == "split" else tb.ROUTER_LAN_IP

    @property
    def root_url(self) -> str:
        return f"http://{self.controld_ip}:{HTTP_PORT}/rootDesc.xml"

    @property
    def rpc(self) -> str:
        if self.transport == "tcp":
            return f"tcp://{tb.ROUTER_LAN_IP}:{NATD_TCP_PORTS[0]}"
        return f"ipc://{self.bed.path('natd-rpc.sock')}"

    @property
    def events(self) -> str:
        if self.transport == "tcp":
            return f"tcp://{tb.ROUTER_LAN_IP}:{NATD_TCP_PORTS[1]}"
        return f"ipc://{self.bed.path('natd-events.sock')}"

    def _curve_args(self) -> list[str]:
        return ["--curve-dir", self.curve_dir] if self.curve_dir else []

    @property
    def admin_socket(self) -> str:
        """controld's admin socket (``igdpcp host-left --socket``)."""
        return self.bed.path("controld-admin.sock")

    def log_path(self, name: str) -> str:
        return self.bed.path(f"{name}.log")

    def log(self, name: str) -> str:
        try:
            with open(self.log_path(name), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def start_natd(self, timeout: float = 15.0) -> None:
        argv = [*self.argv["natd"], "--wan-if", tb.ROUTER_WAN_IF, "--lan-if", tb.ROUTER_LAN_IF,
                "--rpc", self.rpc, "--events", self.events, *self._curve_args(), *self.natd_args]
        self._start("natd", "cpe", argv, "natd up:", timeout)

    def start_controld(self, timeout: float = 20.0) -> None:
        lan_if = tb.CTL_IF if self.layout == "split" else tb.ROUTER_LAN_IF
        argv = [*self.argv["controld"], "--lan-if", lan_if, "--rpc", self.rpc, "--events", self.events,
                "--state-dir", self.bed.path("state"), "--mode", self.mode, "--http-port", str(HTTP_PORT),
                "--admin-socket", self.admin_socket, "--pcp-server-file", self.bed.path("pcp-server"),
                *self._curve_args(), *self.controld_args]
        self._start("controld", self.controld_ns, argv, "controld up:", timeout)

    def start(self) -> Stack:
        """natd first (it owns the sockets), then controld."""
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}")
        self.start_natd()
        self.start_controld()
        return self

    def _start(self, name: str, ns: str, argv: list[str], ready: str, timeout: float) -> None:
        logf = open(self.log_path(name), "ab")
        start = os.path.getsize(self.log_path(name))
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.procs[name] = self.bed.popen(ns, argv, stdout=logf, stderr=subprocess.STDOUT, env=env)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # bounded wait for the daemon's "up" line
            if ready in self.log(name)[start:]:
                return
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.05)
        raise StackError(f"{name} did not start:\n{self.log(name)[-3000:]}")

    def stop(self, name: str, timeout: float = 10.0) -> int | None:
        """SIGTERM ``name`` and wait; returns its exit code."""
        p = self.procs.pop(name, None)
        if p is None:
            return None
        p.terminate()
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            return p.wait(5)

    def kill(self, name: str) -> None:
        """SIGKILL ``name`` (crash simulation)."""
        p = self.procs.pop(name, None)
        if p is not None:
            p.kill()
            p.wait(5)

    def close(self) -> None:
        for name in ("controld", "natd"):
            self.stop(name)

    def upnpc(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run the real ``upnpc`` on the LAN host against this router's description URL."""
        return self.bed.run("lan", ["upnpc", "-u", self.root_url, *args], check=False, timeout=timeout)

    def nat1_forwards(self) -> dict[tuple[str, int], tuple[str, int]]:
        """natd's DNAT map in the router, as {(proto, wan port): (lan ip, lan port)}."""
        import json

        out = self.bed.run("cpe", ["nft", "-j", "list", "map", "ip", "igdpcp", "fwd4"], check=False)
        if out.returncode != 0:
            return {}
        res: dict[tuple[str, int], tuple[str, int]] = {}
        for item in json.loads(out.stdout)["nftables"]:
            for key, val in item.get("map", {}).get("elem", []):
                res[(key["concat"][0], int(key["concat"][1]))] = (val["concat"][0], int(val["concat"][1]))
        return res
