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

Where the conditioning sits (`layout`): `system` puts it in a system turn before the
conversation (each principle re-reads the conversation, but the K responses of a label share
it, computed once by the hf engine); `after` puts it in a system turn after the conversation.
`benchmarks/label.py` and `cai judge check` measure both; README "Judges" gives the figures.

The known failure is over-refusal: a "careful" assistant refuses more readily, so a refusal
scores well even when the request was harmless. The shipped derivation template therefore
describes the violating assistant as failing in both directions (helping with harm, and
refusing or lecturing on safe requests), and both shipped constitutions carry a principle whose
own texts make a needless refusal the violating assistant's answer.
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
from cai.verdict import one_reading_verdict

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
    if not hasattr(backend, "score_continuations"):
        raise ValueError(
            f"engine {type(backend).__name__} cannot return log-probs of whole responses, which "
            "label.judge=likelihood needs; use engine kind hf or vllm for the judge (label.judge_engine)"
        )
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
                reading = one_reading_verdict(p, min_margin)
                votes.append(
                    PairVote(
                        principle_id=principle.id,
                        weight=principle.weight if weighted else 1.0,
                        i=i,
                        j=j,
                        orders=[],
                        p_i_better=reading.p,
                        position_consistent=None,
                        verdict=None if not reading.is_verdict else (i if reading.side > 0 else j),
                        no_verdict=reading.reason,
                        likelihood=[a, b],
                    )
                )
        per_label.append(votes)
    return per_label
