"""The `cai` command line: each command parses its arguments and calls one stage function.

    cai --help

Heavy libraries (torch, transformers, trl, vllm) are imported inside the commands that need
them, so `cai --help` and the constitution tools answer at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

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

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


# --------------------------------------------------------------------------- constitution


@constitution_app.command("validate")
def constitution_validate(
    files: Annotated[list[str], typer.Argument(help="Constitution files or shipped names.")],
) -> None:
    """Validate constitutions; print every problem with file, line, principle and field."""
    from cai.constitution import ConstitutionError, load_constitution

    failed = 0
    for file in files:
        try:
            constitution = load_constitution(file)
        except (ConstitutionError, FileNotFoundError) as exc:
            failed += 1
            err_console.print(f"[red]✗[/] {file}\n{exc}", highlight=False)
            continue
        console.print(
            f"[green]✓[/] {file}: {constitution.name} v{constitution.version}, "
            f"{len(constitution.principles)} principles, hash {constitution.hash[:12]}",
            highlight=False,
        )
    if failed:
        raise typer.Exit(1)


@constitution_app.command("show")
def constitution_show(
    file: Annotated[str, typer.Argument(help="Constitution file or shipped name.")],
    tag: Annotated[list[str] | None, typer.Option(help="Only principles with this tag (repeatable).")] = None,
) -> None:
    """A table of the principles: id, tags, weight, and which stages each can serve."""
    from cai.constitution import ConstitutionError, load_constitution

    try:
        constitution = load_constitution(file)
        principles = constitution.select(tags=tag or ())
    except (ConstitutionError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    table = Table(title=f"{constitution.name} v{constitution.version} ({constitution.hash[:12]})")
    table.add_column("id", no_wrap=True)
    table.add_column("tags", overflow="fold")
    for column in ("weight", "critique", "revision", "compare"):
        table.add_column(column, no_wrap=True)
    for p in principles:
        table.add_row(
            p.id,
            ", ".join(p.tags),
            f"{p.weight:g}",
            *(("✓" if p.text(stage) else "–") for stage in ("critique", "revision", "compare")),
        )
    console.print(table)
    examples = constitution.examples
    console.print(
        f"few-shot examples: {len(examples.critique_revision)} critique/revision, "
        f"{len(examples.compare)} comparison"
    )


# --------------------------------------------------------------------------- prompts


def _read_example(path: Path | None) -> dict:
    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        fail(f"cannot read example {path}: {exc}")
    if not isinstance(data, dict):
        fail(f"{path}: an example is a mapping with prompt, response, critique, response_a, response_b")
    return data


@prompts_app.command("render")
def prompts_render(
    constitution: Annotated[str, typer.Option(help="Constitution file or shipped name.")],
    principle: Annotated[str, typer.Option(help="Principle id.")],
    stage: Annotated[str, typer.Option(help="critique, revision or compare.")],
    example: Annotated[
        Path | None,
        typer.Option(
            help="YAML/JSON with prompt and response (critique, revision), critique (revision), "
            "response_a/response_b (compare). Default: the constitution's first few-shot example."
        ),
    ] = None,
    few_shot: Annotated[int, typer.Option(help="Few-shot examples to include.")] = 0,
    cot: Annotated[bool, typer.Option(help="Chain-of-thought comparison prompt.")] = False,
    templates: Annotated[Path | None, typer.Option(help="Template folder searched first.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Also show the final string after this model's chat template.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the chat as JSON.")] = False,
) -> None:
    """Render the exact chat one stage sends for one principle."""
    from cai.chats import ChatBuilder
    from cai.constitution import ConstitutionError, load_constitution
    from cai.prompts import TemplateError, Templates

    if stage not in {"critique", "revision", "compare"}:
        fail(f"--stage must be critique, revision or compare, not {stage!r}")
    try:
        cons = load_constitution(constitution)
        chosen = cons.principle(principle)
        builder = ChatBuilder(Templates(templates), cons)
        data = _read_example(example)
        prefix = ""
        if stage == "compare":
            shipped = cons.examples.compare[0] if cons.examples.compare else None
            prompt = data.get("prompt", shipped.prompt if shipped else "")
            a = data.get("response_a", shipped.response_a if shipped else "")
            b = data.get("response_b", shipped.response_b if shipped else "")
            score_prompt = builder.compare_prompt(
                prompt, a, b, chosen, cons.examples.compare[:few_shot], data.get("reasoning"), cot
            )
            chat, prefix = score_prompt.chat, score_prompt.assistant_prefix
        else:
            shipped = cons.examples.critique_revision[0] if cons.examples.critique_revision else None
            prompt = data.get("prompt", shipped.prompt if shipped else "")
            response = data.get("response", shipped.response if shipped else "")
            shots = cons.examples.critique_revision[:few_shot]
            if stage == "critique":
                chat = builder.critique_chat(prompt, response, chosen, shots)
            else:
                critique = data.get("critique", shipped.critique if shipped else None)
                chat = builder.revision_chat(prompt, response, chosen, critique, shots)
        if not prompt:
            fail("no example given and the constitution has no few-shot example to use; pass --example")
    except (ConstitutionError, TemplateError, FileNotFoundError, KeyError, ValueError) as exc:
        fail(str(exc).strip("'\""))
    if as_json:
        console.print_json(json.dumps({"chat": chat, "assistant_prefix": prefix}))
    else:
        for message in chat:
            console.print(
                Panel(message["content"], title=message["role"], title_align="left"), highlight=False
            )
        if prefix:
            console.print(Panel(prefix, title="assistant (answer start; options are scored after it)"))
    if model:
        from transformers import AutoTokenizer

        from cai.models import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + prefix
        console.print(Panel(text, title=f"as sent to {model}"), highlight=False, markup=False)


# --------------------------------------------------------------------------- stages

ConfigOption = Annotated[
    str, typer.Option("--config", "-c", help="Run config YAML (a path or a shipped name like 'quickstart').")
]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a field: --set sl.rounds=2 (repeatable).")
]
FreshOption = Annotated[bool, typer.Option(help="Discard this stage's output for this config and redo it.")]


def _context(config: str, overrides: list[str] | None):
    from cai.config import ConfigError, load_config
    from cai.stages.context import StageContext

    try:
        return StageContext(load_config(config, overrides or []), console, config_source=config)
    except (ConfigError, FileNotFoundError) as exc:
        fail(str(exc))


def _run_stage(config: str, overrides: list[str] | None, stage) -> None:
    """Run one stage function with clear errors for everything a user can fix."""
    from cai.constitution import ConstitutionError
    from cai.gate import GoldError, JudgeGateError
    from cai.ledger import StoreError
    from cai.models import ModelNotFoundError
    from cai.prompts import TemplateError
    from cai.sources import PromptSourceError
    from cai.stages.base import StageMissingError

    ctx = _context(config, overrides)
    try:
        stage(ctx)
    except (
        ConstitutionError,
        GoldError,
        JudgeGateError,
        ModelNotFoundError,
        TemplateError,
        PromptSourceError,
        StageMissingError,
        StoreError,
    ) as exc:
        fail(str(exc))
    finally:
        ctx.close()


@generate_app.command("sl")
def generate_sl(config: ConfigOption, set_: SetOption = None, fresh: FreshOption = False) -> None:
    """Answer red-team prompts, then critique and revise them for N rounds (resumable)."""
    from cai.stages.sl import run_sl

    _run_stage(config, set_, lambda ctx: run_sl(ctx, fresh=fresh))


@app.command("label")
def label(config: ConfigOption, set_: SetOption = None, fresh: FreshOption = False) -> None:
    """Sample K responses per prompt and judge them under principles, in both orders (resumable)."""
    from cai.stages.label import run_label

    _run_stage(config, set_, lambda ctx: run_label(ctx, fresh=fresh))


@app.command("mix")
def mix(config: ConfigOption, set_: SetOption = None, fresh: FreshOption = False) -> None:
    """Mix the AI harmlessness labels with human helpfulness preferences (for the PM)."""
    from cai.stages.mix import run_mix

    _run_stage(config, set_, lambda ctx: run_mix(ctx, fresh=fresh))


@train_app.command("sft")
def train_sft(config: ConfigOption, set_: SetOption = None, fresh: FreshOption = False) -> None:
    """Fine-tune the model on (prompt, final revision) from `cai generate sl` (full or LoRA)."""
    from cai.stages.sft import run_sft

    _run_stage(config, set_, lambda ctx: run_sft(ctx, fresh=fresh))


@train_app.command("pm")
def train_pm(config: ConfigOption, set_: SetOption = None, fresh: FreshOption = False) -> None:
    """Train the preference model on the mix; report held-out, per-source accuracy and calibration."""
    from cai.stages.pm import run_pm

    _run_stage(config, set_, lambda ctx: run_pm(ctx, fresh=fresh))


@train_app.command("dpo")
def train_dpo(config: ConfigOption, set_: SetOption = None, fresh: FreshOption = False) -> None:
    """DPO on the mixed preferences, from the SFT model (trl's DPOTrainer)."""
    from cai.stages.dpo import run_dpo

    _run_stage(config, set_, lambda ctx: run_dpo(ctx, fresh=fresh))


@train_app.command("rloo")
def train_rloo(config: ConfigOption, set_: SetOption = None, fresh: FreshOption = False) -> None:
    """RLOO against the preference model, from the SFT model (trl's RLOOTrainer)."""
    from cai.stages.rloo import run_rloo

    _run_stage(config, set_, lambda ctx: run_rloo(ctx, fresh=fresh))


@train_app.command("ppo")
def train_ppo(config: ConfigOption, set_: SetOption = None, fresh: FreshOption = False) -> None:
    """PPO against the preference model with a KL penalty to the SFT model (resumable)."""
    from cai.stages.ppo import run_ppo

    _run_stage(config, set_, lambda ctx: run_ppo(ctx, fresh=fresh))


@app.command("eval")
def evaluate(config: ConfigOption, set_: SetOption = None, fresh: FreshOption = False) -> None:
    """Compare the run's policies: harmless rate, helpful win rate vs base, refusals, Elo, PM accuracy."""
    from cai.stages.evaluation import run_eval

    _run_stage(config, set_, lambda ctx: run_eval(ctx, fresh=fresh))


@app.command("run")
def run(
    config: Annotated[
        str, typer.Argument(help="Run config YAML (a path or a shipped name like 'quickstart').")
    ],
    set_: SetOption = None,
) -> None:
    """Every stage of the recipe into one run directory; complete stages are skipped."""
    from cai.pipeline import run_pipeline

    _run_stage(config, set_, run_pipeline)


@app.command("report")
def report(
    config: ConfigOption,
    set_: SetOption = None,
    output: Annotated[Path | None, typer.Option(help="HTML file (default: RUN_DIR/report.html).")] = None,
) -> None:
    """Write the self-contained HTML report of a run (audit plots, PPO curves, eval results)."""
    from cai.stages.report import run_report

    _run_stage(config, set_, lambda ctx: run_report(ctx, path=output))


@app.command("audit")
def audit(
    run_dir: Annotated[
        Path | None,
        typer.Argument(help="A run directory, a label stage folder, or an audit.jsonl file (or use -c)."),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option("--config", "-c", help="Audit the label stage of this config (its exact folder)."),
    ] = None,
    set_: SetOption = None,
    label: Annotated[
        str | None, typer.Option(help="Show one label in full (its label_id or row id).")
    ] = None,
    principle: Annotated[str | None, typer.Option(help="Only labels this principle voted on.")] = None,
    tag: Annotated[str | None, typer.Option(help="Only labels with a principle of this tag.")] = None,
    contested: Annotated[
        bool | None, typer.Option("--contested/--uncontested", help="Only (un)contested labels.")
    ] = None,
    decisive: Annotated[bool, typer.Option(help="With --principle/--tag: only labels it decided.")] = False,
    constitution: Annotated[str, typer.Option(help="Constitution for tags (default: the run's).")] = "",
    html: Annotated[Path | None, typer.Option(help="Also write an HTML report of the selection.")] = None,
    limit: Annotated[int, typer.Option(help="Labels shown in full at most.")] = 5,
) -> None:
    """Which principle shaped each label: readings in both orders, verdicts, decisive principles."""
    from cai.audit import (
        contested_labels,
        filter_labels,
        judge_quality,
        label_view,
        load_audit,
        load_gate,
        principle_influence,
        print_contested,
        print_influence,
        print_label,
        print_quality,
    )
    from cai.constitution import ConstitutionError, load_constitution

    if (run_dir is None) == (config is None):
        fail("give a run directory (or label folder, or audit.jsonl) or --config, not both and not neither")
    if config is not None:
        ctx = _context(config, set_)
        run_dir = ctx.store("label").path
        console.print(f"label stage of {config}: {run_dir}", highlight=False)
    assert run_dir is not None
    try:
        rows = load_audit(run_dir)
        gate, failures = load_gate(run_dir)
        name = constitution or (rows[0].constitution if rows else "harmless")
        cons = load_constitution(name) if (tag or constitution or rows) else None
        if cons is not None and rows and not constitution and cons.hash != rows[0].constitution_hash:
            err_console.print(
                f"[yellow]note:[/] constitution {name!r} has changed since these labels were made "
                f"(hash {rows[0].constitution_hash[:12]} in the rows); tags come from the current file"
            )
        selected = filter_labels(rows, principle, tag, contested, cons, decisive=decisive)
    except (FileNotFoundError, ValueError, ConstitutionError) as exc:
        fail(str(exc))
    console.print(f"{len(selected)} of {len(rows)} labels selected")
    if label is not None:
        matches = [r for r in rows if label in (r.label_id, r.row_id)]
        if not matches:
            fail(f"no label {label!r} (label ids look like {rows[0].label_id!r})" if rows else "no labels")
        print_label(console, label_view(matches[0]))
        return
    print_quality(console, judge_quality(selected), gate, failures)
    print_influence(console, principle_influence(selected), cons)
    print_contested(console, contested_labels(selected))
    for row in selected[:limit] if (principle or tag or contested is not None) else []:
        print_label(console, label_view(row))
    if html is not None:
        from cai.report import write_report

        write_report(
            html,
            audit=selected,
            gate=gate,
            gate_failures=failures,
            ppo_history=None,
            eval_rows=None,
            pm_metrics=None,
            summary=None,
            title=f"cai audit {run_dir}",
            constitution=cons,
        )
        console.print(f"[green]html:[/] {html}")


@config_app.command("show")
def config_show(
    config: Annotated[str, typer.Argument(help="Run config YAML (a path or a shipped name).")] = "quickstart",
    set_: SetOption = None,
) -> None:
    """Print the config with every default filled in (what a run will actually use)."""
    import yaml

    from cai.config import ConfigError, load_config

    try:
        loaded = load_config(config, set_ or [])
    except (ConfigError, FileNotFoundError) as exc:
        fail(str(exc))
    console.print(
        yaml.safe_dump(loaded.model_dump(mode="json"), sort_keys=False), highlight=False, markup=False
    )


@config_app.command("schema")
def config_schema(
    section: Annotated[
        str | None, typer.Argument(help="A section (sl, label, ppo.kl...); default: all.")
    ] = None,
) -> None:
    """Every config field with its type, default and description."""
    from pydantic import BaseModel
    from rich.markup import escape

    from cai.config import RunConfig

    def rows(model: type[BaseModel], value: BaseModel | None, prefix: str):
        """Walk the fields; defaults come from the default config itself (section defaults win)."""
        for name, field in model.model_fields.items():
            annotation = field.annotation
            nested = [
                t
                for t in (getattr(annotation, "__args__", None) or (annotation,))
                if isinstance(t, type) and issubclass(t, BaseModel)
            ]
            current = getattr(value, name, None) if value is not None else None
            if len(nested) == 1:
                yield (
                    f"{prefix}{name}",
                    nested[0].__name__,
                    "" if current else "None",
                    field.description or "",
                )
                yield from rows(
                    nested[0], current if isinstance(current, BaseModel) else None, f"{prefix}{name}."
                )
                continue
            if len(nested) > 1:  # a union chosen by `kind` (engines): each variant's fields
                yield f"{prefix}{name}", " | ".join(t.__name__ for t in nested), "", field.description or ""
                for variant in nested:
                    tag = (
                        variant.model_fields["kind"].default
                        if "kind" in variant.model_fields
                        else variant.__name__
                    )
                    chosen = current if isinstance(current, variant) else None
                    yield from rows(variant, chosen, f"{prefix}{name}[kind={tag}].")
                continue
            kind = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
            shown = repr(current.model_dump(mode="json") if isinstance(current, BaseModel) else current)
            yield f"{prefix}{name}", kind, shown[:40], field.description or ""

    table = Table("field", "type", "default", "description", title="run config fields")
    found = False
    for field, kind, default, description in rows(RunConfig, RunConfig(), ""):
        if section is None or field == section or field.startswith((section + ".", section + "[")):
            table.add_row(*(escape(cell) for cell in (field, kind, default, description)))
            found = True
    if not found:
        fail(f"no config section or field {section!r}")
    console.print(table)


# --------------------------------------------------------------------------- models


@models_app.command("resolve")
def models_resolve(
    name: Annotated[str, typer.Argument(help="Built-in name, local folder or hub id.")],
) -> None:
    """Print the local folder a model name resolves to (converting the built-in model once)."""
    from cai.models import ModelNotFoundError, resolve_model

    try:
        console.print(resolve_model(name), highlight=False)
    except ModelNotFoundError as exc:
        fail(str(exc))


@models_app.command("list")
def models_list() -> None:
    """The built-in model names and whether each is ready offline."""
    from cai.models import BUILTIN_MODELS, ModelNotFoundError, builtin_gguf, cache_dir

    table = Table("name", "package", "state")
    for name, spec in BUILTIN_MODELS.items():
        try:
            builtin_gguf(name)
            converted = (cache_dir() / "models" / name / "config.json").is_file()
            state = "converted" if converted else "installed (converted on first use)"
        except ModelNotFoundError:
            state = f"missing: {spec.install_hint}"
        table.add_row(name, spec.distribution, state)
    console.print(table)


@app.command("tour")
def tour(
    model: Annotated[str, typer.Option(help="Model name or path.")] = "smollm2-135m-instruct",
    constitution: Annotated[str, typer.Option(help="Constitution file or shipped name.")] = "harmless",
    principle: Annotated[str | None, typer.Option(help="Principle id (default: the first one).")] = None,
    prompt_index: Annotated[int, typer.Option(help="Which shipped red-team prompt.")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 96,
    few_shot: Annotated[int, typer.Option(help="Few-shot critique/revision examples shown first.")] = 1,
) -> None:
    """One real critique -> revision round on the built-in model, showing every prompt sent."""
    from cai.constitution import ConstitutionError
    from cai.models import ModelNotFoundError
    from cai.tour import run_tour

    try:
        run_tour(model, constitution, principle, prompt_index, max_new_tokens, few_shot, console)
    except (ModelNotFoundError, ConstitutionError, KeyError) as exc:
        fail(str(exc))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
