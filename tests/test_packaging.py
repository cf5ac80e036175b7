"""The wheel carries constitutions, templates, configs and data, and an installed cai finds them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            root,
        ],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("cai-*.whl")
    return path


def test_wheel_contains_shipped_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "cai/_shipped/constitutions/harmless.yaml",
        "cai/_shipped/constitutions/hhh.yaml",
        "cai/_shipped/prompts/compare.j2",
        "cai/_shipped/prompts/critique_request.j2",
        "cai/data/red_team.jsonl",
        "cai/data/hh_helpful.jsonl",
        "cai/data/gold_harmless.jsonl",
    ):
        assert expected in names, expected
    # every module of every subpackage (cli/, audit/, report/, stages/, train/ppo/...) ships
    root = Path(__file__).resolve().parent.parent
    modules = {p.relative_to(root).as_posix() for p in (root / "cai").rglob("*.py")}
    assert modules - names == set()
    assert any(n.startswith("cai/_shipped/configs/") and n.endswith(".yaml") for n in names)
    assert not any(n.startswith("tests/") for n in names)


def test_installed_wheel_finds_its_resources_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import cai, cai.resources as r, cai.constitution as c; "
        "print(cai.__file__); print(r.shipped_dir('constitutions')); "
        "print(len(c.load_constitution('harmless').principles))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=True
    )
    module, folder, count = out.stdout.split()
    assert module.startswith(str(target))
    assert folder == str(target / "cai" / "_shipped" / "constitutions")
    assert int(count) >= 16
