"""Several OpenAI-compatible servers behind one backend: spread, bounded, retried elsewhere.

    engine: {kind: openai, base_url: [http://h1:8000/v1, http://h2:8000/v1], concurrency: 64}

`concurrency` is the whole fleet's: at most that many requests in flight, and at most
ceil(concurrency / n) of them on any one of the n servers. A request goes to the server with a
free slot that answered its last request (a server whose last request failed is used only when
the others are full, which is how it is seen to recover), then the one with fewest in flight.

A retryable failure (429, 5xx, timeout, lost connection) sends the request at once to a server
that has not failed it yet; only when every server has failed it does the exponential backoff
apply before the next round. A request fails when every server has failed it *and* it has had
`max_retries` retries, so a single server behaves as before. A batch in which no request
succeeded and every request failed that way means the fleet is down: `FleetDownError` names the
servers and the last error, instead of each item failing quietly and a stage committing a chunk
of failures. Per-request seeds are fixed before a server is chosen, so outputs never depend on
which server answered.

Each server's requests, failures and failures retried elsewhere are counted on
`usage.per_server`; stores sum them into the stage manifest's `servers`.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

from cai.backends.base import ServerCount, Usage

log = logging.getLogger("cai.backends.openai")

RETRY_STATUSES = {408, 409, 429}  # plus every 5xx


class FleetDownError(RuntimeError):
    """Every server failed every request of a batch (after the retries)."""


def is_retryable(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRY_STATUSES or exc.status_code >= 500
    return False


def describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}{f' {status}' if status else ''}: {message}"


class Fleet:
    """The servers, their free slots and their counters; `call` sends one request."""

    def __init__(
        self,
        clients: dict[str, Any],
        *,
        concurrency: int,
        max_retries: int,
        wait: Callable[[Any], float],
        usage: Callable[[], Usage],
    ) -> None:
        self.clients = clients
        self.urls = list(clients)
        self.cap = math.ceil(concurrency / len(self.urls))
        self.max_retries = max_retries
        self.wait = wait  # the backoff between rounds (the backend's, which tests replace)
        self.usage = usage
        self._ready = threading.Condition()
        self._in_flight = dict.fromkeys(self.urls, 0)
        self._answered = dict.fromkeys(self.urls, True)  # did its last request get an answer?
        self._turn = 0  # rotates ties, so an idle fleet spreads its first requests

    def close(self) -> None:
        for client in {id(c): c for c in self.clients.values()}.values():  # tests share one
            client.close()

    def call(self, send: Callable[[Any], Any]) -> Any:
        """`send(client)` on one server after another until one answers (see the module docstring).

        Raises the last error when the request has failed on every server and used its retries.
        """
        from tenacity import Retrying, retry_if_exception

        failed_at: dict[str, int] = {}  # server -> attempt at which it last failed this request
        previous: list[str] = []  # the server of the last attempt

        def stop(state: Any) -> bool:
            return state.attempt_number > self.max_retries and len(failed_at) == len(self.urls)

        def wait(state: Any) -> float:
            return 0.0 if len(failed_at) < len(self.urls) else self.wait(state)

        def log_retry(state: Any) -> None:
            elsewhere = "on another server" if len(failed_at) < len(self.urls) else "after a backoff"
            log.warning(
                "request failed on %s (%s); retrying %s (attempt %d)",
                previous[-1],
                describe(state.outcome.exception()),
                elsewhere,
                state.attempt_number + 1,
            )

        def attempt() -> Any:
            number = len(previous) + 1
            untried = [u for u in self.urls if u not in failed_at]
            url = self._acquire(untried or self.urls, failed_at)
            if previous and previous[-1] != url and previous[-1] in failed_at:
                self._count(previous[-1], retried_elsewhere=1)
            previous.append(url)
            self._count(url, requests=1)
            answered = True  # a non-retryable error is the request's fault: the server did answer
            try:
                return send(self.clients[url])
            except Exception as exc:
                self._count(url, failures=1)
                if is_retryable(exc):
                    failed_at[url] = number
                    answered = False
                raise
            finally:
                self._release(url, answered=answered)

        retrying = Retrying(
            retry=retry_if_exception(is_retryable),
            stop=stop,
            wait=wait,
            before_sleep=log_retry,
            reraise=True,
        )
        return retrying(attempt)

    def check_batch(self, results: Sequence[Any]) -> None:
        """Raise `FleetDownError` when no request of a batch got through (see the module docstring)."""
        errors = [r for r in results if isinstance(r, BaseException)]
        if not results or len(errors) < len(results) or not all(is_retryable(e) for e in errors):
            return
        names = ", ".join(self.urls)
        raise FleetDownError(
            f"every server failed all {len(results)} requests of the batch after retries "
            f"({names}); last error: {describe(errors[-1])}"
        ) from errors[-1]

    # ------------------------------------------------------------------ slots and counters

    def _acquire(self, candidates: list[str], failed_at: dict[str, int]) -> str:
        """Wait for a free slot on one of `candidates` and take the best one (module docstring)."""
        with self._ready:
            while True:
                free = [u for u in candidates if self._in_flight[u] < self.cap]
                if free:
                    break
                self._ready.wait()
            order = {u: (i - self._turn) % len(self.urls) for i, u in enumerate(self.urls)}
            url = min(
                free,
                key=lambda u: (failed_at.get(u, 0), not self._answered[u], self._in_flight[u], order[u]),
            )
            self._turn += 1
            self._in_flight[url] += 1
            return url

    def _release(self, url: str, *, answered: bool) -> None:
        with self._ready:
            self._in_flight[url] -= 1
            self._answered[url] = answered
            self._ready.notify_all()

    def _count(self, url: str, **add: int) -> None:
        with self._ready:
            usage = self.usage()
            servers = dict(usage.per_server)  # a new dict: copies taken earlier keep their numbers
            servers[url] = servers.get(url, ServerCount()).plus(ServerCount(**add))
            usage.per_server = servers
