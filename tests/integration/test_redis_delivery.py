"""process/redis_delivery.py against a real Redis, one subscription at a time.

The fault matrix finds delivery gaps statistically; these tests force one interleaving each,
with events rather than timing, so a gap shows on every run.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from rustic_ai.core.messaging.core.message import AgentTag, Message
from rustic_ai.core.utils.gemstone_id import GemstoneGenerator
from rustic_ai.core.utils.priority import Priority
from rustic_ai.k8s.process import redis_delivery
from rustic_ai.redis.messaging.backend import RedisMessagingBackend
from rustic_ai.redis.messaging.pubsub_manager import RedisPubSubManager


@pytest.fixture
def delivery_fixed():
    """The patches as an agent process has them, for this test only (the test process's own
    rusticai-redis clients, the checker's sender among them, keep the library's behaviour)."""
    saved = dict(RedisPubSubManager.__dict__)
    assert redis_delivery.install()
    yield
    for name in set(RedisPubSubManager.__dict__) - set(saved):
        delattr(RedisPubSubManager, name)
    for name, value in saved.items():
        if RedisPubSubManager.__dict__.get(name) is not value:
            setattr(RedisPubSubManager, name, value)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)  # polling a condition, not a synchronisation


def test_a_live_message_handled_before_the_first_replay_does_not_hide_the_backlog(redis_server, delivery_fixed):
    """A new copy of an agent subscribes: the live feed starts first, then the backlog after its
    predecessor's saved position is read. A live message handled in between (a busy machine)
    must not move the saved position past that backlog: the replay reads the saved position,
    and would then start after the live message — every message published while the agent had
    no copy (4–5 s in the fault matrix's keeper row) lost at once."""
    topic = f"guild-{uuid.uuid4().hex[:6]}:default_topic"
    client_id = f"guild${uuid.uuid4().hex[:6]}"
    ids = GemstoneGenerator(1)
    sender = AgentTag(id="sender", name="sender")

    def message(n: int) -> Message:
        return Message(id_obj=ids.get_id(Priority.NORMAL), sender=sender, topics=topic, payload={"n": n})

    publisher = RedisMessagingBackend({"host": "127.0.0.1", "port": redis_server.port})
    agent = RedisMessagingBackend({"host": "127.0.0.1", "port": redis_server.port})
    raw = redis.Redis(port=redis_server.port)
    try:
        # The predecessor handled message 0 and saved its position; 1..20 came while no copy ran.
        backlog = [message(n) for n in range(21)]
        for m in backlog:
            publisher.store_message("ns", topic, m)
        raw.set(f"eo:pos:{client_id}:{topic}", str(backlog[0].id))

        handled: list[int] = []
        live = message(21)
        live_handled = threading.Event()

        def handler(m: Message) -> None:
            handled.append(m.payload["n"])
            if m.id == live.id:
                live_handled.set()

        manager = agent._pubsub_manager
        subscribe = manager._subscribe_internal

        def subscribe_then_stall(topic_: str, handler_) -> None:
            # The live feed is on; before this thread gets on to the replay, a live message
            # arrives and the agent's worker handles it (and saves its position).
            subscribe(topic_, handler_)
            publisher.store_message("ns", topic, live)
            assert live_handled.wait(10), "the live message was not delivered"
            manager._client_queues[client_id].join()  # handled and its position saved

        manager._subscribe_internal = subscribe_then_stall
        agent.subscribe(topic, handler, client_id=client_id, namespace="ns")

        want = set(range(1, 22))
        try:
            _wait(lambda: want <= set(handled), 5, "the backlog handled")
        except AssertionError:
            raise AssertionError(f"lost {sorted(want - set(handled))}; handled {handled}") from None
        assert sorted(handled) == sorted(want), f"handled {handled}"
        # And a later copy starts after all of it.
        _wait(lambda: raw.get(f"eo:pos:{client_id}:{topic}") == str(live.id).encode(), 5,
              "the position saved after the newest message")
    finally:
        agent.cleanup()
        publisher.cleanup()
        raw.close()


@pytest.fixture
def fresh_gate():
    """Each agent process has its own delivery gate; quiesce closes it for good."""
    saved = redis_delivery._gate
    redis_delivery._gate = redis_delivery._DeliveryGate()
    yield
    redis_delivery._gate = saved


def test_a_message_queued_below_the_saved_position_at_a_stop_reaches_the_next_copy(
        redis_server, delivery_fixed, fresh_gate):
    """Ids order by priority first (GemstoneID), then the publisher's clock: a HIGH message
    published after a NORMAL one has the smaller id. Arriving as the agent stops (the gate
    leaves it unstarted), it sits below the position already saved, and the next copy, which
    starts after that position, would never see it. The position is lowered when such a
    message is queued: it costs at most a duplicate, never the message."""
    topic = f"guild-{uuid.uuid4().hex[:6]}:default_topic"
    client_id = f"guild${uuid.uuid4().hex[:6]}"
    ids = GemstoneGenerator(1)
    sender = AgentTag(id="sender", name="sender")
    publisher = RedisMessagingBackend({"host": "127.0.0.1", "port": redis_server.port})
    raw = redis.Redis(port=redis_server.port)
    first = second = None
    try:
        handled: list[str] = []
        first = RedisMessagingBackend({"host": "127.0.0.1", "port": redis_server.port})
        first.subscribe(topic, lambda m: handled.append(m.payload["n"]), client_id=client_id, namespace="ns")
        normal = Message(id_obj=ids.get_id(Priority.NORMAL), sender=sender, topics=topic, payload={"n": "normal"})
        publisher.store_message("ns", topic, normal)
        _wait(lambda: raw.get(f"eo:pos:{client_id}:{topic}") == str(normal.id).encode(), 5, "normal saved")
        # The stop begins (child.run calls quiesce) with nothing in hand; then a HIGH message arrives.
        assert redis_delivery.quiesce(1.0)
        urgent = Message(id_obj=ids.get_id(Priority.HIGH), sender=sender, topics=topic, payload={"n": "high"})
        assert urgent.id < normal.id
        publisher.store_message("ns", topic, urgent)
        _wait(lambda: not first._pubsub_manager._client_workers[client_id].is_alive(), 5, "the worker gone")
        assert handled == ["normal"]
        first.cleanup()
        first = None
        redis_delivery._gate = redis_delivery._DeliveryGate()  # the next copy is a new process
        got: list[str] = []
        second = RedisMessagingBackend({"host": "127.0.0.1", "port": redis_server.port})
        second.subscribe(topic, lambda m: got.append(m.payload["n"]), client_id=client_id, namespace="ns")
        try:
            _wait(lambda: "high" in got, 5, "the HIGH message delivered to the next copy")
        except AssertionError:
            raise AssertionError(f"the message queued at the stop was lost: the next copy got {got}") from None
    finally:
        for backend in (first, second, publisher):
            if backend is not None:
                backend.cleanup()
        raw.close()
