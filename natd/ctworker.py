"""The conntrack clean-up off natd's event loop: a small worker process natd talks to over a pipe.

A conntrack dump is a kernel walk of the whole table inside one recv (tens of ms with
20,000 entries); on natd's loop it would stall every request behind it.
So natd hands each batch of deleted forwards to this process, one JSON line in, one
JSON line out, and its loop only moves bytes through a pipe. The worker is started on
first use and again after it died; a batch it could not finish is reported, not retried
(the entries time out in the kernel on their own).

    natd -> worker: {"flows": [[proto, wan_ip, wan_port, lan_ip, lan_port], ...]}   (deleted forwards)
                or  {"pinholes": [[lan_ip, proto, lan_port, remote or null], ...]}  (closed pinholes)
    worker -> natd: {"removed": N}  or  {"error": "why"}
"""

# ruff: noqa: E402  (the imports follow the ssl block below on purpose)
from __future__ import annotations

import sys

if __name__ == "__main__":  # the worker process: as natd itself, it never speaks TLS (asyncio would load ssl)
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]

import asyncio
import json
import logging
import os

from natd import conntrack

log = logging.getLogger("natd.ctworker")

BATCH_TIMEOUT_S = 30.0  # one batch: dump + deletes, bounded (netlink's own timeouts are shorter)
MAX_LINE = 1 << 16  # an answer line is tiny; requests may be long (stdin has no limit to hit)


class CtWorker:
    """natd's side: one worker process, one batch at a time."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def _start(self) -> asyncio.subprocess.Process:
        if self.proc is not None and self.proc.returncode is None:
            return self.proc
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where the natd package lives
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "natd.ctworker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env, limit=MAX_LINE)
        return self.proc

    async def forget(self, flows: list[conntrack.Flow]) -> int:
        """Delete the conntrack entries of ``flows`` in the worker; how many went."""
        if not flows:
            return 0
        return await self._ask({"flows": [[f.proto, f.wan_ip, f.wan_port, f.lan_ip, f.lan_port] for f in flows]})

    async def forget_pinholes(self, keys: list[conntrack.PinFlow]) -> int:
        """Delete the conntrack entries closed pinholes ``keys`` admitted, in the worker; how many went."""
        if not keys:
            return 0
        return await self._ask({"pinholes": [list(k) for k in keys]})

    async def _ask(self, request: dict[str, object]) -> int:
        """One batch to the worker, one answer back (the worker is started or restarted as needed)."""
        async with self._lock:
            proc = await self._start()
            assert proc.stdin is not None and proc.stdout is not None
            line = json.dumps(request)
            try:
                async with asyncio.timeout(BATCH_TIMEOUT_S):
                    proc.stdin.write(line.encode() + b"\n")
                    await proc.stdin.drain()
                    answer = await proc.stdout.readline()
            except (TimeoutError, OSError, ValueError):
                self.close()
                raise
            if not answer:
                self.close()
                raise OSError("conntrack worker exited")
            reply = json.loads(answer)
            if "error" in reply:
                raise OSError(str(reply["error"]))
            return int(reply["removed"])

    def close(self) -> None:
        """End the worker (natd stops, or the worker hung)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
        self.proc = None


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 30)  # one request per line, as long as natd's batch
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return  # natd closed the pipe (it stopped)
        try:
            reply: dict[str, object] = {"removed": await _run(json.loads(line))}
        except Exception as exc:  # one bad batch never ends the worker
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


async def _run(request: dict[str, list[list]]) -> int:
    """One batch: deleted forwards' flows, or closed pinholes' flows."""
    if "pinholes" in request:
        return await conntrack.forget_pinholes((str(li), int(p), int(lp), None if r is None else str(r))
                                               for li, p, lp, r in request["pinholes"])
    return await conntrack.forget(conntrack.Flow(int(p), str(wi), int(wp), str(li), int(lp))
                                  for p, wi, wp, li, lp in request["flows"])


if __name__ == "__main__":
    asyncio.run(_serve())
