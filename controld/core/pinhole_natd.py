"""The pinhole core's backend over natd's wire API (docs/pinholes.md "The wire API").

:class:`NatdPinholeBackend` turns the :class:`~controld.core.pinhole.PinholeBackend` calls into
``pinhole.status/add/delete/counters`` requests on controld's natd link and natd's typed
refusals into :class:`PinholeError` kinds; :meth:`NatdPinholeBackend.same_host` asks natd's
neighbour table (``neigh.same_host``), so in secure mode a control point calling from its IPv4
address may open pinholes to its own IPv6 addresses (docs/pinholes.md "Policy").
:class:`PinholeResync` re-sends every live pinhole (``pinhole.sync``) at start and whenever natd
restarted (new boot id) or restored its kernel objects (``restored`` event), as the IPv4 forwards
are re-synced, and re-reads natd's status (the LAN's IPv6 prefixes) on every interface change
natd announces (``wan`` event).

natd filters on no remote *port*: a pinhole asked for one remote port is opened for every
remote port (wider than asked; WANIPv6FirewallControl:1 lets the firewall ignore RemotePort).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable

from controld.core.pinhole import FirewallStatus, Pinhole, PinholeError, PinholeErrorKind, Pinholes
from controld.natd_link import NatdError
from shared import wire

log = logging.getLogger("controld.core.pinhole")

# natd's Error codes for pinhole requests (docs/pinholes.md) -> the core's neutral kinds;
# any other code ("failed", "timeout", ...) means natd could not do it now: UNAVAILABLE
NATD_ERRORS: dict[str, PinholeErrorKind] = {
    "pinholes-off": PinholeErrorKind.FIREWALL_DISABLED,
    "not-lan": PinholeErrorKind.NOT_AUTHORIZED,
    "bad-remote": PinholeErrorKind.INVALID,
    "quota": PinholeErrorKind.QUOTA,
    "duplicate": PinholeErrorKind.NOT_AUTHORIZED,  # another pid holds the same element
    "bad-field": PinholeErrorKind.INVALID,
}

Call = Callable[[wire.Message], Awaitable[wire.Message]]

# natd's same-host answers are kept this long (a yes longer: a host keeps its link-layer address;
# a no briefly: a host natd just solicited may answer a moment later), at most MAX_SAME_HOST pairs
SAME_HOST_TTL_S = {True: 10.0, False: 2.0}
MAX_SAME_HOST = 1024


def pinhole_error(exc: NatdError) -> PinholeError:
    """natd's refusal (or silence) as a :class:`PinholeError`."""
    return PinholeError(NATD_ERRORS.get(exc.code, PinholeErrorKind.UNAVAILABLE), f"natd: {exc}")


def to_wire(p: Pinhole, lease: int) -> wire.Pinhole:
    """The wire form of ``p``: natd keeps no remote port, so that filter is dropped (wider)."""
    return wire.Pinhole(p.uid, p.proto, p.int_client, p.int_port, lease, p.remote_host or None)


class NatdPinholeBackend:
    """:class:`~controld.core.pinhole.PinholeBackend` over ``call`` (``NatdLink.call``)."""

    def __init__(self, call: Call, clock: Callable[[], float] = time.monotonic) -> None:
        self.call = call
        self.clock = clock
        self._same: dict[frozenset[str], tuple[bool, float]] = {}  # address pair -> (answer, expiry)

    async def _ask(self, msg: wire.Message) -> wire.Message:
        try:
            return await self.call(msg)
        except NatdError as exc:
            raise pinhole_error(exc) from None

    async def status(self) -> FirewallStatus:
        """natd's PinholeStatus: enabled and the LAN's IPv6 prefixes."""
        reply = await self._ask(wire.PinholeStatus())
        if not isinstance(reply, wire.PinholeStatusReply):
            raise PinholeError(PinholeErrorKind.UNAVAILABLE, f"natd answered {reply.OP} to pinhole.status")
        return FirewallStatus(reply.enabled, tuple(reply.lan_prefixes))

    async def open(self, p: Pinhole, lease: int) -> None:
        """PinholeAdd; the same uid replaces and re-leases natd's element."""
        if p.remote_port:
            log.info("%s: natd filters no remote port; open for every remote port", p)
        await self._ask(wire.PinholeAdd(to_wire(p, lease)))

    async def close(self, uid: int) -> None:
        """PinholeDelete (natd answers Ok for a pinhole it does not hold)."""
        await self._ask(wire.PinholeDelete(uid))

    async def packets(self, uid: int) -> int:
        """The packets natd's element for ``uid`` admitted (0 when natd does not hold it)."""
        reply = await self._ask(wire.PinholeCounters([uid]))
        if not isinstance(reply, wire.PinholeCountersReply):
            raise PinholeError(PinholeErrorKind.UNAVAILABLE, f"natd answered {reply.OP} to pinhole.counters")
        return next((n for pid, n in zip(reply.pids, reply.packets, strict=False) if pid == uid), 0)

    async def same_host(self, a: str, b: str) -> bool:
        """One LAN host by natd's neighbour table (one link-layer address); equal addresses without asking.

        Answers are cached (SAME_HOST_TTL_S, MAX_SAME_HOST pairs); natd's refusal of an address
        is a no, natd away or failing is UNAVAILABLE (not a refusal the control point earned)."""
        try:
            pair = frozenset(str(ipaddress.ip_address(x)) for x in (a, b))
        except ValueError:
            return False
        if len(pair) == 1:
            return True
        now = self.clock()
        hit = self._same.get(pair)
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            reply = await self.call(wire.SameHost(a, b))
        except NatdError as exc:
            if exc.code in ("bad-field", "bad-op"):  # not an address natd takes, or a natd without the op
                log.info("natd cannot tell whether %s and %s are one host: %s", a, b, exc)
                return False
            raise pinhole_error(exc) from None
        if not isinstance(reply, wire.SameHostReply):
            raise PinholeError(PinholeErrorKind.UNAVAILABLE, f"natd answered {reply.OP} to neigh.same_host")
        self._same.pop(pair, None)
        if len(self._same) >= MAX_SAME_HOST:
            self._same = {k: v for k, v in self._same.items() if v[1] > now}
            while len(self._same) >= MAX_SAME_HOST:  # still full of live answers: drop the oldest
                del self._same[next(iter(self._same))]
        self._same[pair] = (reply.same, now + SAME_HOST_TTL_S[reply.same])
        return reply.same

    async def sync(self, rows: list[tuple[Pinhole, int]]) -> wire.SyncReply:
        """PinholeSync: natd's whole pinhole set becomes ``rows`` (pinhole, remaining lease)."""
        reply = await self._ask(wire.PinholeSync([to_wire(p, lease) for p, lease in rows]))
        if not isinstance(reply, wire.SyncReply):
            raise PinholeError(PinholeErrorKind.UNAVAILABLE, f"natd answered {reply.OP} to pinhole.sync")
        return reply


class PinholeResync:
    """Keeps natd's pinholes equal to the core's rows across natd restarts and restores."""

    def __init__(self, backend: NatdPinholeBackend, pinholes: Pinholes) -> None:
        self.backend = backend
        self.pinholes = pinholes
        self.boot: str | None = None  # natd's boot id at the last successful sync
        self.failing = False  # the last sync failed (its retries log at debug)

    async def sync(self) -> bool:
        """Send every live row with its remaining lease; False (logged) when natd could not take it."""
        self.pinholes.expire()
        rows = [(p, min(self.pinholes.remaining(p), wire.MAX_PINHOLE_LEASE)) for p in self.pinholes.rows.values()]
        rows = [(p, lease) for p, lease in rows if lease >= 1]
        try:
            reply = await self.backend.sync(rows)
        except PinholeError as exc:
            if exc.kind is PinholeErrorKind.FIREWALL_DISABLED:
                log.info("pinhole sync: natd has no IPv6 firewall; %d rows kept", len(rows))
                return True
            # retried at every heartbeat: warn once, not once a second
            log.log(logging.DEBUG if self.failing else logging.WARNING, "pinhole sync of %d rows failed: %s",
                    len(rows), exc)
            self.failing = True
            return False
        self.failing = False
        log.info("pinhole sync: %d rows, natd added %d, removed %d%s", len(rows), reply.added, reply.removed,
                 f", refused {reply.refused}" if reply.refused else "")
        return True

    async def on_natd_event(self, msg: wire.Message) -> None:
        """A new boot id (natd restarted) or a ``restored`` event: re-sync and re-read the status;
        an interface change (``wan``, sent for the LAN's IPv6 prefixes too): re-read the status."""
        if isinstance(msg, wire.WanChanged):
            await self.pinholes.refresh()
            return
        if isinstance(msg, wire.Heartbeat):
            if msg.boot_id == self.boot:
                return
            if self.boot is not None:
                log.warning("natd restarted (boot %s); re-syncing pinholes", msg.boot_id)
        elif isinstance(msg, wire.Restored):
            log.info("natd restored its kernel objects (%s); re-syncing pinholes", msg.reason)
        else:
            return
        await self.pinholes.refresh()
        if await self.sync():  # a failed sync is retried at the next heartbeat
            self.boot = msg.boot_id
