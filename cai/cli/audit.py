"""`cai audit`: which principle shaped each label, from a run directory, a folder or a config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cai.cli.app import SetOption, app, console, context, err_console, fail


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
    conflicts: Annotated[
        bool,
        typer.Option(
            "--conflicts",
            help="Show only how often two principles (and groups) gave opposite verdicts on the same pairs.",
        ),
    ] = False,
    groups: Annotated[
        bool,
        typer.Option(
            "--groups",
            help="Pluralistic runs: each group's weight, the pairs the groups disagreed on, and each "
            "group's share of them (target vs achieved).",
        ),
    ] = False,
) -> None:
    """Which principle shaped each label: readings in both orders, verdicts, decisive principles."""
    from cai.audit import (
        filter_labels,
        label_view,
        load_audit,
        load_gate,
        print_conflicts,
        print_label,
        print_summary,
        summarize,
    )
    from cai.constitution import ConstitutionError, load_constitution

    if (run_dir is None) == (config is None):
        fail("give a run directory (or label folder, or audit.jsonl) or --config, not both and not neither")
    if config is not None:
        ctx = context(config, set_)
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
    if groups:
        from cai.audit import group_shares, print_groups

        table = group_shares(selected)
        if table is None:
            fail("these labels come from a one-group run (no `constitutions:`): there are no groups")
        print_groups(console, table)
        return
    if label is not None:
        matches = [r for r in rows if label in (r.label_id, r.row_id)]
        if not matches:
            fail(f"no label {label!r} (label ids look like {rows[0].label_id!r})" if rows else "no labels")
        print_label(console, label_view(matches[0]))
        return
    summary = summarize(selected, gate, failures)
    if conflicts:
        print_conflicts(console, summary.conflicts)
        if summary.group_conflicts is not None:
            print_conflicts(console, summary.group_conflicts)
    else:
        print_summary(console, summary, cons)
        for row in selected[:limit] if (principle or tag or contested is not None) else []:
            print_label(console, label_view(row))
    if html is not None:
        from cai.report import write_report

        write_report(
            html,
            audit=summary,
            ppo_history=None,
            eval_rows=None,
            pm_metrics=None,
            summary=None,
            title=f"cai audit {run_dir}",
            constitution=cons,
        )
        console.print(f"[green]html:[/] {html}", markup=True, highlight=False)
