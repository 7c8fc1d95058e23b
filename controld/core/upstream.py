"""The upstream side's decisions and deadlines, sans-I/O: time is passed in, nothing sleeps.

Theory of operation. Everything controld must do later (renew or end a mapping, look
for a PCP server again after an ``auto`` fallback, ask the server for its Epoch) is a
deadline in :class:`UpstreamTimers`. The edge (controld/core/service.py) runs ONE
asyncio timer: it sleeps until the earlier of :meth:`UpstreamTimers.next_deadline` and
the PCP client's next retransmission, then calls :meth:`UpstreamTimers.on_timer` with
the wall-clock time and acts on the events it returns (as aioquic's connection does).
No polling loop: a new, earlier deadline wakes the timer at once.

Mode choice (RFC 6970 §5.4, §5.5; docs/requirements.md IWF-12, IWF-13) is the pure
function :func:`choose_mode`; retry times after failed renewals and recoveries are
:func:`recovery_due` and :func:`controld.pcp.client.retry_time`.
"""

from __future__ import annotations

import heapq
import ipaddress
import random
from dataclasses import dataclass

from controld.pcp import client as pcpc

MODES = ("auto", "nat1-only", "cascaded", "no-nat1")
REDECIDE_S = 60.0  # auto mode: how often a fallen-back IWF looks for its PCP server again
RECOVERY_MAX_BACKOFF = 300.0  # longest wait between attempts to re-create a lost mapping
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # RFC 6598 shared address space (a CGN's inside)


@dataclass(frozen=True)
class MappingDue:
    """Mapping ``mid``'s renewal (attempt ``attempt``) or lease end is due."""

    mid: int
    attempt: int


@dataclass(frozen=True)
class RedecideDue:
    """Time to look for the PCP server again (``auto`` fell back to nat1-only)."""


@dataclass(frozen=True)
class EpochPollDue:
    """Time to ask the PCP server for its Epoch (RFC 6887 §14.1: a client MAY send ANNOUNCE)."""


TimerEvent = MappingDue | RedecideDue | EpochPollDue


def is_private(ip: str | None) -> bool:
    """A WAN address behind someone else's NAT: private or shared (RFC 6598); None counts as private."""
    if ip is None:
        return True
    a = ipaddress.IPv4Address(ip)
    return a.is_private or a in _SHARED


def choose_mode(configured: str, wan_ip: str | None, probe_answered: bool | None, told: bool) -> str:
    """The mode to run in (RFC 6970 §5.4, §5.5; docs/requirements.md IWF-12, IWF-13).

    ``auto``: cascaded when the WAN address is private/shared and a PCP server answers,
    or one was configured or came by DHCP (``told``: the IWF then stays cascaded and
    answers "unavailable" while the server is silent). ``probe_answered`` None: no probe
    was needed (or possible) to decide.
    """
    if configured == "nat1-only":
        return "nat1-only"
    if configured == "auto" and (wan_ip is None or not is_private(wan_ip)):
        return "nat1-only"
    if configured != "auto":
        return configured
    return "cascaded" if probe_answered or told else "nat1-only"


def needs_probe(configured: str, wan_ip: str | None) -> bool:
    """Whether :func:`choose_mode` needs a probe's outcome (and the external address is learned)."""
    return configured != "nat1-only" and not (configured == "auto" and (wan_ip is None or not is_private(wan_ip)))


def recovery_due(now: float, attempt: int, rng: random.Random) -> float:
    """Next attempt to re-create a mapping the server lost: from 4 s doubling to RECOVERY_MAX_BACKOFF,
    not at the old grant's renewal times (hours away)."""
    return now + min(RECOVERY_MAX_BACKOFF, pcpc.MIN_RENEW_GAP * 2 ** min(attempt, 12)) * rng.uniform(1.0, 1.25)


class UpstreamTimers:
    """Every upstream deadline: per mapping (renewal or lease end), redecide, epoch poll.

    One live entry per mapping (a new :meth:`schedule` replaces the last); the heap keeps
    superseded entries until they surface, bounded by a rebuild.
    """

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, int]] = []  # (due wall time, mid, attempt)
        self.due: dict[int, tuple[float, int]] = {}  # the live entry per mapping
        self.redecide_at: float | None = None
        self.epoch_poll_at: float | None = None

    def schedule(self, mid: int, due: float, attempt: int = 0) -> None:
        """Set mapping ``mid``'s next deadline; replaces any earlier one."""
        self.due[mid] = (due, attempt)
        heapq.heappush(self.heap, (due, mid, attempt))
        if len(self.heap) > 2 * len(self.due) + 64:  # bounded: drop superseded entries
            self.heap = [(d, m, a) for m, (d, a) in self.due.items()]
            heapq.heapify(self.heap)

    def drop(self, mid: int) -> None:
        """Mapping ``mid`` needs no deadline any more."""
        self.due.pop(mid, None)

    def next_deadline(self) -> float | None:
        """The earliest deadline (wall clock), None when nothing is due ever."""
        while self.heap and self.due.get(self.heap[0][1]) != (self.heap[0][0], self.heap[0][2]):
            heapq.heappop(self.heap)  # superseded
        times = [t for t in (self.heap[0][0] if self.heap else None, self.redecide_at, self.epoch_poll_at)
                 if t is not None]
        return min(times, default=None)

    def on_timer(self, now: float) -> list[TimerEvent]:
        """Every event due at ``now``; each fires once (the owner re-arms what repeats)."""
        out: list[TimerEvent] = []
        if self.redecide_at is not None and self.redecide_at <= now:
            self.redecide_at = None
            out.append(RedecideDue())
        if self.epoch_poll_at is not None and self.epoch_poll_at <= now:
            self.epoch_poll_at = None
            out.append(EpochPollDue())
        while self.heap and self.heap[0][0] <= now:
            due, mid, attempt = heapq.heappop(self.heap)
            if self.due.get(mid) != (due, attempt):
                continue  # superseded by a later schedule
            del self.due[mid]
            out.append(MappingDue(mid, attempt))
        return out


RECOVERY_BOUND_S = 120.0  # a recovery not finished by then no longer holds back the next trigger


class RecoveryGate:
    """Coalesces recovery triggers (epoch losses, ANNOUNCEs: RFC 6887 §14.1.3 lets a server send
    many): one recovery at a time; a trigger during one restarts it once it is over, at most
    once however many arrive. A recovery is over when every mapping it covers has had its
    first attempt (:meth:`finished`), or RECOVERY_BOUND_S after it started."""

    def __init__(self) -> None:
        self.active: set[int] = set()
        self.started: float | None = None
        self.again = False

    def trigger(self, mids: list[int], now: float) -> bool:
        """A recovery of ``mids`` is wanted: True to start it now, False when it waits (coalesced)."""
        if self.started is not None and self.active and now - self.started < RECOVERY_BOUND_S:
            self.again = True
            return False
        self.active, self.started, self.again = set(mids), now, False
        return True

    def finished(self, mid: int) -> bool:
        """Mapping ``mid``'s recovery attempt is over; True when a coalesced trigger now
        wants the recovery run again (the caller triggers it)."""
        if mid not in self.active:
            return False
        self.active.discard(mid)
        if self.active:
            return False
        self.started = None
        again, self.again = self.again, False
        return again
