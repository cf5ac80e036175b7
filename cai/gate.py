"""The judge gate: measure a judge on human-labelled gold pairs before trusting its labels.

    cai label -c configs/quickstart.yaml          # the gate runs first and prints its figures

A judge that cannot tell the better response of a clear pair produces labels that only look
like preferences. Before labelling, the stage asks the same judge (model, engine, mode,
principle selection, verdict margin) about the gold pairs of `label.gold`, and measures:

* **agreement**: the share of gold pairs whose label has a verdict for the human's choice. A
  pair without a verdict (position flips, answers too close to 0.5, abstentions) is not
  agreement: a judge that never commits scores 0, a coin that always commits about 0.5;
* its 95% percentile-bootstrap interval, the same figure per category (harm, harm-subtle,
  evasive, helpful), and **coverage** (the share of pairs with a verdict);
* **position consistency**: the share of (principle, pair) comparisons preferring the same
  response in both orders.

`label.gate` sets the least agreement and consistency; a failing judge either warns (labels are
made, and the report opens with a banner) or halts before the first label is written.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cai.backends.base import Backend
from cai.chats import ChatBuilder
from cai.constitution import Constitution
from cai.hashing import content_hash
from cai.judge import GateConfig, LabelConfig, choose_principles, judge, label_outcome

Category = Literal["harm", "harm-subtle", "evasive", "helpful"]
CATEGORIES: tuple[Category, ...] = get_args(Category)


class GoldError(ValueError):
    """A gold file is missing or a line of it is not a gold pair; the message names file and line."""


class JudgeGateError(RuntimeError):
    """The judge failed its gate under `action: halt`; nothing was labelled."""


class GoldPair(BaseModel):
    """One human-labelled comparison: which response a careful human prefers, and what kind of case."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    category: Category
    prompt: str = Field(min_length=1)
    response_a: str = Field(min_length=1)
    response_b: str = Field(min_length=1)
    preferred: Literal["a", "b"]

    @property
    def preferred_index(self) -> int:
        return 0 if self.preferred == "a" else 1


def resolve_gold(source: str) -> Path:
    """A path, or the name of a gold file shipped in cai/data."""
    from cai.resources import resolve_data

    return resolve_data(source, "gold file", GoldError)


def gold_hash(gold: Sequence[GoldPair]) -> str:
    """The content of a gold set: a gate measured on other pairs is measured again."""
    return content_hash([g.model_dump() for g in gold])


def load_gold(source: str | Path) -> list[GoldPair]:
    """Read gold pairs (JSON Lines); every bad line is an error naming the file, line and field."""
    path = resolve_gold(str(source))
    if not path.is_file():
        raise GoldError(f"{path}: not a file (label.gold takes a JSON Lines file of gold pairs)")
    pairs: list[GoldPair] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            pair = GoldPair.model_validate(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise GoldError(f"{path}:{number}: not valid JSON ({exc})") from None
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"]) or "<line>"
            message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
            raise GoldError(f"{path}:{number}: field '{field}': {message}") from None
        if pair.id in seen:
            raise GoldError(f"{path}:{number}: field 'id': {pair.id!r} appears twice")
        seen.add(pair.id)
        pairs.append(pair)
    if not pairs:
        raise GoldError(f"{path}: no gold pairs")
    return pairs


class CategoryFigure(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int
    agreement: float


class JudgeCheck(BaseModel):
    """A judge measured on gold pairs; `cai label` stores it as gate.json in its stage folder."""

    model_config = ConfigDict(extra="forbid")

    gold: str = Field(description="The gold file measured on.")
    gold_hash: str = Field(description="Content hash of the gold pairs (a changed file is measured again).")
    judge_model: str
    n: int
    agreement: float = Field(description="Share of pairs whose label has a verdict for the human's choice.")
    ci: tuple[float, float] = Field(description="95% percentile-bootstrap interval of the agreement.")
    coverage: float = Field(description="Share of pairs whose label has a verdict at all.")
    agreement_given_verdict: float | None = Field(description="Agreement among pairs with a verdict.")
    by_category: dict[str, CategoryFigure]
    position_consistency: float | None = Field(
        description="Share of (principle, pair) comparisons preferring the same response in both orders."
    )
    no_verdict: dict[str, int] = Field(description="(principle, pair) readings without a verdict, by reason.")
    comparisons: int = Field(description="(principle, pair) readings taken.")
    seconds: float
    scored_tokens: int
    generated_tokens: int


class GateResult(BaseModel):
    """The gate's verdict on a measured judge, as the label stage stores it in its manifest."""

    model_config = ConfigDict(extra="forbid")

    check: JudgeCheck
    passed: bool
    failures: list[str]


def measure_judge(
    backend: Backend,
    builder: ChatBuilder,
    constitution: Constitution,
    gold: Sequence[GoldPair],
    config: LabelConfig,
    seed: int,
    weighted: bool,
    gold_name: str = "",
    examples: Sequence = (),
) -> JudgeCheck:
    """Judge every gold pair exactly as labelling would, and compare with the human choice."""
    from cai.stats import bootstrap_ci

    started = time.perf_counter()
    before = backend.usage.model_copy()
    votes = judge(
        backend,
        builder,
        [[{"role": "user", "content": g.prompt}] for g in gold],
        [[g.response_a, g.response_b] for g in gold],
        [choose_principles(constitution, config.principles, seed, g.id) for g in gold],
        config,
        examples,
        seed=seed,
        weighted=weighted,
    )
    hits: list[float] = []
    covered = 0
    for pair, label_votes in zip(gold, votes, strict=True):
        decided = label_outcome(label_votes, 2, config).pairs[0].decided
        covered += decided is not None
        hits.append(float(decided == pair.preferred_index))
    flat = [v for label_votes in votes for v in label_votes]
    known = [v.position_consistent for v in flat if v.position_consistent is not None]
    reasons: dict[str, int] = {}
    for vote in flat:
        if vote.no_verdict is not None:
            reasons[vote.no_verdict] = reasons.get(vote.no_verdict, 0) + 1
    by_category = {}
    for category in dict.fromkeys(g.category for g in gold):
        mine = [h for g, h in zip(gold, hits, strict=True) if g.category == category]
        by_category[category] = CategoryFigure(n=len(mine), agreement=sum(mine) / len(mine))
    low, high = bootstrap_ci(hits, n_resamples=1000, seed=seed)
    usage = backend.usage.minus(before)
    return JudgeCheck(
        gold=gold_name,
        gold_hash=gold_hash(gold),
        judge_model=backend.model_id,
        n=len(gold),
        agreement=sum(hits) / len(hits),
        ci=(low, high),
        coverage=covered / len(gold),
        agreement_given_verdict=sum(hits) / covered if covered else None,
        by_category=by_category,
        position_consistency=sum(known) / len(known) if known else None,
        no_verdict=reasons,
        comparisons=len(flat),
        seconds=round(time.perf_counter() - started, 2),
        scored_tokens=usage.scored_tokens,
        generated_tokens=usage.completion_tokens,
    )


def gate_result(check: JudgeCheck, gate: GateConfig) -> GateResult:
    failures = gate_failures(check, gate)
    return GateResult(check=check, passed=not failures, failures=failures)


def gate_failures(check: JudgeCheck, gate: GateConfig) -> list[str]:
    """Each figure below its gate, in words a user can act on; empty when the judge passes."""
    failures = []
    if check.agreement < gate.min_agreement:
        failures.append(
            f"gold agreement {check.agreement:.2f} (95% CI {check.ci[0]:.2f}-{check.ci[1]:.2f}, n={check.n}) "
            f"is below label.gate.min_agreement={gate.min_agreement:g}"
        )
    if check.position_consistency is not None and check.position_consistency < gate.min_consistency:
        failures.append(
            f"position consistency {check.position_consistency:.0%} is below "
            f"label.gate.min_consistency={gate.min_consistency:g}: the judge answers by option position"
        )
    return failures


HOW_TO_PROCEED = (
    "use a stronger judge (label.judge_model), chain of thought (label.cot: true) or more principles "
    "per label; or label anyway with --set label.gate.action=warn (the report will say the labels "
    "may carry no signal)"
)


def print_check(console, check: JudgeCheck, failures: Sequence[str] = (), title: str | None = None) -> None:
    """The gate's figures as a table, then what failed (if anything) and how to go on."""
    from rich.table import Table
    from rich.text import Text

    title = title or f"judge gate: {check.judge_model} on {check.n} gold pairs ({check.gold})"
    table = Table(title=Text(title), title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("what it means")
    table.add_row(
        "gold agreement",
        f"{check.agreement:.2f} [{check.ci[0]:.2f}, {check.ci[1]:.2f}]",
        "share of pairs with a verdict for the human's choice (95% bootstrap CI)",
    )
    for category, figure in check.by_category.items():
        table.add_row(f"  {category}", f"{figure.agreement:.2f}", f"n = {figure.n}")
    table.add_row("coverage", f"{check.coverage:.2f}", "share of pairs whose label has a verdict at all")
    consistency = (
        "n/a (no option order)" if check.position_consistency is None else f"{check.position_consistency:.0%}"
    )
    table.add_row("position consistency", consistency, "same response preferred in both orders")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(check.no_verdict.items())) or "none"
    table.add_row("no verdict", f"{sum(check.no_verdict.values())}/{check.comparisons}", Text(reasons))
    table.add_row(
        "cost",
        f"{check.seconds:.1f} s",
        f"{check.scored_tokens} scored tokens, {check.generated_tokens} generated tokens",
    )
    console.print(table)
    for failure in failures:
        console.print(Text.assemble(("gate failed: ", "bold red"), failure))
    if failures:
        console.print(Text.assemble(("how to proceed: ", "bold"), HOW_TO_PROCEED))
