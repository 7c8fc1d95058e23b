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


@dataclass(frozen=True)
class DeleteRetryDue:
    """Time to retry upstream deletes NAT2 has not confirmed yet."""


TimerEvent = MappingDue | RedecideDue | EpochPollDue | DeleteRetryDue


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


DELETE_RETRY_FIRST_S = 4.0  # first retry of an unconfirmed upstream delete; doubling up to the next
DELETE_RETRY_MAX_S = 600.0
DELETE_RETRY_BATCH = 32  # retries sent per round (paced like recoveries)


def delete_retry_due(now: float, attempt: int, rng: random.Random) -> float:
    """When an upstream delete NAT2 did not confirm goes again: 4 s doubling to 10 minutes."""
    return now + min(DELETE_RETRY_MAX_S, DELETE_RETRY_FIRST_S * 2 ** min(attempt, 12)) * rng.uniform(1.0, 1.25)


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
        self.delete_retry_at: float | None = None

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
        times = [t for t in (self.heap[0][0] if self.heap else None, self.redecide_at, self.epoch_poll_at,
                             self.delete_retry_at) if t is not None]
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
        if self.delete_retry_at is not None and self.delete_retry_at <= now:
            self.delete_retry_at = None
            out.append(DeleteRetryDue())
        while self.heap and self.heap[0][0] <= now:
            due, mid, attempt = heapq.heappop(self.heap)
            if self.due.get(mid) != (due, attempt):
                continue  # superseded by a later schedule
            del self.due[mid]
            out.append(MappingDue(mid, attempt))
        return out


RECOVERY_BOUND_S = 120.0  # a recovery not finished by then no longer holds back the next trigger
RECOVERY_MIN_GAP_S = 10.0  # a coalesced restart starts at least this long after the recovery before it


class RecoveryGate:
    """Coalesces recovery triggers (epoch losses, ANNOUNCEs: RFC 6887 §14.1.3 lets a server send
    many): one recovery at a time; triggers during one make ONE restart once it is over, at
    least RECOVERY_MIN_GAP_S after it started. A recovery is over when every mapping it covers
    has had its first attempt (:meth:`finished`), or RECOVERY_BOUND_S after it started."""

    def __init__(self, min_gap: float = RECOVERY_MIN_GAP_S) -> None:
        self.min_gap = min_gap
        self.active: set[int] = set()
        self.started: float | None = None  # when the running recovery starts (or started)
        self.again = False

    def trigger(self, mids: list[int], now: float, delay: float = 0.0) -> bool:
        """A recovery of ``mids`` is wanted in ``delay`` s: True to start it, False when it is
        coalesced into the one running (which then runs once more)."""
        self.active &= set(mids)  # mappings removed meanwhile never finish: they no longer count
        if self.started is not None and self.active and now - self.started < RECOVERY_BOUND_S:
            self.again = True
            return False
        self.begin(mids, now + delay)
        return True

    def begin(self, mids: list[int], at: float) -> None:
        """A recovery of ``mids`` starts at ``at``."""
        self.active, self.started, self.again = set(mids), at, False

    def finished(self, mid: int, now: float) -> float | None:
        """Mapping ``mid``'s recovery attempt is over. When it was the last and triggers came
        meanwhile: the delay after which the caller restarts the recovery (and calls
        :meth:`begin`); else None."""
        if mid not in self.active:
            return None
        self.active.discard(mid)
        if self.active:
            return None
        started, again = self.started or now, self.again
        self.started, self.again = None, False
        return max(0.0, started + self.min_gap - now) if again else None
