"""The engine: an awaitable API (`AsyncK8sEngine`) and rusticai-core's ExecutionEngine
drop-in (`K8sExecutionEngine`) that drives it on a shared background loop."""

from .engine import AsyncK8sEngine
from .sync_engine import K8sExecutionEngine

__all__ = ["AsyncK8sEngine", "K8sExecutionEngine"]
