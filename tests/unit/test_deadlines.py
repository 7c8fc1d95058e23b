"""shared.deadlines: timeouts of one length on one loop timer, in the order they were set."""

from __future__ import annotations

import asyncio

import pytest

from shared.deadlines import Deadlines, expire


def test_due_ones_run_in_order_cancelled_ones_never_and_the_queue_stays_small() -> None:
    ran: list[str] = []

    async def main() -> None:
        d = Deadlines(0.05)
        d.call_later(lambda: ran.append("a"))
        d.call_later(lambda: ran.append("b")).cancel()
        d.call_later(lambda: ran.append("c"))
        await asyncio.sleep(0.15)
        assert ran == ["a", "c"] and len(d) == 0
        for _ in range(1000):  # set and cancelled at once, as a request that is answered in time
            d.call_later(lambda: ran.append("x")).cancel()
        assert len(d) == 1  # the cancelled head goes as the next one comes
        late = d.call_later(lambda: ran.append("late"))
        d.close()
        await asyncio.sleep(0.1)
        assert ran == ["a", "c"] and late.callback is None

    asyncio.run(main())


def test_a_callback_may_set_the_next_timeout_and_a_waiter_times_out() -> None:
    ran: list[int] = []

    async def main() -> None:
        d = Deadlines(0.03)

        def again() -> None:
            ran.append(len(ran))
            if len(ran) < 3:
                d.call_later(again)

        d.call_later(again)
        await asyncio.sleep(0.25)
        assert ran == [0, 1, 2]
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        d.call_later(lambda: expire(fut))
        with pytest.raises(TimeoutError):
            await fut

    asyncio.run(main())
