"""The tool commands: constitutions, prompts, configs, models, and the one-minute tour."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from cai.cli.app import (
    SetOption,
    app,
    config_app,
    console,
    constitution_app,
    err_console,
    fail,
    models_app,
    prompts_app,
)

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
            err_console.print(f"[red]✗[/] {escape(file)}\n{escape(str(exc))}", highlight=False)
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

    from cai.yamlfile import YAMLFileError, describe, load_yaml_value, read_yaml_file

    try:
        data = load_yaml_value(read_yaml_file(path))
    except YAMLFileError as exc:
        fail(f"cannot read example {exc}")
    except yaml.YAMLError as exc:
        fail(f"cannot read example {path}: {describe(exc)}")
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
        for message in chat:  # Text: a prompt holding "[bold]" is shown as written, never as markup
            console.print(Panel(Text(message["content"]), title=message["role"], title_align="left"))
        if prefix:
            console.print(Panel(Text(prefix), title="assistant (answer start; options are scored after it)"))
    if model:
        from transformers import AutoTokenizer

        from cai.models import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + prefix
        console.print(Panel(Text(text), title=f"as sent to {model}"))


# --------------------------------------------------------------------------- config


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
