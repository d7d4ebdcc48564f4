"""LoopMailbox: calls posted from another thread run on the loop, in order, with one wakeup per batch."""
from __future__ import annotations

import asyncio
import threading

from server.service import LoopMailbox


def test_posts_from_a_thread_run_in_order_with_fewer_wakeups_than_posts():
    async def scenario():
        loop = asyncio.get_running_loop()
        mailbox = LoopMailbox(loop)
        wakeups = []
        original = loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):
            wakeups.append(callback)
            return original(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting
        seen, done = [], asyncio.Event()
        on_loop = []

        def record(i):
            on_loop.append(threading.get_ident() == loop_thread)
            seen.append(i)
            if i == 9_999:
                done.set()

        loop_thread = threading.get_ident()

        def engine_thread():
            for step in range(100):  # 100 "steps" of 100 updates each, as an engine step emits them
                for row in range(100):
                    mailbox.post(record, step * 100 + row)

        worker = threading.Thread(target=engine_thread)
        worker.start()
        await asyncio.wait_for(done.wait(), 10)
        worker.join()
        return seen, wakeups, on_loop

    seen, wakeups, on_loop = asyncio.run(scenario())
    assert seen == list(range(10_000))
    assert all(on_loop)
    assert 1 <= len(wakeups) < 10_000 / 10, len(wakeups)
