"""A new copy's first subscription, with a live message handled before its backlog replay reads the saved position.

Run as ``python -m support.delivery_race PORT`` (a process of its own: ``redis_delivery.install()``
patches rusticai-redis for the whole process, as it does in an agent process). It prints one
JSON line: which messages the subscriber handled, and the saved position at the end.

What it stages, with a real Redis and rusticai-redis's own pub/sub manager: an earlier copy of
client ``c`` handled messages 0-4 of a topic and saved its position at 4, then died; 5-9 were
published while no copy ran (the backlog every new copy owes). A new copy subscribes. Its live
feed is up before the library's backlog replay reads the saved position (the order of
``RedisPubSubManager._subscribe_per_client``), so a message published in between may be
handled, and its position saved, first — measured in the seeded soak: 33 messages lost twice
in one run, each time the backlog of an agent adopted from a paused or cut-off host. Here that
interleaving is forced instead of waited for: the first read of the position by the replay
publishes message 10 and returns only once the subscriber has handled it and saved (or
skipped saving) its position.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid

from rustic_ai.k8s.process import redis_delivery

redis_delivery.install()

from rustic_ai.core.messaging.core.message import AgentTag, Message  # noqa: E402
from rustic_ai.core.utils.gemstone_id import GemstoneGenerator  # noqa: E402
from rustic_ai.core.utils.priority import Priority  # noqa: E402
from rustic_ai.redis.messaging.backend import RedisMessagingBackend  # noqa: E402

CLIENT = "c"
WAIT_S = 10.0


def main(port: int) -> None:
    backend = RedisMessagingBackend({"host": "127.0.0.1", "port": port})
    manager = backend._pubsub_manager
    topic = f"race-{uuid.uuid4().hex[:8]}"
    ids = GemstoneGenerator(1)
    messages = []
    for n in range(11):
        messages.append(Message(id_obj=ids.get_id(Priority.NORMAL), sender=AgentTag(id="sender", name="sender"),
                                topics=topic, payload={"n": n}))
        time.sleep(0.002)  # distinct milliseconds, as a sender at 20 a second has them
    for m in messages[:10]:
        backend.store_message("ns", topic, m)
    position_key = f"eo:pos:{CLIENT}:{topic}"
    backend.r.set(position_key, str(messages[4].id))

    handled: list[int] = []
    live_handled = threading.Event()

    def handler(message: Message) -> None:
        handled.append(message.payload["n"])
        if message.payload["n"] == 10:
            live_handled.set()

    real_load = manager._load_position
    staged = threading.Event()

    def load_position(client_id: str, t: str) -> int:
        if t != topic or client_id != CLIENT:
            return real_load(client_id, t)
        if threading.current_thread() is not threading.main_thread():
            staged.wait(WAIT_S)  # the sweeper's first read waits for the staged one: one order, every run
            return real_load(client_id, t)
        if not staged.is_set():
            # The replay's read: the live feed is subscribed; a message published now arrives live.
            backend.store_message("ns", topic, messages[10])
            live_handled.wait(WAIT_S)
            queue = manager._client_queues[CLIENT]
            deadline = time.monotonic() + WAIT_S
            while queue.unfinished_tasks and time.monotonic() < deadline:  # task_done() follows the save
                time.sleep(0.01)
            staged.set()
        return real_load(client_id, t)

    manager._load_position = load_position
    backend.subscribe(topic, handler, client_id=CLIENT)
    deadline = time.monotonic() + WAIT_S
    while not set(range(5, 11)) <= set(handled) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # two more sweeps: anything they would queue is queued
    print(json.dumps({"handled": handled, "staged": staged.is_set(),
                      "position": int(backend.r.get(position_key) or 0),
                      "ids": [m.id for m in messages]}), flush=True)
    backend.cleanup()


if __name__ == "__main__":
    main(int(sys.argv[1]))
