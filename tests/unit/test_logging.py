"""The daemons' log handler: a line is written after the answer its request waits for, in order,
bounded, and at once where no loop runs."""

from __future__ import annotations

import asyncio
import io
import logging

from shared.daemon import MAX_DEFERRED_RECORDS, DeferredHandler
from shared.guard import SafeFormatter, escape


def _logger(stream: io.StringIO) -> tuple[logging.Logger, DeferredHandler]:
    handler = DeferredHandler(stream)
    handler.setFormatter(SafeFormatter("%(message)s"))
    log = logging.getLogger(f"test.deferred.{id(stream)}")
    log.handlers[:] = [handler]
    log.propagate, log.level = False, logging.INFO
    return log, handler


def test_a_line_logged_in_a_callback_is_written_after_the_callback() -> None:
    out = io.StringIO()
    log, _ = _logger(out)
    row = ["before"]

    async def main() -> None:
        log.info("added %s", row)
        row[0] = "changed"  # the line keeps what was logged, not what the row became
        out.write("ANSWER\n")  # what the request sends before the loop's next turn
        log.info("second")
        await asyncio.sleep(0)
        out.write("NEXT\n")

    asyncio.run(main())
    assert out.getvalue() == "ANSWER\nadded ['before']\nsecond\nNEXT\n"


def test_without_a_loop_and_with_a_traceback_lines_are_written_at_once() -> None:
    out = io.StringIO()
    log, _ = _logger(out)
    log.info("start-up %d", 1)
    assert out.getvalue() == "start-up 1\n"

    async def main() -> None:
        log.info("held")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")  # everything held goes first, then the traceback, now
        assert out.getvalue().startswith("start-up 1\nheld\nfailed\nTraceback")

    asyncio.run(main())


def test_held_lines_are_bounded_and_flush_writes_them() -> None:
    out = io.StringIO()
    log, handler = _logger(out)

    async def main() -> None:
        for i in range(MAX_DEFERRED_RECORDS + 1):
            log.info("line %d", i)
        lines = out.getvalue().splitlines()
        assert lines == [f"line {i}" for i in range(MAX_DEFERRED_RECORDS + 1)]  # the full buffer went first
        log.info("last")
        handler.flush()  # what logging.shutdown does at exit
        assert out.getvalue().splitlines()[-1] == "last"

    asyncio.run(main())


def test_time_stamps_are_logging_s_own() -> None:
    plain, safe = logging.Formatter("%(asctime)s %(message)s"), SafeFormatter("%(asctime)s %(message)s")
    for created in (1_800_000_000.0, 1_800_000_000.25, 1_800_000_000.999, 1_800_000_001.5, 1_700_000_000.125):
        rec = logging.LogRecord("x", logging.INFO, "f", 1, "m", None, None)
        rec.created, rec.msecs = created, int((created - int(created)) * 1000)
        assert safe.format(rec) == plain.format(rec)


def test_printable_messages_pass_and_control_characters_do_not() -> None:
    assert escape("mapping 42 TCP 8080 -> 192.168.1.2:80 \u00e9") == "mapping 42 TCP 8080 -> 192.168.1.2:80 \u00e9"
    assert escape("a\u2028b\x85c\x7f") == "a\\x2028b\\x85c\\x7f"
