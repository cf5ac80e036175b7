"""The AI judge of the feedback stage: multiple-choice comparisons, both orders, soft labels.

    cai label --config configs/quickstart.yaml

For a prompt with K responses, every pair (i, j) is judged under every chosen principle, once
with response i shown as option (A) and once swapped, because small judges prefer a position.
The normalised probabilities of the options are the soft label (Bai et al., 2022); the two
orders are averaged into P(i better than j), and the per-order numbers are kept for the audit.
All comparisons of a chunk go to the engine in ONE `score_choices` call: the principle comes
last in the prompt, so an ensemble shares the conversation + responses prefix, which the
engines compute once.

Chain-of-thought mode first generates the judge's reasoning, then scores the options after
it, and clamps the probability into a band (default 0.4-0.6) because CoT verdicts are
overconfident. An empty or failed reasoning is an abstention, counted and shown in the audit,
never a silent vote for (A).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, model_validator

from cai.aggregate import PrincipleVote, aggregate
from cai.backends.base import Backend, Chat, ChoiceScores, SamplingParams
from cai.chats import (
    COMPARE_ANSWER_TEMPLATE,
    COMPARE_COT_ANSWER_TEMPLATE,
    COMPARE_COT_TEMPLATE,
    COMPARE_TEMPLATE,
    OPTIONS,
    ChatBuilder,
)
from cai.config import EngineConfig, Section
from cai.constitution import Constitution, Principle, derive_seed, sample_principles
from cai.records import LabelAudit, OrderVote, PairVote, PreferenceRow
from cai.sources import PromptSource


class PrincipleSelection(Section):
    """Which principles judge each label."""

    count: int | Literal["all"] = Field(
        1, description="Principles per label: 1 (sampled, as in the paper), N (a sampled ensemble) or 'all'."
    )
    tags: list[str] = Field(default_factory=list, description="Only principles with any of these tags.")
    ids: list[str] = Field(default_factory=list, description="Only these principle ids.")
    weighted: bool = Field(True, description="Sample by principle weight.")


class ContestedPolicy(Section):
    """What happens to labels the principles disagree on."""

    threshold: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Share of opinionated principle weight on the losing side that flags a pair.",
    )
    policy: Literal["keep", "downweight", "drop"] = Field(
        "keep",
        description="Contested pairs in the preference set: kept, down-weighted or dropped (always audited).",
    )
    weight: float = Field(
        0.5, ge=0, le=1, description="Training weight of a contested pair under 'downweight'."
    )


def _default_label_sampling() -> SamplingParams:
    return SamplingParams(max_new_tokens=96, temperature=1.0, top_p=0.95, repetition_penalty=1.1)


class LabelConfig(Section):
    """The feedback stage: K responses per prompt from the policy, judged under principles."""

    prompts: PromptSource = Field(
        default_factory=lambda: PromptSource(path="red_team.jsonl"), description="Prompts to label."
    )
    policy: str | None = Field(
        None,
        description="Model that samples the responses; default: this run's SFT model, else the run's model.",
    )
    responses: int = Field(2, ge=2, le=8, description="Responses per prompt (K).")
    sampling: SamplingParams = Field(default_factory=_default_label_sampling, description="Policy sampling.")
    judge_model: str | None = Field(None, description="The feedback model; default: the run's model.")
    judge_engine: EngineConfig | None = Field(
        None, description="Engine for the judge; default: the run's engine."
    )
    principles: PrincipleSelection = Field(default_factory=PrincipleSelection)
    rule: str = Field(
        "mean", description="Aggregation rule: mean, majority, borda, copeland, kemeny, ranked_pairs."
    )
    pairs: Literal["best_worst", "all"] = Field(
        "best_worst", description="Training pairs from the collective ranking (K > 2)."
    )
    contested: ContestedPolicy = Field(default_factory=ContestedPolicy)
    cot: bool = Field(False, description="Chain-of-thought judging: reasoning first, then the scored answer.")
    cot_max_new_tokens: int = Field(96, ge=8, description="Reasoning length in chain-of-thought mode.")
    clamp: tuple[float, float] = Field(
        (0.4, 0.6),
        description="Chain-of-thought probabilities are clamped into this band (the paper's 40-60%).",
    )
    few_shot: int = Field(0, ge=0, description="Few-shot comparison examples from the constitution.")
    gold: str | None = Field(
        "gold_harmless.jsonl",
        description="Human-labelled pairs to measure judge agreement on (null to skip).",
    )
    chunk_size: int = Field(8, ge=1, description="Prompts processed and committed together.")

    @model_validator(mode="after")
    def _check(self) -> LabelConfig:
        from cai.aggregate import RULES

        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; known: {', '.join(sorted(RULES))}")
        low, high = self.clamp
        if not 0 <= low <= 0.5 <= high <= 1:
            raise ValueError("clamp must be (low, high) with 0 <= low <= 0.5 <= high <= 1")
        return self

    def template_names(self) -> list[str]:
        if self.cot:
            return [COMPARE_COT_TEMPLATE, COMPARE_COT_ANSWER_TEMPLATE]
        return [COMPARE_TEMPLATE, COMPARE_ANSWER_TEMPLATE]


# --------------------------------------------------------------------------- comparisons


@dataclass
class Comparison:
    """One (label, pair, principle) judged in both orders."""

    label: int
    i: int
    j: int
    principle: Principle
    orders: dict[str, OrderVote] = field(default_factory=dict)

    def combined(self) -> PairVote:
        """Average P(i better) over the orders that did not abstain."""
        usable = [o for o in self.orders.values() if not o.abstained]
        p_i = [o.probs[0] if o.order == "ab" else o.probs[1] for o in usable]
        consistent = None
        if len(p_i) == 2 and all(abs(p - 0.5) > 1e-9 for p in p_i):
            consistent = (p_i[0] > 0.5) == (p_i[1] > 0.5)
        return PairVote(
            principle_id=self.principle.id,
            weight=self.principle.weight,
            i=self.i,
            j=self.j,
            orders=[self.orders[k] for k in ("ab", "ba") if k in self.orders],
            p_i_better=sum(p_i) / len(p_i) if p_i else None,
            position_consistent=consistent,
        )


def _clamp(probs: list[float], band: tuple[float, float]) -> list[float]:
    low, high = band
    first = min(max(probs[0], low), high)
    return [first, 1.0 - first]


def _order_vote(
    order: str, scores: ChoiceScores, reasoning: str | None, band: tuple[float, float] | None
) -> OrderVote:
    if not scores.ok:
        return OrderVote(
            order=order, logprobs=[], probs=[], reasoning=reasoning, abstained=True, error=scores.error
        )
    probs = _clamp(scores.probs, band) if band else scores.probs
    return OrderVote(order=order, logprobs=scores.logprobs, probs=probs, reasoning=reasoning)


def judge(
    backend: Backend,
    builder: ChatBuilder,
    conversations: Sequence[Chat],
    responses: Sequence[Sequence[str]],
    principles: Sequence[Sequence[Principle]],
    config: LabelConfig,
    examples: Sequence = (),
    seed: int = 0,
) -> list[list[PairVote]]:
    """Judge every pair of every label under its principles, in both orders.

    Returns, per label, the combined votes of each (principle, pair). One `generate` call (CoT
    only) and one `score_choices` call serve the whole batch of labels.
    """
    comparisons: list[Comparison] = []
    for label, (candidates, chosen) in enumerate(zip(responses, principles, strict=True)):
        for i, j in itertools.combinations(range(len(candidates)), 2):
            comparisons += [Comparison(label, i, j, p) for p in chosen]
    jobs: list[tuple[Comparison, str]] = [(c, order) for c in comparisons for order in ("ab", "ba")]

    def shown(c: Comparison, order: str) -> tuple[str, str]:
        a, b = responses[c.label][c.i], responses[c.label][c.j]
        return (a, b) if order == "ab" else (b, a)

    reasoning: list[str | None] = [None] * len(jobs)
    failed: dict[int, str] = {}
    if config.cot:
        chats = [
            builder.compare_chat(conversations[c.label], *shown(c, o), c.principle, examples, cot=True)
            for c, o in jobs
        ]
        params = SamplingParams(max_new_tokens=config.cot_max_new_tokens, temperature=0.0, seed=seed)
        for k, completion in enumerate(backend.generate(chats, params)):
            text = completion.samples[0].text.strip() if completion.ok else ""
            if not completion.ok:
                failed[k] = f"reasoning failed: {completion.error}"
            elif not text:
                failed[k] = "empty reasoning"
            else:
                reasoning[k] = text
    todo = [k for k in range(len(jobs)) if k not in failed]
    prompts = [
        builder.compare_prompt(
            conversations[jobs[k][0].label],
            *shown(*jobs[k]),
            jobs[k][0].principle,
            examples,
            reasoning[k],
            config.cot,
        )
        for k in todo
    ]
    scored = dict(zip(todo, backend.score_choices(prompts, list(OPTIONS)), strict=True)) if prompts else {}
    band = config.clamp if config.cot else None
    for k, (comparison, order) in enumerate(jobs):
        if k in failed:
            comparison.orders[order] = OrderVote(
                order=order, logprobs=[], probs=[], reasoning=reasoning[k], abstained=True, error=failed[k]
            )
        else:
            comparison.orders[order] = _order_vote(order, scored[k], reasoning[k], band)
    per_label: list[list[PairVote]] = [[] for _ in responses]
    for comparison in comparisons:
        per_label[comparison.label].append(comparison.combined())
    return per_label


def principle_votes(pair_votes: Sequence[PairVote], k: int) -> list[PrincipleVote]:
    """Pair votes of one label -> one K x K preference matrix per principle (for aggregation)."""
    by_principle: dict[str, list[PairVote]] = {}
    for vote in pair_votes:
        by_principle.setdefault(vote.principle_id, []).append(vote)
    out = []
    for principle_id, votes in by_principle.items():
        prefs: list[list[float | None]] = [[0.5 if a == b else None for b in range(k)] for a in range(k)]
        for vote in votes:
            if vote.p_i_better is not None:
                prefs[vote.i][vote.j] = vote.p_i_better
                prefs[vote.j][vote.i] = 1.0 - vote.p_i_better
        out.append(PrincipleVote(principle_id=principle_id, weight=votes[0].weight, prefs=prefs))
    return out


def choose_principles(
    constitution: Constitution, selection: PrincipleSelection, seed: int, row_id: str
) -> list[Principle]:
    candidates = constitution.select(stages=["compare"], tags=selection.tags, ids=selection.ids)
    if selection.count == "all" or selection.count >= len(candidates):
        if isinstance(selection.count, int) and selection.count > len(candidates):
            raise ValueError(f"principles.count={selection.count} but only {len(candidates)} principles fit")
        return list(candidates)
    return sample_principles(
        candidates, selection.count, seed=derive_seed(seed, row_id, "judge"), weighted=selection.weighted
    )


def margin_from_soft_label(p: float, cap: float = 0.999) -> float:
    """The reward margin a soft label implies: logit(p), capped so p = 1 stays finite."""
    p = min(max(p, 1 - cap), cap)
    return math.log(p / (1 - p))


@dataclass(frozen=True)
class LabelMeta:
    judge_model_id: str
    policy_model_id: str
    constitution: str
    constitution_hash: str
    template_hashes: dict[str, str]
    config_hash: str


def build_label(
    row_id: str,
    conversation: Chat,
    responses: list[str],
    votes: list[PairVote],
    config: LabelConfig,
    meta: LabelMeta,
) -> tuple[LabelAudit, list[PreferenceRow]]:
    """Aggregate one label's votes; return its audit row and the preference rows it yields."""
    k = len(responses)
    result = aggregate(principle_votes(votes, k), config.rule, config.pairs, config.contested.threshold)
    label_id = f"label:{row_id}"
    audit = LabelAudit(
        label_id=label_id,
        row_id=row_id,
        prompt=conversation,
        responses=responses,
        principles=sorted({v.principle_id for v in votes}),
        votes=votes,
        rule=config.rule,
        outcome={"rule": result.rule, "ranking": result.ranking, "scores": result.scores},
        pairs=result.pairs,
        contested=result.contested,
        principle_agreement=result.principle_agreement,
        judge_model_id=meta.judge_model_id,
        policy_model_id=meta.policy_model_id,
        cot=config.cot,
        template_hashes=meta.template_hashes,
        constitution=meta.constitution,
        constitution_hash=meta.constitution_hash,
        config_hash=meta.config_hash,
    )
    rows = []
    for pair in result.pairs:
        chosen, rejected = responses[pair.chosen], responses[pair.rejected]
        if chosen.strip() == rejected.strip():
            continue  # identical texts teach a preference model nothing
        if pair.contested and config.contested.policy == "drop":
            continue
        weight = (
            config.contested.weight if pair.contested and config.contested.policy == "downweight" else 1.0
        )
        rows.append(
            PreferenceRow(
                prompt=conversation,
                chosen=[{"role": "assistant", "content": chosen}],
                rejected=[{"role": "assistant", "content": rejected}],
                source="ai-harmless",
                label_id=label_id,
                soft_label=pair.soft_label,
                margin=margin_from_soft_label(pair.soft_label),
                weight=weight,
                contested=pair.contested,
            )
        )
    return audit, rows


# --------------------------------------------------------------------------- judge quality


def position_consistency(audits: Sequence[LabelAudit]) -> float | None:
    """Share of (principle, pair) comparisons preferring the same response in both orders.

    A judge that always answers (A) prefers i in one order and j in the other: it scores 0.
    """
    flags = [v.position_consistent for a in audits for v in a.votes if v.position_consistent is not None]
    return sum(flags) / len(flags) if flags else None


def judge_quality(audits: Sequence[LabelAudit], gold_agreement: float | None = None, gold_n: int = 0) -> dict:
    abstained = sum(1 for a in audits for v in a.votes for o in v.orders if o.abstained)
    comparisons = sum(len(v.orders) for a in audits for v in a.votes)
    agreement = [a.principle_agreement for a in audits]
    return {
        "labels": len(audits),
        "position_consistency": position_consistency(audits),
        "principle_agreement": sum(agreement) / len(agreement) if agreement else None,
        "contested_labels": sum(1 for a in audits if a.contested),
        "abstentions": abstained,
        "comparisons": comparisons,
        "gold_agreement": gold_agreement,
        "gold_n": gold_n,
    }
