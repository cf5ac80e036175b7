"""Queries over label audit rows: which principle shaped this label, and how far to trust it.

    cai audit runs/demo --principle privacy --contested

A preference model learns whatever the labels say, so a surprising PM is debugged by asking
which principles produced its labels. Every label's audit row (`cai.records.LabelAudit`) carries
each principle's readings in both presentation orders, its verdict or why there is none, the
aggregation rule, the derived pairs with their contested flag and their decisive principles; this
package only reads those rows, so the answers are reproducible from files alone and never depend
on re-running a judge.

* `rows`: loading rows and the judge gate from a file, a stage folder or a run directory;
* `views`: one label as a reviewer reads it, and filters;
* `conflicts`: how often two principles (or groups) gave opposite verdicts on the same pair;
* `summary`: influence, contested pairs, judge quality, and `summarize` -> `AuditSummary`, the
  one typed summary that the terminal (`terminal`) and the HTML report (`cai.report`) render.
"""

from cai.audit.conflicts import (
    MIN_SHARED,
    ConflictCell,
    ConflictTable,
    Observation,
    UnitContest,
    conflict_notes,
    conflict_table,
    group_conflicts,
    principle_conflicts,
)
from cai.audit.groups import GroupShare, GroupsTable, group_shares
from cai.audit.rows import AUDIT_FILE, LABEL_STAGE, audit_file, load_audit, load_gate
from cai.audit.summary import (
    AuditSummary,
    ContestedPair,
    JudgeQuality,
    PrincipleInfluence,
    contested_labels,
    gold_item,
    judge_quality,
    principle_influence,
    quality_items,
    quality_warnings,
    soft_label_histogram,
    summarize,
)
from cai.audit.terminal import (
    print_conflicts,
    print_contested,
    print_groups,
    print_influence,
    print_label,
    print_quality,
    print_summary,
)
from cai.audit.views import LabelView, PairView, VoteView, filter_labels, label_view

__all__ = [
    "GroupShare",
    "GroupsTable",
    "group_shares",
    "print_groups",
    "AUDIT_FILE",
    "LABEL_STAGE",
    "MIN_SHARED",
    "AuditSummary",
    "ConflictCell",
    "ConflictTable",
    "ContestedPair",
    "JudgeQuality",
    "LabelView",
    "Observation",
    "PairView",
    "PrincipleInfluence",
    "UnitContest",
    "VoteView",
    "audit_file",
    "conflict_notes",
    "conflict_table",
    "contested_labels",
    "filter_labels",
    "gold_item",
    "group_conflicts",
    "judge_quality",
    "label_view",
    "load_audit",
    "load_gate",
    "principle_conflicts",
    "principle_influence",
    "print_conflicts",
    "print_contested",
    "print_influence",
    "print_label",
    "print_quality",
    "print_summary",
    "quality_items",
    "quality_warnings",
    "soft_label_histogram",
    "summarize",
]
