"""The `cai` command line: each command parses its arguments and calls one stage function.

    cai --help

`app.py` holds the typer apps and shared options; `stages.py` one command per registered stage
plus `run` and `report`; `audit.py` the audit; `judge.py` the judge check; `tools.py`
constitutions, prompts, configs and models. Importing them registers their commands.
"""

from __future__ import annotations

from cai.cli import audit, judge, stages, tools  # noqa: F401 - importing registers the commands
from cai.cli.app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
