"""The only package that imports redis: the location registry and its key layout."""

from .keys import Keys
from .registry import ClaimResult, HeartbeatResult, LocationRegistry

__all__ = ["ClaimResult", "HeartbeatResult", "Keys", "LocationRegistry"]
