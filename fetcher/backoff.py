"""When to retry and how long to wait: --retries failures in a row, the server's Retry-After,
else exponential backoff with jitter."""

from __future__ import annotations

import copy
from collections.abc import Callable

from tenacity import RetryCallState, wait_exponential_jitter

from fetcher.errors import TransientFetchError
from fetcher.sources.base import TooSlow

MAX_RETRY_AFTER = 300.0


class wait_retry_after:
    """A tenacity wait that honours a server's Retry-After (429, 503), capped at 5 minutes.

    ``failures`` is the count the backoff doubles with: tenacity's attempt number unless given.
    """

    def __init__(self, initial: float, failures: Callable[[], int] | None = None) -> None:
        self._backoff = wait_exponential_jitter(initial=initial, max=60, jitter=initial)
        self._failures = failures

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TransientFetchError) and exc.retry_after is not None:
            return min(exc.retry_after, MAX_RETRY_AFTER)
        if self._failures is not None:  # tenacity's formula, on another count than its attempts
            state = copy.copy(state)
            state.attempt_number = self._failures()
        return float(self._backoff(state))


class InARow:
    """What --retries counts: failures in a row, with no progress between them.

    A download that got further between two failures, such as one through a CDN that drops
    long connections every few minutes, is not failing: its count starts again at 1, and so
    does its backoff. Progress is ``reached()``, the byte the next attempt goes on from, at its
    furthest; a stream cut for being too slow (TooSlow) makes none, or a trickle would be
    retried for ever. Give ``stop`` and ``wait`` to tenacity; ``count`` is the attempt to log.
    """

    def __init__(self, retries: int, backoff: float, reached: Callable[[], int] = lambda: 0) -> None:
        self.count = 0
        self.retries = retries
        self.wait = wait_retry_after(backoff, lambda: self.count)
        self._reached = reached
        self._furthest = 0

    def stop(self, state: RetryCallState) -> bool:
        reached = self._reached()
        slow = state.outcome is not None and isinstance(state.outcome.exception(), TooSlow)
        if reached > self._furthest and not slow:
            self.count = 0
        self._furthest = max(self._furthest, reached)
        self.count += 1
        return self.count > self.retries
