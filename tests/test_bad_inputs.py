"""Bad input, as a user types it: every file kind cai reads, each broken one way, through the CLI.

For each case the command must fail (exit 1) with a message that names the file (and line or
field where there is one) and says what is wrong, and nothing already written in the run
directory may change. The run directory holds a finished label stage, so `cai mix` reaches the
human preference files.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from cai.cli import app
from cai.config import load_config
from cai.stages.context import StageContext
from cai.testing import EchoBackend

GOOD_PRINCIPLE = "  - id: careful\n    compare: Which response is more careful?\n"
GOOD = 'name: mine\nversion: "1"\nprinciples:\n' + GOOD_PRINCIPLE


def bomb(levels: int = 9) -> str:
    """A 'billion laughs' YAML: each level repeats the one before 9 times (9^9 values)."""
    lines = ["name: bomb", 'version: "1"', "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    previous = "a"
    for name in "bcdefghijk"[: levels - 1]:
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
        previous = name
    lines.append(f"principles: *{previous}")
    return "\n".join(lines) + "\n"


# (id, file name, content, expected fragments of the message); {file} is the file's path
CONSTITUTIONS = [
    ("yaml-syntax", "c.yaml", GOOD + "  - id: [broken\n", ["c.yaml:", "YAML syntax"]),
    ("alias-bomb", "c.yaml", bomb(), ["c.yaml:", "expands to more than 100,000 values", "aliases"]),
    (
        "oversized",
        "c.yaml",
        GOOD + "# " + "x" * 1_100_000 + "\n",
        ["c.yaml", "over the 1,000,000-byte limit"],
    ),
    ("binary", "c.yaml", b"\x00\x01\x02binary\x00", ["c.yaml", "binary file"]),
    ("not-utf8", "c.yaml", GOOD.encode() + "caf\xe9".encode("latin-1"), ["c.yaml", "not UTF-8"]),
    ("empty", "c.yaml", "", ["c.yaml:1", "a constitution is a mapping"]),
    ("a-list", "c.yaml", "- one\n- two\n", ["c.yaml:1", "a constitution is a mapping"]),
    (
        "unknown-key",
        "c.yaml",
        GOOD + "    colour: red\n",
        ["c.yaml:6", "principle 'careful'", "unknown key 'colour'"],
    ),
    (
        "duplicate-id",
        "c.yaml",
        GOOD + GOOD_PRINCIPLE,
        ["c.yaml:6", "principles.1.id", "duplicate principle id 'careful'"],
    ),
    (
        "bad-id",
        "c.yaml",
        GOOD.replace("careful", "Be_Careful"),
        ["c.yaml:4", "does not match the id pattern", "lowercase letters"],
    ),
    ("template-syntax", "c.yaml", GOOD.replace("more careful", "{{ 7*7 }}"), ["c.yaml:5", "template syntax"]),
    (
        "wrong-type",
        "c.yaml",
        'name: mine\nversion: "1"\nprinciples: everything\n',
        ["c.yaml:3", "principles"],
    ),
    (
        "duplicate-key",
        "c.yaml",
        GOOD.replace("name: mine\n", "name: mine\nname: yours\n"),
        ["c.yaml:2", "duplicate key 'name'"],
    ),
    ("bad-weight", "c.yaml", GOOD + "    weight: -2\n", ["c.yaml:6", "weight", "greater than 0"]),
]

CONFIG = yaml.safe_dump({"run_dir": "runs/x", "sl": {"rounds": 2}})
CONFIGS = [
    ("unknown-key", "r.yaml", "sl:\n  roundz: 2\n", ["r.yaml:2", "field 'sl.roundz'", "unknown key"]),
    ("wrong-type", "r.yaml", "sl:\n  rounds: many\n", ["r.yaml:2", "field 'sl.rounds'", "valid integer"]),
    ("yaml-syntax", "r.yaml", "sl: {rounds: 2\n", ["r.yaml:", "YAML syntax"]),
    ("binary", "r.yaml", b"sl:\x00\x00", ["r.yaml", "binary file"]),
    ("alias-bomb", "r.yaml", bomb().replace("principles:", "notes:"), ["r.yaml:", "expands to more than"]),
    ("stage-order", "r.yaml", "stages: [label, sl]\n", ["r.yaml:1", "stages must follow the order"]),
    ("engine-kind", "r.yaml", "engine: {kind: tpu}\n", ["r.yaml:1", "engine"]),
    ("a-list", "r.yaml", "- sl\n", ["r.yaml", "a run config is a mapping of sections"]),
    ("margin-range", "r.yaml", "label: {min_margin: 0.7}\n", ["r.yaml:1", "label.min_margin"]),
]

OVERRIDES = [
    ("no-equals", ["sl.rounds"], ["'sl.rounds'", "is not of the form key.path=value"]),
    ("unknown-field", ["sl.roundz=3"], ["field 'sl.roundz'", "unknown key"]),
    ("bad-yaml-value", ["sl.principles=[a,"], ["'sl.principles=[a,'", "the value is not valid YAML"]),
    ("list-index", ["mix.human.5.limit=3"], ["mix.human.5.limit", "no list item '5'"]),
    ("into-a-scalar", ["seed.x=1"], ["seed.x", "'seed' is not a section"]),
]

PROMPTS = [
    ("truncated-jsonl", "p.jsonl", '{"prompt": "fine"}\n{"prompt": "cut', ["p.jsonl:2", "not valid JSON"]),
    (
        "wrong-column",
        "p.jsonl",
        '{"text": "hello"}\n',
        ["p.jsonl:1", "no column 'prompt'", "set prompts.column"],
    ),
    ("binary", "p.jsonl", b"\x00\x00\x00", ["p.jsonl", "binary file"]),
    ("json-object", "p.json", '{"prompt": "one"}', ["p.json", "holds a JSON array"]),
    ("empty-prompt", "p.json", '["a real prompt", "  "]', ["p.json item 2", "empty prompt"]),
    (
        "number-prompt",
        "p.jsonl",
        '{"prompt": 42}\n',
        ["p.jsonl:1", "a prompt is a string or a list of messages, got int"],
    ),
    (
        "ends-with-assistant",
        "p.jsonl",
        json.dumps({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        + "\n",
        ["p.jsonl:1", "must end with a user turn"],
    ),
    ("unsupported-type", "p.xml", "<prompts/>", ["p.xml", "unsupported prompt file type '.xml'"]),
]

PREFERENCES = [
    (
        "json-array",
        "h.jsonl",
        "jsonl",
        json.dumps([{"prompt": "p", "chosen": "a", "rejected": "b"}], indent=1),
        ["h.jsonl", "none of its", "looks like a JSON array"],
    ),
    (
        "truncated-gzip",
        "h.jsonl.gz",
        "hh",
        gzip.compress(b'{"chosen": "x"}\n' * 50)[:40],
        ["h.jsonl.gz", "unreadable"],
    ),
    (
        "malformed-hh",
        "h.jsonl",
        "hh",
        json.dumps({"chosen": "Human: hi", "rejected": "\n\nHuman: hi\n\nAssistant: yo"}) + "\n",
        ["h.jsonl", "none of its 1 rows", "h.jsonl:1", "chosen"],
    ),
    ("empty", "h.jsonl", "jsonl", "\n", ["h.jsonl", "holds no preference pairs"]),
    (
        "not-trl",
        "h.parquet",
        "trl",
        b"PAR1 not really parquet",
        ["h.parquet", "not a readable TRL preference dataset"],
    ),
]


def write(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})


def said(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A config with a finished label stage (echo engine), so later stages reach their inputs."""
    root = tmp_path_factory.mktemp("bad-inputs")
    config = root / "run.yaml"
    data = {
        "run_dir": str(root / "run"),
        "model": "echo",
        "sl": {"prompts": {"path": "red_team.jsonl", "limit": 2}},
        "label": {"prompts": {"path": "red_team.jsonl", "limit": 2}, "gold": None, "chunk_size": 2},
        "mix": {"human": [{"path": "hh_helpful.jsonl", "format": "hh", "limit": 4}]},
        "stages": ["sl", "label", "mix"],
    }
    config.write_text(yaml.safe_dump(data))
    ctx = StageContext(load_config(config), Console(file=open(os.devnull, "w")))
    ctx._backends[f"echo|{ctx.config.engine.model_dump_json()}"] = EchoBackend()
    ctx.stage("label").run(ctx)
    return root, config


@pytest.mark.parametrize(
    ("case", "name", "content", "expected"), CONSTITUTIONS, ids=[c[0] for c in CONSTITUTIONS]
)
def test_bad_constitution(tmp_path, case, name, content, expected):
    path = write(tmp_path, name, content)
    started = time.perf_counter()
    result = invoke("constitution", "validate", str(path))
    elapsed = time.perf_counter() - started
    assert result.exit_code == 1, result.output
    for fragment in expected:
        assert fragment in said(result), (fragment, result.output)
    assert elapsed < 2.0  # a 9-level alias bomb took 30+ s and 2.7 GB before the limit


@pytest.mark.parametrize(("case", "name", "content", "expected"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_bad_config(tmp_path, case, name, content, expected):
    path = write(tmp_path, name, content)
    started = time.perf_counter()
    result = invoke("config", "show", str(path))
    assert result.exit_code == 1, result.output
    for fragment in expected:
        assert fragment in said(result), (fragment, result.output)
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(("case", "overrides", "expected"), OVERRIDES, ids=[c[0] for c in OVERRIDES])
def test_bad_override(case, overrides, expected):
    args = [arg for item in overrides for arg in ("--set", item)]
    result = invoke("config", "show", "quickstart", *args)
    assert result.exit_code == 1, result.output
    for fragment in expected:
        assert fragment in said(result), (fragment, result.output)


def test_an_alias_bomb_in_an_override_is_refused_at_once():
    # one line, seven levels of ten references each: 10^7 values once expanded
    value = (
        "[&l0 [a, a, a, a, a, a, a, a, a, a]"
        + "".join(f", &l{n} [" + ", ".join([f"*l{n - 1}"] * 10) + "]" for n in range(1, 7))
        + "]"
    )
    started = time.perf_counter()
    result = invoke("config", "show", "quickstart", "--set", f"sl.tags={value}")
    assert result.exit_code == 1 and "expands to more than 100,000 values" in said(result)
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(("case", "name", "content", "expected"), PROMPTS, ids=[c[0] for c in PROMPTS])
def test_bad_prompt_file(run, tmp_path, case, name, content, expected):
    root, config = run
    path = write(tmp_path, name, content)
    before = snapshot(root / "run")
    result = invoke("generate", "sl", "-c", str(config), "--set", f"sl.prompts.path={path}")
    assert result.exit_code == 1, result.output
    for fragment in expected:
        assert fragment in said(result), (fragment, result.output)
    assert snapshot(root / "run") == before  # nothing written, nothing lost


def test_a_missing_prompt_file_names_itself(run, tmp_path):
    root, config = run
    result = invoke(
        "generate", "sl", "-c", str(config), "--set", f"sl.prompts.path={tmp_path / 'none.jsonl'}"
    )
    assert (
        result.exit_code == 1
        and "none.jsonl" in said(result)
        and "neither an existing path nor a shipped file" in said(result)
    )


@pytest.mark.parametrize(
    ("case", "name", "format", "content", "expected"), PREFERENCES, ids=[c[0] for c in PREFERENCES]
)
def test_bad_human_preference_file(run, tmp_path, case, name, format, content, expected):
    root, config = run
    path = write(tmp_path, name, content)
    before = snapshot(root / "run")
    result = invoke(
        "mix", "-c", str(config), "--set", f"mix.human.0.path={path}", "--set", f"mix.human.0.format={format}"
    )
    assert result.exit_code == 1, result.output
    for fragment in expected:
        assert fragment in said(result), (fragment, result.output)
    assert snapshot(root / "run") == before


def test_a_missing_preference_file_names_itself(run, tmp_path):
    root, config = run
    result = invoke("mix", "-c", str(config), "--set", f"mix.human.0.path={tmp_path / 'gone.jsonl'}")
    assert result.exit_code == 1 and "gone.jsonl" in said(result)


def test_inputs_that_look_odd_but_are_fine(run, tmp_path):
    """version: 1 is the version '1'; prompts may be a .txt (one per line) or a JSON array."""
    good = write(tmp_path, "v.yaml", GOOD.replace('version: "1"', "version: 1"))
    result = invoke("constitution", "validate", str(good))
    assert result.exit_code == 0 and "mine v1," in said(result)
    from cai.sources import PromptSource, load_prompts

    text = write(tmp_path, "p.txt", "How do I boil an egg?\n\n  \nWhat is DNS?\n")
    assert [i.prompt[0]["content"] for i in load_prompts(PromptSource(path=str(text)))] == [
        "How do I boil an egg?",
        "What is DNS?",
    ]
    array = write(tmp_path, "p.json", json.dumps(["one", {"prompt": "two"}]))
    assert [i.prompt[0]["content"] for i in load_prompts(PromptSource(path=str(array)))] == ["one", "two"]
    lines = write(tmp_path, "old.json", '{"prompt": "one"}\n{"prompt": "two"}\n')  # JSON lines named .json
    assert len(load_prompts(PromptSource(path=str(lines)))) == 2


def test_error_text_is_printed_as_written(tmp_path):
    """Text in [brackets] (a regex, a user's id) must never be eaten as rich markup."""
    path = write(tmp_path, "c.yaml", GOOD.replace("careful", "'[red]x[/red]'"))
    result = invoke("constitution", "validate", str(path))
    assert result.exit_code == 1 and "'[red]x[/red]' does not match the id pattern" in said(result)
    result = invoke("config", "show", "quickstart", "--set", "sl.tags=[[bold]]")
    assert result.exit_code == 1 and "--set sl.tags=[[bold]]" in said(result)


def test_there_are_at_least_thirty_bad_inputs():
    assert len(CONSTITUTIONS) + len(CONFIGS) + len(OVERRIDES) + len(PROMPTS) + len(PREFERENCES) >= 30
