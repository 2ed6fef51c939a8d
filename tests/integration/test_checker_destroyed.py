"""The exactly-once checker excuses a missing message as "destroyed with Redis" only on proof.

`support.exactly_once` counts a never-handled message apart from the lost ones when a Redis
restarted empty provably took it (see its docstring, conditions 1–4). These tests pin both
halves: a real redis-server restarted empty or with its data is told apart from outside,
and each condition missing turns the excuse back into a loss.
"""

from __future__ import annotations

import time

import pytest

from support.exactly_once import Checker, Copy, Instance, RedisInstances, _AgentLedger
from support.probe import redis_messaging
from support.redis_server import RedisServer

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("keep_data", [False, True], ids=["empty", "with-data"])
def test_a_restart_empty_is_told_apart_from_one_with_its_data(keep_data):
    server = RedisServer().start()
    try:
        instances = RedisInstances(redis_messaging(server.port))
        first = instances.current()
        server.shutdown(keep_data=keep_data)
        assert instances.current() is None, "nothing answers while it is down"
        server.start()
        second = instances.current()
        assert first and second and first != second
        assert (instances.wiped(first) is not None) is (not keep_data)
        assert instances.wiped(second) is None, "the running instance is not proven wiped"
        instances.close()
    finally:
        server.close()


NO_PID = 4_194_305  # above the kernel's largest pid_max: no live process has it


def _checker(tmp_path) -> tuple[Checker, float]:
    """A checker with no sender or sampler running: the tests fill in what they would have seen."""
    checker = Checker(tmp_path, "g", redis_messaging(1), ["a"])
    t0 = time.monotonic() - 100  # every event in the past, so no sample can make a copy "alive now"
    old, new = Instance("old", t0, t0 + 10, canary=True, data_survived=False), Instance("new", t0 + 11, t0 + 20)
    checker.sender.instances.seen = [old, new]
    for seq in range(10):  # one a second: 0..9 acknowledged by the old instance, 11.. by the new
        checker.sender.sent[seq] = t0 + seq
        checker.sender.acked_by[seq] = "old"
    for seq in range(11, 15):
        checker.sender.sent[seq] = t0 + seq + 0.5
        checker.sender.acked_by[seq] = "new"
    # Copy 1 handled 0..6 and died at 6.5 (SIGKILL); copy 2 started after the old Redis was gone.
    first, second = Copy(NO_PID, 1, t0 - 1), Copy(NO_PID + 1, 2, t0 + 12)
    ledger = _AgentLedger(copies=[first, second],
                          handled=[(s, 1, t0 + s) for s in range(7)] + [(s, 2, t0 + 13) for s in range(11, 15)])
    checker.ledgers.agents["a"] = ledger
    checker.dead_by.update({first: t0 + 6.6, second: t0 + 30})
    return checker, t0


def test_messages_only_the_wiped_store_held_are_destroyed_not_lost(tmp_path):
    report = _checker(tmp_path)[0].report().agents["a"]
    assert report.destroyed == [7, 8, 9] and report.lost == []


def test_a_restart_that_kept_its_data_excuses_nothing(tmp_path):
    checker, t0 = _checker(tmp_path)
    checker.sender.instances.seen[0].data_survived = True
    report = checker.report().agents["a"]
    assert report.lost == [7, 8, 9] and report.destroyed == []


def test_a_publish_not_proven_stored_in_one_instance_is_lost(tmp_path):
    checker, t0 = _checker(tmp_path)
    del checker.sender.acked_by[8]  # the run_id read after the publish failed, or changed
    assert checker.report().agents["a"].lost == [8]


def test_a_copy_alive_all_along_owes_the_message(tmp_path):
    checker, t0 = _checker(tmp_path)
    first = checker.ledgers.agents["a"].copies[0]
    checker.dead_by[first] = t0 + 10.5  # it outlived the old Redis: its feed should have had them
    report = checker.report().agents["a"]
    assert report.lost == [7, 8, 9] and report.destroyed == []


def test_a_copy_that_read_later_messages_of_that_instance_owed_the_earlier_ones(tmp_path):
    checker, t0 = _checker(tmp_path)
    checker.ledgers.agents["a"].handled.append((9, 2, t0 + 13))  # read 9 from the old store
    report = checker.report().agents["a"]
    assert report.lost == [7, 8] and report.destroyed == []


def test_a_message_published_to_the_new_empty_redis_is_lost(tmp_path):
    checker, t0 = _checker(tmp_path)
    checker.ledgers.agents["a"].handled = [h for h in checker.ledgers.agents["a"].handled if h[0] != 12]
    report = checker.report().agents["a"]
    assert report.lost == [12] and report.destroyed == [7, 8, 9]
