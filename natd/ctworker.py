"""The conntrack worker process (``python -m natd.ctworker``): natd's conntrack clean-up off its loop.

A conntrack dump is a kernel walk of the whole table inside one recv (tens of ms with
20,000 entries); on natd's loop it would stall every request behind it. So natd
(natd/ctlink.py) hands each batch of deleted forwards or closed pinholes to this process,
one JSON line in, one JSON line out:

    natd -> worker: {"flows": [[proto, wan_ip, wan_port, lan_ip, lan_port], ...]}   (deleted forwards)
                or  {"pinholes": [[lan_ip, proto, lan_port, remote or null], ...]}  (closed pinholes)
    worker -> natd: {"removed": N}  or  {"error": "why"}

A plain blocking process that imports no asyncio, ssl or logging (natd logs the answers), so that
it costs a 128 MB router little while it runs (docs/performance.md); it exits when natd closes its
stdin, which natd does after the worker sat idle (natd/ctlink.py CT_IDLE_S) and when natd stops.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from natd import conntrack

TYPE_CHECKING = False  # the typing module alone is ~0.8 MB of the worker's memory: types for mypy only
if TYPE_CHECKING:
    from typing import BinaryIO

MAX_ITEMS = 65_536  # flows or pinholes per request (a whole port range): natd splits bigger batches
MAX_REQUEST = MAX_ITEMS * 128  # bytes of one request line: an item is at most ~100 bytes of JSON
MAX_ERROR = 200  # characters of an error answer (an exception's text may quote the request)


def run(request: object) -> int:
    """One batch, deleted forwards' flows or closed pinholes' flows; how many entries went."""
    if not isinstance(request, dict):
        raise ValueError("a request is a JSON object")
    if "pinholes" in request:
        return conntrack.forget_pinholes((str(li), int(p), int(lp), None if r is None else str(r))
                                         for li, p, lp, r in request["pinholes"])
    if "flows" in request:
        return conntrack.forget(conntrack.Flow(int(p), str(wi), int(wp), str(li), int(lp))
                                for p, wi, wp, li, lp in request["flows"])
    raise ValueError("a request holds flows or pinholes")


def error(why: str) -> bytes:
    """An error answer line."""
    return json.dumps({"error": why[:MAX_ERROR]}).encode() + b"\n"


def answer(line: bytes, batch: Callable[[object], int] = run) -> bytes:
    """The answer line to one request line; a bad request or a failed batch is an error answer."""
    try:
        return json.dumps({"removed": batch(json.loads(line))}).encode() + b"\n"
    except Exception as exc:  # one bad batch never ends the worker
        return error(f"{type(exc).__name__}: {exc}")


def serve(stdin: BinaryIO, stdout: BinaryIO, batch: Callable[[object], int] = run) -> int:
    """Answer request lines until natd closes the pipe; the exit status."""
    while True:
        line = stdin.readline(MAX_REQUEST + 1)
        if not line:
            return 0  # EOF: natd stopped, or let the idle worker go
        if len(line) > MAX_REQUEST:
            while line and not line.endswith(b"\n"):  # skip to the line's end, a bounded piece at a time
                line = stdin.readline(MAX_REQUEST)
            out = error(f"request longer than {MAX_REQUEST} bytes")
        else:
            out = answer(line, batch)
        stdout.write(out)
        stdout.flush()


if __name__ == "__main__":
    sys.exit(serve(sys.stdin.buffer, sys.stdout.buffer))
