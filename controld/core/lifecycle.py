"""A port mapping's lifecycle: every state, every event, every transition, in one table.

Rules
- A mapping is created in PENDING when a front end asks for it; nothing is promised yet.
- It becomes ACTIVE only when its whole path exists: the NAT1 binding and, upstream,
  a PCP SUCCESS (or, in nat1-only mode, the NAT1 binding alone). Only ACTIVE,
  RENEWING and RECOVERING mappings are listed to control points.
- A mapping that fails before ACTIVE is GONE and leaves nothing behind: its NAT1
  binding is removed (docs/core.md, "one request, end to end").
- An ACTIVE mapping is renewed in the background (RFC 6887 §11.2.1); renewal answers
  never reach the control point (RFC 6970 §5.9, docs/requirements.md IWF-75). A failed renewal
  keeps the mapping and retries until the lease ends (docs/requirements.md §12, our policy).
- When the server lost state (epoch, ANNOUNCE: RFC 6887 §8.5, §14.1) the mapping is
  RECOVERING until re-created with its stored nonce.
- A delete (control point, lease end, host gone) goes through DELETING to GONE; the
  local entry is dropped whatever the server answers (docs/requirements.md §11 notes).

Theory of operation: the interworking core feeds :func:`next_state` with the
mapping's state and an :class:`Ev`; the table says where it goes, and any pair not in
the table is a bug surfaced as :class:`LifecycleError`, never a silent no-op.
"""

from __future__ import annotations

from enum import Enum


class State(str, Enum):
    PENDING = "pending"
    ACTIVE = "active"
    RENEWING = "renewing"
    RECOVERING = "recovering"
    DELETING = "deleting"
    GONE = "gone"


class Ev(str, Enum):
    UPSTREAM_OK = "upstream_ok"  # PCP SUCCESS, or NAT1 installed in nat1-only mode
    UPSTREAM_ERROR = "upstream_error"  # PCP error result
    TIMEOUT = "timeout"  # no PCP answer within the bound
    RENEW_DUE = "renew_due"
    STATE_LOST = "state_lost"  # epoch check failed, ANNOUNCE, natd or WAN change
    DELETE = "delete"  # control point, lease end, DHCP release
    DELETED = "deleted"  # the delete finished (any outcome)


S, E = State, Ev
TRANSITIONS: dict[tuple[State, Ev], State] = {
    (S.PENDING, E.UPSTREAM_OK): S.ACTIVE,
    (S.PENDING, E.UPSTREAM_ERROR): S.GONE,
    (S.PENDING, E.TIMEOUT): S.GONE,
    (S.ACTIVE, E.RENEW_DUE): S.RENEWING,
    (S.ACTIVE, E.UPSTREAM_OK): S.ACTIVE,  # a re-add by the owner refreshes it
    (S.ACTIVE, E.STATE_LOST): S.RECOVERING,
    (S.ACTIVE, E.DELETE): S.DELETING,
    (S.RENEWING, E.UPSTREAM_OK): S.ACTIVE,
    (S.RENEWING, E.UPSTREAM_ERROR): S.ACTIVE,  # keep it; retried at the next renewal point
    (S.RENEWING, E.TIMEOUT): S.ACTIVE,
    (S.RENEWING, E.STATE_LOST): S.RECOVERING,
    (S.RENEWING, E.DELETE): S.DELETING,
    (S.RECOVERING, E.UPSTREAM_OK): S.ACTIVE,
    (S.RECOVERING, E.UPSTREAM_ERROR): S.RECOVERING,
    (S.RECOVERING, E.TIMEOUT): S.RECOVERING,
    (S.RECOVERING, E.STATE_LOST): S.RECOVERING,
    (S.RECOVERING, E.RENEW_DUE): S.RECOVERING,
    (S.RECOVERING, E.DELETE): S.DELETING,
    (S.DELETING, E.DELETED): S.GONE,
    (S.DELETING, E.DELETE): S.DELETING,
}

LISTED = frozenset({S.ACTIVE, S.RENEWING, S.RECOVERING})


class LifecycleError(RuntimeError):
    """An event that the current state does not accept."""


def next_state(state: State, event: Ev) -> State:
    """The state after ``event``; raises LifecycleError for a pair the table lacks."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise LifecycleError(f"event {event.value} not allowed in state {state.value}") from None
