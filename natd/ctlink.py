"""natd's side of the conntrack worker process (natd/ctworker.py): one batch at a time over its pipes.

The worker is started on first use and again after it died or went idle: CT_IDLE_S after its
last batch natd closes the worker's stdin (it exits at EOF) and reaps it, so a router holds the
process only around bursts of deletes. A batch the worker could not finish is reported, not
retried (the entries time out in the kernel on their own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys

from natd import conntrack
from natd.ctworker import MAX_ITEMS

CT_IDLE_S = 30.0  # a burst of deletes reuses one worker; an idle router holds none (~12 MiB RSS back)
BATCH_TIMEOUT_S = 30.0  # one batch: dump + deletes, bounded (the worker's socket timeouts are shorter)
EXIT_TIMEOUT_S = 2.0  # a worker exits at EOF at once; one that does not within this is killed
MAX_LINE = 1 << 16  # an answer line is tiny
# No bytecode writes (the packages ship it compiled), no cwd on the path, no site-packages scan: the
# worker needs only the stdlib and the directory natd lives in (PYTHONPATH).
WORKER_ARGV = ("-B", "-P", "-S", "-m", "natd.ctworker")


class CtWorker:
    """natd's side: one worker process, one batch at a time, ended after ``idle_s`` without a batch."""

    def __init__(self, idle_s: float = CT_IDLE_S) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.idle_s = idle_s
        self._lock = asyncio.Lock()
        self._idle: asyncio.TimerHandle | None = None
        self._ending: set[asyncio.Task[None]] = set()  # workers being reaped

    async def _start(self) -> asyncio.subprocess.Process:
        if self.proc is not None and self.proc.returncode is None:
            return self.proc
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where the natd package lives
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, *WORKER_ARGV, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env, limit=MAX_LINE)
        return self.proc

    async def forget(self, flows: list[conntrack.Flow]) -> int:
        """Delete the conntrack entries of ``flows`` in the worker; how many went."""
        return await self._batches("flows", [[f.proto, f.wan_ip, f.wan_port, f.lan_ip, f.lan_port] for f in flows])

    async def forget_pinholes(self, keys: list[conntrack.PinFlow]) -> int:
        """Delete the conntrack entries closed pinholes ``keys`` admitted, in the worker; how many went."""
        return await self._batches("pinholes", [list(k) for k in keys])

    async def _batches(self, kind: str, items: list[list]) -> int:
        """``items`` in requests of at most MAX_ITEMS (the worker's bound on one line)."""
        n = 0
        for i in range(0, len(items), MAX_ITEMS):
            n += await self._ask({kind: items[i:i + MAX_ITEMS]})
        return n

    async def _ask(self, request: dict[str, object]) -> int:
        """One batch to the worker, one answer back (the worker is started or restarted as needed)."""
        async with self._lock:
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
            try:
                return await self._exchange(request)
            finally:  # still under the lock: no batch is in flight when the timer is armed
                if self.proc is not None:
                    self._idle = asyncio.get_running_loop().call_later(self.idle_s, self._on_idle)

    async def _exchange(self, request: dict[str, object]) -> int:
        proc = await self._start()
        assert proc.stdin is not None and proc.stdout is not None
        line = json.dumps(request, separators=(",", ":"))
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

    def _on_idle(self) -> None:
        self._idle = None
        if not self._lock.locked():  # a batch re-arms the timer when it is done
            self._end(kill=False)

    def _end(self, kill: bool) -> None:
        """Let the worker go (closed stdin, or killed) and reap it in the background."""
        proc, self.proc = self.proc, None
        if proc is not None:
            task = asyncio.get_running_loop().create_task(_reap(proc, kill))
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

    def close(self) -> None:
        """Kill the worker (it hung or broke the protocol); the next batch starts another."""
        self._end(kill=True)

    async def stop(self) -> None:
        """End the worker as natd stops: EOF on its stdin, then reaped."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._end(kill=False)
        if self._ending:
            await asyncio.wait(self._ending)


async def _reap(proc: asyncio.subprocess.Process, kill: bool) -> None:
    """End ``proc`` (EOF on its stdin, or SIGKILL; SIGKILL too if EOF did not end it in EXIT_TIMEOUT_S),
    and wait for it, so that no zombie is left."""
    with contextlib.suppress(ProcessLookupError):  # it may have exited meanwhile
        if proc.returncode is None:
            if kill:
                proc.kill()
            elif proc.stdin is not None:
                proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), EXIT_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await asyncio.wait_for(proc.wait(), EXIT_TIMEOUT_S)
