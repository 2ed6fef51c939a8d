"""Delivery fixes for rusticai-redis 1.4's per-client subscriptions, applied in agent processes only.

rusticai-redis keeps, per agent (client) and topic, the id of the last message it handled
(``eo:pos:{client}:{topic}``) and replays what came after it when the agent subscribes —
the mechanism that lets an agent restarted or moved to another host pick up where it
stopped. Measured with this project's exactly-once checker (tests/support/exactly_once.py),
these gaps in it lose or repeat messages under the faults this engine is built to survive:

* **Lost across a reconnect.** After a Redis restart (or any broken pub/sub connection) the
  subscription comes back — redis-py reconnects and re-subscribes on its own, or the
  library's health monitor does up to 10 s later — but nothing replays the backlog, so
  whatever was published meanwhile is never delivered (4–15 messages per agent per restart
  in the fault matrix). Fix: a sweeper thread reads each subscription's backlog from its
  saved position every second (and after the library's own re-subscribe), as a first
  subscription does, and queues what was never queued.
* **Handled twice by one process.** A first subscription starts the live feed, then reads
  the backlog; a message published in between arrives both ways and is handled twice by
  the same process. Fix: each client's queue accepts a message id once (a bounded memory of
  recent ids per client); the replay fix above relies on this too, since a replay after a
  reconnect overlaps what arrived live.
* **Lost by the next copy.** The queue is not in id order (a live message can overtake the
  replay), and the saved position is simply the last id handled, so it can move past a
  message still waiting; a copy started from it later (after a crash, a fence, a move)
  never sees that message — nor the backlog a new copy had not even read yet when a live
  message overtook it. Fix: the position saved is never past the oldest message still
  queued, nor past where this copy started before its first replay was queued.

* **Lost by the copy itself, at its first subscribe.** The library starts a subscription's
  live feed, then reads the saved position for its backlog replay. A live message handled
  in between (the gap measured 1–35 ms on a loaded machine, a live message every 50 ms in
  the fault matrix; 2 of 14 adopted copies handled one in it) saved its own id, and the
  replay then read that id and started after it: the whole backlog since the predecessor's
  position was skipped, for good (the sweeps start from the same position). In the keeper
  row that backlog is everything published to the new Redis while the agent had no copy —
  the 87 messages it lost once in CI; in the seeded soak, 33 messages twice in one run, each
  time an agent adopted from a paused or cut-off host. Fix: until its first replay is
  queued, this copy saves no position (the predecessor's stays); the replay's id memory
  drops the live message it already handled.

* **Lost when a copy dies just after Redis comes back (empty).** Measured with an agent
  SIGKILLed 0.5 s after an empty restart (the fault matrix's "just-after" row; 4 of ~40 lost
  in one run of three before this fix, and 2 in the seeded soak): three slow paths let the
  copy handle a live message, and save its position, ahead of older ones only the new
  store held, so its successor started past them. (a) The dirty mark below was skipped on
  the *first* reconnect of every pub/sub connection (redis-py registers ``on_connect`` after
  the first connect, so counting calls and skipping one skipped the first reconnect); it now
  goes by whether the PubSub already had channels. (b) The reader reconnected with redis-py's
  default backoff (jittered, up to 1 s a try) and the sweep read through the library's
  client, which retries the same way: both came back up to a second after Redis. The reader
  now retries every 50 ms, and sweeps use a client of their own with no retry (the sweep
  loop is the retry), every 0.1 s while Redis is away or the feed is not back. (c) A reader
  thread that gave up (an outage past its retries) waited for the library's health check
  (10 s); the sweeper restarts it as soon as Redis answers.

* **Handled twice after a clean stop.** The library's worker thread goes on taking queued
  messages while the agent shuts down, and nothing waits for the one in hand: the process
  exits (or reaches its fence's hard deadline) between the handler's effects and the saved
  position, and the next copy handles that message again — a stop, a drain or a fence then
  costs a duplicate, which only a crash should. Fix: a *delivery gate* (`quiesce`): once the
  agent is asked to stop, no message is started, and the stop waits (bounded) until the one
  in hand is handled and its position saved. What was queued and not started keeps its
  position unsaved, so the next copy gets it — also when its id is *below* the position
  already saved (ids order by priority first, then the publisher's clock: a HIGH message
  sent after NORMAL ones has the smaller id): queuing such a message lowers the saved
  position just below it (a later copy may handle a message again, never lose one).
  Not covered (review, not yet fixed): when priorities mix in one topic, the library replays
  from the position's *timestamp*, so lowering to a HIGH message's id can move the window
  past a NORMAL message queued before it; and a HIGH message published while no copy is
  subscribed sits below a NORMAL position, which the library's replay (`id > position`)
  drops. One integer position cannot say "everything before time T, of every priority";
  that needs a replay of our own. The fault matrix and the soak publish one priority.

What none of this can save is a message Redis acknowledged and then lost with its data
before any copy read it (an empty restart right after a copy died): only the publisher
could send it again. The exactly-once checker counts those apart, on proof
(tests/support/exactly_once.py, "destroyed with Redis").

All are small wrappers around the library's own methods (``_enqueue_for_client``,
``_resubscribe_all``, ``_setup_internal``, ``_subscribe_internal``, ``_save_position``,
``_replay_backlog``), installed by ``install()`` when the agent's messaging backend is
rusticai-redis; nothing changes for other backends. They are meant to be removed once the
library does the same.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import types
from typing import Any

log = logging.getLogger(__name__)

HOLD_LIVE_S = 2.0  # how long a live delivery after an outage waits for the backlog sweep to succeed
REMEMBERED_IDS = 20_000  # per client: far more than can be in flight between a feed and a replay


def install() -> bool:
    """Patches rusticai-redis's pub/sub manager once; False when the library is not installed."""
    try:
        from rustic_ai.redis.messaging.pubsub_manager import RedisPubSubManager
    except ImportError:
        return False
    if getattr(RedisPubSubManager, "_rk8s_delivery_fixed", False):
        return True
    original_enqueue = RedisPubSubManager._enqueue_for_client
    original_save = RedisPubSubManager._save_position
    original_resubscribe = RedisPubSubManager._resubscribe_all
    original_setup = RedisPubSubManager._setup_internal
    original_replay = RedisPubSubManager._replay_backlog
    original_subscribe = RedisPubSubManager._subscribe_internal

    def _enqueue_for_client(self: Any, client_id: str, namespace: Any, topic: str, handler: Any,
                            message: Any) -> None:
        if self.__dict__.get("_rk8s_dirty") and not getattr(_sweeping, "active", False):
            # The first delivery after Redis was unreachable: queue what the feed missed
            # meanwhile *before* it, so nothing newer is handled (and its position saved)
            # ahead of an older message still missing — a copy started from that position
            # later would never see the older one. Held (briefly) until a sweep succeeds.
            deadline = time.monotonic() + HOLD_LIVE_S
            while True:
                _sweep_quietly(self)
                if not self.__dict__.get("_rk8s_dirty") or time.monotonic() > deadline:
                    break
                time.sleep(0.05)  # Redis is answering the feed but not yet the read: retry shortly
        seen = _seen_ids(self, client_id)
        with seen.lock:
            if message.id in seen.ids:
                return
            seen.ids[message.id] = None
            while len(seen.ids) > REMEMBERED_IDS:
                seen.ids.popitem(last=False)
            seen.pending.setdefault(topic, set()).add(message.id)
            # Ids order by priority first, then the publisher's clock: a message can arrive with an
            # id below the position already saved (a HIGH one after NORMAL ones, a publisher whose
            # clock is behind). A later copy starts after that position and would never see it,
            # whether this copy stops (the gate leaves it unstarted) or crashes first: lower it.
            lower = message.id - 1 if topic in seen.replayed and message.id <= seen.saved.get(topic, 0) else None
            if lower is not None:
                seen.saved[topic] = lower
        if lower is not None:
            original_save(self, client_id, topic, lower)
        original_enqueue(self, client_id, namespace, topic, handler, message)

    def _save_position(self: Any, client_id: str, topic: str, message_id: int) -> None:
        # The saved position is where a later copy of this agent starts. The queue is not in id
        # order (live messages can overtake a replay), so never save past a message still
        # waiting in it: save just below the oldest one pending, or the newest handled.
        seen = _seen_ids(self, client_id)
        with seen.lock:
            pending = seen.pending.setdefault(topic, set())
            pending.discard(message_id)
            best = seen.best[topic] = max(seen.best.get(topic, 0), message_id)
            safe = min(min(pending) - 1, best) if pending else best
            if topic not in seen.replayed:
                # The first replay has not queued the backlog yet: a live message handled now
                # may be newer than backlog messages this process has not even read. Save
                # nothing: the position stays where the previous copy left it, which is where
                # the replay reads it (the live feed is up before the replay reads it, so a
                # message handled in between that saved its own id made the replay start past
                # the whole backlog — see "Lost by the copy itself" above).
                return
            seen.saved[topic] = safe
        while True:
            original_save(self, client_id, topic, safe)
            with seen.lock:
                # A message below `safe` may have been queued while it was being written (the
                # enqueue side lowers only what it saw saved): write the lower value again.
                pending = seen.pending.get(topic)
                if not pending or min(pending) - 1 >= safe:
                    return
                safe = seen.saved[topic] = min(pending) - 1

    def _resubscribe_all(self: Any) -> None:  # the library's path when its pub/sub thread died
        original_resubscribe(self)
        _replay_all(self)

    def _setup_internal(self: Any) -> None:
        resetup = self.__dict__.get("_rk8s_sweeper") is not None
        original_setup(self)
        if resetup:  # the library rebuilt its pub/sub connection: whatever was missed comes first
            self.__dict__["_rk8s_dirty"] = True
        _watch_reconnects(self)
        _start_sweeper(self)

    def _subscribe_internal(self: Any, topic: str, handler: Any) -> None:
        original_subscribe(self, topic, handler)
        with self.lock:  # the reader's first connection never passes through on_connect
            connection = getattr(self.pubsub, "connection", None)
            if connection is not None and not isinstance(getattr(connection, "retry", None), _ReaderRetry):
                connection.retry = _reader_retry()

    def _replay_backlog(self: Any, topic: str, client_id: str, handler: Any, namespace: Any) -> None:
        # The first replay of a subscription marks where this process's responsibility starts.
        floors = self.__dict__.setdefault("_rk8s_floors", {})
        if (topic, client_id) not in floors:
            floors[(topic, client_id)] = self._load_position(client_id, topic)
            log.info("subscribed %s to %s from saved position %d", client_id, topic, floors[(topic, client_id)])
        original_replay(self, topic, client_id, handler, namespace)
        seen = _seen_ids(self, client_id)
        with seen.lock:
            first = topic not in seen.replayed
            seen.replayed.add(topic)
            handled = seen.best.get(topic)
        if first and handled is not None:
            # A live message handled before this replay saved nothing (see _save_position); save
            # now, as its own save would have, or a clean stop with an empty backlog and no later
            # message would leave the predecessor's position and the next copy handle it again.
            self._save_position(client_id, topic, handled)

    def _client_worker_loop(self: Any, client_id: str) -> None:
        # The library's loop, with the delivery gate around each message: taken from the queue,
        # a message is only started while the gate is open, and counts as in hand until its
        # position is saved (or its failure handled), which is what `quiesce` waits for.
        while not self.shutdown_event.is_set():
            queue_ = self._client_queues.get(client_id)
            if queue_ is None:
                break  # the client unsubscribed from everything
            try:
                namespace, topic, handler, message = queue_.get(timeout=0.5)
            except queue.Empty:
                continue
            if not _gate.enter():
                break  # stopping: not started, position not saved — the next copy handles it
            try:
                try:
                    handler(message)
                    self._save_position(client_id, topic, message.id)
                except Exception as exc:  # noqa: BLE001 - the library's own failure path (retry, dead letter)
                    self._handle_delivery_failure(client_id, namespace, topic, message, exc)
            finally:
                _gate.leave()
                queue_.task_done()

    RedisPubSubManager._client_worker_loop = _client_worker_loop
    RedisPubSubManager._enqueue_for_client = _enqueue_for_client
    RedisPubSubManager._save_position = _save_position
    RedisPubSubManager._resubscribe_all = _resubscribe_all
    RedisPubSubManager._setup_internal = _setup_internal
    RedisPubSubManager._replay_backlog = _replay_backlog
    RedisPubSubManager._subscribe_internal = _subscribe_internal
    RedisPubSubManager._rk8s_delivery_fixed = True
    return True


class _DeliveryGate:
    """Whether agent code may start on another message, and how many messages are in hand.

    One per process (an agent process runs one agent): `quiesce` closes it for good.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._closed = False
        self._in_hand = 0

    def enter(self) -> bool:
        with self._cond:
            if self._closed:
                return False
            self._in_hand += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self._in_hand -= 1
            self._cond.notify_all()

    def close(self, timeout_s: float) -> bool:
        with self._cond:
            self._closed = True
            return self._cond.wait_for(lambda: self._in_hand == 0, max(0.0, timeout_s))


_gate = _DeliveryGate()


def quiesce(timeout_s: float) -> bool:
    """Starts no further message; waits up to ``timeout_s`` for the one in hand to be handled and
    its position saved. True when nothing is in hand any more (always, when install() did not
    patch anything)."""
    ok = _gate.close(timeout_s)
    if not ok:
        log.warning("a message was still being handled %.2f s after the stop began; its next copy may "
                    "handle it again", timeout_s)
    return ok


SWEEP_S = 0.5  # how often each subscription's recent backlog is read again
SWEEP_FAST_S = 0.1  # ... while Redis is away or the live feed is not back after a reconnect


def _replay_all(manager: Any) -> None:
    with manager.lock:
        clients = list(manager._client_handlers.items())
    for (topic, client_id), (handler, namespace) in clients:
        manager._replay_backlog(topic, client_id, handler, namespace)
    if clients:
        log.info("replayed the backlog of %d subscriptions after a reconnect", len(clients))


LAG_S = 5.0  # the sweep re-reads this much history behind the newest message (publishers' clocks differ)


def _sweep_once(manager: Any) -> int:
    """Reads every subscription's recent backlog; queues what this process never queued.

    Only messages after the position saved when this process subscribed are candidates
    (``_floors``: older ones were handled by an earlier copy of the agent). The saved
    position itself is a high-water mark — a message delivered out of order moves it past
    one still missing — so the sweep reads from a trailing window instead and lets the
    queue's id memory drop what is already there.
    """
    from rustic_ai.core.messaging.core.message import Message
    from rustic_ai.core.utils.gemstone_id import GemstoneID

    with manager.lock:
        clients = list(manager._client_handlers.items())
    floors = manager.__dict__.setdefault("_rk8s_floors", {})
    windows = manager.__dict__.setdefault("_rk8s_windows", {})
    queued = 0
    for (topic, client_id), (handler, namespace) in clients:
        floor = floors.get((topic, client_id))
        if floor is None:  # subscribed before install(): start from the saved position
            floor = floors[(topic, client_id)] = manager._load_position(client_id, topic)
        since = windows.get((topic, client_id), GemstoneID.from_int(floor).timestamp if floor else 0.0)
        client = _sweep_client(manager)
        raw = client.zrangebyscore(topic, since, "+inf") if since else client.zrange(topic, 0, -1)
        messages = sorted((Message.from_json(m) for m in raw or ()), key=lambda m: m.id)
        seen = _seen_ids(manager, client_id)
        for message in messages:
            if message.id > floor and message.id not in seen.ids:
                manager._enqueue_for_client(client_id, namespace, topic, handler, message)
                queued += 1
        if messages:
            newest = GemstoneID.from_int(messages[-1].id).timestamp
            windows[(topic, client_id)] = max(since, newest - LAG_S * _units_per_second(newest))
    return queued


SWEEP_READ_TIMEOUT_S = 2.0  # a sweep's read gives up on a Redis that does not answer (paused) after this


def _sweep_client(manager: Any) -> Any:
    """A client of the library's Redis for sweeps only, that fails at once instead of retrying.

    The library's client retries a failed command with a backoff of up to a second a try, so
    a sweep started during an outage returned up to a second after Redis came back (and a
    live delivery waiting for that sweep waited with it). Same server and settings, its own
    small pool, no retry: the sweeper's own loop is the retry. A client without a
    connection pool (a cluster client) is used as it is.
    """
    client = manager.__dict__.get("_rk8s_sweep_client")
    if client is None:
        client = manager.client
        pool = getattr(client, "connection_pool", None)
        if pool is not None and hasattr(pool, "connection_kwargs"):
            import redis
            from redis.backoff import NoBackoff

            kwargs = {**pool.connection_kwargs, "retry": redis.retry.Retry(NoBackoff(), 0)}
            kwargs["socket_timeout"] = min(kwargs.get("socket_timeout") or SWEEP_READ_TIMEOUT_S, SWEEP_READ_TIMEOUT_S)
            kwargs["socket_connect_timeout"] = min(kwargs.get("socket_connect_timeout") or SWEEP_READ_TIMEOUT_S,
                                                   SWEEP_READ_TIMEOUT_S)
            client = redis.Redis(connection_pool=type(pool)(connection_class=pool.connection_class,
                                                            max_connections=2, **kwargs))
        manager.__dict__["_rk8s_sweep_client"] = client
    return client


def _units_per_second(timestamp: float) -> float:
    # GemstoneID timestamps are milliseconds since an epoch in rusticai-core 1.4; seconds
    # would be far smaller numbers. Either way the window is LAG_S of real time.
    return 1000.0 if timestamp > 1e10 else 1.0


_sweeping = threading.local()
_sweep_lock = threading.Lock()


def _sweep_quietly(manager: Any) -> int:
    """One sweep, how many messages it queued; a failure (Redis away) marks the manager dirty,
    so the next live delivery sweeps first."""
    with _sweep_lock:
        _sweeping.active = True
        try:
            if queued := _sweep_once(manager):
                log.warning("queued %d messages the live feed had missed (a reconnect)", queued)
            manager.__dict__["_rk8s_dirty"] = False
            return queued
        except Exception as exc:  # noqa: BLE001 - Redis away: the next sweep tries again
            manager.__dict__["_rk8s_dirty"] = True
            log.debug("backlog sweep failed: %s", exc)
            return 0
        finally:
            _sweeping.active = False


def _revive_feed(manager: Any) -> None:
    """Restarts the pub/sub reader thread when it died, on the same PubSub object.

    redis-py's reader gives up on a connection error it cannot retry away (a Redis restart)
    and its thread ends; the library notices only at its next health check (every 10 s by
    default) and then reconnects with a backoff from 1 s. Until then only these sweeps
    deliver, and what is published meanwhile exists only in Redis's store. A new reader on
    the same PubSub reconnects at its first read, and redis-py's ``on_connect`` subscribes it
    to the same channels again (marking the manager dirty, see `_watch_reconnects`).
    """
    with manager.lock:
        thread, pubsub = manager.redis_thread, manager.pubsub
        if thread is None or pubsub is None or thread.is_alive() or manager.shutdown_event.is_set():
            return
        if manager.reconnection_active:
            return  # the library's own reconnect is under way: it builds a new reader
        sleep_time = manager.config.pubsub_poll_sleep_time if manager.config else 0.01
        manager.redis_thread = pubsub.run_in_thread(sleep_time=sleep_time, daemon=True)
    manager.__dict__["_rk8s_dirty"] = True  # whatever the dead reader missed is swept before the next live one
    log.warning("the pub/sub reader had died (Redis went away); started it again")


def _feed_down(manager: Any) -> bool:
    """The pub/sub connection has no socket: redis-py is between a drop and its reconnect."""
    pubsub = manager.pubsub
    connection = getattr(pubsub, "connection", None) if pubsub is not None else None
    return pubsub is None or connection is None or getattr(connection, "_sock", None) is None


def _watch_reconnects(manager: Any) -> None:
    """redis-py's PubSub may reconnect and re-subscribe by itself (its ``on_connect``) without the
    library noticing; mark the manager dirty then, so the next live delivery sweeps first."""
    pubsub = manager.pubsub
    if pubsub is None:
        return
    resubscribe = pubsub.on_connect

    def on_connect(_pubsub: Any, connection: Any) -> None:
        # Called on every *re*connect only: the first subscribe takes a connection the pool
        # has already connected, and registers this afterwards. (Counting calls and skipping
        # the first, as this did before, missed the first reconnect of every connection.)
        # Channels already known mean a reconnect either way.
        reconnect = bool(_pubsub.channels or _pubsub.patterns)
        connection.retry = _reader_retry()
        resubscribe(connection)
        if reconnect:
            manager.__dict__["_rk8s_dirty"] = True

    # Bound (redis-py keeps a WeakMethod of it), and set before the first subscribe registers it.
    pubsub.on_connect = types.MethodType(on_connect, pubsub)


READER_RETRY_S = 0.05  # the pub/sub reader's reconnect interval while Redis is away
READER_RETRIES = 100  # ... then it gives up (as redis-py's default does, after ~5 s) and `_revive_feed` restarts it


def _reader_retry() -> Any:
    """A constant, short reconnect interval for the pub/sub reader's connection.

    redis-py's default backs off exponentially with jitter up to 1 s a try, so the live feed
    comes back up to a second or more after Redis does (measured: 0.6–3 s after a 1 s
    restart); meanwhile only the sweeps deliver, and what is published exists only in
    Redis's store. The bound keeps a command on this connection (it returns to the client's
    pool when the reader closes) from retrying longer than the default would.
    """
    from redis.backoff import ConstantBackoff

    return _ReaderRetry(ConstantBackoff(READER_RETRY_S), READER_RETRIES)


try:
    from redis.retry import Retry as _Retry
except ImportError:  # no redis-py: install() finds no rusticai-redis either
    _Retry = object


class _ReaderRetry(_Retry):  # type: ignore[misc, valid-type]
    """Marks a connection whose retry policy is already the reader's."""


def _start_sweeper(manager: Any) -> None:
    """The library's live feed silently misses what is published while its pub/sub connection
    is down (redis-py reconnects and re-subscribes by itself, without telling it), so the
    backlog is read again every SWEEP_S; the queue's id memory drops what it already has.
    One range read per subscription per sweep, usually empty."""
    if manager.__dict__.get("_rk8s_sweeper") is not None:
        return

    def sweep() -> None:
        delay = SWEEP_S
        while not manager.shutdown_event.wait(delay):
            queued = _sweep_quietly(manager)
            if not manager.__dict__.get("_rk8s_dirty"):  # Redis answers: the live feed should too
                _revive_feed(manager)
            # While Redis is away or the live feed is not back (it missed what this sweep found,
            # or its socket is gone), what is published now exists only in Redis's store: a Redis
            # restarted empty again would take it with it. Look again soon.
            trouble = queued or manager.__dict__.get("_rk8s_dirty") or _feed_down(manager)
            delay = SWEEP_FAST_S if trouble else SWEEP_S

    thread = threading.Thread(target=sweep, name="rk8s-backlog-sweep", daemon=True)
    manager.__dict__["_rk8s_sweeper"] = thread
    thread.start()


class _Seen:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ids: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.pending: dict[str, set[int]] = {}  # topic -> ids queued and not yet handled
        self.best: dict[str, int] = {}  # topic -> the newest id handled
        self.replayed: set[str] = set()  # topics whose first backlog replay has been queued
        self.saved: dict[str, int] = {}  # topic -> the position this process last wrote


_registry_lock = threading.Lock()


def _seen_ids(manager: Any, client_id: str) -> _Seen:
    with _registry_lock:
        table = manager.__dict__.setdefault("_rk8s_seen", {})
        seen = table.get(client_id)
        if seen is None:
            seen = table[client_id] = _Seen()
        return seen
