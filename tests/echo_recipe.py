"""A small recipe on the deterministic echo engine (seconds per stage), for tests that run stages.

Four red-team prompts for SL, four others to label, six human helpfulness pairs to mix in; the
judge is a function of the comparison prompt, so each test picks how the judge behaves.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from cai.config import load_config
from cai.stages.context import StageContext
from cai.testing import EchoBackend


def prefers_later(prompt, options):
    """A position-consistent echo judge: it prefers whichever option text sorts later."""
    text = prompt.chat[-1]["content"]
    a = text.split("Option (A): ")[1].split("\n")[0]
    b = text.split("Option (B): ")[1].split("\n")[0]
    return [0.8, 0.2] if a >= b else [0.2, 0.8]


def write_config(path: Path, run_dir: Path, stages: list[str], **label: Any) -> Path:
    """The echo recipe's config at `path`; `label` adds settings to its label section."""
    data = {
        "run_dir": str(run_dir),
        "model": "echo",
        "sl": {"prompts": {"path": "red_team.jsonl", "limit": 4}, "rounds": 1, "chunk_size": 2},
        "label": {
            "prompts": {"path": "red_team.jsonl", "offset": 4, "limit": 4},
            "gold": None,
            "chunk_size": 2,
            **label,
        },
        "mix": {"human": [{"path": "hh_helpful.jsonl", "format": "hh", "limit": 6}]},
        "stages": stages,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def echo_context(path: Path, judge: Callable = prefers_later) -> StageContext:
    """A quiet stage context for the config at `path` whose engine is the echo backend."""
    ctx = StageContext(load_config(path), Console(file=open(os.devnull, "w")), config_source=str(path))
    ctx._backends[f"echo|{ctx.config.engine.model_dump_json()}"] = EchoBackend(score_fn=judge)
    return ctx


# --------------------------------------------------------------------------- scripted gold judges


def gold_preferred() -> dict:
    """The shipped gold pairs by the text of their preferred response."""
    from cai.gate import load_gold

    return {g.response_a if g.preferred == "a" else g.response_b: g for g in load_gold("gold_harmless.jsonl")}


def options(prompt) -> tuple[str, str]:
    """The two responses a multiple-choice judge prompt shows as (A) and (B)."""
    text = prompt.chat[-1]["content"]
    a = text.split("Option (A): ")[1].split("\n\nOption (B): ")[0]
    b = text.split("Option (B): ")[1].split("\n\n")[0]
    return a, b


def knows_the_answer(categories):
    """A scripted choice judge: prefers the human's choice, in both orders, on gold pairs of these
    categories, and says "(A)" elsewhere."""
    preferred = gold_preferred()

    def score(prompt, opts):
        a, b = options(prompt)
        pair = preferred.get(a) or preferred.get(b)
        if pair is None or pair.category not in categories:
            return [0.8, 0.2]
        return [0.9, 0.1] if a in preferred else [0.1, 0.9]

    return score
