"""An exactly-once checker that trusts nothing the engine or the hosts report.

Three independent sources, none of them the registry or a host's own table:

* **the ledger** — every `support.ledger_agents.LedgerAgent` process appends a ``start``
  line when it is built and a ``handled`` line per numbered message, to a file of its own
  (see that module). Every process that ever was a copy of an agent is in it.
* **/proc** — a sampler thread looks, every 50 ms, at which of those processes are alive
  right now (same pid *and* same start time, so a reused pid is not mistaken for a copy)
  and keeps the most simultaneous live copies seen per agent.
* **the sender** — a thread that publishes numbered messages on the guild's default topic
  through the guild's real messaging backend (Redis, via a rusticai probe agent) at a
  steady rate. A publish that raises is recorded as not sent, so an outage that refuses
  messages does not count them as lost.

From these the report gives, per agent: messages lost (sent while the agent was wanted,
never handled by any copy before the settle deadline), messages handled twice (by sequence number, over all
copies), the most live copies seen at once, and the time to recover (from the end of the
fault to the first handling of a message sent after it).

**Destroyed with Redis, counted apart.** A Redis restarted empty takes with it every message
it had acknowledged that a copy of the agent had not read yet — say the agent's process was
SIGKILLed a moment before: its next copy starts from a store that no longer has them, and
only the publisher could send them again (rusticai's publish does not). No delivery fix
in the engine can bring those back, so the report lists them as ``destroyed``, not
``lost`` — but only when all of this is established from outside the engine:

1. *one instance stored it*: the sender read the same Redis ``run_id`` (new at every start
   of redis-server) just before the publish and just after it returned (`RedisInstances`);
2. *that instance's data is gone*: its successor lacks the canary key the checker wrote to
   it, in a MULTI with INFO so the reply proves which instance stored it (a restart with
   its data keeps the key; then nothing of that instance is excused);
3. *the agent read nothing of that instance after it*: no copy handled a message sent after
   it and before that instance last answered (reading later messages, live or by a
   replay from the store, it would have had this one);
4. *no copy could have had it delivered*: no copy of the agent was alive from the
   acknowledgement until that instance last answered (ledger start times, death seen by
   the /proc sampler). A copy subscribed all along owes the message however the store
   fared — its live feed or its backlog sweep must get it first.

Everything else missing is lost: a message published to the new, empty Redis; one a live
copy missed because its feed was down when the store was wiped; one whose instance is
unknown (the publish straddled a restart). Each condition can only turn an excuse into a
loss when the evidence is missing (an INFO that failed, a canary that could not be
written, a death the sampler has not seen), never the other way round. In the fault matrix
(agent SIGKILL just before an empty restart) what is excused is the 0.1–0.3 s of messages
between the kill and Redis going away; with the data kept, nothing is.

Typical use::

    async with Checker(ledger_dir, guild_id, messaging, agents) as checker:
        await checker.wait_answering()
        with checker.fault("host paused"):
            with faults.paused(host.pid):
                await asyncio.sleep(4)
        report = await checker.settle()
    report.assert_exactly_once(max_twice=0, logs=fleet.logs)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from urllib.parse import unquote

from .eventually import eventually
from .ledger_agents import SEQ_FIELD, ledger_path

log = logging.getLogger(__name__)

SAMPLE_EVERY_S = 0.05


@dataclasses.dataclass(frozen=True)
class Copy:
    """One process that was built as a copy of an agent."""

    pid: int
    starttime: int  # /proc/PID/stat field 22: with the pid, names this process and no later one
    started_at: float  # CLOCK_MONOTONIC


def copy_alive(copy: Copy) -> bool:
    """Alive right now by /proc: present, the same process (start time), not a zombie, and
    able to run again.

    A stopped process (state T: SIGSTOPped with its host, say) counts as alive: it still
    holds its subscriptions and resumes handling the moment it gets SIGCONT — unless the
    kernel already holds a signal for it that ends it (`_doomed`): then the first thing
    SIGCONT does is end it, before it runs another instruction of its own. That is how a
    frozen agent's fence looks from outside (its kernel timer fired while it was stopped):
    the process entry is there, the copy is not. Nor is a process whose every thread is
    exiting (`_exiting`): the kernel is tearing it down.
    """
    try:
        stat = Path(f"/proc/{copy.pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X") or int(fields[19]) != copy.starttime:
        return False
    return not (_doomed(copy.pid) or _exiting(copy.pid))


PF_EXITING = 0x4  # a task's flag (/proc/PID/task/TID/stat field 9) from the start of its exit


def _exiting(pid: int) -> bool:
    """Every thread of the process is exiting: it is being torn down and runs no code of its own
    again. Shown as state R or D, not yet Z, for as long as freeing its memory takes — measured
    23 ms for a 300 MB process, far longer than a sampling interval on a loaded machine, so a
    frozen copy ended by SIGCONT (its fatal signal already taken) would otherwise be seen
    alive beside the copy that replaced it."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return True
    for task in tasks:
        try:
            flags = int((task / "stat").read_text().rsplit(")", 1)[1].split()[6])
            if flags & PF_EXITING:
                continue
            # Not exiting yet, but sent its SIGKILL by a group exit (the thread that took the fatal
            # signal zaps the others; each sets PF_EXITING only once it runs again, which on a
            # loaded machine can take milliseconds, while /proc/PID/status shows none of it:
            # the signal taken, the main thread's own SIGKILL already consumed). It enters the
            # kernel at once (the zap kicks it) and never returns to its own code.
            if _task_pending(task) & _SIGKILL:
                continue
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue  # that thread is gone
        return False
    return True


_SIGKILL = 1 << (9 - 1)


def _task_pending(task: Path) -> int:
    for line in (task / "status").read_text().splitlines():
        if line.startswith("SigPnd:"):
            return int(line.split(":")[1], 16)
    return 0


# Signals whose default action ends the process (signal(7)): all of 1-31 but CHLD, CONT, STOP,
# TSTP, TTIN, TTOU, URG and WINCH.
_FATAL_BY_DEFAULT = sum(1 << (n - 1) for n in range(1, 32) if n not in (17, 18, 19, 20, 21, 22, 23, 28))


def _doomed(pid: int) -> bool:
    """A signal is pending (for the process or its main thread) that ends it when it resumes
    (stopped), or before it returns to its own code (woken by SIGCONT, not yet exiting):
    fatal by default, and neither caught, ignored nor blocked (by the main thread; a signal
    another thread would take while the main thread blocks it counts as not dooming — the
    safe side). Read from /proc/PID/status, the kernel's own bookkeeping."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    masks = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"):
            masks[name] = int(value.strip(), 16)
    if len(masks) != 5:
        return False
    pending = masks["SigPnd"] | masks["ShdPnd"]
    return bool(pending & _FATAL_BY_DEFAULT & ~(masks["SigBlk"] | masks["SigIgn"] | masks["SigCgt"]))


@dataclasses.dataclass
class _AgentLedger:
    copies: list[Copy] = dataclasses.field(default_factory=list)
    handled: list[tuple[int, int, float]] = dataclasses.field(default_factory=list)  # (seq, pid, at)
    offset: int = 0


class Ledgers:
    """Reads a guild's ledger files incrementally (only whole lines, from where it left off)."""

    def __init__(self, directory: Path, guild_id: str) -> None:
        self.directory = Path(directory)
        self.guild_id = guild_id
        self.agents: dict[str, _AgentLedger] = {}
        self._prefix = ledger_path(directory, guild_id, "").name.removesuffix(".ledger")  # "<guild>__"

    def refresh(self) -> None:
        for path in self.directory.glob(f"{self._prefix}*.ledger"):
            agent_id = unquote(path.name[len(self._prefix):-len(".ledger")])
            entry = self.agents.setdefault(agent_id, _AgentLedger())
            with path.open("rb") as f:
                f.seek(entry.offset)
                data = f.read()
            end = data.rfind(b"\n") + 1  # a line still being written waits for the next refresh
            entry.offset += end
            for line in data[:end].decode().splitlines():
                kind, *rest = line.split()
                if kind == "start":
                    entry.copies.append(Copy(int(rest[0]), int(rest[1]), float(rest[2])))
                elif kind == "handled":
                    entry.handled.append((int(rest[0]), int(rest[1]), float(rest[2])))


CANARY_KEY = "exactly-once-checker:instance:{}"


@dataclasses.dataclass
class Instance:
    """One run of redis-server, as the sender saw it (its run_id is new at every start)."""

    run_id: str
    first_seen: float  # monotonic
    last_seen: float  # the last time it answered: it died after this
    canary: bool = False  # the checker's own key is known to be stored in it
    data_survived: bool | None = None  # in its successor: True, False (restarted empty) or unknown


class RedisInstances:
    """Tells which redis-server is answering, and whether a successor kept its predecessor's data.

    Asked by the sender around every publish, over a connection of its own (not the
    engine's). Each instance gets a canary key, written in one MULTI with INFO, so the reply
    proves which instance stored it; when a new run_id appears, the canary of the one before
    is looked up in it: absent means the predecessor's data did not survive the restart.
    """

    def __init__(self, messaging) -> None:
        import redis  # the sender's machinery only; the checker's other parts need no client

        conf = dict(messaging.backend_config.get("redis_client") or {})
        self._client = redis.Redis(host=conf.get("host", "127.0.0.1"), port=int(conf.get("port", 6379)),
                                   socket_timeout=0.2, socket_connect_timeout=0.2,
                                   retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0))
        self.seen: list[Instance] = []

    def current(self) -> str | None:
        """The run_id answering now; None when nothing answers."""
        try:
            run_id = str(self._client.info("server")["run_id"])
        except Exception:  # noqa: BLE001 - Redis away: which one stored a message stays unknown
            return None
        now = time.monotonic()
        last = self.seen[-1] if self.seen else None
        if last is None or last.run_id != run_id:
            new = Instance(run_id, now, now)
            with contextlib.suppress(Exception):
                if last is not None and last.canary:
                    new_has_it = bool(self._client.exists(CANARY_KEY.format(last.run_id)))
                    last.data_survived = new_has_it
                pipe = self._client.pipeline(transaction=True)
                pipe.set(CANARY_KEY.format(run_id), "1")
                pipe.info("server")
                new.canary = str(pipe.execute()[1]["run_id"]) == run_id
            self.seen.append(new)
            last = new
        last.last_seen = now
        return run_id

    def wiped(self, run_id: str) -> Instance | None:
        """The instance, if it is proven that its data did not survive into its successor."""
        for inst in self.seen:
            if inst.run_id == run_id:
                return inst if inst.data_survived is False else None
        return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()


class Sender(threading.Thread):
    """Publishes ``{"ledger_seq": n}`` on the default topic at a steady rate, from its own thread."""

    def __init__(self, guild_id: str, messaging, rate_per_s: float = 20.0) -> None:
        super().__init__(name="ledger-sender", daemon=True)
        self.guild_id, self.messaging, self.interval = guild_id, messaging, 1.0 / rate_per_s
        self.sent: dict[int, float] = {}  # seq -> monotonic time the publish returned
        self.instances = RedisInstances(messaging)
        self.acked_by: dict[int, str] = {}  # seq -> run_id of the one Redis instance that stored it
        self.failed: list[int] = []
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._stop = threading.Event()

    def run(self) -> None:
        from .probe import Probe  # rusticai-core's Guild machinery: only the sender thread needs it

        try:
            probe = Probe(self.guild_id, self.messaging)
        except BaseException as exc:  # noqa: BLE001 - reported by the checker, not lost in a thread
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        seq = 0
        next_due = time.monotonic()
        try:
            while not self._stop.is_set():
                probe.clear()  # the probe captures every message on the topic; keep only the latest
                before = self.instances.current()
                try:
                    probe.agent.publish_dict("default_topic", {SEQ_FIELD: seq})
                    self.sent[seq] = time.monotonic()
                except Exception as exc:  # noqa: BLE001 - a refused publish is "not sent", not lost
                    log.info("publish %d failed: %s", seq, exc)
                    self.failed.append(seq)
                else:
                    # Which Redis acknowledged it, only when provable: the same instance answered
                    # just before the publish and just after it returned.
                    if before is not None and self.instances.current() == before:
                        self.acked_by[seq] = before
                seq += 1
                # Steady rate, no catch-up burst after a publish that blocked (Redis paused).
                next_due = max(next_due + self.interval, time.monotonic())
                self._stop.wait(next_due - time.monotonic())
        finally:
            # rusticai-redis raises KeyError in its delivery thread when a client shuts down while
            # a delivery to it is under way. The probe hears its own messages: once the last one
            # arrived, nothing more is on the way to it and it can close.
            last = seq - 1
            deadline = time.monotonic() + 2.0
            while last in self.sent and time.monotonic() < deadline and not any(
                    m.payload.get(SEQ_FIELD) == last for m in list(probe.agent.captured_messages)):
                time.sleep(0.02)
            with contextlib.suppress(Exception):
                probe.close()
            self.instances.close()

    def stop(self) -> None:
        self._stop.set()
        self.join(30)


@dataclasses.dataclass
class AgentReport:
    agent_id: str
    sent: int
    lost: list[int]
    twice: dict[int, list[int]]  # seq -> pids of every handling of it
    max_copies: int
    max_copies_pids: list[int]  # the live copies at the moment the most were seen
    copies_started: list[int]  # every pid that was ever built as this agent
    live_at_end: list[int]
    recover_s: float | None  # None: nothing sent after the fault was handled
    retired: bool = False  # stopped on purpose: owes only what was sent before, and no live copy
    destroyed: list[int] = dataclasses.field(default_factory=list)  # never handled, and provably wiped
    # with the Redis that stored them (see Checker.destroyed_with_redis); not in ``lost``

    @property
    def twice_by_one_copy(self) -> int:
        """Duplicates one process handled twice itself (redelivery), not two copies each once."""
        return sum(1 for pids in self.twice.values() if len(set(pids)) < len(pids))

    def line(self) -> str:
        rec = "never" if self.recover_s is None else f"{self.recover_s:.2f} s"
        name = f"{self.agent_id} (stopped)" if self.retired else self.agent_id
        wiped = f" (+ {len(self.destroyed)} destroyed with Redis {self.destroyed[:20]})" if self.destroyed else ""
        return (f"{name}: sent {self.sent}, lost {len(self.lost)} {self.lost[:20]}{wiped}, "
                f"twice {len(self.twice)} (by one copy {self.twice_by_one_copy}) "
                f"{dict(list(self.twice.items())[:10])}, "
                f"most live copies {self.max_copies} {self.max_copies_pids}, recover {rec}, "
                f"processes {self.copies_started}, live at end {self.live_at_end}")


@dataclasses.dataclass
class Report:
    agents: dict[str, AgentReport]
    not_sent: int
    faults: list[tuple[str, float, float]]  # (name, began, healed), monotonic

    def summary(self) -> str:
        faults = ", ".join(f"{n} ({h - b:.1f} s)" for n, b, h in self.faults) or "none"
        return "\n".join([f"faults: {faults}; publishes refused: {self.not_sent}",
                          *(a.line() for a in self.agents.values())])

    def totals(self) -> dict:
        return {"lost": sum(len(a.lost) for a in self.agents.values()),
                "destroyed_with_redis": sum(len(a.destroyed) for a in self.agents.values()),
                "twice": sum(len(a.twice) for a in self.agents.values()),
                "max_copies": max((a.max_copies for a in self.agents.values()), default=0),
                "recover_s": max((a.recover_s if a.recover_s is not None else float("inf")
                                  for a in self.agents.values()), default=0.0)}

    def problems(self, *, max_twice: int | dict[str, int] = 0, recover_within_s: float = 10.0) -> list[str]:
        """What breaks exactly-once; empty when nothing does. ``max_twice``: allowed duplicates,
        for every agent or per agent (e.g. one per crash of one of its copies)."""
        out = []
        for a in self.agents.values():
            allowed = max_twice.get(a.agent_id, 0) if isinstance(max_twice, dict) else max_twice
            if a.lost:
                out.append(f"{a.agent_id}: {len(a.lost)} messages lost, seqs {a.lost[:30]}")
            if len(a.twice) > allowed:
                out.append(f"{a.agent_id}: {len(a.twice)} messages handled twice (allowed {allowed}): "
                           f"{dict(list(a.twice.items())[:15])} (seq: pids)")
            if a.max_copies > 1:
                out.append(f"{a.agent_id}: {a.max_copies} live copies at once, pids {a.max_copies_pids}")
            if a.retired:
                if a.live_at_end:
                    out.append(f"{a.agent_id}: stopped, yet copies {a.live_at_end} are alive")
                continue
            if len(a.live_at_end) != 1:
                out.append(f"{a.agent_id}: {len(a.live_at_end)} live copies after the fault healed "
                           f"{a.live_at_end} (want 1)")
            if a.recover_s is None or a.recover_s > recover_within_s:
                out.append(f"{a.agent_id}: did not handle messages again within {recover_within_s} s "
                           f"of the fault healing (took {a.recover_s})")
        return out

    def assert_exactly_once(self, *, max_twice: int | dict[str, int] = 0, recover_within_s: float = 10.0,
                            logs: Callable[[], str] | None = None) -> None:
        problems = self.problems(max_twice=max_twice, recover_within_s=recover_within_s)
        if problems:
            tail = f"\n--- host logs ---\n{logs()}" if logs is not None else ""
            raise AssertionError("exactly-once broken:\n  " + "\n  ".join(problems)
                                 + f"\n--- checker ---\n{self.summary()}{tail}")


class Checker:
    """Ledger + /proc sampler + sender for one guild's agents; see the module docstring."""

    def __init__(self, ledger_dir: Path, guild_id: str, messaging, agents: Iterable[str], *,
                 rate_per_s: float = 20.0) -> None:
        self.ledgers = Ledgers(ledger_dir, guild_id)
        self.agents = set(agents)
        self.sender = Sender(guild_id, messaging, rate_per_s)
        self.faults: list[tuple[str, float, float]] = []
        self.retired: dict[str, float] = {}  # agent -> when it was stopped on purpose
        self.joined: dict[str, float] = {}  # agent -> when it was added after the sender started
        self._max: dict[str, tuple[int, list[int]]] = {}
        self.dead_by: dict[Copy, float] = {}  # copy -> the first sample that found it dead (it died before)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample_forever, name="copy-sampler", daemon=True)
        self.sampler_error: BaseException | None = None

    # -- lifecycle

    async def __aenter__(self) -> Checker:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self._sampler.start()
        self.sender.start()
        self.sender.ready.wait(30)
        if self.sender.error is not None:
            self.close()
            raise RuntimeError(f"sender could not join the guild: {self.sender.error!r}")

    def close(self) -> None:
        if self.sender.is_alive():
            self.sender.stop()
        self._stop.set()
        if self._sampler.is_alive():
            self._sampler.join(5)

    # -- the /proc sampler

    def _sample_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except BaseException as exc:  # noqa: BLE001 - surfaced by settle(), a dead sampler sees nothing
                self.sampler_error = exc
                raise
            self._stop.wait(SAMPLE_EVERY_S)

    def sample(self) -> dict[str, list[int]]:
        """Live copies per agent right now; also updates the maximum seen."""
        with self._lock:
            self.ledgers.refresh()
            now = time.monotonic()
            live = {}
            for a, e in self.ledgers.agents.items():
                live[a] = []
                for c in e.copies:
                    if copy_alive(c):
                        live[a].append(c.pid)
                    else:
                        self.dead_by.setdefault(c, now)
            for a, pids in live.items():
                if len(pids) > self._max.get(a, (0, []))[0]:
                    self._max[a] = (len(pids), pids)
        return live

    # -- faults and waiting

    @contextlib.contextmanager
    def fault(self, name: str) -> Iterator[None]:
        """Marks the fault's span; the time to recover is measured from its end."""
        began = time.monotonic()
        try:
            yield
        finally:
            self.faults.append((name, began, time.monotonic()))
            log.info("fault %s healed after %.2f s", name, time.monotonic() - began)

    def handled_since(self, t: float) -> set[str]:
        """Agents that handled a message sent at or after ``t``."""
        with self._lock:
            self.ledgers.refresh()
            sent = dict(self.sender.sent)
            return {a for a, e in self.ledgers.agents.items()
                    if any(sent.get(seq, -1.0) >= t for seq, _pid, _at in e.handled[-50:])}

    async def wait_answering(self, agents: Iterable[str] | None = None, timeout: float = 20.0) -> None:
        """Until every agent handles a message sent from now on."""
        want = set(agents or self.agents)
        t = time.monotonic()
        await eventually(lambda: want <= self.handled_since(t), timeout=timeout, interval=0.1,
                         what=f"agents {sorted(want)} handling messages")

    def take_max_copies(self) -> dict[str, tuple[int, list[int]]]:
        """The most live copies seen per agent since the last call; starts a new window."""
        with self._lock:
            seen, self._max = self._max, {}
        return seen

    def recovery_s(self, healed: float, agents: Iterable[str]) -> float | None:
        """Slowest agent's time from ``healed`` to its first handling of a message sent after it."""
        with self._lock:
            self.ledgers.refresh()
            sent = dict(self.sender.sent)
            worst = 0.0
            for a in agents:
                after = [at for seq, _p, at in self.ledgers.agents.get(a, _AgentLedger()).handled
                         if sent.get(seq, -1.0) >= healed]
                if not after:
                    return None
                worst = max(worst, min(after) - healed)
        return worst

    def add_agent(self, agent_id: str) -> None:
        """An agent launched from now on: it owes every message sent from now on. (It usually
        gets older ones too, from the topic's history, but an empty Redis has none to give.)"""
        self.agents.add(agent_id)
        self.retired.pop(agent_id, None)
        self.joined[agent_id] = time.monotonic()

    def retire(self, agent_id: str) -> None:
        """The agent is being stopped on purpose: from now on it owes no handling, and no copy
        of it may be left alive."""
        self.agents.discard(agent_id)
        self.retired[agent_id] = time.monotonic()

    async def settle(self, *, min_traffic_s: float = 1.5, after_heal_s: float = 10.0,
                     deadline_s: float = 15.0, quiet_s: float = 2.0) -> Report:
        """Keeps sending for at least ``min_traffic_s`` after the heal and until every agent handles
        new messages (or ``after_heal_s``), then stops the sender and waits for every sent
        message to be handled: until ``deadline_s``, or ``quiet_s`` without any handling."""
        healed = self.faults[-1][2] if self.faults else time.monotonic()

        def recovered() -> bool:
            return time.monotonic() - healed >= min_traffic_s and self.agents <= self.handled_since(healed)

        with contextlib.suppress(AssertionError):
            await eventually(recovered, timeout=after_heal_s, interval=0.1, what="handling after the fault")
        self.sender.stop()

        progress = {"handled": -1, "at": time.monotonic()}

        def all_handled_or_quiet() -> bool:
            with self._lock:
                self.ledgers.refresh()
                sent = dict(self.sender.sent)
                entries = {a: self.ledgers.agents.get(a, _AgentLedger()) for a in self.agents}
                if all(self._owed(a, sent) <= {s for s, _p, _t in e.handled} for a, e in entries.items()):
                    return True
                # Still catching up (a backlog after a stall) is progress; nothing new handled
                # for quiet_s means what is missing is not coming.
                handled = sum(len(e.handled) for e in entries.values())
                if handled != progress["handled"]:
                    progress.update(handled=handled, at=time.monotonic())
                return time.monotonic() - progress["at"] >= quiet_s

        with contextlib.suppress(AssertionError):
            await eventually(all_handled_or_quiet, timeout=deadline_s, interval=0.1, what="every sent message handled")
        return self.report()

    def _owed(self, agent_id: str, sent: dict[int, float]) -> set[int]:
        """The messages the agent must handle: those sent while it was wanted."""
        since, until = self.joined.get(agent_id, 0.0), self.retired.get(agent_id)
        return {s for s, t in sent.items() if t >= since and (until is None or t < until)}

    def _destroyed_with_redis(self, seq: int, entry: _AgentLedger, sent: dict[int, float]) -> bool:
        """True only when it is proven, from outside the engine, that the message was destroyed by
        the storage before this agent could have read it — see `destroyed_with_redis`."""
        run_id = self.sender.acked_by.get(seq)
        inst = self.sender.instances.wiped(run_id) if run_id is not None else None
        if inst is None:
            return False  # not proven stored in one instance, or that instance's data survived
        acked = sent[seq]
        # A copy that handled anything published later to that instance was reading it after
        # this message was there: a correct delivery would have handled this one too.
        if any(s > seq and sent.get(s, float("inf")) <= inst.last_seen for s, _p, _t in entry.handled):
            return False
        # A copy alive from the acknowledgement until the instance died was subscribed (or
        # replaying) all along: the message was its to handle, wiped store or not.
        for c in entry.copies:
            if c.started_at <= acked and self.dead_by.get(c, float("inf")) > inst.last_seen:
                return False
        return True

    def report(self) -> Report:
        if self.sampler_error is not None:
            raise RuntimeError("the /proc sampler died") from self.sampler_error
        live = self.sample()
        healed = self.faults[-1][2] if self.faults else None
        sent = dict(self.sender.sent)
        agents = {}
        with self._lock:
            for a in sorted(self.agents | set(self.retired)):
                entry = self.ledgers.agents.get(a, _AgentLedger())
                until = self.retired.get(a)
                owed = self._owed(a, sent)
                counts = Counter(seq for seq, _p, _t in entry.handled)
                pids: dict[int, list[int]] = {}
                for seq, pid, _t in entry.handled:
                    if counts[seq] > 1:
                        pids.setdefault(seq, []).append(pid)
                after = [at for seq, _p, at in entry.handled if healed is not None and sent.get(seq, -1.0) >= healed]
                most = self._max.get(a, (0, []))
                missing = owed - set(counts)
                destroyed = {seq for seq in missing if self._destroyed_with_redis(seq, entry, sent)}
                agents[a] = AgentReport(
                    agent_id=a, sent=len(owed), lost=sorted(missing - destroyed), twice=pids,
                    destroyed=sorted(destroyed),
                    max_copies=most[0], max_copies_pids=most[1], copies_started=[c.pid for c in entry.copies],
                    live_at_end=live.get(a, []), retired=until is not None,
                    recover_s=(min(after) - healed) if after else (None if healed is not None else 0.0),
                )
        return Report(agents=agents, not_sent=len(self.sender.failed), faults=list(self.faults))
