import threading

import pytest

from bt_ray.inference.router import Router


def test_least_outstanding():
    r = Router(["a", "b", "c"])
    picks = [r.pick() for _ in range(6)]
    assert sorted(picks) == ["a", "a", "b", "b", "c", "c"]
    r.done("b"); r.done("b")
    assert r.pick() == "b"


def test_sticky_by_prefix_within_slack():
    r = Router(["a", "b"], sticky_slack=2)
    assert r.pick("P") == "a"
    # 'a' has 1 outstanding, 'b' 0: within the slack, the prefix stays home
    assert r.pick("P") == "a"
    assert r.pick("P") == "a"
    assert r.pick("P") == "b"  # 'a' now has 3 vs 0: too busy, spill to 'b'
    assert r.pick("Q") == "b" or r.load()["a"] >= r.load()["b"]


def test_remove_replica_and_reroute():
    r = Router(["a", "b"])
    r.pick("P")
    r.remove("a")
    assert r.pick("P") == "b"
    assert "a" not in r.load()


def test_done_is_balanced_under_threads():
    r = Router(["a", "b", "c", "d"])

    def work():
        for _ in range(500):
            rid = r.pick(None)
            r.done(rid)

    threads = [threading.Thread(target=work) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert r.load() == {"a": 0, "b": 0, "c": 0, "d": 0}


def test_an_empty_router_refuses_to_pick_and_takes_replicas_back():
    r = Router(["a"])
    r.remove("a")
    with pytest.raises(LookupError, match="no replica"):
        r.pick("p")
    r.add("a")
    assert r.pick("p") == "a"
