"""A scripted PCP server for the error paths real miniupnpd cannot produce (never the only upstream).

Run in a test bed namespace: ``python -m tests.bed.fake_pcp --bind 100.64.0.3 --log FILE``.
It answers MAP and ANNOUNCE on UDP 5351 of ``--bind``; what it answers is chosen by
the request's suggested external port, so one running server scripts every row of
the RFC 6970 §4.3 table (docs/requirements.md, Error table):

- 20001..20063: error result ``port - 20000`` with Lifetime 0 (the request copied back,
  RFC 6887 §8.2); 20100 + N: result N with Lifetime 30 (a long-ish error lifetime)
- 21000 + V: UNSUPP_VERSION proposing version V (RFC 6887 §9)
- 22000..22099: NETWORK_FAILURE the first time a nonce asks, SUCCESS after (short-error retry)
- 23000..23099: never answered
- 25000: SUCCESS, then 0.3 s later the server "restarts": its epoch starts again from 0 and
  it multicasts an unsolicited ANNOUNCE to 224.0.0.1:5350 (RFC 6887 §14.1.3)
- anything else: SUCCESS, external 198.20.0.1 and the suggested port (or 40000 + internal
  port), lifetime min(requested, 120); lifetime 0 deletes.

Every request is logged as one JSON line (op, lifetime, ports, options, result) so tests
can assert what reached the server. Bounded: packets over 1100 octets are dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import socket
import struct
import time

from shared import pcp

PUBLIC_IP = ipaddress.IPv4Address("198.20.0.1")
MAX_GRANT = 120


class FakePcp(asyncio.DatagramProtocol):
    def __init__(self, log_path: str | None) -> None:
        self.start = time.monotonic()
        self.seen: set[bytes] = set()
        self.log = open(log_path, "a", buffering=1) if log_path else None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def epoch(self) -> int:
        return int(time.monotonic() - self.start) + self.epoch_base

    epoch_base = 1000

    def restart(self) -> None:
        """Lose all state: the epoch starts again, and an ANNOUNCE tells the clients."""
        self.start, self.epoch_base = time.monotonic(), 0
        self._announce()

    def _announce(self) -> None:
        if self.transport is not None:
            msg = pcp.encode_response(pcp.Response(pcp.Opcode.ANNOUNCE, 0, 0, self.epoch()))
            self.transport.sendto(msg, (pcp.ANNOUNCE_GROUP_V4, pcp.ANNOUNCE_PORT))
            self._record(op="announce-sent", epoch=self.epoch())

    def _record(self, **fields: object) -> None:
        if self.log:
            self.log.write(json.dumps(fields) + "\n")

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) > pcp.MAX_SIZE or self.transport is None:
            return
        try:
            req = pcp.decode_request(data)
        except pcp.PcpDecodeError as exc:
            self._record(op="bad", result=int(exc.result), error=str(exc))
            return
        reply = self.answer(req, data)
        m = req.map
        self._record(op=int(req.opcode), lifetime=req.lifetime, client=str(req.client_ip),
                     iport=m.internal_port if m else None, eport=m.external_port if m else None,
                     proto=m.protocol if m else None, nonce=m.nonce.hex() if m else None,
                     third_party=str(req.options.third_party) if req.options.third_party else None,
                     prefer_failure=req.options.prefer_failure, description=req.options.description,
                     filters=[str(f.peer_ip) for f in req.options.filters],
                     result=None if reply is None else reply[3])
        if reply is not None:
            self.transport.sendto(reply, addr)

    def answer(self, req: pcp.Request, raw: bytes) -> bytes | None:
        """The scripted reply to ``req`` (None: stay silent)."""
        if req.opcode == pcp.Opcode.ANNOUNCE:
            return pcp.encode_response(pcp.Response(pcp.Opcode.ANNOUNCE, 0, 0, self.epoch()))
        m = req.map
        assert m is not None
        port = m.external_port
        if 20001 <= port <= 20063 or 20100 < port <= 20163:
            result, life = (port - 20000, 0) if port < 20100 else (port - 20100, 30)
            # An error copies the request's opcode data and options back (RFC 6887 §8.2).
            return pcp.encode_response(pcp.Response(pcp.Opcode.MAP, result, life, self.epoch(), m, req.options))
        if 21000 <= port <= 21003:
            return struct.pack("!BBBBII12s", port - 21000, 0x80 | pcp.Opcode.MAP, 0,
                               pcp.Result.UNSUPP_VERSION, 60, self.epoch(), b"\0" * 12)
        if 22000 <= port < 22100 and m.nonce not in self.seen:
            self.seen.add(m.nonce)
            return pcp.encode_response(pcp.Response(pcp.Opcode.MAP, pcp.Result.NETWORK_FAILURE, 30,
                                                    self.epoch(), m, req.options))
        if 23000 <= port < 23100:
            return None
        if port == 25000 and req.lifetime:
            asyncio.get_running_loop().call_later(0.3, self.restart)  # after this answer went out
        if req.lifetime == 0:
            granted = dataclasses.replace(m, external_port=0, external_ip=pcp.any_address(4))
            return pcp.encode_response(pcp.Response(pcp.Opcode.MAP, 0, 0, self.epoch(), granted))
        eport = port or 40000 + m.internal_port % 20000
        granted = dataclasses.replace(m, external_port=eport, external_ip=PUBLIC_IP)
        opts = dataclasses.replace(req.options, description=None)  # DESCRIPTION not processed
        return pcp.encode_response(pcp.Response(pcp.Opcode.MAP, 0, min(req.lifetime, MAX_GRANT),
                                                self.epoch(), granted, opts))


async def serve(bind: str, log_path: str | None) -> None:
    """Answer until killed."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: FakePcp(log_path), local_addr=(bind, pcp.SERVER_PORT))
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(bind))
    print("fake-pcp ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bind", required=True)
    p.add_argument("--log", default=None)
    args = p.parse_args()
    asyncio.run(serve(args.bind, args.log))


if __name__ == "__main__":
    main()
