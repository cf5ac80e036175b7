"""Run configuration: one YAML file, validated by pydantic, with dotted overrides from the CLI.

    cai run configs/quickstart.yaml --set sl.rounds=2 --set engine.batch_size=8

`RunConfig` is the shared settings plus one section per stage, composed from the stage registry
(`cai.stages.registry`): a new stage's section appears here without editing this file. Every
field is documented once, with `Field(description=...)`; `cai config schema` prints them.
Unknown keys are errors (a typo must not silently fall back to a default), and errors name the
file, the line and the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)

from cai.eval_judges import eval_settings
from cai.groups import GroupSpec, check_groups
from cai.sections import EngineConfig, HFEngine, Section, TemplatesConfig
from cai.stages.registry import STAGE_ORDER, STAGES
from cai.yamlfile import (
    YAMLFileError,
    describe,
    file_loc,
    line_of,
    load_yaml_value,
    load_yaml_with_lines,
    read_yaml_file,
    yaml_error_line,
)


class RunSettings(Section):
    """Settings every stage shares; `RunConfig` adds one section per stage."""

    run_dir: Path = Field(Path("runs/default"), description="Where every stage writes its outputs.")
    seed: int = Field(0, description="Master seed; each stage derives its own from it.")
    model: str = Field(
        "smollm2-135m-instruct", description="Base helpful model: built-in name, local folder or hub id."
    )
    constitution: str = Field("harmless", description="Constitution file, or a shipped name.")
    constitutions: list[GroupSpec] | None = Field(
        None,
        description="A pluralistic run instead of `constitution`: stakeholder groups, each with a "
        "name, a constitution and a weight (label.groups.rule decides across them; sl uses the first).",
    )
    templates: TemplatesConfig = Field(default_factory=TemplatesConfig)
    engine: EngineConfig = Field(default_factory=HFEngine, description="Engine for all model calls.")

    @model_validator(mode="after")
    def _one_or_groups(self) -> RunSettings:
        if self.constitutions is not None:
            if "constitution" in self.model_fields_set:
                raise ValueError(
                    "give either `constitution` (one group) or `constitutions` (stakeholder groups), not both"
                )
            check_groups(self.constitutions)
        return self

    @model_serializer(mode="wrap")
    def _one_form(self, handler: SerializerFunctionWrapHandler) -> dict:
        # one-group configs dump (and hash) as before groups existed; group configs have no
        # `constitution` (it would be an error beside `constitutions`)
        data = handler(self)
        data.pop("constitutions" if self.constitutions is None else "constitution", None)
        return data


def _ordered(cls: type, stages: list[str]) -> list[str]:
    if len(set(stages)) != len(stages):
        raise ValueError("a stage is listed twice")
    if stages != sorted(stages, key=STAGE_ORDER.index):
        raise ValueError(f"stages must follow the order {', '.join(STAGE_ORDER)}")
    return stages


def _eval_judge_fits(config: Any) -> Any:
    """eval.judge reads the label section's settings: refuse, at load, a mode they cannot serve
    (a long `cai run` should not fail at its last stage)."""
    eval_settings(config.label, config.eval.judge, config.eval.harm_principles)
    return config


def _judge_can_read(config: Any) -> Any:
    """A judge mode the judge's engine cannot serve fails here, before any stage runs."""
    label = getattr(config, "label", None)
    if label is not None and label.judge == "likelihood":
        kind = (label.judge_engine or config.engine).kind
        if kind == "openai":
            raise ValueError(
                f"label.judge: likelihood needs log-probs of whole responses, which engine {kind!r} does "
                "not return; use hf or vllm for the judge (label.judge_engine)"
            )
    return config


def _groups_need_groups(config: Any) -> Any:
    """`label.groups` decides across stakeholder groups: without `constitutions` there are none."""
    label = getattr(config, "label", None)
    if label is not None and label.groups is not None and config.constitutions is None:
        raise ValueError("label.groups needs stakeholder groups: list them under `constitutions`")
    return config


def _compose() -> type[RunSettings]:
    """RunSettings + a section per stage that has one + the recipe (`stages`)."""
    sections: dict[str, Any] = {
        name: (stage.config, Field(default_factory=stage.config, description=stage.about))
        for name, stage in STAGES.items()
        if stage.config is not None
    }
    recipe = [name for name, stage in STAGES.items() if stage.default]
    stages = (
        list[Literal[STAGE_ORDER]],  # type: ignore[valid-type]
        Field(
            default_factory=lambda: list(recipe),
            description="Stages `cai run` runs, in this order (dpo and rloo are optional alternatives).",
        ),
    )
    return create_model(
        "RunConfig",
        __base__=RunSettings,
        __doc__="The whole run config: shared settings, one section per stage, and the recipe.",
        __validators__={
            "ordered": field_validator("stages")(_ordered),
            "eval_judge_fits": model_validator(mode="after")(_eval_judge_fits),
            "judge_can_read": model_validator(mode="after")(_judge_can_read),
            "groups_need_groups": model_validator(mode="after")(_groups_need_groups),
        },
        **sections,
        stages=stages,
    )


RunConfig = _compose()


class ConfigError(ValueError):
    """A config file or override is invalid; the message names file, line and field."""


def _set_dotted(data: dict, dotted: str, value: Any, source: str) -> None:
    """Set `a.b.0.c`: dict keys, and list positions by number (`mix.human.0.limit=8`)."""
    keys = dotted.split(".")
    node: Any = data
    for key in keys[:-1]:
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"{source}: cannot set {dotted!r}: no list item {key!r}")
            node = node[int(key)]
            continue
        child = node.setdefault(key, {})
        if not isinstance(child, dict | list):
            raise ConfigError(f"{source}: cannot set {dotted!r}: {key!r} is not a section")
        node = child
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{source}: cannot set {dotted!r}: no list item {last!r}")
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply `a.b=value` overrides; values are parsed as YAML (so `3`, `true`, `[a, b]` work)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        dotted, raw = item.split("=", 1)
        try:
            value = load_yaml_value(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {describe(exc)}") from None
        dotted = dotted.strip()
        parent, _, leaf = dotted.rpartition(".")
        if leaf == "kind" and parent:
            # switching a section's kind (engine.kind=openai) drops the old kind's fields
            section = _get_dotted(data, parent)
            if isinstance(section, dict) and section.get("kind") != value:
                _set_dotted(data, parent, {}, f"override {item!r}")
        _set_dotted(data, dotted, value, f"override {item!r}")
    return data


def _get_dotted(data: dict, dotted: str) -> Any:
    node: Any = data
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), model: type[BaseModel] | None = None
) -> Any:
    """Load a run config (a path or a shipped config name), apply overrides, validate."""
    from cai.resources import resolve_shipped

    model = model or RunConfig

    data: Any = {}
    lines: dict = {}
    source = "<defaults>"
    if path is not None:
        resolved = resolve_shipped(path, "configs", (".yaml", ".yml"))
        source = str(resolved)
        try:
            data, lines = load_yaml_with_lines(read_yaml_file(resolved))
        except YAMLFileError as exc:
            raise ConfigError(str(exc)) from None
        except yaml.YAMLError as exc:
            line = yaml_error_line(exc)
            where = f"{source}:{line}" if line else source
            raise ConfigError(f"{where}: {describe(exc)}") from None
        data = data or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a run config is a mapping of sections")
    config = _validate(model, data, lines, source)
    if not overrides:
        return config
    # Overrides apply on top of the validated config with every default filled in, so
    # `--set sl.sampling.max_new_tokens=16` keeps the section's other defaults.
    full = apply_overrides(config.model_dump(mode="json"), overrides)
    return _validate(model, full, {}, f"{source} + --set {' '.join(overrides)}")


def _validate(model: type[BaseModel], data: Any, lines: dict, source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            line = line_of(lines, loc)
            where = f"{source}:{line}" if line else source
            message = error["msg"] if error["type"] != "extra_forbidden" else "unknown key"
            if not loc:  # a rule across sections (RunConfig's own validator) names its fields itself
                message = message.removeprefix("Value error, ")
            field = ".".join(map(str, file_loc(lines, loc))) if lines else ".".join(map(str, loc))
            # a check across sections has no one field; its message names the fields
            problems.append(f"{where}: field '{field}': {message}" if field else f"{where}: {message}")
        raise ConfigError("\n".join(problems)) from None
