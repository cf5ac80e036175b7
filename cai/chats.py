"""The exact chats cai sends to models, built from templates, principles and few-shot examples.

One module builds every chat so that `cai prompts render` shows precisely what the critique
loop and the judge send: there is no second code path that could drift from the first.
"""

from __future__ import annotations

from collections.abc import Sequence

from cai.backends.base import Chat, Message, ScorePrompt
from cai.constitution import CompareExample, Constitution, CritiqueRevisionExample, Principle
from cai.prompts import Templates

CRITIQUE_TEMPLATE = "critique_request.j2"
REVISION_TEMPLATE = "revision_request.j2"
COMPARE_TEMPLATE = "compare.j2"
COMPARE_ANSWER_TEMPLATE = "compare_answer.j2"
COMPARE_COT_TEMPLATE = "compare_cot.j2"
COMPARE_COT_ANSWER_TEMPLATE = "compare_cot_answer.j2"
OPTIONS = ("A", "B")


def user(content: str) -> Message:
    return {"role": "user", "content": content}


def assistant(content: str) -> Message:
    return {"role": "assistant", "content": content}


def as_chat(prompt: str | Chat) -> Chat:
    """A prompt is either a single human turn or a whole conversation ending with a human turn."""
    if isinstance(prompt, str):
        return [user(prompt)]
    return [dict(m) for m in prompt]  # type: ignore[misc]


def _principle_vars(principle: Principle) -> dict:
    return principle.model_dump(include={"id", "critique", "revision", "compare", "tags"})


def _example_principle(
    example: CritiqueRevisionExample | CompareExample, constitution: Constitution | None, fallback: Principle
) -> Principle:
    if example.principle is not None and constitution is not None:
        return constitution.principle(example.principle)
    return fallback


class ChatBuilder:
    """Builds the SL (critique/revision) and RL (comparison) chats for one constitution."""

    def __init__(self, templates: Templates, constitution: Constitution | None = None) -> None:
        self.templates = templates
        self.constitution = constitution

    def template_hashes(self, names: Sequence[str]) -> dict[str, str]:
        return {name: self.templates.hash(name) for name in names}

    # ------------------------------------------------------------------ supervised stage

    def critique_request(self, principle: Principle) -> str:
        return self.templates.render(CRITIQUE_TEMPLATE, principle=_principle_vars(principle))

    def revision_request(self, principle: Principle, critique: str | None) -> str:
        return self.templates.render(
            REVISION_TEMPLATE, principle=_principle_vars(principle), critique=critique
        )

    def sl_fewshot(
        self, examples: Sequence[CritiqueRevisionExample], principle: Principle, critique: bool
    ) -> Chat:
        """Demonstrations as earlier turns: the model sees a full round done well before its own."""
        turns: Chat = []
        for example in examples:
            shown = _example_principle(example, self.constitution, principle)
            turns += [user(example.prompt), assistant(example.response)]
            if critique:
                turns += [user(self.critique_request(shown)), assistant(example.critique)]
            turns += [
                user(self.revision_request(shown, example.critique if critique else None)),
                assistant(example.revision),
            ]
        return turns

    def critique_chat(
        self,
        prompt: str | Chat,
        response: str,
        principle: Principle,
        examples: Sequence[CritiqueRevisionExample] = (),
    ) -> Chat:
        return [
            *self.sl_fewshot(examples, principle, critique=True),
            *as_chat(prompt),
            assistant(response),
            user(self.critique_request(principle)),
        ]

    def revision_chat(
        self,
        prompt: str | Chat,
        response: str,
        principle: Principle,
        critique: str | None,
        examples: Sequence[CritiqueRevisionExample] = (),
    ) -> Chat:
        """With a critique, the revision continues the critique chat; without, it is asked directly
        (the paper's revision-only variant)."""
        if critique is None:
            return [
                *self.sl_fewshot(examples, principle, critique=False),
                *as_chat(prompt),
                assistant(response),
                user(self.revision_request(principle, None)),
            ]
        return [
            *self.critique_chat(prompt, response, principle, examples),
            assistant(critique),
            user(self.revision_request(principle, critique)),
        ]

    # ------------------------------------------------------------------ feedback stage

    def compare_question(
        self, conversation: str | Chat, response_a: str, response_b: str, question: str, cot: bool = False
    ) -> str:
        return self.templates.render(
            COMPARE_COT_TEMPLATE if cot else COMPARE_TEMPLATE,
            conversation=as_chat(conversation),
            response_a=response_a,
            response_b=response_b,
            question=question,
        )

    def compare_fewshot(self, examples: Sequence[CompareExample], principle: Principle, cot: bool) -> Chat:
        """Demonstrations that do not depend on the principle being asked about.

        An example without its own principle is shown with the constitution's first comparison
        principle, not the current one: the demonstrations then form part of the prefix shared
        by every principle of an ensemble, which the engines compute only once.
        """
        turns: Chat = []
        anchor = principle
        if self.constitution is not None:
            anchor = next((p for p in self.constitution.principles if p.compare), principle)
        for example in examples:
            shown = _example_principle(example, self.constitution, anchor)
            question = shown.compare or principle.compare or ""
            answer = self.answer_prefix(example.reasoning if cot else None) + f"{example.answer})"
            turns += [
                user(
                    self.compare_question(
                        example.prompt, example.response_a, example.response_b, question, cot
                    )
                ),
                assistant(answer),
            ]
        return turns

    def answer_prefix(self, reasoning: str | None) -> str:
        """The start of the judge's answer; the options are scored right after it."""
        if reasoning is None:
            return self.templates.render(COMPARE_ANSWER_TEMPLATE)
        return self.templates.render(COMPARE_COT_ANSWER_TEMPLATE, reasoning=reasoning)

    def compare_chat(
        self,
        conversation: str | Chat,
        response_a: str,
        response_b: str,
        principle: Principle,
        examples: Sequence[CompareExample] = (),
        cot: bool = False,
    ) -> Chat:
        if principle.compare is None:
            raise ValueError(f"principle {principle.id!r} has no comparison question")
        return [
            *self.compare_fewshot(examples, principle, cot),
            user(self.compare_question(conversation, response_a, response_b, principle.compare, cot)),
        ]

    def compare_prompt(
        self,
        conversation: str | Chat,
        response_a: str,
        response_b: str,
        principle: Principle,
        examples: Sequence[CompareExample] = (),
        reasoning: str | None = None,
        cot: bool = False,
    ) -> ScorePrompt:
        """What `score_choices` gets: the chat, and the answer start the options continue."""
        return ScorePrompt(
            chat=self.compare_chat(conversation, response_a, response_b, principle, examples, cot),
            assistant_prefix=self.answer_prefix(reasoning if cot else None),
        )
