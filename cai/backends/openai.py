"""Any OpenAI-compatible chat server: `vllm serve`, llama.cpp's server, hosted APIs.

    engine: {kind: openai, base_url: "http://127.0.0.1:8000/v1", concurrency: 8}

One HTTP request per chat (its `n` samples ride in the same request), at most `concurrency` in
flight. The client's own retries are off: tenacity retries 429, 5xx, timeouts and connection
errors with exponential backoff and jitter (honouring Retry-After up to a limit), and a request
that still fails fails only its own item, with the reason. `base_url` may list several servers
(`cai.backends.openai_fleet`): requests spread over them and a failed one moves to another.

Scoring asks for one token with `top_logprobs` and reads each option's log-prob from that list,
so only single-token options work over HTTP. An option missing from the top-k gets a floor,
(lowest returned log-prob) + log(1/2): below everything the server returned but not -inf, so
the soft label stays a finite, ordered number. Floors are counted on `usage.floored_logprobs`
and logged; raise `top_logprobs` (vLLM allows up to 20 by default) if they are common.
"""

from __future__ import annotations

import json
import logging
import math
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cai.backends.base import (
    Chat,
    ChoiceScores,
    Completion,
    Sample,
    ScorePrompt,
    ServerCount,
    Usage,
    request_seed,
)
from cai.backends.openai_fleet import Fleet, describe
from cai.sections import OpenAIEngine, SamplingParams

log = logging.getLogger("cai.backends.openai")

FLOOR_OFFSET = math.log(0.5)  # a missing option is scored half as likely as the least likely shown
MAX_RETRY_AFTER = 60.0  # seconds; a server asking for longer is treated as failing


def _retry_after(exc: BaseException | None) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def option_logprobs(options: Sequence[str], top: Sequence[tuple[str, float]]) -> tuple[list[float], int]:
    """Map options to log-probs in a top-k list: exact token text first, then stripped text.

    Returns the log-probs and how many were floored (not found; see the module docstring).
    """
    exact: dict[str, float] = {}
    stripped: dict[str, float] = {}
    for token, logprob in top:
        exact[token] = max(logprob, exact.get(token, -math.inf))
        key = token.strip()
        stripped[key] = max(logprob, stripped.get(key, -math.inf))
    floor = min(lp for _, lp in top) + FLOOR_OFFSET if top else -math.inf
    values, floored = [], 0
    for option in options:
        if option in exact:
            values.append(exact[option])
        elif option.strip() in stripped:
            values.append(stripped[option.strip()])
        else:
            values.append(floor)
            floored += 1
    return values, floored


class OpenAIBackend:
    """Generation and scoring through an OpenAI-compatible server (see the module docstring)."""

    def __init__(self, model: str, config: OpenAIEngine | None = None, *, client: Any = None) -> None:
        self.config = config or OpenAIEngine()
        self.model_id = model
        self.usage = Usage()
        if client is None:
            import openai

            clients = {
                url: openai.OpenAI(
                    base_url=url,
                    api_key=os.environ.get(self.config.api_key_env, "EMPTY"),
                    timeout=self.config.timeout,
                    max_retries=0,  # ours, in the fleet, so that every engine retries the same way
                )
                for url in self.config.urls
            }
        else:  # tests: one client stands in for every server
            clients = dict.fromkeys(self.config.urls, client)
        self.retry_wait: Callable[[Any], float] = self._backoff  # tests replace it
        self.fleet = Fleet(
            clients,
            concurrency=self.config.concurrency,
            max_retries=self.config.max_retries,
            wait=lambda state: self.retry_wait(state),
            usage=lambda: self.usage,
        )
        self._token_counts: dict[str, int | None] = {}

    @property
    def servers(self) -> dict[str, ServerCount]:
        """Requests, failures and failures retried elsewhere, per server URL, since the start."""
        return {url: self.usage.per_server.get(url, ServerCount()) for url in self.config.urls}

    def close(self) -> None:
        self.fleet.close()

    # ------------------------------------------------------------------ transport

    def _backoff(self, retry_state: Any) -> float:
        """Exponential backoff with full jitter, or the server's Retry-After when it sends one."""
        import random

        asked = _retry_after(retry_state.outcome.exception() if retry_state.outcome else None)
        if asked is not None and asked <= MAX_RETRY_AFTER:
            return asked
        return random.uniform(0, min(30.0, 0.5 * 2 ** (retry_state.attempt_number - 1)))

    def _run(self, bodies: list[dict[str, Any]]) -> list[Any]:
        """Send every request, at most `concurrency` at once; a failure becomes its exception.

        Raises `FleetDownError` when no request got through (`Fleet.check_batch`).
        """

        def one(body: dict[str, Any]) -> Any:
            try:
                return self.fleet.call(
                    lambda client: client.chat.completions.create(model=self.model_id, **body)
                )
            except Exception as exc:  # noqa: BLE001 - fails only this item, with the reason
                return exc

        if len(bodies) <= 1:
            results = [one(b) for b in bodies]
        else:
            with ThreadPoolExecutor(max_workers=min(self.config.concurrency, len(bodies))) as pool:
                results = list(pool.map(one, bodies))
        self.fleet.check_batch(results)
        return results

    # ------------------------------------------------------------------ generation

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        bodies = []
        for index, chat in enumerate(chats):
            body: dict[str, Any] = dict(
                messages=[dict(m) for m in chat],
                n=params.n,
                max_tokens=params.max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
            )
            seed = request_seed(params.seed, index)
            if seed is not None:
                body["seed"] = seed
            if params.stop:
                body["stop"] = list(params.stop)
            if params.repetition_penalty != 1.0:
                # not in OpenAI's API; vLLM and llama.cpp servers read it from the body
                body["extra_body"] = {"repetition_penalty": params.repetition_penalty}
            bodies.append(body)
        results = [self._completion(r) for r in self._run(bodies)]
        self.usage.generate_calls += 1
        for completion in results:
            self.usage.prompt_tokens += completion.prompt_tokens
            self.usage.completion_tokens += sum(s.tokens for s in completion.samples)
            self.usage.failed_items += not completion.ok
        return results

    @staticmethod
    def _completion(response: Any) -> Completion:
        if isinstance(response, BaseException):
            return Completion(error=describe(response))
        choices = sorted(response.choices, key=lambda c: c.index)
        texts = [(c.message.content or "") for c in choices]
        usage = getattr(response, "usage", None)
        total = getattr(usage, "completion_tokens", 0) or 0
        # The API reports tokens per request, not per choice: with n > 1 the total is shared
        # out in proportion to text length (exact for n = 1, and the sum is always exact).
        weights = [max(len(t), 1) for t in texts]
        counts = [total * w // sum(weights) for w in weights]
        if counts:
            counts[0] += total - sum(counts)
        samples = [
            Sample(
                text=text.strip(),
                tokens=count,
                finish_reason="length" if choice.finish_reason == "length" else "stop",
            )
            for choice, text, count in zip(choices, texts, counts, strict=True)
        ]
        return Completion(samples=samples, prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0)

    # ------------------------------------------------------------------ scoring

    def score_choices(self, prompts: Sequence[ScorePrompt], options: Sequence[str]) -> list[ChoiceScores]:
        if not options:
            raise ValueError("score_choices needs at least one option")
        self._check_single_tokens(options)
        bodies = []
        for prompt in prompts:
            messages = [dict(m) for m in prompt.chat]
            body: dict[str, Any] = dict(
                max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=self.config.top_logprobs
            )
            if prompt.assistant_prefix and self.config.continue_final_message:
                messages.append({"role": "assistant", "content": prompt.assistant_prefix})
                body["extra_body"] = {"continue_final_message": True, "add_generation_prompt": False}
            elif prompt.assistant_prefix:
                last = messages[-1]
                messages[-1] = {**last, "content": f"{last['content']}\n\n{prompt.assistant_prefix}"}
            body["messages"] = messages
            bodies.append(body)
        results = []
        floored = 0
        for response in self._run(bodies):
            scores, floors = self._scores(response, options)
            floored += floors
            results.append(scores)
        self.usage.score_calls += 1
        self.usage.floored_logprobs += floored
        if floored:
            log.warning(
                "%d option log-probs were not in the server's top %d and were floored",
                floored,
                self.config.top_logprobs,
            )
        for scores in results:
            self.usage.scored_tokens += scores.prompt_tokens
            self.usage.cached_tokens += scores.cached_tokens
            self.usage.failed_items += not scores.ok
        return results

    @staticmethod
    def _scores(response: Any, options: Sequence[str]) -> tuple[ChoiceScores, int]:
        if isinstance(response, BaseException):
            return ChoiceScores.failed(options, describe(response)), 0
        try:
            first = response.choices[0].logprobs.content[0]
        except (AttributeError, IndexError, TypeError):
            return ChoiceScores.failed(options, "the server returned no logprobs"), 0
        top = [(t.token, t.logprob) for t in (first.top_logprobs or [])]
        top.append((first.token, first.logprob))  # the sampled token, should top-k omit it
        values, floored = option_logprobs(options, top)
        usage = getattr(response, "usage", None)
        details = getattr(usage, "prompt_tokens_details", None)
        scores = ChoiceScores.from_logprobs(
            options,
            values,
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            cached_tokens=getattr(details, "cached_tokens", 0) or 0,
        )
        return scores, floored

    def _check_single_tokens(self, options: Sequence[str]) -> None:
        """Refuse multi-token options, which one next-token distribution cannot score.

        The server's /tokenize endpoint (vLLM) says exactly; where it has none, an option with
        inner whitespace is refused as surely several tokens, and others are taken on trust.
        """
        for option in options:
            if option not in self._token_counts:
                self._token_counts[option] = self._count_tokens(option)
            count = self._token_counts[option]
            if count is None:
                count = 1 if not option.strip() or len(option.strip().split()) == 1 else 2
            if count != 1:
                raise ValueError(
                    f"option {option!r} is {count} tokens for this model; over HTTP only single-token "
                    "options can be scored (use the hf or vllm engine for longer options)"
                )

    def _count_tokens(self, text: str) -> int | None:
        """The option's token count from the first server whose /tokenize answers, else None."""
        for url in self.config.urls:
            count = self._count_tokens_at(url, text)
            if count is not None:
                return count
        return None

    def _count_tokens_at(self, url: str, text: str) -> int | None:
        root = url.rstrip("/").removesuffix("/v1")
        payload = json.dumps({"model": self.model_id, "prompt": text, "add_special_tokens": False}).encode()
        request = urllib.request.Request(
            root + "/tokenize",
            data=payload,
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {os.environ.get(self.config.api_key_env, 'EMPTY')}",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=min(self.config.timeout, 10.0)) as reply:
                data = json.loads(reply.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None
        tokens = data.get("tokens") if isinstance(data, dict) else None
        return len(tokens) if isinstance(tokens, list) else None
