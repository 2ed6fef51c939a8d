"""Real agent-host processes for tests: `rustic-agent-host` subprocesses on free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent
# Set to a directory to keep every host's log there as <name>.log (and, through the hosts'
# environment, every ledger agent's own log: support/ledger_agents.py). Off by default.
LOG_DIR_ENV = "RUSTIC_K8S_TEST_LOG_DIR"


class HostProcess:
    def __init__(self, redis_url: str, key_prefix: str, *, name: str, env: dict[str, str] | None = None,
                 args: list[str] | None = None, wait: bool = True, own_group: bool = False) -> None:
        """``own_group``: the host leads a process group of its own, so a test can signal the
        group (os.killpg) without signalling itself."""
        self.name = name
        if keep_dir := os.environ.get(LOG_DIR_ENV):
            Path(keep_dir).mkdir(parents=True, exist_ok=True)
            self.log = open(Path(keep_dir) / f"{name}.log", "ab")  # noqa: SIM115 - closed in close()
        else:
            self.log = tempfile.NamedTemporaryFile(prefix=f"rk8s-{name}-", suffix=".log", delete=False)
        self.log_path = Path(self.log.name)
        full_env = dict(os.environ)
        # Test agents live in tests/support; agent processes must be able to import them.
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), full_env.get("PYTHONPATH", "")]))
        full_env.update(
            {
                "RUSTIC_K8S_REDIS_URL": redis_url,
                "RUSTIC_K8S_KEY_PREFIX": key_prefix,
                "RUSTIC_AGENT_HOST_LISTEN": "127.0.0.1:0",
                "RUSTIC_AGENT_HOST_NAME": name,
                "RUSTIC_AGENT_HOST_STOP_GRACE_S": "3",
            }
        )
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rustic_ai.k8s.cli.agent_host", *(args or [])],
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=full_env,
            text=True,
            process_group=0 if own_group else None,
        )
        self.address = ""
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until the host prints or exits
        if "ready on" not in line or time.monotonic() > deadline:
            self.proc.kill()
            self.proc.wait(10)
            logs = self.logs()
            self.proc.stdout.close()  # no pipe or file left open behind a host that failed
            self.log.close()
            raise RuntimeError(f"host {self.name} did not start: {line!r}\n{logs}")
        self.address = line.strip().rsplit(" ", 1)[-1]
        return self.address

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the host drains and exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(10)

    def close(self) -> None:
        try:
            self.terminate()
        except subprocess.TimeoutExpired:
            self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()
        if not (os.environ.get("RUSTIC_K8S_TEST_KEEP_LOGS") or os.environ.get(LOG_DIR_ENV)):  # set it to read a failed run's host logs
            self.log_path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); read its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def start_hosts(redis_url: str, key_prefix: str, names: list[str], env: dict[str, str] | None = None,
                *, own_group: bool = False) -> list[HostProcess]:
    """Starts several hosts at once (interpreter start-up overlaps) and waits for all."""
    hosts = [HostProcess(redis_url, key_prefix, name=n, env=env, wait=False, own_group=own_group) for n in names]
    try:
        for h in hosts:
            h.wait_ready()
    except BaseException:
        for h in hosts:
            h.kill()
        raise
    return hosts
