"""What the admin API, the CLI, rpcd and the LAN web page need from controld's core.

Every front end here talks to the core only through :class:`AdminBackend`, so the
core's policy (secure mode, permissions, quotas) applies to each of them exactly as
to UPnP, PCP and NAT-PMP. The values crossing it are plain dataclasses; ``asdict``
of each is what the admin socket sends as JSON (docs/operating.md lists the fields).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol


class Origin(str, Enum):
    """Which front end made a mapping."""

    UPNP = "upnp"
    PCP = "pcp"
    NATPMP = "natpmp"
    OPERATOR = "operator"  # admin socket, CLI, rpcd/LuCI, or the page's admin
    WEB = "web"  # a LAN host on the page, for itself


class ErrorKind(str, Enum):
    """Protocol-neutral failure kinds; each front end maps them to its own codes."""

    INVALID = "invalid"  # malformed or out-of-range argument
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"  # the external port is taken
    DENIED = "denied"  # policy: secure mode, permission rules, not the owner
    QUOTA = "quota"  # per-host or total limit reached
    UPSTREAM = "upstream"  # the PCP server refused or did not answer
    UNAVAILABLE = "unavailable"  # natd down, shutting down
    INTERNAL = "internal"
    # the admin socket's own refusals, before a request reaches the core
    BAD_REQUEST = "bad_request"  # not one JSON object on one line
    UNKNOWN_COMMAND = "unknown_command"
    TOO_LARGE = "too_large"  # a line over the limit; the connection is closed
    BUSY = "busy"  # too many clients; the connection is closed


class BackendError(Exception):
    """A refused or failed operation: ``kind`` for programs, ``message`` for people."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class Requester:
    """Who asks: the core's policy decides from this (secure mode: ``address`` only)."""

    origin: Origin
    address: str | None = None  # the LAN host's address; None for the operator
    admin: bool = False  # may see and manage every host's mappings


OPERATOR = Requester(Origin.OPERATOR, None, admin=True)


@dataclass(frozen=True)
class MappingView:
    """One mapping as operators see it (docs/operating.md, "list")."""

    id: int
    proto: str  # "TCP" or "UDP"
    ext_ip: str | None  # the address the Internet reaches (NAT2's in cascaded mode)
    ext_port: int
    nat1_ip: str | None  # the router's WAN binding; None in no-nat1 mode
    nat1_port: int | None
    int_ip: str
    int_port: int
    origin: Origin
    owner: str  # the LAN host that asked, or "operator"
    description: str
    remaining: int | None  # seconds of lifetime left; None = permanent
    state: str  # the lifecycle state: pending, active, renewing, recovering, deleting


@dataclass(frozen=True)
class AddRequest:
    """A new mapping from the admin API or the page. ``lifetime`` 0 = permanent (operator only)."""

    proto: str
    ext_port: int
    int_ip: str
    int_port: int
    description: str = ""
    lifetime: int = 0


@dataclass(frozen=True)
class MappingKey:
    """A mapping named by its external side instead of its id."""

    proto: str
    ext_port: int


@dataclass
class Counters:
    """Monotonic counters since controld started (docs/operating.md, "counters")."""

    requests: dict[str, int] = field(default_factory=dict)  # origin -> requests received
    errors: dict[str, dict[str, int]] = field(default_factory=dict)  # origin -> error code -> count
    pcp_rtt_p50_ms: float | None = None  # median PCP round trip of the recent exchanges
    renewals: int = 0  # PCP renewals sent
    resyncs: int = 0  # full NAT1 syncs sent to natd
    natd_restarts: int = 0  # natd boot-id changes seen


@dataclass
class Status:
    """controld's state at a glance (``igdpcp status``)."""

    version: str
    mode: str  # nat1-only, cascaded or no-nat1
    wan_ip: str | None
    ext_ip: str | None  # NAT2's external address (cascaded), else the WAN address
    pcp_server: str | None
    pcp_epoch: int | None  # the server's last epoch time
    pcp_last_answer: float | None  # wall-clock time of its last answer
    secure_mode: bool
    mappings: dict[str, int]  # origin -> mappings listed now
    counters: Counters


@dataclass(frozen=True)
class ChangeEvent:
    """A mapping appeared, changed state, or went (``watch``)."""

    kind: str  # "added", "updated" or "removed"
    mapping: MappingView
    reason: str = ""  # e.g. "lease expired", "host left", "operator"
    time: float = 0.0  # wall clock


Unsubscribe = Callable[[], None]


class AdminBackend(Protocol):
    """The core as the admin API, rpcd and the web page use it (docs/operating.md)."""

    async def status(self) -> Status:
        """The current :class:`Status`."""
        ...

    async def list(self) -> list[MappingView]:
        """Every mapping that exists (all states but gone), in creation order."""
        ...

    async def get(self, mapping_id: int) -> MappingView:
        """One mapping; BackendError(NOT_FOUND) if there is none with that id."""
        ...

    async def add(self, req: AddRequest, by: Requester) -> MappingView:
        """Create a mapping through the core's policy, upstream included; returns it once active."""
        ...

    async def delete(self, target: int | MappingKey, by: Requester) -> MappingView:
        """Delete one mapping (by id or external proto/port) upstream and locally; returns it.
        A non-admin requester may delete only its own (BackendError DENIED)."""
        ...

    async def flush(self, host: str | None, by: Requester) -> int:
        """Delete every mapping, or every mapping of LAN host ``host``; returns how many."""
        ...

    async def host_left(self, ip: str) -> int:
        """A LAN host left (DHCP release, RFC 6970 §5.10): delete its mappings; returns how many."""
        ...

    async def reload(self) -> None:
        """Re-read the configuration (as SIGHUP) without dropping mappings."""
        ...

    def subscribe(self, callback: Callable[[ChangeEvent], None]) -> Unsubscribe:
        """Call ``callback`` for every change from now on (from the loop, never blocking);
        returns the function that stops it."""
        ...
