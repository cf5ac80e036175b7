"""The label stage with stakeholder groups (`constitutions:` in the run config).

    cai label --config configs/pluralistic.yaml

Each group's principles are drawn per label (seeded per group) from its own constitution and
judge the label's responses; `cai.group_labels` turns the groups' verdicts into the label. Under
`label.groups.rule: proportional` the contested pairs are apportioned when the stage finalizes,
from the committed rows alone (`settle`), so a resumed stage decides exactly as an uninterrupted
one. One-group configs never reach this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cai.chats import ChatBuilder
from cai.constitution import Constitution, load_constitution
from cai.group_labels import GroupHead, group_label
from cai.groups import GroupSpec, GroupsRule, normalise_weights
from cai.hashing import derive_seed
from cai.judge import LabelMeta, choose_principles, judge, weighting
from cai.records import LabelAudit, LabelResult

if TYPE_CHECKING:
    from cai.stages.context import StageContext


@dataclass(frozen=True)
class Group:
    """A stakeholder group as the label stage uses it: its spec, share, constitution and chats."""

    spec: GroupSpec
    weight: float
    constitution: Constitution
    builder: ChatBuilder


def load_groups(ctx: StageContext) -> list[Group]:
    """The config's groups with their constitutions loaded and weights normalised (empty: one group)."""
    specs = ctx.config.constitutions or []
    shares = normalise_weights({g.name: g.weight for g in specs})
    groups = []
    for spec in specs:
        constitution = load_constitution(spec.constitution)
        groups.append(Group(spec, shares[spec.name], constitution, ChatBuilder(ctx.templates, constitution)))
    return groups


def groups_key(ctx: StageContext) -> dict:
    """What the groups add to the label stage's key (nothing for one-group configs)."""
    if not ctx.groups:
        return {}
    return {
        "group_rule": (ctx.config.label.groups or GroupsRule()).rule,
        "groups": [
            {
                "name": g.spec.name,
                "weight": g.spec.weight,
                "constitution": g.constitution.name,
                "constitution_stage_hash": g.constitution.stage_hash("compare", ctx.config.label.judge),
            }
            for g in ctx.groups
        ],
    }


def groups_summary(ctx: StageContext, audits: list[LabelAudit]) -> dict:
    """For the stage summary (and so its manifest): the weights as configured, the sum they were
    normalised by, the normalised shares, and each group's share of the disagreed pairs."""
    from cai.audit.groups import group_shares

    table = group_shares(audits)
    return {
        "rule": (ctx.config.label.groups or GroupsRule()).rule,
        "normalisation": sum(g.spec.weight for g in ctx.groups),
        "weights": {g.spec.name: {"raw": g.spec.weight, "normalised": g.weight} for g in ctx.groups},
        **(table.model_dump(mode="json", exclude={"rule"}) if table is not None else {}),
    }


def judge_groups(ctx: StageContext, ready, number: int, backend, meta: LabelMeta) -> list[LabelResult]:
    """Judge the ready labels of one chunk under every group's principles; build their labels.

    `ready` holds (row_id, item, responses). One judge call per group (a group's principle
    weights count in its own draw or aggregation, as in a one-group run).
    """
    cfg = ctx.config.label
    votes: list[list] = [[] for _ in ready]
    heads: list[list[GroupHead]] = [[] for _ in ready]
    for group in ctx.groups:
        seed = derive_seed(ctx.config.seed, "group", group.spec.name)
        chosen = [choose_principles(group.constitution, cfg.principles, seed, row_id) for row_id, *_ in ready]
        judged = judge(
            backend,
            group.builder,
            [item.prompt for _, item, _ in ready],
            [responses for _, _, responses in ready],
            chosen,
            cfg,
            group.constitution.examples.compare[: cfg.few_shot],
            seed=derive_seed(ctx.config.seed, "cot", number, group.spec.name),
            weighted=weighting(group.constitution, cfg.principles) == "aggregation",
        )
        for n, (principles, label_votes) in enumerate(zip(chosen, judged, strict=True)):
            votes[n] += [v.model_copy(update={"group": group.spec.name}) for v in label_votes]
            heads[n].append(
                GroupHead(
                    name=group.spec.name,
                    weight=group.weight,
                    raw_weight=group.spec.weight,
                    constitution=group.constitution.name,
                    constitution_hash=group.constitution.hash,
                    principles=tuple(p.id for p in principles),
                )
            )
    results = []
    for (row_id, item, responses), label_votes, label_heads in zip(ready, votes, heads, strict=True):
        audit, rows = group_label(row_id, item.prompt, responses, label_votes, label_heads, cfg, meta)
        results.append(
            LabelResult(row_id=row_id, config_hash=meta.config_hash, audit=audit, preferences=rows)
        )
    return results
