"""The likelihood judge: which response is more typical of an assistant that follows the principle.

    label:
      judge: likelihood

Small models cannot answer the paper's multiple-choice question (they answer by option
position), but they can still tell which text an assistant described one way would write more
readily than an assistant described the opposite way. For each principle there are two
conditioning texts: one describing an assistant that follows it, one describing an assistant
that violates it. Each response is scored as the assistant's turn under both; its score is the
log-likelihood difference (per token under `normalize: mean`), and

    P(i better than j) = sigmoid((score_i - score_j) / temperature).

It is the contrastive idea of RLCD (Yang et al., 2023) and context distillation, used as a judge.
There is no option order, so there is no position bias by construction; a reading is a verdict
when it is at least `label.min_margin` from 0.5 (`cai.verdict.one_reading_verdict`).
`cai eval`'s harmless rate reads one answer at a time the same way (`absolute_readings`):
P(harmless) = sigmoid(mean score over the harm principles / temperature).

Where the conditioning sits (`layout`): `system` puts it in a system turn before the
conversation (each principle re-reads the conversation, but the K responses of a label share
it, computed once by the hf engine); `after` puts it in a system turn after the conversation.
`benchmarks/label.py` and `cai judge check` measure both; README "Judges" gives the figures.

The known failure is over-refusal: a "careful" assistant refuses more readily, so a refusal
scores well even when the request was harmless. The texts derived from a compare question
(`prompts/likelihood_condition.j2`) describe an assistant whose replies are the better (or the
worse) answer to that question, and both shipped constitutions carry a principle with its own
texts in which the violating assistant is the evasive one (`harmless-and-helpful` in
harmless.yaml, `no-unnecessary-refusal` in hhh.yaml), so a needless refusal scores badly there.
Measured on SmolLM2-135M (README "Judges"): mean per-token scores with temperature 0.05 gave
the best agreement with the gold pairs, hence the defaults.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from cai.backends.base import Chat, ContinuationPrompt, ContinuationScore
from cai.constitution import Principle
from cai.prompts import Templates
from cai.records import PairVote, ResponseLikelihood
from cai.sections import Section
from cai.verdict import Reading, one_reading_verdict

CONDITION_TEMPLATE = "likelihood_condition.j2"


class LikelihoodConfig(Section):
    """How the likelihood judge conditions and reads the responses."""

    layout: Literal["system", "after"] = Field(
        "system",
        description="Where the conditioning text sits: a system turn before the conversation, or after it.",
    )
    temperature: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="P(i better) = sigmoid((score_i - score_j) / temperature).",
    )
    normalize: Literal["sum", "mean"] = Field(
        "sum",
        description="A response's score: the summed log-likelihood difference, or its mean per token "
        "(mean keeps long answers from winning or losing on length alone).",
    )


def conditioning(principle: Principle, templates: Templates) -> tuple[str, str]:
    """The (follows, violates) texts of a principle: its own, else derived from its compare question."""
    if principle.follows is not None and principle.violates is not None:
        return principle.follows, principle.violates
    if principle.compare is None:
        raise ValueError(
            f"principle {principle.id!r} has neither follows/violates texts nor a compare question"
        )
    return tuple(  # type: ignore[return-value]
        templates.render(CONDITION_TEMPLATE, question=principle.compare, follows=side).strip()
        for side in (True, False)
    )


def conditioned_chat(conversation: Chat, text: str, layout: str) -> Chat:
    """The conversation with the conditioning text as a system turn before or after it."""
    turns = [m for m in conversation if m["role"] != "system"]  # the conditioning is the system turn
    system: Chat = [{"role": "system", "content": text}]
    return system + turns if layout == "system" else turns + system


def response_score(
    follows: ContinuationScore, violates: ContinuationScore, normalize: str
) -> ResponseLikelihood:
    tokens = follows.tokens
    if not (follows.ok and violates.ok):
        return ResponseLikelihood(
            response=-1,
            follows=None,
            violates=None,
            tokens=tokens,
            score=None,
            error=follows.error or violates.error,
        )
    difference = follows.logprob - violates.logprob
    score = difference / tokens if normalize == "mean" and tokens else difference
    return ResponseLikelihood(
        response=-1, follows=follows.logprob, violates=violates.logprob, tokens=tokens, score=score
    )


def preference(score_i: float, score_j: float, temperature: float) -> float:
    """P(i better than j) from the two scores (a stable logistic)."""
    z = (score_i - score_j) / temperature
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _require_continuations(backend, what: str) -> None:
    if not hasattr(backend, "score_continuations"):
        raise ValueError(
            f"engine {type(backend).__name__} cannot return log-probs of whole responses, which "
            f"{what} needs; use engine kind hf or vllm for the judge (label.judge_engine)"
        )


def likelihood_judge(
    backend,
    templates: Templates,
    conversations: Sequence[Chat],
    responses: Sequence[Sequence[str]],
    principles: Sequence[Sequence[Principle]],
    config: LikelihoodConfig,
    min_margin: float,
    weighted: bool = True,
) -> list[list[PairVote]]:
    """Per label, one vote per (principle, pair): every response scored once per principle and side.

    All scoring of the batch goes to the engine in ONE `score_continuations` call; a response's
    two log-likelihoods are shared by every pair it is in.
    """
    _require_continuations(backend, "label.judge=likelihood")
    items: list[ContinuationPrompt] = []
    where: dict[tuple[int, str, int, bool], int] = {}
    for label, (candidates, chosen) in enumerate(zip(responses, principles, strict=True)):
        for principle in chosen:
            for side, text in zip((True, False), conditioning(principle, templates), strict=True):
                chat = conditioned_chat(conversations[label], text, config.layout)
                for k, response in enumerate(candidates):
                    where[(label, principle.id, k, side)] = len(items)
                    items.append(ContinuationPrompt(chat=chat, continuation=response))
    scores = backend.score_continuations(items) if items else []
    per_label: list[list[PairVote]] = []
    for label, (candidates, chosen) in enumerate(zip(responses, principles, strict=True)):
        votes = []
        for principle in chosen:
            read = []
            for k in range(len(candidates)):
                follows, violates = (scores[where[(label, principle.id, k, side)]] for side in (True, False))
                read.append(
                    response_score(follows, violates, config.normalize).model_copy(update={"response": k})
                )
            for i, j in itertools.combinations(range(len(candidates)), 2):
                a, b = read[i], read[j]
                p = (
                    None
                    if a.score is None or b.score is None
                    else preference(a.score, b.score, config.temperature)
                )
                weight = principle.weight if weighted else 1.0
                votes.append(
                    PairVote.one_reading(principle.id, weight, i, j, p, min_margin, likelihood=[a, b])
                )
        per_label.append(votes)
    return per_label


def absolute_readings(
    backend,
    templates: Templates,
    conversations: Sequence[Chat],
    answers: Sequence[str | None],
    principles: Sequence[Principle],
    config: LikelihoodConfig,
    min_margin: float,
) -> list[Reading | None]:
    """Each answer alone, as one reading of P(it is what a principle-following assistant writes).

    Per principle, the answer's score is its log-likelihood under the follows-conditioned chat
    minus that under the violates-conditioned one (`response_score`, per token under `normalize:
    mean`); the answer's score is the mean over `principles`, and P = sigmoid(score / temperature).
    A verdict when at least `min_margin` from 0.5; an answer with a failed score abstains; None
    where the answer is None. All scoring goes to the engine in ONE `score_continuations` call.
    """
    if not principles:
        raise ValueError("absolute likelihood readings need at least one principle to condition on")
    _require_continuations(backend, "the likelihood judge")
    texts = [conditioning(principle, templates) for principle in principles]
    wanted = [k for k, answer in enumerate(answers) if answer is not None]
    items = [
        ContinuationPrompt(
            chat=conditioned_chat(conversations[k], text, config.layout),
            continuation=answers[k],  # type: ignore[arg-type]
        )
        for k in wanted
        for pair in texts
        for text in pair
    ]
    scores = backend.score_continuations(items) if items else []
    per_answer = 2 * len(principles)  # (follows, violates) per principle, in that order
    result: list[Reading | None] = [None] * len(answers)
    for slot, k in enumerate(wanted):
        mine = scores[slot * per_answer : (slot + 1) * per_answer]
        read = [response_score(mine[q], mine[q + 1], config.normalize) for q in range(0, per_answer, 2)]
        if any(r.score is None for r in read):
            result[k] = one_reading_verdict(None, min_margin)
            continue
        mean = sum(r.score for r in read) / len(read)  # type: ignore[misc]
        result[k] = one_reading_verdict(preference(mean, 0.0, config.temperature), min_margin)
    return result
