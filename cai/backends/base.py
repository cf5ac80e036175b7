"""The one protocol every stage uses to talk to a model: generate text, and score choices.

Stages (critique loop, judge, PPO rollouts, evaluation) never touch transformers, vLLM or HTTP
directly; they call `generate` and `score_choices` on a `Backend`. That keeps them pure enough
to test with a scripted fake and lets one config field (`engine.kind`) move a whole run from
CPU transformers to vLLM or to a remote server.

Two rules hold for every backend:
- outputs are aligned with inputs, and one bad item (an over-long prompt, a failed request)
  fails only that item, with `error` set; the rest of the batch goes on;
- token usage is counted on `backend.usage`, so stages can report what they cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict

from cai.hashing import derive_seed
from cai.sections import SamplingParams


class Message(TypedDict):
    role: str  # "system" | "user" | "assistant"
    content: str


Chat = list[Message]


FinishReason = Literal["stop", "length", "error"]


class Sample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    tokens: int
    finish_reason: FinishReason
    token_ids: list[int] | None = Field(
        None, description="Generated token ids (before stop-string trimming), where the engine has them."
    )
    stop_token_id: int | None = Field(
        None,
        description="The EOS token that ended the sample (cut off `token_ids`), where the engine knows it; "
        "models can have several (Qwen2.5: <|im_end|> and <|endoftext|>).",
    )


class Completion(BaseModel):
    """All samples for one chat; `error` set (and no samples) when the item failed."""

    model_config = ConfigDict(extra="forbid")

    samples: list[Sample] = Field(default_factory=list)
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str:
        if self.error is not None:
            raise ValueError(f"completion failed: {self.error}")
        return self.samples[0].text


class ScorePrompt(BaseModel):
    """A chat whose next assistant turn starts with `assistant_prefix`; options continue it.

    The backend applies the model's chat template with a generation prompt, appends the prefix
    as plain text, then scores each option's tokens (tokenized on their own, without special
    tokens) as a continuation. Options that are single tokens are scored in one pass.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    chat: Chat
    assistant_prefix: str = ""


class ChoiceScores(BaseModel):
    """Log-probabilities of each option as a continuation, and their normalised probabilities."""

    model_config = ConfigDict(extra="forbid")

    options: list[str]
    logprobs: list[float] = Field(default_factory=list)
    probs: list[float] = Field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_logprobs(
        cls, options: Sequence[str], logprobs: Sequence[float], prompt_tokens: int = 0, cached_tokens: int = 0
    ) -> ChoiceScores:
        return cls(
            options=list(options),
            logprobs=[float(x) for x in logprobs],
            probs=normalise(logprobs),
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
        )

    @classmethod
    def failed(cls, options: Sequence[str], error: str) -> ChoiceScores:
        return cls(options=list(options), error=error)


class ContinuationPrompt(BaseModel):
    """A chat whose next assistant turn is `continuation`, to be scored token by token.

    The backend applies the chat template with a generation prompt and scores the continuation's
    own tokens (tokenized alone, without special tokens), the way the likelihood judge reads a
    response as what an assistant would say (`cai.likelihood`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    chat: Chat
    continuation: str


class ContinuationScore(BaseModel):
    """Sum of the continuation's token log-probabilities; an empty continuation scores 0 over 0 tokens."""

    model_config = ConfigDict(extra="forbid")

    logprob: float = 0.0
    tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def encode_continuations(
    encode: Callable[[Chat, str], list[int]],
    tokenizer: object,
    prompts: Sequence[ContinuationPrompt],
    limit: int,
    room: int = 0,
) -> tuple[dict[int, tuple[list[int], list[int]]], list[ContinuationScore | None]]:
    """(prompt ids, continuation ids) of each item that fits within `limit` (+ `room`), and the
    results list with failed items and empty continuations already in place (the rest None)."""
    results: list[ContinuationScore | None] = [None] * len(prompts)
    encoded: dict[int, tuple[list[int], list[int]]] = {}
    for index, item in enumerate(prompts):
        try:
            prompt = encode(item.chat, "")
        except Exception as exc:  # noqa: BLE001 - a malformed chat fails only its own item
            results[index] = ContinuationScore(error=f"chat template failed: {exc}")
            continue
        tail = (
            tokenizer(item.continuation, add_special_tokens=False)["input_ids"] if item.continuation else []
        )  # type: ignore[operator]
        if not tail:  # nothing to score: an empty answer is recorded as such, never a crash
            results[index] = ContinuationScore(prompt_tokens=len(prompt))
        elif len(prompt) + len(tail) + room > limit:
            message = (
                f"prompt of {len(prompt)} tokens + response of {len(tail)} exceeds the maximum length {limit}"
            )
            results[index] = ContinuationScore(prompt_tokens=len(prompt), error=message)
        else:
            encoded[index] = (prompt, tail)
    return encoded, results


def normalise(logprobs: Sequence[float]) -> list[float]:
    """Softmax over the options' log-probabilities (stable); the soft label of the CAI paper."""
    finite = [x for x in logprobs if math.isfinite(x)]
    if not finite:
        return [1.0 / len(logprobs)] * len(logprobs)
    top = max(finite)
    weights = [math.exp(x - top) if math.isfinite(x) else 0.0 for x in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


class ServerCount(BaseModel):
    """What one server of an OpenAI-compatible fleet was sent (`cai.backends.openai_fleet`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: int = Field(0, description="Attempts sent to this server (retries included).")
    failures: int = Field(0, description="Attempts that ended in an error here.")
    retried_elsewhere: int = Field(0, description="Failures here whose request went on to another server.")

    def plus(self, other: ServerCount) -> ServerCount:
        return ServerCount(**{k: getattr(self, k) + getattr(other, k) for k in ServerCount.model_fields})

    def minus(self, other: ServerCount) -> ServerCount:
        return ServerCount(**{k: getattr(self, k) - getattr(other, k) for k in ServerCount.model_fields})


class Usage(BaseModel):
    """Cumulative token accounting of one backend, for the cost figures stages report."""

    model_config = ConfigDict(extra="forbid")

    generate_calls: int = 0
    score_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    scored_tokens: int = 0
    cached_tokens: int = 0
    failed_items: int = 0
    # Option log-probs estimated rather than read (an option outside a server's top-k, see
    # `cai.backends.openai`): still valid scores, but a run should show how many there were.
    floored_logprobs: int = 0
    # Per server URL, for the openai engine only (empty elsewhere). Backends replace the dict
    # rather than change it in place, so a `model_copy()` taken before a call stays as it was.
    per_server: dict[str, ServerCount] = Field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """The flat integer figures (everything but `per_server`)."""
        return {k: getattr(self, k) for k in Usage.model_fields if k != "per_server"}

    def minus(self, earlier: Usage) -> Usage:
        mine, theirs = self.counts(), earlier.counts()
        servers = {
            url: count.minus(earlier.per_server.get(url, ServerCount()))
            for url, count in self.per_server.items()
        }
        return Usage(**{k: mine[k] - theirs[k] for k in mine}, per_server=servers)

    def plus(self, other: Usage) -> Usage:
        mine, theirs = self.counts(), other.counts()
        servers = dict(self.per_server)
        for url, count in other.per_server.items():
            servers[url] = servers.get(url, ServerCount()).plus(count)
        return Usage(**{k: mine[k] + theirs[k] for k in mine}, per_server=servers)


@runtime_checkable
class Backend(Protocol):
    """What a generation + scoring engine provides. See the module docstring for the rules."""

    model_id: str
    usage: Usage

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]: ...

    def score_choices(self, prompts: Sequence[ScorePrompt], options: Sequence[str]) -> list[ChoiceScores]: ...

    def close(self) -> None: ...


def option_token_ids(tokenizer: object, options: Sequence[str]) -> tuple[list[list[int]], bool]:
    """Each option's token ids (no special tokens) and whether every option is one token.

    An option that tokenizes to nothing could never be scored, so it is refused here, once for
    every engine that scores choices locally.
    """
    option_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]  # type: ignore[operator]
    if any(not ids for ids in option_ids):
        raise ValueError(f"an option tokenizes to nothing: {list(options)!r}")
    return option_ids, all(len(ids) == 1 for ids in option_ids)


def encode_chat(tokenizer: object, chat: Chat, prefix: str = "") -> list[int]:
    """The tokens every local engine sends for `chat`: its template with a generation prompt, then
    `prefix` (the start of the answer), so hf and vLLM score and generate from the same ids."""
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)  # type: ignore[attr-defined]
    return tokenizer(text + prefix, add_special_tokens=False)["input_ids"]  # type: ignore[operator]


def _encode_within(
    encode: Callable[[Chat, str], list[int]],
    chats: Sequence[tuple[Chat, str]],
    *,
    room: int,
    limit: int,
    needs: str = "",
) -> tuple[dict[int, list[int]], dict[int, tuple[str, int]]]:
    """Encode each (chat, prefix); keep those that leave `room` tokens within `limit`.

    Returns the ids by index and, for the rest, (error message, prompt tokens) by index: a chat
    whose template fails or that is too long fails alone, never the batch. `needs` says what the
    room is for in the message (e.g. " + 64 new tokens").
    """
    encoded: dict[int, list[int]] = {}
    failed: dict[int, tuple[str, int]] = {}
    for index, (chat, prefix) in enumerate(chats):
        try:
            ids = encode(chat, prefix)
        except Exception as exc:  # noqa: BLE001 - a malformed chat fails only its own item
            failed[index] = (f"chat template failed: {exc}", 0)
            continue
        if len(ids) + room > limit:
            message = f"prompt of {len(ids)} tokens{needs} exceeds the maximum length {limit}"
            failed[index] = (message, len(ids))
            continue
        encoded[index] = ids
    return encoded, failed


def encode_for_generation(
    encode: Callable[[Chat, str], list[int]], chats: Sequence[Chat], params: SamplingParams, limit: int
) -> tuple[dict[int, list[int]], list[Completion | None]]:
    """The ids of the chats that leave room for `params.max_new_tokens` within `limit`, and the
    results list with the failed items' `Completion`s already in place (the rest are None)."""
    encoded, failed = _encode_within(
        encode,
        [(chat, "") for chat in chats],
        room=params.max_new_tokens,
        limit=limit,
        needs=f" + {params.max_new_tokens} new tokens",
    )
    results: list[Completion | None] = [None] * len(chats)
    for index, (error, tokens) in failed.items():
        results[index] = Completion(prompt_tokens=tokens, error=error)
    return encoded, results


def encode_for_scoring(
    encode: Callable[[Chat, str], list[int]],
    prompts: Sequence[ScorePrompt],
    options: Sequence[str],
    room: int,
    limit: int,
) -> tuple[dict[int, list[int]], list[ChoiceScores | None]]:
    """The ids of the prompts (with their answer prefix) that leave `room` tokens for the options
    within `limit`, and the results list with the failed items' `ChoiceScores` in place."""
    encoded, failed = _encode_within(
        encode, [(p.chat, p.assistant_prefix) for p in prompts], room=room, limit=limit
    )
    results: list[ChoiceScores | None] = [None] * len(prompts)
    for index, (error, _) in failed.items():
        results[index] = ChoiceScores.failed(options, error)
    return encoded, results


def request_seed(seed: int | None, index: int) -> int | None:
    """The seed of item `index` of a call seeded with `seed` (None stays unseeded).

    Seeding each request on its own, rather than the whole batch, makes an item's samples
    independent of what else is in the batch (and of the order a server runs requests in).
    31 bits, because some OpenAI-compatible servers reject larger seeds.
    """
    if seed is None:
        return None
    return derive_seed("request", seed, index) % (2**31 - 1)
