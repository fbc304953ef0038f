"""Canary routing, shared by the classifier and the generative student servers."""

from __future__ import annotations

import hashlib
import random


def route_to_challenger(fraction: float, user: str | None, rng: random.Random) -> bool:
    """Canary routing: sticky per user id (hash) when given, otherwise a fresh draw per request."""
    if fraction <= 0:
        return False
    if user:
        h = int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "big") / 2**64
        return h < fraction
    return rng.random() < fraction
