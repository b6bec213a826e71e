"""fetch_guard.hand_over on faust's own ProducerBuffer (a running mode service; only its send is replaced): an agent
hands its table writes over while the buffer sends, and is never held by a buffer that stops sending (a broker down)
or by one that is stopping (a worker's shutdown, the SIGTERM path that held a worker past 60 s in CI at ee358af)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import SimpleNamespace
from typing import Any

from faust.transport.producer import ProducerBuffer

from pipeline.detect.fetch_guard import hand_over


class Buffer(ProducerBuffer):
    """Sends by appending to `sent`; with `stuck` set, a send never returns (a producer whose broker is gone)."""

    def __init__(self, stuck: bool = False) -> None:
        super().__init__()
        self.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))
        self.sent: list[Any] = []
        self.stuck = stuck

    async def _send_pending(self, fut: Any) -> None:
        if self.stuck:
            await asyncio.Event().wait()
        self.sent.append(fut)


async def _with(buf: Buffer, n: int, stop_first: bool = False) -> tuple[int, float]:
    await buf.start()
    for i in range(n):
        buf.put(i)  # type: ignore[arg-type]
    if stop_first:
        buf._stopped.set()  # what Service.stop sets first: should_stop is True from here on
    t0 = time.monotonic()
    handed = await hand_over(SimpleNamespace(buffer=buf))
    took = time.monotonic() - t0
    with contextlib.suppress(RuntimeError):  # faust's own stop refuses a buffer not empty ("Producer not Running")
        await buf.stop()
    return handed, took


def test_writes_are_handed_over_while_the_buffer_sends() -> None:
    buf = Buffer()
    handed, _ = asyncio.run(_with(buf, 1500))
    assert buf.size == 0 and len(buf.sent) == 1500 and handed == 1500


def test_a_buffer_that_stops_sending_does_not_hold_the_agent() -> None:
    buf = Buffer(stuck=True)
    handed, took = asyncio.run(_with(buf, 50))
    # the first message is taken by the sender and never returns; the rest wait in the buffer for the commit
    assert handed == 1 and buf.size == 49 and not buf.sent and took < 1.0


def test_a_stopping_buffer_is_left_at_once() -> None:
    buf = Buffer()
    handed, took = asyncio.run(_with(buf, 100, stop_first=True))
    assert handed == 0 and took < 0.05
