"""The `cai` command line's apps, console and shared options; the commands live beside it.

    cai --help

Heavy libraries (torch, transformers, trl, vllm) are imported inside the commands that need
them, so `cai --help` and the constitution tools answer at once.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    help="Constitutional AI end to end: critique/revision data, AI preference labels you can audit, "
    "preference models and PPO.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
constitution_app = typer.Typer(help="Check and inspect constitution YAML files.", no_args_is_help=True)
prompts_app = typer.Typer(help="See the exact text a model will be sent.", no_args_is_help=True)
models_app = typer.Typer(help="Resolve model names (built-in, local folder, hub id).", no_args_is_help=True)
app.add_typer(constitution_app, name="constitution")
app.add_typer(prompts_app, name="prompts")
app.add_typer(models_app, name="models")
generate_app = typer.Typer(help="Generate datasets (the supervised stage).", no_args_is_help=True)
app.add_typer(generate_app, name="generate")
train_app = typer.Typer(help="Train: sft, pm (preference model), ppo, dpo, rloo.", no_args_is_help=True)
app.add_typer(train_app, name="train")
config_app = typer.Typer(
    help="Inspect run configs: resolved values and every field's documentation.", no_args_is_help=True
)
app.add_typer(config_app, name="config")
judge_app = typer.Typer(help="Measure the judge a config would label with.", no_args_is_help=True)
app.add_typer(judge_app, name="judge")

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    """Print an error exactly as written (rich markup escaped) and exit."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


ConfigOption = Annotated[
    str, typer.Option("--config", "-c", help="Run config YAML (a path or a shipped name like 'quickstart').")
]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a field: --set sl.rounds=2 (repeatable).")
]
FreshOption = Annotated[bool, typer.Option(help="Discard this stage's output for this config and redo it.")]


def context(config: str, overrides: list[str] | None):
    from cai.config import ConfigError, load_config
    from cai.stages.context import StageContext

    try:
        return StageContext(load_config(config, overrides or []), console, config_source=config)
    except (ConfigError, FileNotFoundError) as exc:
        fail(str(exc))


def run_stage(config: str, overrides: list[str] | None, stage) -> None:
    """Run one stage function with clear errors for everything a user can fix."""
    from cai.constitution import ConstitutionError
    from cai.gate import GoldError, JudgeGateError
    from cai.ledger import StoreError
    from cai.models import ModelNotFoundError
    from cai.preferences import PreferenceDataError
    from cai.prompts import TemplateError
    from cai.sources import PromptSourceError
    from cai.stages.base import StageMissingError

    ctx = context(config, overrides)
    try:
        stage(ctx)
    except (
        ConstitutionError,
        GoldError,
        JudgeGateError,
        FileNotFoundError,
        ModelNotFoundError,
        PreferenceDataError,
        TemplateError,
        PromptSourceError,
        StageMissingError,
        StoreError,
    ) as exc:
        fail(str(exc))
    finally:
        ctx.close()
