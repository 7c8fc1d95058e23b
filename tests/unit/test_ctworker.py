"""The conntrack worker process and natd's side of it (issue #12: a lean worker that goes away when idle).

The worker runs as a real subprocess here; every request used answers without a kernel walk
(an empty batch or a bad one), so no namespace is needed. tests/netns/test_natd_conntrack.py
runs it against the kernel.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys

import pytest

from natd import ctlink, ctworker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = ("asyncio", "ssl", "logging", "typing", "subprocess", "threading", "zmq")


def _gone(pid: int) -> bool:
    """True once ``pid`` is reaped (a zombie still has its /proc entry)."""
    return not os.path.exists(f"/proc/{pid}")


def test_worker_module_imports_no_asyncio_nor_other_heavy_modules() -> None:
    code = f"import natd.ctworker, sys; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, *ctlink.WORKER_ARGV[:-2], "-c", code], capture_output=True, text=True,
                         timeout=30, check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.stdout.strip() == "[]"


def test_worker_process_answers_bad_lines_with_errors_goes_on_and_exits_0_at_eof() -> None:
    p = subprocess.Popen([sys.executable, *ctlink.WORKER_ARGV], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.stdin is not None and p.stdout is not None

    def ask(line: bytes) -> dict:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(line + b"\n")
        p.stdin.flush()
        return json.loads(p.stdout.readline())

    try:
        assert ask(b"{not json")["error"].startswith("JSONDecodeError")
        assert ask(b'["flows"]') == {"error": "ValueError: a request is a JSON object"}
        assert ask(b'{"mappings": []}') == {"error": "ValueError: a request holds flows or pinholes"}
        huge = ask(b'{"flows": [[6, "100.64.0.1", 1, "192.168.1.2", "' + b"x" * 5000 + b'"]]}')
        assert len(huge["error"]) == ctworker.MAX_ERROR  # the request's text is not echoed whole
        assert ask(b" " * ctworker.MAX_REQUEST) == {"error": f"request longer than {ctworker.MAX_REQUEST} bytes"}
        assert ask(b'{"flows": []}') == {"removed": 0}  # and the worker went on
        p.stdin.close()
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_serve_bounds_a_line_and_takes_a_last_line_without_newline(monkeypatch) -> None:
    monkeypatch.setattr(ctworker, "MAX_REQUEST", 16)
    seen: list[object] = []

    def batch(request: object) -> int:
        seen.append(request)
        return 7

    out = io.BytesIO()
    stdin = io.BytesIO(b'{"flows":[1,2]}\n' + b"x" * 40 + b"\n" + b'{"flows":[1,22]}\n' + b'{"flows":[3]}')
    assert ctworker.serve(stdin, out, batch) == 0
    assert [json.loads(a) for a in out.getvalue().splitlines()] == [
        {"removed": 7}, {"error": "request longer than 16 bytes"}, {"error": "request longer than 16 bytes"},
        {"removed": 7}]
    assert seen == [{"flows": [1, 2]}, {"flows": [3]}]


def test_natd_splits_a_big_batch_into_requests_the_worker_accepts(monkeypatch) -> None:
    monkeypatch.setattr(ctlink, "MAX_ITEMS", 2)
    asked: list[dict] = []

    async def ask(request: dict) -> int:
        asked.append(request)
        return 1

    w = ctlink.CtWorker()
    monkeypatch.setattr(w, "_ask", ask)
    assert asyncio.run(w.forget_pinholes([("2001:db8::2", 6, p, None) for p in range(5)])) == 3
    assert [len(r["pinholes"]) for r in asked] == [2, 2, 1]


@pytest.mark.timeout(30)
def test_idle_worker_is_ended_and_reaped_and_the_next_batch_starts_another() -> None:
    async def run() -> None:
        w = ctlink.CtWorker(idle_s=0.05)
        assert await w._ask({"flows": []}) == 0
        assert w.proc is not None
        first = w.proc
        async with w._lock:  # a batch holds the worker: the timer firing now leaves it alone
            w._on_idle()
            assert w.proc is first and first.returncode is None
        w._idle = asyncio.get_running_loop().call_later(0.05, w._on_idle)  # as the batch would re-arm it
        for _ in range(500):  # bounded: the worker goes within ~50 ms
            if w.proc is None and not w._ending:
                break
            await asyncio.sleep(0.01)
        assert w.proc is None and first.returncode == 0 and _gone(first.pid)  # EOF, exit 0, no zombie

        assert await w._ask({"flows": []}) == 0  # the next batch starts a worker again
        second = w.proc
        assert second is not None and second.pid != first.pid
        await w.stop()  # natd stops: the worker ends at EOF and is reaped
        assert w.proc is None and second.returncode == 0 and _gone(second.pid) and w._idle is None

    asyncio.run(run())


@pytest.mark.timeout(30)
def test_a_broken_worker_is_killed_and_reaped() -> None:
    async def run() -> None:
        w = ctlink.CtWorker()
        assert await w._ask({"flows": []}) == 0
        proc = w.proc
        assert proc is not None
        w.close()  # what a timed-out or garbled exchange does
        assert w.proc is None and w._ending
        await asyncio.wait(w._ending)
        assert proc.returncode == -9 and _gone(proc.pid)
        await w.stop()  # the idle timer the batch armed goes too
        assert w._idle is None

    asyncio.run(run())
