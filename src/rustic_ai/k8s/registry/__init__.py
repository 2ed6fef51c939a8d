"""The only package that imports redis: the location registry and its key layout."""

from .keys import Keys
from .registry import (
    NOT_DESIRED,
    OWNED_ELSEWHERE,
    SHORT,
    ClaimResult,
    HeartbeatResult,
    KeepRound,
    Kept,
    LocationRegistry,
    Unplaced,
)

__all__ = ["NOT_DESIRED", "OWNED_ELSEWHERE", "SHORT", "ClaimResult", "HeartbeatResult", "KeepRound", "Kept", "Keys",
           "LocationRegistry", "Unplaced"]
