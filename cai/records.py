"""Row schemas for everything that crosses a file boundary (DESIGN.md section 3).

Each row says where it came from: the model, the sampling parameters, the seed, the hashes of
the constitution and templates that shaped it. Preference rows join their audit rows through
`label_id`, so "which principle shaped this label" is answerable from files alone.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from cai.aggregate import DerivedPair
from cai.backends.base import Chat
from cai.rules import RuleOutcome
from cai.sections import SamplingParams
from cai.verdict import NoVerdict, one_reading_verdict


class Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OmitNone(Row):
    """A row whose fields in `OMIT_WHEN_NONE` are left out of its JSON when None: fields added for
    pluralistic runs, so one-group runs keep the bytes they had before groups existed."""

    OMIT_WHEN_NONE: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)
        for name in self.OMIT_WHEN_NONE:
            if getattr(self, name) is None:
                data.pop(name, None)
        return data


# --------------------------------------------------------------------------- supervised stage


class VerifyResult(Row):
    """The AI judge's comparison of a revision with the answer it revised (`sl.verify`).

    A revision is not always better than what it revised (small models often make it worse);
    the verdict says whether this one was, so `filter` can keep only the better ones and
    `record` can show how often revising helps, per principle.
    """

    against_round: int = Field(
        description="The round whose revision was compared with this one (0: the initial response): "
        "the answer this round revised."
    )
    judge_model_id: str
    p_revision_better: float | None = Field(
        description="The judge's two-order probability that the revision is better; None if it abstained."
    )
    verdict: Literal["better", "worse", "no-verdict"] = Field(
        description="A verdict needs both orders to agree and a margin (label.min_margin), as for labels."
    )
    no_verdict: NoVerdict | None = Field(description="Why there is no verdict (None when there is one).")
    accepted: bool = Field(
        description="Whether this revision became the answer later rounds revise (and the SFT target "
        "if it is the last): under `filter` only with a verdict 'better'; under `record` always, as "
        "without verification. An empty revision never is."
    )


class SLRound(Row):
    """One critique -> revision round; `critique` is None in revision-only mode."""

    round: int
    principle_id: str
    critique: str | None
    revision: str
    critique_tokens: int = 0
    revision_tokens: int = 0
    finish_reasons: list[str] = Field(default_factory=list)
    verify: VerifyResult | None = Field(
        None, description="The judge's verdict on this revision (None: sl.verify is off)."
    )

    @model_serializer(mode="wrap")
    def _omit_unverified(self, handler: SerializerFunctionWrapHandler) -> dict:
        # Rows written with sl.verify off stay byte-identical to rows written before it existed.
        data = handler(self)
        if self.verify is None:
            data.pop("verify", None)
        return data


class SLRecord(Row):
    """One red-team prompt (one sample of it) taken through every round of critique and revision."""

    row_id: str = Field(description="Stable id: source, position in the source, sample index.")
    source: str
    index: int
    sample: int
    prompt: Chat
    initial_response: str
    rounds: list[SLRound]
    final_revision: str
    model_id: str
    sampling: SamplingParams
    seed: int
    constitution: str
    constitution_hash: str
    template_hashes: dict[str, str]
    config_hash: str
    error: str | None = Field(None, description="Set when a model call failed for this row.")

    def messages(self) -> Chat:
        """TRL conversational SFT format: the prompt, then the final revision as the answer."""
        return [*self.prompt, {"role": "assistant", "content": self.final_revision}]


class SFTRow(Row):
    """TRL's conversational language-modelling format: what SFTTrainer reads, one per SL row."""

    messages: Chat = Field(description="The red-team prompt, then the final revision as the answer.")
    row_id: str = Field(description="Joins the SL row (with every round) this example came from.")


# --------------------------------------------------------------------------- feedback stage


class RaterSplit(Row):
    """How the human ratings of one pair split (`mix.human[].rater_column`), seen from its chosen side."""

    n: int = Field(description="Ratings of this pair (one per rater or group).")
    for_chosen: int = Field(description="Ratings that preferred the row's chosen response.")
    against: int = Field(description="Ratings that preferred the row's rejected response.")
    weight_for: float = Field(description="Summed rater weight preferring chosen.")
    weight_against: float = Field(description="Summed rater weight preferring rejected.")


class PreferenceRow(OmitNone):
    """TRL's conversational preference format plus provenance; loads in RewardTrainer/DPOTrainer."""

    OMIT_WHEN_NONE: ClassVar[tuple[str, ...]] = ("group", "raters")

    prompt: Chat
    chosen: Chat
    rejected: Chat
    source: str = Field(description="ai-harmless, human-helpful, ...: where the label came from.")
    label_id: str | None = Field(None, description="Joins to the label audit row (AI labels only).")
    soft_label: float | None = Field(None, description="P(chosen is better) from the judge, in [0, 1].")
    margin: float | None = Field(None, description="Reward margin derived from the soft label (logit).")
    weight: float = Field(1.0, description="Training weight (down-weighted when contested).")
    contested: bool = False
    verdict: bool | None = Field(
        None,
        description="AI rows: whether a principle gave a verdict on this pair (false only under "
        "label.no_verdict: keep); None for human rows.",
    )
    raters: RaterSplit | None = Field(
        None, description="Human rows aggregated over several raters: the split of their ratings."
    )
    group: str | None = Field(
        None, description="Pluralistic runs: the group whose verdict decided this pair (None otherwise)."
    )


class OrderVote(Row):
    """The judge's raw numbers for one principle, one pair, one presentation order."""

    order: Literal["ab", "ba"] = Field(description="ab: response i shown as (A); ba: swapped.")
    logprobs: list[float] = Field(description="Log-prob of each option (A, B) as the answer.")
    probs: list[float] = Field(description="Normalised option probabilities.")
    reasoning: str | None = Field(None, description="Chain-of-thought text, when used.")
    abstained: bool = False
    error: str | None = None


class ResponseLikelihood(Row):
    """One response read by the likelihood judge under one principle (`cai.likelihood`)."""

    response: int = Field(description="Index of the response among the label's K.")
    follows: float | None = Field(
        description="Log-likelihood of the response as the turn of an assistant that follows the principle."
    )
    violates: float | None = Field(
        description="Log-likelihood of the response as the turn of an assistant that violates the principle."
    )
    tokens: int = Field(description="Response tokens scored (0 for an empty response).")
    score: float | None = Field(
        description="follows - violates (per token under normalize: mean); None when scoring failed."
    )
    error: str | None = None


class ResponseScore(Row):
    """A classifier judge's score of one response (`label.judge: classifier`)."""

    index: int = Field(description="The response's position among the label's K responses.")
    score: float = Field(
        description="Logit-scale acceptability: log p / (1 - p) of the acceptable label, or a scalar "
        "head's value."
    )
    tokens: int = Field(description="Tokens the classifier read (the user message and the response).")


class PairVote(OmitNone):
    """One principle's judgement of one pair (i, j) of responses, both orders combined.

    Under `label.judge: classifier` the reader is the classifier, not a principle: `principle_id`
    is "classifier", `orders` is empty (no presentation order) and `classifier_scores` holds both
    responses' scores.
    """

    OMIT_WHEN_NONE: ClassVar[tuple[str, ...]] = ("group",)

    principle_id: str
    group: str | None = Field(
        None, description="Pluralistic runs: the group whose principle this is (None in one-group runs)."
    )
    weight: float = Field(description="The principle's weight in aggregation (1 where sampling applied it).")
    i: int
    j: int
    orders: list[OrderVote]
    p_i_better: float | None = Field(description="Combined P(response i better); None if abstained.")
    position_consistent: bool | None = Field(
        None, description="Both orders prefer the same response (None if either abstained)."
    )
    verdict: int | None = Field(
        description="The response (i or j) this principle's verdict prefers: both orders agree and the "
        "combined probability is at least min_margin from 0.5. None: no verdict."
    )
    no_verdict: NoVerdict | None = Field(description="Why there is no verdict (None when there is one).")
    likelihood: list[ResponseLikelihood] | None = Field(
        None,
        description="Likelihood judge: responses i and j under this principle (no option orders then).",
    )
    classifier_scores: list[ResponseScore] | None = Field(
        None, description="Classifier judge only: the scores of responses i and j that gave p_i_better."
    )

    @classmethod
    def one_reading(
        cls, principle_id: str, weight: float, i: int, j: int, p: float | None, min_margin: float, **evidence
    ) -> PairVote:
        """The vote of a judge with no presentation order (likelihood, classifier): one reading
        of P(i better), a verdict when at least `min_margin` from 0.5 (`one_reading_verdict`);
        `evidence` is the judge's own numbers (its `likelihood` or `classifier_scores`)."""
        reading = one_reading_verdict(p, min_margin)
        return cls(
            principle_id=principle_id,
            weight=weight,
            i=i,
            j=j,
            orders=[],
            p_i_better=reading.p,
            position_consistent=None,
            verdict=None if not reading.is_verdict else (i if reading.side > 0 else j),
            no_verdict=reading.reason,
            **evidence,
        )


TrainingUse = Literal["row", "no-verdict", "abstained", "rule-conflict", "contested", "identical"]
"""What became of a derived pair: a training row, or why not (see `cai.judge.training_use`)."""


class GroupVerdict(Row):
    """One group's verdict on one label of a pluralistic run (`cai.stages.label_groups`)."""

    name: str
    weight: float = Field(description="The group's normalised weight (its share of the population).")
    raw_weight: float = Field(description="The weight as configured, before normalisation.")
    constitution: str
    constitution_hash: str
    principles: list[str] = Field(description="The group's principles that judged this label.")
    ranking: list[int] | None = Field(
        description="The group's own ranking under label.rule; None when it has no verdict on the label."
    )
    p: list[float | None] = Field(
        description="Per entry of the label's `pairs`: the group's P(chosen better) (the mean over its "
        "principles with a verdict on the pair; without one, over those that answered; None if none did)."
    )
    verdict: list[int | None] = Field(
        description="Per entry of `pairs`: the response the group's verdict prefers; None: the group "
        "has no verdict there (and takes no part in deciding it)."
    )


class DecidedBy(Row):
    """Which group decided one derived pair of a pluralistic run, and why."""

    group: str | None = Field(
        description="The deciding group: the apportioned one; under consensus or a per-label rule the "
        "heaviest group whose verdict agrees with the decision; None when no group's does."
    )
    reason: Literal["consensus", "apportioned", "rule", "no-verdict", "pending"] = Field(
        description="consensus: every group with a verdict agreed; apportioned: a contested pair given "
        "to this group by the proportional rule; rule: a per-label rule decided between disagreeing "
        "groups; no-verdict: no group had a verdict; pending: before the proportional pass (ledger "
        "rows only, never in audit.jsonl)."
    )
    seat: int | None = Field(None, description="The apportioned seat's place in the seat order (1 first).")


class LabelAudit(OmitNone):
    """Everything that shaped one label; one row per prompt, joined by `label_id`."""

    OMIT_WHEN_NONE: ClassVar[tuple[str, ...]] = ("groups", "decided_by")

    label_id: str
    row_id: str
    prompt: Chat
    responses: list[str]
    principles: list[str]
    votes: list[PairVote]
    rule: str
    outcome: RuleOutcome
    pairs: list[DerivedPair]
    training: list[TrainingUse] = Field(description="Per derived pair: a training row, or why not.")
    contested: bool
    has_verdict: bool = Field(description="At least one principle gave a verdict on some pair of this label.")
    principle_agreement: float | None = Field(
        description="Weighted share of verdicts agreeing with the label; None without verdicts."
    )
    min_margin: float = Field(description="Distance from 0.5 a two-order average needed to be a verdict.")
    weighting: Literal["sampling", "aggregation"] = Field(
        description="Where principle weights were applied: by drawing principles, or in aggregation."
    )
    judge_model_id: str
    policy_model_id: str
    judge: str = Field("choice", description="The judge mode: choice, likelihood or classifier.")
    cot: bool
    template_hashes: dict[str, str]
    constitution: str
    constitution_hash: str
    config_hash: str
    groups: list[GroupVerdict] | None = Field(
        None,
        description="Pluralistic runs: every group's verdict (with its constitution hash); `rule` is "
        "then the rule inside each group, `outcome.rule` the rule across groups, and `constitution` "
        "names the first group's. None in one-group runs.",
    )
    decided_by: list[DecidedBy] | None = Field(
        None, description="Pluralistic runs: per entry of `pairs`, the group that decided it and why."
    )


# --------------------------------------------------------------------------- evaluation


class MetricRow(Row):
    """One evaluation figure for one policy, with its uncertainty and sample size."""

    metric: str = Field(
        description="e.g. harmless_rate, helpful_win_rate_vs_base, refusal_rate, elo, pm_accuracy"
    )
    policy: str = Field(description="Policy name (base, sft, ppo, dpo...) or 'pm' for PM figures.")
    value: float
    ci_low: float | None = Field(None, description="Lower end of the 95% bootstrap interval.")
    ci_high: float | None = Field(None, description="Upper end of the 95% bootstrap interval.")
    n: int = Field(description="Number of items the figure is computed over.")
    note: str | None = None
    no_verdict: int | None = Field(
        None, description="Judged figures: items on which the judge gave no verdict (a win for neither side)."
    )


class LabelResult(Row):
    """What the label stage commits per prompt: the audit row and the preference rows it gave."""

    row_id: str
    config_hash: str
    audit: LabelAudit | None = None
    preferences: list[PreferenceRow] = Field(default_factory=list)
    error: str | None = Field(None, description="Why this prompt has no label (e.g. the policy failed).")
