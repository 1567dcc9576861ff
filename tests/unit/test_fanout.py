"""bt_ray.phases.fanout.run_stream: jobs that lead to more jobs, with plain-callable programs (no LM)."""

import time

import dspy

from bt_ray.phases.fanout import Job, run_jobs, run_stream


class Program:
    """A stand-in for a DSPy program: waits `delay` s, then answers; records when it started and ended."""

    def __init__(self, name, delay, log):
        self.name, self.delay, self.log = name, delay, log

    def __call__(self, **inputs):
        self.log.append(("start", self.name, time.monotonic()))
        time.sleep(self.delay)
        self.log.append(("end", self.name, time.monotonic()))
        return dspy.Prediction(answer=self.name)


def example():
    return dspy.Example(question="q").with_inputs("question")


def test_a_follow_up_job_starts_while_an_unrelated_slow_job_still_runs():
    """Π's bootstraps: a plan's next wave must not wait for another plan's (or a scoring job's) stragglers."""
    log = []
    slow, fast, after = Program("slow", 1.0, log), Program("fast", 0.05, log), Program("after-fast", 0.05, log)
    jobs = [Job(slow, example(), tag="slow"), Job(fast, example(), tag="fast")]
    follow = lambda outcome: [Job(after, example(), tag="after-fast")] if outcome.job.tag == "fast" else []  # noqa: E731

    outcomes = run_stream(jobs, follow, None, adapter=None, max_inflight=4)

    assert [o.job.tag for o in outcomes] == ["fast", "after-fast", "slow"]  # in the order they ended
    ended = {name: t for event, name, t in log if event == "end"}
    started = {name: t for event, name, t in log if event == "start"}
    assert started["after-fast"] < ended["slow"]


def test_run_jobs_returns_outcomes_in_job_order():
    log = []
    jobs = [Job(Program(str(i), 0.2 - 0.05 * i, log), example(), tag=i) for i in range(4)]
    assert [o.job.tag for o in run_jobs(jobs, None, adapter=None, max_inflight=4)] == [0, 1, 2, 3]
    assert [name for event, name, _ in log if event == "end"] == ["3", "2", "1", "0"]
