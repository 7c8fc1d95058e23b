"""Per-host fairness for the UPnP HTTP server, sans-I/O: peer and time in, admit or refuse out.

One host cannot starve the others: each source address may hold at
most MAX_PER_HOST connections and open them, while it already holds one, at RATE_PER_S
(burst RATE_BURST): a control point that waits for each answer before its next request
(miniupnpc listing 10,000 entries, one connection each) is bounded by our own service
time and is never refused, only parallel openers are rate limited; the last
RESERVE of the MAX_CONNECTIONS slots go only to hosts holding fewer than RESERVE_UNDER
connections, so a newcomer is served even while others fill the server. Each connection
has its own deadlines (controld.upnp.http: READ_DEADLINE for header and body), so a slow
sender frees its slot within seconds.
"""

from __future__ import annotations

MAX_CONNECTIONS = 256  # in total
MAX_PER_HOST = 32  # per source address (a control point runs a few at once; a fuzzer 16)
RESERVE = 32  # of the total, kept for hosts holding fewer than RESERVE_UNDER
RESERVE_UNDER = 2
RATE_BURST = 256.0  # connections one host may open at once
RATE_PER_S = 128.0  # and then per second (a bound on work per host, well above any control point)
MAX_HOSTS = 4096  # rate buckets remembered (bounded; the least recently seen is forgotten)


class Fairness:
    """Connections held per host, and a token bucket of new connections per host."""

    def __init__(self, total: int = MAX_CONNECTIONS, per_host: int = MAX_PER_HOST, reserve: int = RESERVE,
                 burst: float = RATE_BURST, rate: float = RATE_PER_S) -> None:
        self.total, self.per_host, self.reserve = total, per_host, reserve
        self.burst, self.rate = burst, rate
        self.held: dict[str, int] = {}
        self.active = 0
        self.buckets: dict[str, tuple[float, float]] = {}  # host -> (tokens, last time)

    def admit(self, host: str, now: float) -> bool:
        """Take a connection slot for ``host`` (release it with :meth:`release`); False: refused."""
        held = self.held.get(host, 0)
        if held >= self.per_host or self.active >= self.total:
            return False
        if self.active >= self.total - self.reserve and held >= RESERVE_UNDER:
            return False  # the reserve is for hosts under their share
        if held == 0:  # one at a time: paced by our answers, nothing to limit
            self.held[host] = 1
            self.active += 1
            return True
        tokens, last = self.buckets.pop(host, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if len(self.buckets) >= MAX_HOSTS:
            self.buckets.pop(next(iter(self.buckets)))
        ok = tokens >= 1.0
        self.buckets[host] = (tokens - 1.0 if ok else tokens, now)
        if ok:
            self.held[host] = held + 1
            self.active += 1
        return ok

    def release(self, host: str) -> None:
        """``host``'s connection ended."""
        held = self.held.get(host, 0)
        if held <= 1:
            self.held.pop(host, None)
        else:
            self.held[host] = held - 1
        if held:
            self.active -= 1
