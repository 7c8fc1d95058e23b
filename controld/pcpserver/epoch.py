"""Our server epoch and the announcements that tell LAN clients it was reset.

One epoch serves PCP (RFC 6887 §8.5) and NAT-PMP (RFC 6886 §3.6, "seconds since start of
epoch"): it counts seconds from its start and goes back to 0 when we lose mapping state
or our external address changes. After a reset, :class:`Announcer` multicasts PCP ANNOUNCE
(RFC 6887 §14.1.3) and NAT-PMP's address announcement (RFC 6886 §3.2.1) to 224.0.0.1:5350
ten times, 250 ms apart and then doubling, so clients re-create their mappings at once.
Time is passed in: the socket edge calls ``on_timer(now)`` at ``next_deadline()``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from controld.pcpserver.pcp import announcement
from shared import natpmp as natpmp_codec
from shared.const import ALL_HOSTS, PCP_CLIENT_PORT

ALL_NODES_V6 = "ff02::1"  # RFC 6887 §14.1.3: IPv6 ANNOUNCE group
REPEATS = 10  # RFC 6887 §14.1.3, RFC 6886 §3.2.1: up to ten copies
FIRST_GAP = 0.25  # seconds; each later gap doubles (same sections)
MAX_EPOCH = 0xFFFFFFFF


@dataclass(frozen=True)
class EpochRecord:
    """What to persist so a restart that kept its state keeps counting (RFC 6887 §8.5)."""

    seconds: int
    wall: float  # wall-clock time of the snapshot: the process's monotonic clock restarts with it


class ServerEpoch:
    """Seconds since our epoch started; ``now`` is a monotonic clock in seconds."""

    def __init__(self, now: float, start_seconds: int = 0) -> None:
        self._origin = now - start_seconds

    def seconds(self, now: float) -> int:
        """The epoch time to put in every answer (RFC 6887 §7.2, RFC 6886 §3.2)."""
        return min(MAX_EPOCH, max(0, int(now - self._origin)))

    def reset(self, now: float) -> None:
        """Start again from 0: state lost or external address changed (RFC 6887 §8.5, RFC 6886 §3.6)."""
        self._origin = now

    def record(self, now: float, wall: float) -> EpochRecord:
        """A snapshot to store with the mapping table."""
        return EpochRecord(self.seconds(now), wall)

    @classmethod
    def after_restart(cls, now: float, wall: float, saved: EpochRecord | None, state_kept: bool) -> ServerEpoch:
        """Our epoch after our own restart: it goes on counting through the downtime only if
        every mapping survived (restored and re-installed); otherwise it starts at 0, which
        makes clients re-create their mappings (RFC 6887 §8.5, RFC 6886 §3.6)."""
        if state_kept and saved is not None and wall >= saved.wall:
            return cls(now, min(MAX_EPOCH, saved.seconds + int(wall - saved.wall)))
        return cls(now)


@dataclass(frozen=True)
class Datagram:
    """One announcement to send from our server address and port (RFC 6887 §14.1.3)."""

    payload: bytes
    host: str
    port: int


class Announcer:
    """Paced unsolicited announcements after a state loss or an address change."""

    def __init__(self, epoch: ServerEpoch, *, pcp: bool = True, natpmp: bool = True, ipv6: bool = False,
                 repeats: int = REPEATS, first_gap: float = FIRST_GAP) -> None:
        self.epoch = epoch
        self.pcp = pcp
        self.natpmp = natpmp
        self.ipv6 = ipv6
        self.repeats = repeats
        self.first_gap = first_gap
        self._external: ipaddress.IPv4Address | None = None
        self._next: float | None = None
        self._sent = 0

    def lose_state(self, now: float, external_ip: ipaddress.IPv4Address | None) -> None:
        """Upstream or our own state is gone, or the external address changed: reset the
        epoch and announce from ``now`` (restarting a schedule already running)."""
        self.epoch.reset(now)
        self.set_external(external_ip)
        self._next = now
        self._sent = 0

    def set_external(self, external_ip: ipaddress.IPv4Address | None) -> None:
        """The address NAT-PMP copies carry; None (unknown yet) leaves them out."""
        self._external = external_ip

    def next_deadline(self) -> float | None:
        """When ``on_timer`` wants to run next; None when nothing is scheduled."""
        return self._next

    def on_timer(self, now: float) -> list[Datagram]:
        """The copies due at ``now``, each with the epoch of its own sending time."""
        if self._next is None or now < self._next:
            return []
        epoch = self.epoch.seconds(now)
        out: list[Datagram] = []
        if self.pcp:
            out.append(Datagram(announcement(epoch), ALL_HOSTS, PCP_CLIENT_PORT))
            if self.ipv6:
                out.append(Datagram(announcement(epoch), ALL_NODES_V6, PCP_CLIENT_PORT))
        if self.natpmp and self._external is not None:
            out.append(Datagram(natpmp_codec.address_announcement(epoch, self._external), ALL_HOSTS,
                                PCP_CLIENT_PORT))
        self._sent += 1
        if self._sent >= self.repeats:
            self._next = None
        else:
            # gaps 250 ms, 500 ms, 1 s, ... counted from this sending, so a late timer never
            # makes a gap shorter than the RFC's
            self._next = now + self.first_gap * 2 ** (self._sent - 1)
        return out
