"""shared.daemon.QuietTrim: the heap goes back to the kernel once a burst of work is over,
never in the middle of it, and not again before the next burst."""

from __future__ import annotations

import asyncio
import ctypes
import subprocess
import sys

import pytest

from shared import daemon


def test_due_after_a_burst_at_the_first_quiet_period_and_not_again_before_the_next() -> None:
    trim = daemon.QuietTrim(ops=50)
    seen = trim.count
    for _ in range(5):  # a burst of 100 over five periods, busy in each one
        for _ in range(20):
            trim.note()
        assert not trim.due(seen)
        seen = trim.count
    assert trim.due(seen)  # a period with none
    trim._trimmed_at = trim.count  # (what run() does after trimming)
    for _ in range(20):
        trim.note()
    assert not trim.due(trim.count)  # 20 more: below the threshold
    for _ in range(30):
        trim.note()
    assert trim.due(trim.count)


def test_a_bulk_operation_is_a_burst_of_its_own_trimmed_once_quiet() -> None:
    """natd's sync of 10k or a restore is one operation that fills the heap like a thousand: the
    trim comes at the next quiet period, after the replies and monitor events that follow it."""
    trim = daemon.QuietTrim(ops=50)
    trim.note()
    trim.soon()
    assert not trim.due(0)  # busy in this period
    assert trim.due(trim.count)
    trim._trimmed_at = trim.count
    trim.note()
    assert not trim.due(trim.count)


def test_the_task_trims_once_the_notes_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    trim = daemon.QuietTrim(ops=50, quiet=0.02)
    monkeypatch.setattr(daemon, "release_memory", lambda: trims.append(trim.count))

    async def run() -> None:
        task = asyncio.create_task(trim.run())
        for _ in range(100):
            trim.note()
        for _ in range(200):  # bounded: 2 s at most
            if trims:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # quiet periods go by: no second trim without new work
        task.cancel()

    asyncio.run(run())
    assert trims == [100]


def test_release_memory_is_glibc_malloc_trim_here() -> None:
    """The bed runs on glibc: the trim is real (musl's is None and a no-op)."""
    daemon._glibc.cache_clear()
    assert daemon._glibc("malloc_trim") is not None
    daemon.release_memory()


def test_the_tidy_up_runs_before_the_trim_and_a_failing_one_ends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """controld's WAL checkpoint rides on the trim: once per quiet moment, just before it; an
    exception in it is logged and the trims go on."""
    done: list[str] = []

    def tidy() -> None:
        done.append("tidy")
        if len(done) == 1:
            raise RuntimeError("a bug in the tidy-up")

    trim = daemon.QuietTrim(ops=10, quiet=0.02, tidy=tidy)
    monkeypatch.setattr(daemon, "release_memory", lambda: done.append("trim"))

    async def run() -> None:
        task = asyncio.create_task(trim.run())
        for burst in (1, 2):
            for _ in range(10):
                trim.note()
            for _ in range(200):  # bounded: 2 s at most
                if done.count("trim") == burst:
                    break
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(run())
    assert done == ["tidy", "trim", "tidy", "trim"]


_MMAPPED_AFTER_A_BIG_FREE = """
import ctypes, sys
from shared import daemon
class Info(ctypes.Structure):  # glibc's struct mallinfo2 (2.33+)
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[1] == "hold":
    daemon.hold_mmap_threshold()
big = bytes(1 << 20)  # mmapped (above the starting threshold); freed below
del big
before = libc.mallinfo2().hblkhd
mid = bytes(600_000)  # without the hold: from the heap, as glibc raised its threshold at the free
print(libc.mallinfo2().hblkhd - before >= 600_000)
"""


@pytest.mark.parametrize(("mode", "mmapped"), [("hold", "True"), ("default", "False")])
def test_the_held_mmap_threshold_keeps_big_blocks_out_of_the_heap(mode: str, mmapped: str) -> None:
    """glibc raises its mmap threshold to each mmapped block freed, so later big blocks fragment the heap;
    hold_mmap_threshold() keeps them mmapped (given back whole when freed). The default case shows the
    test can tell the two apart."""
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc 2.33+ (no mallinfo2)")
    res = subprocess.run([sys.executable, "-c", _MMAPPED_AFTER_A_BIG_FREE, mode], capture_output=True, text=True,
                         timeout=30, check=True)
    assert res.stdout.strip() == mmapped
