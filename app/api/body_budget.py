"""A budget of request-body bytes in flight, so concurrent large bodies cannot exhaust memory.

A request reserves its body size before the body is read and gives it back when its
response is done (the parsed body lives that long too). A request that does not fit waits
up to ``wait_s`` for others to finish, then is refused (the caller answers 503). One event
loop per process, so the bookkeeping needs no lock; ``release`` is synchronous, so it is
safe in a ``finally`` of a cancelled task.
"""

from __future__ import annotations

import asyncio


class BodyBudget:
    def __init__(self, capacity: int, wait_s: float) -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        self.used = 0
        self._waiters: list[asyncio.Future[None]] = []

    async def acquire(self, n: int) -> bool:
        """Reserve ``n`` bytes; False when they did not fit within ``wait_s``."""
        if self.used + n <= self.capacity:
            self.used += n
            return True
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.wait_s):
                while self.used + n > self.capacity:
                    freed = loop.create_future()
                    self._waiters.append(freed)
                    try:
                        await freed
                    finally:
                        if freed in self._waiters:
                            self._waiters.remove(freed)
        except TimeoutError:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n
        waiters, self._waiters = self._waiters, []
        for freed in waiters:  # every waiter looks again; those that fit go on
            if not freed.done():
                freed.set_result(None)
