"""Entry points: `rustic-agent-host` and the `rustic-k8s` operator CLI. Logging handlers
and signal handlers are installed here and nowhere else."""
