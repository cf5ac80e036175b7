"""Verified revision (`sl.verify`): the AI judge compares each revision with the answer it revised.

    cai generate sl -c configs/quickstart.yaml --set sl.verify=filter

A revision is not always an improvement: small models often lose content or drift from the
prompt. After every critique -> revision round the judge of the feedback stage (`label.*`: its
model, engine, mode, margin) compares the revision with the answer it revised, under that
round's principle, in both orders, exactly as it compares labels. `record` stores its verdict in
the round; `filter` keeps a revision only with a verdict that it is better, so the next round
revises the last accepted answer and the SFT target is the last accepted answer.

All rows of a chunk's round go to the judge in ONE `judge()` call, seeded from the run seed,
the chunk and the round, so a resumed stage judges exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cai.backends.base import Backend, Chat
from cai.chats import ChatBuilder
from cai.constitution import CompareExample, Principle
from cai.judge import LabelConfig, judge
from cai.records import SLRecord, VerifyResult

VerifyMode = Literal["off", "record", "filter"]
"""off: no judge (the stage as before verification existed); record: store the verdicts;
filter: keep a revision only with a verdict that it is better."""

COUNTS = ("accepted", "rejected", "better", "worse", "no_verdict")
"""What `verify_summary` counts per principle: what became of the revisions, and the verdicts."""


@dataclass(frozen=True)
class Verifier:
    """The judge a verifying SL stage uses: its engine, its settings and the mode."""

    mode: Literal["record", "filter"]
    backend: Backend
    builder: ChatBuilder
    config: LabelConfig
    examples: Sequence[CompareExample] = ()

    def check(
        self,
        conversations: Sequence[Chat],
        previous: Sequence[str],
        revisions: Sequence[str],
        principles: Sequence[Principle],
        against: Sequence[int],
        seed: int,
    ) -> list[VerifyResult]:
        """Judge each revision against the answer it revised, under its round's principle.

        Responses are `[previous, revision]`, so the judge's response j (index 1) is the revision.
        """
        if not revisions:
            return []
        votes = judge(
            self.backend,
            self.builder,
            conversations,
            [[old, new] for old, new in zip(previous, revisions, strict=True)],
            [[p] for p in principles],
            self.config,
            self.examples,
            seed=seed,
            weighted=False,
        )
        results = []
        for (vote,), revision, before in zip(votes, revisions, against, strict=True):
            verdict = {None: "no-verdict", 0: "worse", 1: "better"}[vote.verdict]
            kept = verdict == "better" if self.mode == "filter" else True
            results.append(
                VerifyResult(
                    against_round=before,
                    judge_model_id=self.backend.model_id,
                    p_revision_better=None if vote.p_i_better is None else 1.0 - vote.p_i_better,
                    verdict=verdict,
                    no_verdict=vote.no_verdict,
                    # an empty revision would erase the answer, verified or not
                    accepted=kept and bool(revision.strip()),
                )
            )
        return results


def verify_summary(rows: Sequence[SLRecord], mode: VerifyMode) -> dict:
    """Per principle: revisions accepted and rejected, and the judge's verdicts (the manifest's
    `summary["verify"]`, shown by the terminal line and the HTML report)."""
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        for r in row.rounds:
            if r.verify is None:
                continue
            tally = counts.setdefault(r.principle_id, dict.fromkeys(COUNTS, 0))
            tally["accepted" if r.verify.accepted else "rejected"] += 1
            tally[r.verify.verdict.replace("-", "_")] += 1
    totals = {k: sum(t[k] for t in counts.values()) for k in COUNTS}
    return {"mode": mode, **totals, "by_principle": dict(sorted(counts.items()))}


def check_principles(candidates: Sequence[Principle]) -> None:
    """Every principle a round can draw must have a comparison question for the judge to ask."""
    missing = [p.id for p in candidates if p.compare is None]
    if missing:
        raise ValueError(
            f"sl.verify needs a comparison question for every principle the SL stage can draw; "
            f"{', '.join(missing)} have none (narrow sl.principles / sl.tags, or set sl.verify: off)"
        )
