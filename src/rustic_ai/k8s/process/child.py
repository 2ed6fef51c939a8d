"""The agent process: one rusticai agent, built from a JSON launch request, until SIGTERM.

Started two ways, both ending in ``run()``:

* cold: ``python -m rustic_ai.k8s.process.child`` (``main()``), with the control pipe's
  fd number in ``RUSTIC_K8S_CONTROL_FD`` and the host's pid in ``RUSTIC_K8S_PARENT_PID``;
* warm: forked from the fork server (``forkserver.py``), which calls ``run()`` directly.

The agent is built exactly as rusticai-core's own engines build it: through a subclass of
``AgentWrapper`` whose ``initialize_agent()`` creates the messaging interface, builds the
agent from its spec and subscribes it to its topics. Only after that returns does the
child report ``ready`` on the control pipe, so a host that sees ``ready`` may immediately
publish to the agent. Failures are reported on the same pipe (see ``control.py``) and
classified: a request that can never work (bad JSON, spec validation, an agent class that
cannot be imported or is not an Agent, a bad client type) is ``invalid_spec`` and exit
code 2; anything else raised while building or subscribing is ``launch`` and exit code 3.

The host's lease is enforced here too (``fence.py``): a thread stops the agent cleanly when
the deadline the host last extended passes, and a kernel timer ends it at the hard
deadline, so a stalled host never leaves a copy running once another host may adopt it.

Shutdown is SIGTERM (or SIGINT): the handler only sets a flag, the main thread (woken
through ``signal.set_wakeup_fd``, see ``_StopSignal``) then calls
``redis_delivery.quiesce`` (no further message is started; the one in hand is finished and
its position saved, so the next copy does not handle it again), then
``AgentWrapper.shutdown()`` (unsubscribe, unregister, close messaging) and exits 0 with
``os._exit``, so no leftover messaging thread can hold the exit up. rusticai-core's
messaging runs its own threads; that is fine here, a child never forks.

PR_SET_PDEATHSIG is armed first thing in ``main()``; the imports that precede it (this
package, rusticai-core: about a second) cannot be avoided under ``-m``, and a host that
died during them is caught by the parent-pid check right after arming.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import sys
import time
from typing import Any, NoReturn

from opentelemetry import propagate, trace
from pydantic import ValidationError

from rustic_ai.core.guild.agent import Agent
from rustic_ai.core.guild.dsl import AgentSpec, OpaqueProps
from rustic_ai.core.guild.execution.agent_wrapper import AgentWrapper
from rustic_ai.core.messaging import Client
from rustic_ai.core.utils.basic_class_utils import get_class_from_name

from ..base.allowlist import ModuleAllowList
from ..base.envrefs import resolve_references
from ..base.errors import ForbiddenModuleError, InvalidSpecError
from ..base.models import LaunchRequest
from ..base.resources import DEVICE_ENV
from ..base.specs import ParsedLaunch, parse_launch
from . import redis_delivery
from .fence import LeaseFence
from .control import (
    CONTROL_FD_ENV,
    EVENT_READY,
    EXIT_FENCED,
    EXIT_INVALID_SPEC,
    EXIT_LAUNCH_FAILED,
    EXIT_OK,
    EXIT_ORPHANED,
    KIND_FORBIDDEN,
    KIND_INVALID_SPEC,
    KIND_LAUNCH,
    LEASE_FD_ENV,
    PARENT_PID_ENV,
    error_event,
    read_all,
    set_parent_death_signal,
    write_event,
)

log = logging.getLogger("rustic_ai.k8s.process.child")  # not __main__ under -m

FINISH_MARGIN_S = 0.05  # a fenced stop stops waiting for the message in hand this long before the hard deadline
FINISH_MAX_S = 30.0  # any other stop waits at most this long (the host's SIGKILL after its stop grace comes first)
_tracer = trace.get_tracer("rustic_ai.k8s.agent")


class ProcessAgentWrapper(AgentWrapper):
    """rusticai-core's wrapper, run in a process of its own: ``run()`` builds and subscribes."""

    def run(self) -> Agent:
        return self.initialize_agent()


def _resolve_class(qualified_name: str, base: type, what: str) -> type:
    try:
        cls = get_class_from_name(qualified_name)
    except Exception as exc:  # an import runs arbitrary module code: any failure means "cannot be imported"
        raise InvalidSpecError(f"{what} {qualified_name!r} cannot be imported: {type(exc).__name__}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise InvalidSpecError(f"{what} {qualified_name!r} is not a subclass of {base.__module__}.{base.__qualname__}")
    return cls


def prepare(raw: bytes, allowed: ModuleAllowList | None = None) -> tuple[ParsedLaunch, type[Client]]:
    """Parses and validates the request and resolves every class it names.

    Raises ForbiddenModuleError for a module outside ``allowed`` (default: the list the host
    passed in the environment) before anything is imported, else InvalidSpecError.
    """
    try:
        request = LaunchRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidSpecError(f"invalid launch request: {str(exc)[:600]}") from None
    # Checked again here, not only on the host: parse_launch imports the classes it names.
    (allowed or ModuleAllowList.from_env()).check_launch(request)
    # ${env:RUSTIC_SECRET_*} references become the values of this process's environment (the
    # host's) here and nowhere else: the request, the desired state and listings keep them.
    messaging = resolve_references(request.messaging_config, os.environ)
    parsed = parse_launch(request.model_copy(update={"messaging_config": messaging}))
    _resolve_class(parsed.agent_spec.class_name, Agent, "agent class")
    if isinstance(parsed.agent_spec.properties, OpaqueProps):
        # The spec was accepted tolerantly (props kept opaque because their classes were not
        # importable where it was parsed). Rebuild them strictly now, as rusticai-core's
        # build_agent_from_spec would, so a missing props class is a spec error, not a crash.
        try:
            strict = AgentSpec.model_validate(parsed.agent_spec.model_dump(), context={"require_agent_class": True})
        except (ValidationError, ValueError, TypeError) as exc:
            raise InvalidSpecError(f"invalid agent spec: {str(exc)[:600]}") from None
        parsed = ParsedLaunch(parsed.request, parsed.guild_spec, strict, parsed.messaging_config)
    client_type = _resolve_class(request.client_type, Client, "client type")
    return parsed, client_type


def _configure_logging(raw: bytes) -> None:
    # The agent id goes into every line: a host keeps each agent's output apart, but
    # people read these lines after they were copied elsewhere too.
    try:
        data = json.loads(raw)
        label = f"{data['guild_spec'].get('id', '?')}/{data['agent_spec'].get('id', '?')}"
    except Exception:
        label = "?"
    label = str(label).replace("%", "%%")
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        force=True,  # a forked child inherits the fork server's handlers; replace them
        format=f"%(asctime)s %(levelname)s [agent {label} pid %(process)d] %(name)s: %(message)s",
    )


class _StopSignal:
    """SIGTERM/SIGINT, awaited by the main thread in a way messaging threads cannot swallow.

    The kernel hands a process-directed signal to any thread that does not block it, often
    one of the messaging backend's. Python then runs the handler in the main thread only
    when that thread next executes bytecode, so a main thread parked in a lock (such as
    ``threading.Event.wait()``) would never wake. ``signal.set_wakeup_fd`` makes the
    C-level handler write a byte to a pipe whatever thread it ran on; the main thread
    waits on that pipe with select, runs the Python handler, and sees the flag.

    Installed before the agent is built: an agent that wants other signal behaviour may
    change it in its __init__, and a SIGTERM during the build is honoured right after it.
    """

    def __init__(self) -> None:
        self._set = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._set = True

    def set(self) -> None:
        """Asks the main thread to stop; callable from any thread (the lease fence's)."""
        self._set = True
        try:
            os.write(self._wake_w, b"\0")
        except OSError:  # the pipe is full: a wake-up is already pending
            pass

    def wait(self) -> None:
        while not self._set:
            # The timeout is only a safety net; the wakeup byte ends the select at once.
            select.select([self._wake_r], [], [], 1.0)
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass


def run(raw: bytes, control_fd: int, lease_fd: int, *, ready_extra: dict[str, Any] | None = None) -> int:
    """Builds the agent, reports on ``control_fd``, serves until SIGTERM or the lease deadline; returns the exit code.

    The lease fence is armed before anything else: a host that loses its lease while this
    agent is still being built must not leave it running either.
    """
    stop = _StopSignal()
    _configure_logging(raw)
    fence = LeaseFence(lease_fd, on_stop=stop.set)
    fence.arm()

    _apply_device_env(raw)  # before anything imports agent code (CUDA reads it once, at its first use)
    try:
        parsed, client_type = prepare(raw)
    except ForbiddenModuleError as exc:
        log.error("refused launch request: %s", exc)
        _report(control_fd, error_event(KIND_FORBIDDEN, str(exc)))
        return EXIT_INVALID_SPEC
    except InvalidSpecError as exc:
        log.error("invalid launch request: %s", exc)
        _report(control_fd, error_event(KIND_INVALID_SPEC, str(exc)))
        return EXIT_INVALID_SPEC

    request = parsed.request
    delivery_gated = False
    if parsed.messaging_config.backend_module.startswith("rustic_ai.redis."):
        delivery_gated = redis_delivery.install()  # exactly-once gaps of rusticai-redis 1.4 (see redis_delivery.py)
    wrapper = ProcessAgentWrapper(
        guild_spec=parsed.guild_spec,
        agent_spec=parsed.agent_spec,
        messaging_config=parsed.messaging_config,
        machine_id=request.machine_id,
        client_type=client_type,
        client_properties=dict(request.client_properties),
        organization_id=request.organization_id or None,
    )
    try:
        # The build is one span, a child of the engine's launch call when the host passed
        # its trace context on (a no-op unless the process configures an OpenTelemetry SDK).
        parent = propagate.extract(request.trace_context) if request.trace_context else None
        with _tracer.start_as_current_span("rk8s.agent.build", context=parent,
                                           attributes={"rk8s.guild_id": request.key.guild_id,
                                                       "rk8s.agent_id": request.key.agent_id}) as span:
            trace_id = span.get_span_context().trace_id
            if trace_id:
                log.info("building agent %s in trace %032x", request.key, trace_id)
            wrapper.run()
    except Exception as exc:
        log.exception("agent %s failed to start", request.key)
        _report(control_fd, error_event(KIND_LAUNCH, f"{type(exc).__name__}: {exc}"))
        return EXIT_LAUNCH_FAILED

    ready = {"event": EVENT_READY, "pid": os.getpid(), **(ready_extra or {})}
    if not _report(control_fd, ready):
        log.error("the host went away before agent %s was ready; shutting down", request.key)
        stop.set()
    log.info("agent %s (%s) ready", request.key, parsed.agent_spec.class_name)

    stop.wait()
    log.info("agent %s stopping", request.key)
    # Finish the message in hand (and save its position) before anything else: one cut off half way
    # is handled again by the next copy. Bounded by the fence's hard deadline when the fence
    # fired (the kernel timer ends us there anyway), else by FINISH_MAX_S (the host's own
    # SIGKILL after its stop grace comes first by default).
    if delivery_gated:
        left = fence.kill_at - FINISH_MARGIN_S - time.monotonic() if fence.fired and fence.kill_at else FINISH_MAX_S
        redis_delivery.quiesce(left)
    try:
        wrapper.shutdown()
    except Exception:
        log.exception("agent %s did not shut down cleanly", request.key)
    log.info("agent %s stopped", request.key)
    return EXIT_FENCED if fence.fired else EXIT_OK


def _apply_device_env(raw: bytes) -> None:
    """CUDA_VISIBLE_DEVICES / NVIDIA_VISIBLE_DEVICES as the host granted them (base/resources.device_env).

    Only those two variables: the request is not a way to set anything else in an agent's
    environment. An agent that was granted no GPU gets both set to "none visible", so it cannot
    pick up the devices its host (the pod) was given.
    """
    try:
        env = json.loads(raw).get("device_env") or {}
    except (ValueError, AttributeError):
        return  # a bad request is reported by prepare()
    if not isinstance(env, dict):
        return
    for name in DEVICE_ENV:
        value = env.get(name)
        if isinstance(value, str):
            os.environ[name] = value


def _report(control_fd: int, event: dict[str, Any]) -> bool:
    """Writes the one control line and closes the pipe; False when the host's end is gone."""
    try:
        write_event(control_fd, event)
        return True
    except OSError:  # EPIPE: the host (or its launch) gave up on us
        return False
    finally:
        try:
            os.close(control_fd)
        except OSError:
            pass


def finish(code: int) -> NoReturn:
    """Exits without running interpreter teardown: messaging threads must not delay or block the exit."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def main() -> NoReturn:
    """Cold entry point: the request on stdin, the control pipe's fd in the environment."""
    parent = int(os.environ.get(PARENT_PID_ENV) or 0) or None
    if not set_parent_death_signal(parent):
        os._exit(EXIT_ORPHANED)
    try:
        control_fd = int(os.environ[CONTROL_FD_ENV])
        lease_fd = int(os.environ[LEASE_FD_ENV])
        # pass_fds made them inheritable; an agent's own subprocesses must not hold them open,
        # or the host would not see end of file when this process dies.
        os.set_inheritable(control_fd, False)
        os.set_inheritable(lease_fd, False)
    except (KeyError, ValueError, OSError) as exc:
        print(f"rustic_ai.k8s.process.child: no usable control or lease pipe ({CONTROL_FD_ENV}, {LEASE_FD_ENV}): "
              f"{exc}", file=sys.stderr)
        os._exit(EXIT_INVALID_SPEC)
    finish(run(read_all(0), control_fd, lease_fd))


if __name__ == "__main__":
    main()
