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
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from cai.aggregate import Aggregate, aggregate
from cai.backends.base import Backend, Chat
from cai.chats import (
    COMPARE_ANSWER_TEMPLATE,
    COMPARE_COT_ANSWER_TEMPLATE,
    COMPARE_COT_TEMPLATE,
    COMPARE_TEMPLATE,
    OPTIONS,
    ChatBuilder,
)
from cai.classifier import ClassifierConfig
from cai.comparison import Comparison, _order_vote
from cai.constitution import Constitution, Principle, sample_principles
from cai.groups import GroupsRule
from cai.hashing import derive_seed
from cai.likelihood import CONDITION_TEMPLATE, LikelihoodConfig, likelihood_judge
from cai.records import LabelAudit, OrderVote, PairVote, PreferenceRow, TrainingUse
from cai.rules import PrincipleVote
from cai.sections import EngineConfig, SamplingParams, Section
from cai.sources import PromptSource
from cai.verdict import DEFAULT_MIN_MARGIN

JudgeMode = Literal["choice", "likelihood", "classifier"]
"""The three ways a judge can read a pair (README "Judges": when to use which, and the cost)."""


class PrincipleSelection(Section):
    """Which principles judge each label."""

    count: int | Literal["all"] = Field(
        1, description="Principles per label: 1 (sampled, as in the paper), N (a sampled ensemble) or 'all'."
    )
    tags: list[str] = Field(default_factory=list, description="Only principles with any of these tags.")
    ids: list[str] = Field(default_factory=list, description="Only these principle ids.")
    weighted: bool = Field(
        True,
        description="Sample by principle weight. A weight is applied once: in the draw when principles "
        "are sampled by weight, else (count: all, or weighted: false) in aggregation.",
    )


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


class GateConfig(Section):
    """The judge gate: measure the judge on human-labelled gold pairs before labelling."""

    min_agreement: float = Field(
        0.6,
        ge=0,
        le=1,
        description="Least share of gold pairs whose label has a verdict for the human's choice.",
    )
    min_consistency: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Least position consistency on the gold pairs (same response preferred in both orders).",
    )
    action: Literal["warn", "halt"] = Field(
        "warn",
        description="A failing judge: warn and label anyway (the report says so), or halt before labelling.",
    )


def _default_label_sampling() -> SamplingParams:
    return SamplingParams(max_new_tokens=96, temperature=1.0, top_p=0.95, repetition_penalty=1.1)


class LabelConfig(Section):
    """The feedback stage: K responses per prompt from the policy, judged under principles."""

    prompts: PromptSource = Field(
        default_factory=lambda: PromptSource(path="red_team.jsonl"), description="Prompts to label."
    )
    judge: JudgeMode = Field(
        "choice",
        description="How the judge reads a pair: 'choice' (the paper's multiple-choice question, both "
        "orders; add cot: true for chain of thought), 'likelihood' (each response's log-likelihood under "
        "a principle-following vs a principle-violating assistant; no option order) or 'classifier' (a "
        "sequence-classification model scores each response).",
    )
    classifier: ClassifierConfig | None = Field(
        None,
        description="The sequence-classification model of judge: classifier (needed then, ignored "
        "otherwise): each response is scored with the last user message; P(i better) = "
        "sigmoid((s_i - s_j) / temperature).",
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
    likelihood: LikelihoodConfig = Field(
        default_factory=LikelihoodConfig, description="The likelihood judge (label.judge: likelihood)."
    )
    principles: PrincipleSelection = Field(default_factory=PrincipleSelection)
    rule: str = Field(
        "mean", description="Aggregation rule: mean, majority, borda, copeland, kemeny, ranked_pairs."
    )
    pairs: Literal["best_worst", "all"] = Field(
        "best_worst", description="Training pairs from the collective ranking (K > 2)."
    )
    contested: ContestedPolicy = Field(default_factory=ContestedPolicy)
    min_margin: float = Field(
        DEFAULT_MIN_MARGIN,
        ge=0,
        lt=0.5,
        description="A judgement is a verdict only when both orders prefer the same response and their "
        "average is at least this far from 0.5 (0.05: above what bf16 vs fp32 moves a small judge; "
        "see cai/verdict.py).",
    )
    no_verdict: Literal["drop", "keep"] = Field(
        "drop",
        description="Pairs no principle gave a verdict on carry no signal: drop them from training (kept in "
        "the audit), or keep them with the paper's averaged probability. Fully abstained pairs are "
        "always dropped.",
    )
    gate: GateConfig = Field(default_factory=GateConfig, description="Judge gate on the gold pairs.")
    cot: bool = Field(False, description="Chain-of-thought judging: reasoning first, then the scored answer.")
    cot_max_new_tokens: int = Field(96, ge=8, description="Reasoning length in chain-of-thought mode.")
    clamp: tuple[float, float] = Field(
        (0.4, 0.6),
        description="Chain-of-thought probabilities are clamped into this band (the paper's 40-60%).",
    )
    few_shot: int = Field(0, ge=0, description="Few-shot comparison examples from the constitution.")
    gold: str | None = Field(
        "gold_harmless.jsonl",
        description="Human-labelled pairs the gate measures the judge on (a path, or a shipped file; null "
        "skips the gate).",
    )
    chunk_size: int = Field(8, ge=1, description="Prompts processed and committed together.")
    groups: GroupsRule | None = Field(
        None,
        description="Pluralistic runs (`constitutions:`): the rule across groups.",
    )

    @model_serializer(mode="wrap")
    def _omit_groups(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)  # one-group configs keep their stage keys: no `groups: null` in the hash
        if self.groups is None:
            data.pop("groups", None)
        return data

    @model_validator(mode="after")
    def _check(self) -> LabelConfig:
        from cai.rules import RULES

        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; known: {', '.join(sorted(RULES))}")
        if self.judge == "classifier" and self.classifier is None:
            raise ValueError(
                "label.classifier: judge 'classifier' needs a classifier section, e.g. "
                "classifier: {model: path/to/model, label_index: 1}"
            )
        low, high = self.clamp
        if not 0 <= low <= 0.5 <= high <= 1:
            raise ValueError("clamp must be (low, high) with 0 <= low <= 0.5 <= high <= 1")
        return self

    def judge_settings(self) -> dict:
        """What the judge itself reads (margin, chain of thought, clamp): the part of this section
        that `cai eval`, judging with the same machinery, must key its folder by."""
        if self.judge == "likelihood":
            return self.model_dump(mode="json", include={"judge", "min_margin", "likelihood"})
        read = {"judge", "min_margin", "cot", "clamp"} | ({"cot_max_new_tokens"} if self.cot else set())
        read |= {"classifier"} if self.judge == "classifier" else set()
        return self.model_dump(mode="json", include=read)

    def template_names(self) -> list[str]:
        if self.judge == "likelihood":
            return [CONDITION_TEMPLATE]
        if self.cot:
            return [COMPARE_COT_TEMPLATE, COMPARE_COT_ANSWER_TEMPLATE]
        return [COMPARE_TEMPLATE, COMPARE_ANSWER_TEMPLATE]


# --------------------------------------------------------------------------- comparisons


def judge(
    backend: Backend,
    builder: ChatBuilder,
    conversations: Sequence[Chat],
    responses: Sequence[Sequence[str]],
    principles: Sequence[Sequence[Principle]],
    config: LabelConfig,
    examples: Sequence = (),
    seed: int = 0,
    weighted: bool = True,
) -> list[list[PairVote]]:
    """Judge every pair of every label under its principles, in both orders.

    Returns, per label, the combined votes of each (principle, pair). One `generate` call (CoT
    only) and one `score_choices` call serve the whole batch of labels. `weighted` False gives
    every vote weight 1 (the weights were already applied when the principles were drawn).
    Under `judge: classifier` the backend is a `cai.classifier.ClassifierScorer` and the
    classifier reads each pair instead (`cai.classifier.classifier_judge`).
    """
    if config.judge == "likelihood":
        return likelihood_judge(
            backend,
            builder.templates,
            conversations,
            responses,
            principles,
            config.likelihood,
            config.min_margin,
            weighted,
        )
    if config.judge == "classifier":
        from cai.classifier import classifier_judge

        return classifier_judge(backend, conversations, responses, principles, config, weighted)  # type: ignore[arg-type]
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
        per_label[comparison.label].append(comparison.combined(config.min_margin, weighted))
    return per_label


def principle_votes(pair_votes: Sequence[PairVote], k: int) -> list[PrincipleVote]:
    """Pair votes of one label -> one K x K preference matrix per principle (for aggregation)."""
    by_principle: dict[str, list[PairVote]] = {}
    for vote in pair_votes:
        by_principle.setdefault(vote.principle_id, []).append(vote)
    out = []
    for principle_id, votes in by_principle.items():
        prefs: list[list[float | None]] = [[0.5 if a == b else None for b in range(k)] for a in range(k)]
        verdicts = [[False] * k for _ in range(k)]
        for vote in votes:
            if vote.p_i_better is not None:
                prefs[vote.i][vote.j] = vote.p_i_better
                prefs[vote.j][vote.i] = 1.0 - vote.p_i_better
            if vote.verdict is not None:
                verdicts[vote.i][vote.j] = verdicts[vote.j][vote.i] = True
        out.append(
            PrincipleVote(principle_id=principle_id, weight=votes[0].weight, prefs=prefs, verdicts=verdicts)
        )
    return out


def weighting(
    constitution: Constitution, selection: PrincipleSelection
) -> Literal["sampling", "aggregation"]:
    """Where a principle's weight counts, so that it counts once: in the draw, or in aggregation."""
    candidates = constitution.select(stages=["compare"], tags=selection.tags, ids=selection.ids)
    drawn = selection.count != "all" and selection.count < len(candidates)
    return "sampling" if drawn and selection.weighted else "aggregation"


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
    weighting: Literal["sampling", "aggregation"] = "aggregation"


def label_outcome(votes: Sequence[PairVote], k: int, config: LabelConfig) -> Aggregate:
    """The collective label of one prompt's votes under the config's rule (verdicts only)."""
    return aggregate(principle_votes(votes, k), config.rule, config.pairs, config.contested.threshold)


def training_use(
    pair, responses: Sequence[str], votes: Sequence[PairVote], config: LabelConfig
) -> TrainingUse:
    """Whether a derived pair becomes a training row, and if not, why.

    A row's `chosen` is always the response its probability favours: a pair whose rule and
    probability disagree (a rule conflict) is not a row. Pairs without a verdict carry no signal
    and are rows only under `no_verdict: keep`; pairs nobody answered never are.
    """
    if responses[pair.chosen].strip() == responses[pair.rejected].strip():
        return "identical"  # identical texts teach a preference model nothing
    on_pair = [v for v in votes if {v.i, v.j} == {pair.chosen, pair.rejected}]
    if all(v.p_i_better is None for v in on_pair):
        return "abstained"
    if not pair.has_verdict and config.no_verdict == "drop":
        return "no-verdict"
    if pair.rule_conflict:
        return "rule-conflict"
    if pair.contested and config.contested.policy == "drop":
        return "contested"
    return "row"


def audit_provenance(config: LabelConfig, meta: LabelMeta) -> dict:
    """The fields every audit row carries about the judge and the run that made it (one-group
    and group labels alike)."""
    return {
        "min_margin": config.min_margin,
        "weighting": meta.weighting,
        "judge_model_id": meta.judge_model_id,
        "policy_model_id": meta.policy_model_id,
        "judge": config.judge,
        "cot": config.cot,
        "template_hashes": meta.template_hashes,
        "constitution": meta.constitution,
        "constitution_hash": meta.constitution_hash,
        "config_hash": meta.config_hash,
    }


def build_label(
    row_id: str,
    conversation: Chat,
    responses: list[str],
    votes: list[PairVote],
    config: LabelConfig,
    meta: LabelMeta,
) -> tuple[LabelAudit, list[PreferenceRow]]:
    """Aggregate one label's votes; return its audit row and the preference rows it yields."""
    result = label_outcome(votes, len(responses), config)
    label_id = f"label:{row_id}"
    uses = [training_use(pair, responses, votes, config) for pair in result.pairs]
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
        training=uses,
        contested=result.contested,
        has_verdict=result.has_verdict,
        principle_agreement=result.principle_agreement,
        **audit_provenance(config, meta),
    )
    return audit, preference_rows(conversation, responses, result.pairs, uses, label_id, config)


def preference_rows(
    conversation: Chat,
    responses: Sequence[str],
    pairs: Sequence,
    uses: Sequence[TrainingUse],
    label_id: str,
    config: LabelConfig,
    groups: Sequence[str | None] | None = None,
) -> list[PreferenceRow]:
    """The training rows of one label: its derived pairs whose use is "row" (`groups`: the group
    that decided each pair, in pluralistic runs)."""
    rows = []
    for k, (pair, use) in enumerate(zip(pairs, uses, strict=True)):
        if use != "row":
            continue
        downweighted = pair.contested and config.contested.policy == "downweight"
        rows.append(
            PreferenceRow(
                prompt=conversation,
                chosen=[{"role": "assistant", "content": responses[pair.chosen]}],
                rejected=[{"role": "assistant", "content": responses[pair.rejected]}],
                source="ai-harmless",
                label_id=label_id,
                soft_label=pair.soft_label,
                margin=margin_from_soft_label(pair.soft_label),
                weight=config.contested.weight if downweighted else 1.0,
                contested=pair.contested,
                verdict=pair.has_verdict,
                group=groups[k] if groups is not None else None,
            )
        )
    return rows
