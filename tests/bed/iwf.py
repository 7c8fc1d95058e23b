"""The interworking core in process, with natd and NAT2 scripted (no namespaces).

``ScriptedLink`` stands in for controld's natd link: binds succeed and PCP requests are
answered by tests/bed/fake_pcp.py's rules; subclasses override :meth:`ScriptedLink.answer`
(NAT2's reply) or ``call`` (natd's). What tests assert is what the core asked natd to send
upstream (``sent``, decoded) and what the front end got back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controld.core.model import Mapping
from controld.core.service import Iwf, IwfConfig
from controld.core.store import MappingTable
from controld.upnp import igd as upnp_igd
from shared import pcp, wire
from shared.const import DISCARD_PORT
from tests.bed.fake_pcp import FakePcp

LAN = "192.168.1.2"
SERVER = "100.64.0.1"


@dataclass(frozen=True)
class Sent:
    """One PCP request the core asked natd to relay, decoded."""

    request: pcp.Request

    @property
    def opcode(self) -> int:
        return self.request.opcode

    @property
    def lifetime(self) -> int:
        return self.request.lifetime

    @property
    def options(self) -> pcp.Options:
        return self.request.options

    @property
    def map(self) -> pcp.MapData:
        """The MAP data (a MAP request always has it)."""
        assert self.request.map is not None, f"not a MAP request: {self.request}"
        return self.request.map


def regrant(response: bytes, **changes: Any) -> bytes:
    """``response`` (an encoded MAP response) with its MAP data changed, e.g. another external port."""
    r = pcp.decode_response(response)
    assert r.map is not None
    return pcp.encode_response(dataclasses.replace(r, map=dataclasses.replace(r.map, **changes)))


class ScriptedLink:
    """Stands in for natd: binds succeed, PCP requests are answered by FakePcp's script."""

    def __init__(self) -> None:
        self.iwf: Iwf | None = None
        self.fake = FakePcp(None)
        self.sent: list[tuple[wire.PcpExchange, Sent]] = []
        self.unbound: list[int] = []

    def answer(self, req: pcp.Request, raw: bytes) -> bytes | None:
        """NAT2's reply to ``req`` (None: silence); subclasses script other answers."""
        return self.fake.answer(req, raw)

    async def call(self, msg: wire.Message, timeout: float = 5.0) -> wire.Message:
        if isinstance(msg, wire.Hello):
            return wire.HelloReply("boot", "100.64.0.2", SERVER, ["192.168.1.1"], ["192.168.1.0/24"])
        if isinstance(msg, wire.Sync):
            return wire.SyncReply(len(msg.bindings), 0)
        if isinstance(msg, wire.Bind):
            return wire.BindReply("100.64.0.2", msg.want_port or 40000)
        if isinstance(msg, wire.Unbind):
            self.unbound.append(msg.mid)
            return wire.Ok()
        assert isinstance(msg, wire.PcpExchange)
        req = pcp.decode_request(msg.packet)
        self.sent.append((msg, Sent(req)))
        reply = self.answer(req, msg.packet)
        if reply is None:  # no answer: natd replies once the wait is over
            await asyncio.sleep(msg.wait_ms / 1000)
            return wire.PcpAnswer()
        return wire.PcpAnswer(reply, None)

    def maps(self, eport: int | None = None) -> list[Sent]:
        """The MAP requests sent, probes left out; only those suggesting ``eport`` if given."""
        return [s for _, s in self.sent if s.opcode == pcp.Opcode.MAP and s.request.map is not None
                and s.map.internal_port != DISCARD_PORT and (eport is None or s.map.external_port == eport)]


def make_iwf(tmp_path: Path, link: ScriptedLink, **cfg: Any) -> Iwf:
    """A core on a fresh table in ``tmp_path``, talking to ``link``; ``cfg`` overrides the test defaults."""
    conf = IwfConfig(**{"mode": "cascaded", "pcp_server": SERVER, "service_wait": 0.0, "epoch_poll": 0.0,
                        "pcp_timeout": 2.0, **cfg})
    iwf = Iwf(conf, MappingTable(str(tmp_path)), link, rng=random.Random(5))  # type: ignore[arg-type]
    link.iwf = iwf
    return iwf


def drive(iwf: Iwf, body: Callable[[], Awaitable[None]], seconds: float = 60) -> None:
    """Start ``iwf``, run ``body``, stop it and close its table (bounded by ``seconds``)."""
    async def main() -> None:
        await iwf.start()
        try:
            await body()
        finally:
            await iwf.stop()
            iwf.table.close()
    asyncio.run(asyncio.wait_for(main(), seconds))


def run(tmp_path: Path, body: Callable[[Iwf, ScriptedLink], Awaitable[None]], **cfg: Any) -> None:
    """A core with a plain ScriptedLink around ``body(iwf, link)``."""
    link = ScriptedLink()
    iwf = make_iwf(tmp_path, link, **cfg)
    drive(iwf, lambda: body(iwf, link), 30)


async def until(cond: Callable[[], object], seconds: float = 3.0) -> None:
    """Wait (bounded) until ``cond()`` holds; fail the test if it never does."""
    for _ in range(int(seconds / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def add(iwf: Iwf, ext: int, lease: int = 0, igd: int = 1, iport: int = 80, desc: str = "web") -> Mapping:
    """AddPortMapping from LAN for TCP ``ext`` -> ``iport``."""
    return await upnp_igd.add_port_mapping(iwf, LAN, igd, "", ext, pcp.PROTO_TCP, iport, LAN, True, desc, lease)
