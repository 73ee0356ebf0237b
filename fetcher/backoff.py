"""How long to wait before a retry: the server's Retry-After, else exponential backoff with jitter."""

from __future__ import annotations

from tenacity import RetryCallState, wait_exponential_jitter

from fetcher.errors import TransientFetchError

MAX_RETRY_AFTER = 300.0


class wait_retry_after:
    """A tenacity wait that honours a server's Retry-After (429, 503), capped at 5 minutes."""

    def __init__(self, initial: float) -> None:
        self._backoff = wait_exponential_jitter(initial=initial, max=60, jitter=initial)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TransientFetchError) and exc.retry_after is not None:
            return min(exc.retry_after, MAX_RETRY_AFTER)
        return float(self._backoff(state))
