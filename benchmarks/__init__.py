"""Benchmarks of rusticai-k8s against rusticai-core's own execution engines (``scripts/dev bench``).

Every scenario runs in a worker process of its own (``benchmarks.worker``), so an engine's
threads, forks and imports never leak into another engine's numbers; the orchestrator
(``benchmarks.cli``) only sequences workers, collects their JSON results and reports.
"""
