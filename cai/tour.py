"""A one-minute tour: validate the shipped constitutions, then one real critique -> revision.

    cai tour

It shows, on the built-in model and fully offline, the exact prompts the supervised stage
sends and what the model answers, so a new user sees the whole idea before running anything
long.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from rich.console import Console
from rich.panel import Panel

from cai.chats import ChatBuilder
from cai.constitution import load_constitution
from cai.prompts import Templates
from cai.resources import data_path, shipped_dir
from cai.sections import SamplingParams


@dataclass
class TourResult:
    prompt: str
    principle_id: str
    response: str
    critique: str
    revision: str


def run_tour(
    model: str = "smollm2-135m-instruct",
    constitution_name: str = "harmless",
    principle_id: str | None = None,
    prompt_index: int = 0,
    max_new_tokens: int = 96,
    few_shot: int = 1,
    console: Console | None = None,
) -> TourResult:
    from cai.backends.hf import HFBackend

    console = console or Console()
    console.rule("[bold]1. Constitutions")
    for path in sorted(shipped_dir("constitutions").glob("*.yaml")):
        loaded = load_constitution(path)
        console.print(
            f"[green]✓[/] {path.name}: {len(loaded.principles)} principles, hash {loaded.hash[:12]}"
        )
    constitution = load_constitution(constitution_name)
    lines = data_path("red_team.jsonl").read_text(encoding="utf-8").splitlines()
    example = json.loads(lines[prompt_index % len(lines)])
    principle = constitution.principle(principle_id) if principle_id else constitution.select(["critique"])[0]
    builder = ChatBuilder(Templates(), constitution)
    # Greedy with a repetition penalty: a 135M model loops without one.
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.2, seed=0)
    shots = constitution.examples.critique_revision[:few_shot]

    console.rule(f"[bold]2. The model ({model})")
    backend = HFBackend(model)
    console.print(Panel(example["prompt"], title=f"red-team prompt {example['id']} ({example['category']})"))
    response = backend.generate([[{"role": "user", "content": example["prompt"]}]], params)[0].text
    console.print(Panel(response, title="initial response", border_style="yellow"))

    console.rule(f"[bold]3. Critique against principle '{principle.id}'")
    critique_chat = builder.critique_chat(example["prompt"], response, principle, shots)
    console.print(
        Panel(critique_chat[-1]["content"], title="critique request (rendered critique_request.j2)")
    )
    critique = backend.generate([critique_chat], params)[0].text
    console.print(Panel(critique, title="critique", border_style="cyan"))

    console.rule("[bold]4. Revision")
    revision_chat = builder.revision_chat(example["prompt"], response, principle, critique, shots)
    console.print(
        Panel(revision_chat[-1]["content"], title="revision request (rendered revision_request.j2)")
    )
    revision = backend.generate([revision_chat], params)[0].text
    console.print(Panel(revision, title="revision", border_style="green"))
    usage = backend.usage
    console.print(
        f"{usage.generate_calls} generate calls, {usage.prompt_tokens} prompt tokens, "
        f"{usage.completion_tokens} generated tokens"
    )
    return TourResult(example["prompt"], principle.id, response, critique, revision)
