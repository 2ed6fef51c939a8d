"""The orchestrator: ``scripts/dev bench [--only launch,guild,burst,...] [--quick]``.

Runs every selected scenario in worker processes (``benchmarks.worker``), one after the
other (the machine has two cores; workers side by side would measure each other), then
writes the results, a chart and a summary table with pass/fail per target.

Full runs write ``benchmarks/results/latest.json`` and ``launch_latency.png``; runs with
``--only`` or ``--quick`` write ``latest-partial.json`` and ``launch_latency-partial.png`` so
they never overwrite the numbers the README quotes. Any run of the guild scenario (launch
through ``Guild.launch_agent``, guild_launch.py), but a quick one, also writes its rows to
``guild_launch.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import guild_launch
from .common import cmdline, descendants_of, is_zombie, machine_info
from .report import render_table, targets, write_chart

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = ("launch", "guild", "burst", "memory", "registry", "density")
ENGINES = ("k8s-warm", "k8s-warm-preload", "k8s-cold", "multiprocess", "multithreaded", "ray")
# k8s-warm-preload (hosts started with RUSTIC_AGENT_HOST_PRELOAD=<the agents' module>) is for
# comparison by hand: since the fork server learns agent modules itself it measures the same.
DEFAULT_ENGINES = ("k8s-warm", "k8s-cold", "multiprocess", "multithreaded", "ray")
PR_SET_CHILD_SUBREAPER = 36

FULL = {"n": 15, "warmup": 2, "memory_agents": 10, "burst_agents": 50, "registry_agents": 10_000,
        "registry_calls": 2000, "guild_calls": 1000, "density_agents": 100, "worker_timeout_s": 420,
        "guild_n": 25}
QUICK = {"n": 5, "warmup": 1, "memory_agents": 10, "burst_agents": 50, "registry_agents": 2000,
         "registry_calls": 500, "guild_calls": 200, "density_agents": 30, "worker_timeout_s": 240,
        "guild_n": 7}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/dev bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help=f"comma-separated scenarios ({', '.join(SCENARIOS)}); default all")
    p.add_argument("--engines", default="", help=f"comma-separated engines for launch/memory ({', '.join(ENGINES)})")
    p.add_argument("--guild-engines", default="",
                   help=f"comma-separated engines for the guild scenario ({', '.join(guild_launch.DEFAULT_ENGINES)})")
    p.add_argument("--quick", action="store_true", help="fewer launches and agents: a smoke run of a minute or two")
    p.add_argument("--out", default=str(RESULTS), help="results directory (default benchmarks/results)")
    p.add_argument("--rerender", metavar="JSON", default="",
                   help="measure nothing: rebuild the table, targets and chart from a results file")
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.only.split(",") if s.strip()] or list(SCENARIOS)
    bad = [s for s in args.scenarios if s not in SCENARIOS]
    if bad:
        p.error(f"unknown scenario(s) {bad}; choose from {', '.join(SCENARIOS)}")
    args.engine_list = [e.strip() for e in args.engines.split(",") if e.strip()] or list(DEFAULT_ENGINES)
    bad = [e for e in args.engine_list if e not in ENGINES]
    if bad:
        p.error(f"unknown engine(s) {bad}; choose from {', '.join(ENGINES)}")
    args.guild_engine_list = ([e.strip() for e in args.guild_engines.split(",") if e.strip()]
                              or list(guild_launch.DEFAULT_ENGINES))
    bad = [e for e in args.guild_engine_list if e not in guild_launch.ENGINE_CLASSES]
    if bad:
        p.error(f"unknown guild engine(s) {bad}; choose from {', '.join(guild_launch.ENGINE_CLASSES)}")
    return args


def plan(args: argparse.Namespace, size: dict[str, Any]) -> list[dict[str, Any]]:
    """The workers to run, in order."""
    jobs: list[dict[str, Any]] = []
    per_engine = [s for s in ("launch", "memory", "burst") if s in args.scenarios]
    for engine in args.engine_list:
        wanted = [s for s in per_engine if s != "burst" or engine.startswith("k8s-warm")]
        if not wanted:
            continue
        jobs.append({"task": "engine", "engine": engine, "scenarios": wanted, "n": size["n"],
                     "warmup": size["warmup"], "memory_agents": size["memory_agents"],
                     "burst_agents": size["burst_agents"]})
    if "guild" in args.scenarios:
        jobs.append({"task": "guild", "engines": args.guild_engine_list, "n": size["guild_n"],
                     "warmup": size["warmup"]})
    if "registry" in args.scenarios:
        jobs.append({"task": "registry", "agents": size["registry_agents"], "guild_size": 100,
                     "calls": size["registry_calls"], "guild_calls": size["guild_calls"]})
    if "density" in args.scenarios:
        jobs.append({"task": "density", "agents": size["density_agents"]})
    return jobs


def run_worker(job: dict[str, Any], log_dir: Path, timeout_s: float) -> list[dict[str, Any]]:
    name = job.get("engine") or job["task"]
    fd, out_path = tempfile.mkstemp(prefix=f"rk8s-bench-{name}-", suffix=".json")
    os.close(fd)
    log_path = log_dir / f"{name}.log"
    print(f"\n== {name}: {', '.join(job.get('scenarios', [job['task']]))}", flush=True)
    began = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.worker", json.dumps(job), out_path],
                                cwd=ROOT, stdout=None, stderr=log, start_new_session=True)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            print(f"   {name}: no result after {timeout_s:.0f} s; stopping it (log: {log_path})", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    try:
        with open(out_path) as f:
            rows = json.load(f)
    except (OSError, ValueError):
        rows = [{"error": f"worker exited with {proc.returncode} without results", "task": job}]
    finally:
        with contextlib.suppress(OSError):
            os.unlink(out_path)
    for row in rows:
        if "error" in row:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
            print(f"   {name} FAILED: {row['error']}\n   last log lines ({log_path}):", flush=True)
            for line in tail:
                print(f"     {line}")
    print(f"   ({time.monotonic() - began:.0f} s)", flush=True)
    return rows


def leftovers() -> list[int]:
    """Our descendants still alive; reaps the zombies of orphans we adopted as subreaper."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    return [p for p in descendants_of(os.getpid()) if not is_zombie(p)]


def check_leftovers() -> list[str]:
    time.sleep(0.5)
    alive = leftovers()
    if not alive:
        print("\nno process left behind (every worker, host, agent, Redis and Ray process has exited)")
        return []
    warnings = [f"{pid} {cmdline(pid)[:150]}" for pid in alive]
    print(f"\nWARNING: {len(alive)} child process(es) still running after the benchmarks; stopping them:")
    for w in warnings:
        print(f"  {w}")
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and leftovers():
        time.sleep(0.2)
    for pid in leftovers():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    leftovers()
    return warnings


def code_state() -> dict[str, Any]:
    """The commit measured, and how many files under src/ differed from it (a shared work tree)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines() if line.strip()]
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_src_files": len(dirty)}


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def rerender(path: Path) -> int:
    doc = json.loads(path.read_text())
    rows = [r for r in doc if r.get("scenario") != "targets"]
    meta = next((r for r in doc if r.get("scenario") == "targets"), {})
    quick = bool(meta.get("quick"))
    verdicts = targets(rows, quick=quick)
    table = render_table(rows, verdicts)
    print(table)
    partial = path.stem.endswith("-partial")
    suffix = "-partial" if partial else ""
    machine = meta.get("machine") or (rows[0].get("machine") if rows else {}) or {}
    note = write_chart(rows, path.parent / f"launch_latency{suffix}.png", machine, meta.get("timestamp", ""))
    if note:
        print(f"chart: {note}")
    if meta:
        meta["targets"] = verdicts
    path.write_text(json.dumps(rows + ([meta] if meta else []), indent=1, default=str) + "\n")
    (path.parent / f"summary{suffix}.txt").write_text(table + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rerender:
        return rerender(Path(args.rerender))
    size = QUICK if args.quick else FULL
    partial = (args.quick or args.scenarios != list(SCENARIOS) or args.engine_list != list(DEFAULT_ENGINES)
               or args.guild_engine_list != list(guild_launch.DEFAULT_ENGINES))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = out_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    # Orphans of workers (an agent whose host died, a Ray daemon) become our children, so
    # the final check sees every process this run started, however it was started.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    stamp = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    machine = machine_info()
    machine["loadavg_start"] = loadavg()
    machine["code"] = code_state()
    print(f"rusticai-k8s benchmarks {'(quick) ' if args.quick else ''}{stamp}")
    print(f"machine: {machine['cpu_model']}, {machine['cores']} cores, {machine['memory_gb']} GB, "
          f"Python {machine['python']}, Linux {machine['kernel']}, redis-server {machine['redis_server']}")
    print(f"code: commit {machine['code']['commit'] or '?'}"
          + (f" + {machine['code']['uncommitted_src_files']} uncommitted files under src/"
             if machine["code"]["uncommitted_src_files"] else ""))
    if machine["loadavg_start"] and machine["loadavg_start"][0] > 1.0:
        print(f"note: load average {machine['loadavg_start'][0]:.2f} at start: something else is using the CPUs; "
              "expect noisier numbers")
    print("scenarios: " + ", ".join(args.scenarios))

    ray_missing = importlib.util.find_spec("rustic_ai.ray") is None or importlib.util.find_spec("ray") is None
    jobs = plan(args, size)
    rows: list[dict[str, Any]] = []
    if ray_missing:
        jobs = [j for j in jobs if j.get("engine") != "ray"]
        for job in jobs:
            if job["task"] == "guild" and "ray" in job["engines"]:
                job["engines"] = [e for e in job["engines"] if e != "ray"]
                print("\nnotice: rusticai-ray is not installed, so the guild scenario skips RayExecutionEngine")
                rows.append({"engine": "RayExecutionEngine", "engine_key": "ray",
                             "scenario": "guild_launch_to_first_reply",
                             "skipped": "rusticai-ray is not installed (pip install -e '.[ray]')"})
        if "ray" in args.engine_list and {"launch", "memory"} & set(args.scenarios):
            print("\nnotice: rusticai-ray is not installed, so RayExecutionEngine is skipped "
                  "(pip install -e '.[ray]' adds it)")
            rows.append({"engine": "RayExecutionEngine", "engine_key": "ray", "scenario": "launch_to_first_reply",
                         "skipped": "rusticai-ray is not installed (pip install -e '.[ray]')"})
    began = time.monotonic()
    try:
        for job in jobs:
            if job["task"] == "guild":
                rows += guild_launch.run_scenario(job["engines"], job["n"], job["warmup"], log_dir)
            else:
                rows += run_worker(job, log_dir, size["worker_timeout_s"])
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up")
        check_leftovers()
        return 130
    elapsed = time.monotonic() - began
    machine["loadavg_end"] = loadavg()

    for row in rows:
        row.setdefault("machine", machine)
        row.setdefault("timestamp", stamp)
        row["quick"] = args.quick
    verdicts = targets(rows, quick=args.quick)
    table = render_table(rows, verdicts)
    print("\n" + table)

    suffix = "-partial" if partial else ""
    chart = out_dir / f"launch_latency{suffix}.png"
    chart_note = write_chart(rows, chart, machine, stamp)
    left = check_leftovers()
    doc = rows + [{"engine": "-", "scenario": "targets", "targets": verdicts, "machine": machine,
                   "timestamp": stamp, "quick": args.quick, "elapsed_s": round(elapsed, 1),
                   "leftover_processes": left}]
    json_path = out_dir / f"latest{suffix}.json"
    json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    guild_rows = [r for r in rows if r.get("scenario") == "guild_launch_to_first_reply"]
    if guild_rows and not args.quick:  # its own file: partial runs of other scenarios leave it alone
        guild_doc = {"command": " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]),
                     "timestamp": stamp, "machine": machine, "rows": guild_rows,
                     "target": next((v for v in verdicts if v["target"].startswith("through Guild")), None)}
        (out_dir / "guild_launch.json").write_text(json.dumps(guild_doc, indent=1, default=str) + "\n")
    (out_dir / f"summary{suffix}.txt").write_text(table + "\n")
    print(f"\nwrote {json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path}"
          + (f", {chart.relative_to(ROOT) if chart.is_relative_to(ROOT) else chart}" if chart_note is None else "")
          + f"; worker logs in {log_dir}")
    if chart_note:
        print(f"chart: {chart_note}")
    print(f"total {elapsed:.0f} s")
    failed = any("error" in r for r in rows)
    return 1 if failed or left else 0
