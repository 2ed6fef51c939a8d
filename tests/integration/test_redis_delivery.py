"""Agent-side delivery fixes for rusticai-redis (process/redis_delivery.py), against a real Redis.

Each scenario runs in a process of its own (``redis_delivery.install()`` patches the library
for a whole process, as in an agent process; this test process's own senders must keep the
library as it ships).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support.hosts import TESTS_DIR


def _run(module: str, *args: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert done.returncode == 0, f"{module} failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_live_message_before_the_first_replay_does_not_skip_the_backlog(redis_server):
    """A new copy's live feed is up before the replay reads the saved position; a message handled
    in between must not move that position past the backlog (support/delivery_race.py stages it).
    Before the fix the copy handled only the live message: the 5 messages of the backlog were
    never delivered to it, nor to any later copy."""
    out = _run("support.delivery_race", str(redis_server.port))
    assert out["staged"], "the live message was not handled before the replay read the position"
    assert sorted(out["handled"]) == list(range(5, 11)), f"handled {out['handled']}, want the backlog 5-9 and 10"
    assert out["position"] == out["ids"][10], "the position ends at the newest message, all handled"
