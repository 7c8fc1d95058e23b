"""PCP client core (RFC 6887), sans-I/O: requests and packets in, events out, time passed in.

Theory of operation. The owner starts an *exchange* per request with
:meth:`PcpClient.request`; the client answers with :class:`Transmit` events and
remembers when the next retransmission is due. The owner calls :meth:`poll` at
:meth:`next_timer` and :meth:`receive` for every packet from a server; both return
events: :class:`Transmit`, :class:`Answer` (a matching response; the exchange
ends), :class:`GaveUp` (the exchange's time bound passed), :class:`EpochLost` (the
server lost state: re-create everything there) and :class:`Unsolicited` (a Mapping
Update or an ANNOUNCE nobody asked for). No sockets, no sleeping, no clock reads:
retransmission, epoch and renewal are tested by passing numbers.

References: retransmission RFC 6887 §8.1.1; response checks §8.3; matching §11.4;
epoch §8.5 (a server time up to 1 s back still counts as valid); renewal timing
§11.2.1; the IWF's use of all of it RFC 6970 §5.1, docs/requirements.md IWF-7, IWF-8, IWF-13, IWF-84.
"""

from __future__ import annotations

import random
from collections.abc import Hashable
from dataclasses import dataclass, field

from shared import pcp

IRT = 3.0  # initial retransmission time, RFC 6887 §8.1.1
MRT = 1024.0  # maximum retransmission time
MIN_RENEW_GAP = 4.0  # renewals never less than 4 s apart (§11.2.1)
MAX_SANE_LIFETIME = 24 * 3600  # treat absurdly long lifetimes as a day (§15)
ANNOUNCE_MAX_DELAY = 5.0  # random 0-5 s before re-creating after an ANNOUNCE (§14.1.3)
UNSUPP_VERSION_RETRY = 1800.0  # retry a server that refused version 2 after min(30 min, Lifetime) (§9)
MAX_EXCHANGES = 70_000  # every outstanding request is a mapping or a probe: bounded like the table


@dataclass(frozen=True)
class Transmit:
    """Send ``packet`` to ``server`` once and listen ``wait`` seconds for the answer (then
    the next retransmission or the give-up is due); ``via``: the owner's relay hint."""

    key: Hashable
    server: str
    packet: bytes
    wait: float = IRT
    via: int | None = None


@dataclass(frozen=True)
class Answer:
    key: Hashable
    response: pcp.Response


@dataclass(frozen=True)
class GaveUp:
    key: Hashable


@dataclass(frozen=True)
class EpochLost:
    """``server`` lost its mappings; ``announce``: learned from an ANNOUNCE (wait U[0, 5] s, §14.1.3)."""

    server: str
    announce: bool = False


@dataclass(frozen=True)
class Unsolicited:
    server: str
    response: pcp.Response
    lan_ip: str | None


Event = Transmit | Answer | GaveUp | EpochLost | Unsolicited


@dataclass
class _Exchange:
    key: Hashable
    server: str
    request: pcp.Request
    packet: bytes
    internal_ip: str | None  # the address the mapping is for (matching, §11.4)
    deadline: float | None  # MRD: give up after this (None: retransmit forever)
    next_send: float
    rt: float
    sent: int = 0
    via: int | None = None  # passed through in Transmit (controld: the NAT1 binding natd rewrites to)


@dataclass
class _Epoch:
    client_time: float
    server_time: int


@dataclass
class PcpClient:
    """Outstanding exchanges and per-server epoch state."""

    rng: random.Random = field(default_factory=random.Random)
    exchanges: dict[Hashable, _Exchange] = field(default_factory=dict)
    epochs: dict[str, _Epoch] = field(default_factory=dict)
    # server -> (until, its UNSUPP_VERSION answer): version negotiation failed (§9)
    refused: dict[str, tuple[float, pcp.Response]] = field(default_factory=dict)

    def _rand(self) -> float:
        return self.rng.uniform(-0.1, 0.1)

    def request(self, key: Hashable, server: str, req: pcp.Request, now: float,
                max_duration: float | None = None, internal_ip: str | None = None,
                via: int | None = None) -> list[Event]:
        """Start (or restart) an exchange; returns the first transmission.

        A server that answered UNSUPP_VERSION is not asked again before its retry time:
        the exchange ends at once with that answer (RFC 6887 §9).
        """
        refused = self.refused.get(server)
        if refused is not None:
            if now < refused[0]:
                self.exchanges.pop(key, None)
                return [Answer(key, refused[1])]
            del self.refused[server]
        if key not in self.exchanges and len(self.exchanges) >= MAX_EXCHANGES:
            return [GaveUp(key)]
        packet = pcp.encode_request(req)
        deadline = None if max_duration is None else now + max_duration
        ex = _Exchange(key, server, req, packet, internal_ip, deadline, now, IRT, via=via)
        self.exchanges[key] = ex
        return self._send(ex, now, first=True)

    def cancel(self, key: Hashable) -> None:
        self.exchanges.pop(key, None)

    def _send(self, ex: _Exchange, now: float, first: bool = False) -> list[Event]:
        ex.rt = (1 + self._rand()) * (IRT if first else min(2 * ex.rt, MRT))
        ex.next_send = now + ex.rt
        ex.sent += 1
        until = ex.next_send if ex.deadline is None else min(ex.next_send, ex.deadline)
        return [Transmit(ex.key, ex.server, ex.packet, max(0.0, until - now), ex.via)]

    def next_timer(self) -> float | None:
        """When :meth:`poll` must next be called (None: nothing outstanding)."""
        times = [min(ex.next_send, ex.deadline) if ex.deadline is not None else ex.next_send
                 for ex in self.exchanges.values()]
        return min(times, default=None)

    def poll(self, now: float) -> list[Event]:
        """Retransmit what is due and give up on exchanges past their bound."""
        out: list[Event] = []
        for ex in list(self.exchanges.values()):
            if ex.deadline is not None and now >= ex.deadline:
                del self.exchanges[ex.key]
                out.append(GaveUp(ex.key))
            elif now >= ex.next_send:
                out.extend(self._send(ex, now))
        return out

    def _epoch_valid(self, server: str, server_time: int, now: float) -> bool:
        prev = self.epochs.get(server)
        self.epochs[server] = _Epoch(now, server_time)
        if prev is None:
            return True
        if server_time + 1 < prev.server_time:
            return False
        if server_time < prev.server_time:  # back by up to 1 s: valid ( note)
            return True
        client_delta = int(now - prev.client_time)
        server_delta = server_time - prev.server_time
        return not (client_delta + 2 < server_delta - server_delta // 16
                    or server_delta + 2 < client_delta - client_delta // 16)

    def _matches(self, ex: _Exchange, resp: pcp.Response, server: str, lan_ip: str | None) -> bool:
        if ex.server != server or ex.request.opcode != resp.opcode:
            return False
        if resp.opcode != pcp.Opcode.MAP:
            return True
        rq, rs = ex.request.map, resp.map
        if rq is None or rs is None:
            return False
        if (rq.nonce, rq.protocol, rq.internal_port) != (rs.nonce, rs.protocol, rs.internal_port):
            return False
        tp = ex.request.options.third_party
        want_ip = str(tp) if tp is not None else ex.internal_ip
        got_ip = str(resp.options.third_party) if resp.options.third_party is not None else lan_ip
        if want_ip is not None and got_ip is not None and want_ip != got_ip:
            return False
        if resp.result == pcp.Result.SUCCESS and ex.request.options.prefer_failure and ex.request.lifetime:
            # PREFER_FAILURE race (RFC 6887 §11.4): a success with other values is a stale update.
            if rq.external_port and rs.external_port != rq.external_port:
                return False
            if not rq.external_ip.packed.strip(b"\x00") == b"" and rs.external_ip != rq.external_ip:
                return False
        return True

    def receive(self, server: str, data: bytes, now: float, lan_ip: str | None = None) -> list[Event]:
        """Process one packet from ``server``; malformed or unmatched packets change nothing.

        Order of checks as RFC 6887 §8.3, §8.4: size, R bit, version (UNSUPP_VERSION before
        the length checks), frame, then matching by opcode, nonce and every field, and only
        then epoch processing. An unmatched MAP response comes out as :class:`Unsolicited`
        with its epoch NOT checked: only the owner knows whether it matches a mapping it
        holds (a Mapping Update, §14.2); if it does, the owner calls :meth:`check_epoch`.
        """
        try:
            resp = pcp.decode_response(data)
        except pcp.PcpDecodeError:
            return []  # RFC 6887 §8.3: silently dropped
        if resp.result == pcp.Result.UNSUPP_VERSION:
            return self._unsupported_version(server, resp, now, lan_ip)
        matched = next((ex for ex in self.exchanges.values() if self._matches(ex, resp, server, lan_ip)), None)
        if matched is None:
            if resp.opcode == pcp.Opcode.MAP:
                return [Unsolicited(server, resp, lan_ip)]  # epoch: only once the owner matched it
            if resp.opcode == pcp.Opcode.ANNOUNCE and resp.result == pcp.Result.SUCCESS:
                # An unsolicited ANNOUNCE (§14.1.3) carries nothing to match: its source was checked
                # by the relay (the server's address and port, arriving on the WAN).
                return [*self.check_epoch(server, resp.epoch, now, announce=True), Unsolicited(server, resp, lan_ip)]
            return []  # a response to nothing we sent (§8.3: MUST ignore)
        del self.exchanges[matched.key]
        return [*self.check_epoch(server, resp.epoch, now), Answer(matched.key, resp)]

    def check_epoch(self, server: str, epoch: int, now: float, announce: bool = False) -> list[Event]:
        """Epoch processing (§8.5) for a response already matched to a request or a mapping:
        an :class:`EpochLost` when ``server`` lost its state."""
        return [] if self._epoch_valid(server, epoch, now) else [EpochLost(server, announce=announce)]

    def _unsupported_version(self, server: str, resp: pcp.Response, now: float,
                             lan_ip: str | None) -> list[Event]:
        """We speak only version 2 (NAT-PMP fallback is not offered upstream): the exchanges it
        answers end with it, and the server is left alone for min(30 min, Lifetime).

        It counts only when it answers our outstanding request (RFC 6887 §8.4): one that
        echoes a request (version 2, the nonce and fields of one outstanding exchange) ends
        that exchange; one with no nonce (header only) ends every exchange there, but only
        from a server that never answered version 2 (one that has is not believed to have
        forgotten it: a forged answer would turn PCP off for 30 minutes)."""
        if resp.map is not None:  # it copies a request (pcp.decode_response): match it like any answer
            hit = next((ex for ex in self.exchanges.values() if self._matches(ex, resp, server, lan_ip)), None)
            if hit is None:
                return []
            del self.exchanges[hit.key]
            self.refused[server] = (now + min(UNSUPP_VERSION_RETRY, resp.lifetime), resp)
            return [Answer(hit.key, resp)]
        asked = any(ex.server == server for ex in self.exchanges.values())
        if not asked or server in self.epochs:
            return []  # nothing asked, or a v2 server: a stray or spoofed packet changes nothing
        self.refused[server] = (now + min(UNSUPP_VERSION_RETRY, resp.lifetime), resp)
        out: list[Event] = []
        for ex in [ex for ex in self.exchanges.values() if ex.server == server]:
            del self.exchanges[ex.key]
            out.append(Answer(ex.key, resp))
        return out


def renewal_time(granted: int, t0: float, attempt: int, rng: random.Random) -> float:
    """When renewal ``attempt`` (0, 1, ...) of a mapping granted at ``t0`` goes out.

    RFC 6887 §11.2.1: first at U[1/2, 5/8] of the lifetime, then 3/4..13/16, 7/8..29/32;
    callers keep attempts at least MIN_RENEW_GAP apart.
    """
    life = min(granted, MAX_SANE_LIFETIME)
    k = attempt
    return t0 + life * (1 - 2 ** -(k + 1)) + rng.uniform(0, life * 2 ** -(k + 3))


def retry_time(granted: int, t0: float, attempt: int, now: float, rng: random.Random) -> float:
    """When the next renewal goes after ``attempt`` failed ones (RFC 6887 §11.2.1).

    The first §11.2.1 window that is still at least MIN_RENEW_GAP away; once the
    lifetime has run out, back off from IRT doubling up to MRT (§8.1.1), never
    sooner than MIN_RENEW_GAP.
    """
    life = min(granted, MAX_SANE_LIFETIME)
    for k in range(attempt, attempt + 32):  # bounded: the windows converge on t0 + life
        t = renewal_time(granted, t0, k, rng)
        if t >= now + MIN_RENEW_GAP and t < t0 + life:
            return t
    backoff = min(MRT, IRT * 2.0 ** min(attempt, 10)) * (1 + rng.uniform(-0.1, 0.1))
    return now + max(MIN_RENEW_GAP, backoff)


# Short-lifetime errors (RFC 6887 §7.4): worth one more try later (RFC 6970 §5.6.1, §5.6.2).
SHORT_RESULTS = frozenset({pcp.Result.NETWORK_FAILURE, pcp.Result.NO_RESOURCES, pcp.Result.USER_EX_QUOTA})
# CANNOT_PROVIDE_EXTERNAL is short when its Lifetime is at most this (docs/requirements.md §18 item 9).
SHORT_ERROR_MAX_LIFETIME = 60


def is_short_error(resp: pcp.Response) -> bool:
    """Whether an error answer is a short-lifetime one (docs/requirements.md IWF-46, IWF-51; §18 item 9)."""
    if resp.result == pcp.Result.CANNOT_PROVIDE_EXTERNAL:
        return resp.lifetime <= SHORT_ERROR_MAX_LIFETIME
    return resp.result in SHORT_RESULTS
