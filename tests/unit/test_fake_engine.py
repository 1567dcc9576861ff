"""The FakeEngine's loop load (a test engine's hook for bench/pool_overhead.py --loop-load): from its first
request on, its event loop is held busy_ms of every period_ms, read from the model directory in a replica."""

import asyncio
import sys
from pathlib import Path

from bt_ray.inference.engine import GenerationRequest, SamplingParams
from bt_ray.inference.fake import FakeEngine, write_loop_load

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def longest_stall(engine: FakeEngine, seconds: float = 0.3) -> float:
    """The longest gap of a 1 ms heartbeat on the engine's loop while one request waits `seconds`."""
    from pool_overhead import watch_loop

    request = GenerationRequest(({"role": "user", "content": f"fake-sleep:{seconds} hi"},), SamplingParams())
    _, stall = asyncio.run(watch_loop(engine.generate(request)))
    return stall


def test_a_loop_load_holds_the_loop_and_none_does_not(tmp_path):
    write_loop_load(str(tmp_path), 10, 6)
    loaded = FakeEngine(model_dir=str(tmp_path))
    assert loaded.loop_load == (10.0, 6.0)
    held = longest_stall(loaded)
    assert held >= 0.005  # each spin holds the loop for 6 ms
    assert FakeEngine(model_dir="").loop_load is None and longest_stall(FakeEngine()) < held
