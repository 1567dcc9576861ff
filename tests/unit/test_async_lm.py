"""bt-ray's dspy.LM called asynchronously (`await lm.acall(...)`, as DSPy's async programs do)."""

import asyncio
import threading
import time

from bt_ray.inference.lm import pool_lm

from .fakes import FakePool, unique_tag


class SlowPool(FakePool):
    """Fake pool: every call takes 0.3 s and the most calls in flight at once are counted."""

    def __init__(self):
        super().__init__(responder=lambda request: "[[ ## answer ## ]]\nok\n\n")
        self.inflight = self.peak = 0
        self._count = threading.Lock()

    def generate(self, request):
        with self._count:
            self.inflight += 1
            self.peak = max(self.peak, self.inflight)
        time.sleep(0.3)
        with self._count:
            self.inflight -= 1
        return super().generate(request)


def test_async_calls_run_up_to_max_inflight_at_once():
    """asyncio.to_thread's default executor has min(32, CPUs + 4) threads: 6 calls at once on 2 CPUs."""
    pool = SlowPool()
    lm = pool_lm(pool, unique_tag(), None, temperature=0.1, max_tokens=16, max_inflight=48)

    async def main():
        return await asyncio.gather(*(lm.acall(messages=[{"role": "user", "content": f"question {i}"}])
                                      for i in range(48)))

    answers = asyncio.run(main())
    assert len(answers) == 48 and len(pool.requests) == 48
    assert pool.peak == 48
