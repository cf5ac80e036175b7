"""The supervised stage of Constitutional AI: answer, then critique and revise for N rounds.

    cai generate sl --config configs/quickstart.yaml

For every prompt the model answers; then each round samples a principle (seeded per row and
round, re-sampled every round as in the paper), asks the model to critique its latest answer
against it and to revise the answer. The final revisions become SFT data. With `verify` on, the
AI judge compares each revision with the answer it revised (`cai/verify.py`); under `filter`
only revisions it judges better are kept.

This module is pure: a function of a backend, a constitution and templates. Rows are processed
in chunks, and each step of a round is ONE engine call for the whole chunk, so the stage runs
at the engine's batched speed. Storage and resumption live in `cai/stages/sl.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import Field

from cai.backends.base import Backend, Chat
from cai.chats import CRITIQUE_TEMPLATE, REVISION_TEMPLATE, ChatBuilder
from cai.constitution import Constitution, Principle, sample_principles
from cai.hashing import derive_seed
from cai.records import SLRecord, SLRound
from cai.sections import SamplingParams, Section
from cai.sources import PromptItem, PromptSource
from cai.verify import Verifier, VerifyMode


def _default_sampling() -> SamplingParams:
    return SamplingParams(max_new_tokens=128, temperature=0.7, top_p=0.9, repetition_penalty=1.1)


class SLConfig(Section):
    """The critique -> revision stage."""

    prompts: PromptSource = Field(
        default_factory=lambda: PromptSource(path="red_team.jsonl"), description="Red-team prompts."
    )
    model: str | None = Field(
        None, description="Model that answers, critiques and revises; default: the run's model."
    )
    rounds: int = Field(
        4, ge=1, description="Critique -> revision rounds; a new principle is drawn each round."
    )
    critique: bool = Field(
        True, description="Ask for a critique before each revision (false: revision only)."
    )
    samples_per_prompt: int = Field(1, ge=1, description="Independent rows per prompt.")
    tags: list[str] = Field(default_factory=list, description="Only principles with any of these tags.")
    principles: list[str] = Field(default_factory=list, description="Only these principle ids.")
    weighted: bool = Field(True, description="Sample principles by weight.")
    few_shot: int = Field(
        1, ge=0, description="Few-shot critique/revision examples shown before each request."
    )
    sampling: SamplingParams = Field(
        default_factory=_default_sampling, description="Sampling for every call."
    )
    chunk_size: int = Field(
        16,
        ge=1,
        description="Rows processed and committed together; fixed chunks keep resumed runs identical.",
    )
    verify: VerifyMode = Field(
        "off",
        description="Verified revision: after each round the AI judge (label.judge_model and label's "
        "judge settings) compares the revision with the answer it revised, under the round's principle. "
        "off: no judge; record: store its verdict and probability in the round; filter: keep a revision "
        "only with a verdict that it is better, else the previous answer stays, is revised next round "
        "and can be the SFT target. Every principle sl can draw needs a comparison question.",
    )

    def template_names(self) -> list[str]:
        return [CRITIQUE_TEMPLATE, REVISION_TEMPLATE] if self.critique else [REVISION_TEMPLATE]


@dataclass(frozen=True)
class SLJob:
    """One row to produce: a prompt and which sample of it."""

    row_id: str
    item: PromptItem
    sample: int


@dataclass(frozen=True)
class SLMeta:
    """Provenance written into every row."""

    model_id: str
    seed: int
    constitution: str
    constitution_hash: str
    template_hashes: dict[str, str]
    config_hash: str


def make_jobs(items: Sequence[PromptItem], samples_per_prompt: int) -> list[SLJob]:
    return [
        SLJob(f"{item.key}:{item.index}:{sample}", item, sample)
        for item in items
        for sample in range(samples_per_prompt)
    ]


@dataclass
class _State:
    job: SLJob
    response: str = ""
    initial: str = ""
    accepted_round: int = 0  # the round whose revision `response` is (0: the initial answer)
    rounds: list[SLRound] = field(default_factory=list)
    error: str | None = None


def _seeded(params: SamplingParams, *parts: object) -> SamplingParams:
    return params.model_copy(update={"seed": derive_seed(params.seed, *parts)})


def run_chunk(
    jobs: Sequence[SLJob],
    backend: Backend,
    builder: ChatBuilder,
    constitution: Constitution,
    config: SLConfig,
    meta: SLMeta,
    chunk_key: str,
    verifier: Verifier | None = None,
) -> list[SLRecord]:
    """Take one chunk of rows through the initial answer and every round.

    A failed call fails only its row (the error is recorded and its later rounds are skipped);
    the other rows go on. Seeds are derived from the run seed, the chunk and the step, so the
    same chunk always gets the same samples. With a `verifier`, each round's revisions are
    judged in one call and only accepted ones become the answer the next round revises.
    """
    stages = ["critique", "revision"] if config.critique else ["revision"]
    candidates = constitution.select(stages=stages, tags=config.tags, ids=config.principles)
    examples = constitution.examples.critique_revision[: config.few_shot]
    states = [_State(job) for job in jobs]

    answers = backend.generate(
        [s.job.item.prompt for s in states], _seeded(config.sampling, meta.seed, chunk_key, 0)
    )
    for state, completion in zip(states, answers, strict=True):
        if completion.ok:
            state.response = state.initial = completion.text
        else:
            state.error = f"initial answer: {completion.error}"

    for round_number in range(1, config.rounds + 1):
        live = [s for s in states if s.error is None]
        if not live:
            break
        picks: list[Principle] = [
            sample_principles(
                candidates,
                1,
                seed=derive_seed(meta.seed, s.job.row_id, round_number),
                weighted=config.weighted,
            )[0]
            for s in live
        ]
        critiques: list[str | None] = [None] * len(live)
        critique_tokens = [0] * len(live)
        if config.critique:
            chats: list[Chat] = [
                builder.critique_chat(s.job.item.prompt, s.response, p, examples)
                for s, p in zip(live, picks, strict=True)
            ]
            outputs = backend.generate(
                chats, _seeded(config.sampling, meta.seed, chunk_key, round_number, "c")
            )
            for k, (state, completion) in enumerate(zip(live, outputs, strict=True)):
                if completion.ok:
                    critiques[k] = completion.text
                    critique_tokens[k] = completion.samples[0].tokens
                else:
                    state.error = f"round {round_number} critique: {completion.error}"
        revision_jobs = [k for k, s in enumerate(live) if s.error is None]
        chats = [
            builder.revision_chat(live[k].job.item.prompt, live[k].response, picks[k], critiques[k], examples)
            for k in revision_jobs
        ]
        outputs = backend.generate(chats, _seeded(config.sampling, meta.seed, chunk_key, round_number, "r"))
        revised = []
        for k, completion in zip(revision_jobs, outputs, strict=True):
            if completion.ok:
                revised.append((k, completion.samples[0]))
            else:
                live[k].error = f"round {round_number} revision: {completion.error}"
        verdicts = [None] * len(revised)
        if verifier is not None:
            verdicts = verifier.check(
                [live[k].job.item.prompt for k, _ in revised],
                [live[k].response for k, _ in revised],
                [sample.text for _, sample in revised],
                [picks[k] for k, _ in revised],
                [live[k].accepted_round for k, _ in revised],
                seed=derive_seed(meta.seed, chunk_key, round_number, "v"),
            )
        for (k, sample), verdict in zip(revised, verdicts, strict=True):
            state = live[k]
            state.rounds.append(
                SLRound(
                    round=round_number,
                    principle_id=picks[k].id,
                    critique=critiques[k],
                    revision=sample.text,
                    critique_tokens=critique_tokens[k],
                    revision_tokens=sample.tokens,
                    finish_reasons=[sample.finish_reason],
                    verify=verdict,
                )
            )
            # An empty revision would erase the answer; keep the last non-empty one instead.
            if verdict.accepted if verdict is not None else sample.text.strip():
                state.response = sample.text
                state.accepted_round = round_number

    return [
        SLRecord(
            row_id=s.job.row_id,
            source=s.job.item.key,
            index=s.job.item.index,
            sample=s.job.sample,
            prompt=s.job.item.prompt,
            initial_response=s.initial,
            rounds=s.rounds,
            final_revision=s.response,
            model_id=meta.model_id,
            sampling=config.sampling,
            seed=meta.seed,
            constitution=meta.constitution,
            constitution_hash=meta.constitution_hash,
            template_hashes=meta.template_hashes,
            config_hash=meta.config_hash,
            error=s.error,
        )
        for s in states
    ]
