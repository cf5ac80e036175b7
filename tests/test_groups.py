"""Pluralistic feedback: stakeholder groups and the rules across them, on hand-worked profiles.

The emoji profile (Peters, ECAI 2024): 60% of raters dislike emojis, 40% like them. A
per-comparison majority decides every emoji comparison against emojis (10/0 on 10 labels); the
proportional rule gives each group a share of the contested labels equal to its weight (6/4).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from cai.audit import group_shares
from cai.config import ConfigError, load_config
from cai.group_labels import GroupHead, group_label, settle
from cai.groups import Contest, GroupsRule, apportion, collective_ranking, maximin_rule, normalise_weights
from cai.judge import LabelConfig, LabelMeta
from cai.records import LabelAudit, LabelResult, PairVote
from cai.rules import PrincipleVote
from cai.testing import EchoBackend
from tests.echo_recipe import echo_context, write_config

META = LabelMeta("judge", "policy", "c", "hash", {"compare.j2": "h"}, "cfg")


def heads(weights: dict[str, float]) -> list[GroupHead]:
    shares = normalise_weights(weights)
    return [GroupHead(g, shares[g], w, g, f"hash-{g}", ("p",)) for g, w in weights.items()]


def vote(group: str, i: int, j: int, p: float | None, principle: str = "p") -> PairVote:
    """A principle of `group` on pair (i, j): a verdict when p is clear of 0.5."""
    verdict = None if p is None or abs(p - 0.5) < 0.05 else (i if p > 0.5 else j)
    return PairVote(
        principle_id=principle,
        group=group,
        weight=1.0,
        i=i,
        j=j,
        orders=[],
        p_i_better=p,
        verdict=verdict,
        no_verdict=None if verdict is not None else ("abstained" if p is None else "below-margin"),
    )


def label(n: int, weights: dict[str, float], ps: dict[str, float | None], rule: str, k: int = 2, **cfg):
    """One K = 2 label: each group's one principle gives P(response 0 better) = ps[group]."""
    config = LabelConfig(groups=GroupsRule(rule=rule), responses=k, **cfg)
    votes = [vote(g, 0, 1, p) for g, p in ps.items()]
    audit, rows = group_label(
        f"x:{n}", [{"role": "user", "content": "?"}], ["a", "b"], votes, heads(weights), config, META
    )
    return LabelResult(row_id=f"x:{n}", config_hash="cfg", audit=audit, preferences=rows), config


def run_labels(profile: list[dict[str, float | None]], weights: dict[str, float], rule: str, seed: int = 0):
    results = []
    config = None
    for n, ps in enumerate(profile):
        result, config = label(n, weights, ps, rule)
        results.append(result)
    return settle(results, config, seed)


def decided(results) -> dict[str | None, int]:
    table = group_shares([r.audit for r in results])
    return {g.name: g.decided for g in table.groups}


EMOJI = {"plain": 0.6, "emoji": 0.4}


def emoji_profile(n: int, strengths: bool = True):
    """n labels; response 0 has no emoji: 'plain' prefers it, 'emoji' prefers response 1."""
    return [{"plain": 0.9 - 0.02 * (i % 5) if strengths else 0.8, "emoji": 0.2} for i in range(n)]


# --------------------------------------------------------------------------- pure rules


def test_weights_are_normalised_shares():
    assert normalise_weights({"a": 3, "b": 2}) == {"a": 0.6, "b": 0.4}
    with pytest.raises(ValueError, match="finite and > 0"):
        normalise_weights({"a": 1, "b": 0})


def test_emoji_profile_majority_gives_the_majority_every_label():
    results = run_labels(emoji_profile(10), EMOJI, "weighted_majority")
    assert decided(results) == {"plain": 10, "emoji": 0}
    assert all(r.audit.pairs[0].chosen == 0 for r in results)  # no emoji, every time
    assert all(r.preferences[0].group == "plain" for r in results)


def test_emoji_profile_proportional_gives_60_40():
    results = run_labels(emoji_profile(10), EMOJI, "proportional")
    assert decided(results) == {"plain": 6, "emoji": 4}
    assert sum(r.audit.pairs[0].chosen == 1 for r in results) == 4  # emoji responses chosen 4 times
    table = group_shares([r.audit for r in results])
    assert [(g.weight, g.achieved) for g in table.groups] == [(0.6, 0.6), (0.4, 0.4)]
    for r in results:
        (by,) = r.audit.decided_by
        assert by.reason == "apportioned" and by.seat in range(1, 11)
        assert r.preferences[0].group == by.group
        # the apportioned group's own probability is the soft label: a minority's row is a row
        assert r.audit.training == ["row"] and r.audit.pairs[0].soft_label >= 0.5
    assert sorted(r.audit.decided_by[0].seat for r in results) == list(range(1, 11))


def test_each_group_takes_the_labels_it_feels_strongest_about_first():
    # 'emoji' feels strongly (p = 0.05) on labels 7..9 and mildly on the rest: it decides those 3
    # and one more; 'plain' is equally sure everywhere
    profile = [{"plain": 0.8, "emoji": 0.05 if i >= 7 else 0.4} for i in range(10)]
    results = run_labels(profile, EMOJI, "proportional")
    emoji = {r.audit.row_id for r in results if r.audit.decided_by[0].group == "emoji"}
    assert {"x:7", "x:8", "x:9"} <= emoji and len(emoji) == 4


def test_odd_counts_stay_within_one_label_of_the_quota():
    for n in (3, 7, 11, 13):
        got = decided(run_labels(emoji_profile(n), EMOJI, "proportional"))
        assert abs(got["plain"] - 0.6 * n) < 1 and abs(got["emoji"] - 0.4 * n) < 1
        assert got["plain"] + got["emoji"] == n
    assert decided(run_labels(emoji_profile(7), EMOJI, "proportional")) == {"plain": 4, "emoji": 3}


def test_three_groups_get_5_3_2_of_ten_contested_labels():
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    contests = [
        Contest(f"l{i}", {"a": 1, "b": -1, "c": 1 if i % 2 else -1}, {"a": 0.3, "b": 0.3, "c": 0.3})
        for i in range(10)
    ]
    seats = apportion(contests, weights, seed=0)
    counts = {g: sum(s.group == g for s in seats.values()) for g in weights}
    assert counts == {"a": 5, "b": 3, "c": 2}
    # the same through labels: the three groups disagree on every label
    profile = [{"a": 0.8, "b": 0.2, "c": 0.8 if i % 2 else 0.2} for i in range(10)]
    assert decided(run_labels(profile, weights, "proportional")) == {"a": 5, "b": 3, "c": 2}


def test_ties_are_broken_by_the_seed_deterministically():
    weights = {"a": 1.0, "b": 1.0}  # equal weights, equal strengths: every choice is a tie
    contests = [Contest(f"l{i}", {"a": 1, "b": -1}, {"a": 0.3, "b": 0.3}) for i in range(3)]
    outcomes = set()
    for seed in range(12):
        first = apportion(contests, weights, seed)
        assert first == apportion(list(reversed(contests)), weights, seed)  # input order is no tie-break
        assert sorted(s.group for s in first.values()) in (["a", "a", "b"], ["a", "b", "b"])
        outcomes.add(tuple(sorted((k, s.group) for k, s in first.items())))
    assert len(outcomes) > 1  # the seed, not the name or the position, breaks the ties


def test_groups_that_agree_everywhere_change_nothing():
    profile = [{"plain": 0.8, "emoji": 0.7 if i % 3 else 0.5} for i in range(9)]  # 'emoji' abstains on some
    runs = {
        rule: run_labels(profile, EMOJI, rule) for rule in ("weighted_majority", "proportional", "maximin")
    }
    for rule, results in runs.items():
        assert all(r.audit.pairs[0].chosen == 0 for r in results), rule
        assert all(r.audit.decided_by[0].reason == "consensus" for r in results), rule
        assert group_shares([r.audit for r in results]).disagreed == 0
    strip = [[(r.audit.pairs, r.preferences) for r in results] for results in runs.values()]
    assert strip[0] == strip[1] == strip[2]


def test_groups_without_a_verdict_take_no_part_and_labels_without_any_are_no_verdict_labels():
    (result, _) = label(0, EMOJI, {"plain": 0.52, "emoji": None}, "proportional")
    assert not result.audit.has_verdict and result.audit.decided_by[0].reason == "no-verdict"
    assert result.audit.training == ["no-verdict"] and result.preferences == []
    (result, _) = label(1, EMOJI, {"plain": 0.52, "emoji": 0.2}, "proportional")  # only 'emoji' votes
    assert result.audit.decided_by[0].reason == "consensus" and result.audit.decided_by[0].group == "emoji"
    assert result.audit.pairs[0].chosen == 1


def test_maximin_protects_the_least_satisfied_group_where_the_majority_does_not():
    # 'plain' barely prefers response 0 (0.55); 'emoji' strongly prefers response 1 (0.1)
    ballots = [
        PrincipleVote(principle_id="plain", weight=0.6, prefs=[[0.5, 0.55], [0.45, 0.5]]),
        PrincipleVote(principle_id="emoji", weight=0.4, prefs=[[0.5, 0.1], [0.9, 0.5]]),
    ]
    assert collective_ranking(ballots, "weighted_majority").ranking == [0, 1]
    outcome = maximin_rule(ballots)
    assert outcome.ranking == [1, 0] and outcome.scores == [0.1, 0.45]  # min satisfaction per response
    (result, _) = label(0, EMOJI, {"plain": 0.6, "emoji": 0.1}, "maximin")
    assert result.audit.pairs[0].chosen == 1 and result.audit.decided_by[0].group == "emoji"


def test_ranking_rules_take_group_ballots_weighted_by_group_weight():
    k3 = [[0.5, 0.9, 0.9], [0.1, 0.5, 0.9], [0.1, 0.1, 0.5]]  # 0 > 1 > 2
    flipped = [[0.5, 0.1, 0.1], [0.9, 0.5, 0.1], [0.9, 0.9, 0.5]]  # 2 > 1 > 0
    ballots = [
        PrincipleVote(principle_id="a", weight=0.6, prefs=k3),
        PrincipleVote(principle_id="b", weight=0.4, prefs=flipped),
    ]
    for rule in ("borda", "copeland", "kemeny", "ranked_pairs", "weighted_majority"):
        assert collective_ranking(ballots, rule).ranking == [0, 1, 2], rule
    heavy_b = [ballots[0].model_copy(update={"weight": 0.4}), ballots[1].model_copy(update={"weight": 0.6})]
    assert collective_ranking(heavy_b, "borda").ranking == [2, 1, 0]


def test_three_responses_are_decided_per_derived_pair():
    """K = 3, best_worst: the groups' collective ranking gives one (best, worst) pair; each group's
    verdict on that pair is its own verdict on those two responses; the apportioned group's side wins."""
    config = LabelConfig(groups=GroupsRule(rule="proportional"), responses=3)
    results = []
    for n in range(5):
        votes = [
            vote("plain", 0, 1, 0.8),
            vote("plain", 0, 2, 0.9),
            vote("plain", 1, 2, 0.8),  # 0 > 1 > 2
            vote("emoji", 0, 1, 0.2),
            vote("emoji", 0, 2, 0.1),
            vote("emoji", 1, 2, 0.2),  # 2 > 1 > 0
        ]
        audit, rows = group_label(f"x:{n}", [], ["a", "b", "c"], votes, heads(EMOJI), config, META)
        assert audit.outcome.ranking == [0, 1, 2] and audit.decided_by[0].reason == "pending"
        results.append(LabelResult(row_id=f"x:{n}", config_hash="cfg", audit=audit, preferences=rows))
    settled = settle(results, config, seed=0)
    pairs = [(r.audit.pairs[0].chosen, r.audit.pairs[0].rejected) for r in settled]
    assert sorted(pairs) == [(0, 2)] * 3 + [(2, 0)] * 2  # 5 labels at 60/40: 3 and 2
    for r in settled:
        plain, emoji = r.audit.groups
        assert plain.verdict == [0] and emoji.verdict == [2] and plain.ranking == [0, 1, 2]
        assert r.preferences[0].group == r.audit.decided_by[0].group


def test_settling_is_a_pure_function_of_the_rows():
    results = run_labels(emoji_profile(10), EMOJI, "proportional", seed=5)
    config = LabelConfig(groups=GroupsRule(rule="proportional"))
    unsettled = [label(n, EMOJI, ps, "proportional")[0] for n, ps in enumerate(emoji_profile(10))]
    again = settle(list(reversed(unsettled)), config, 5)
    assert sorted(r.model_dump_json() for r in again) == sorted(r.model_dump_json() for r in results)


# --------------------------------------------------------------------------- config


def group_config(path: Path, run_dir: Path, rule: str = "proportional", weights=(3, 2), **label) -> Path:
    write_config(path, run_dir, ["label"], groups={"rule": rule}, principles={"count": 2}, **label)
    data = yaml.safe_load(path.read_text())
    data["constitutions"] = [
        {"name": "frank", "constitution": "frank", "weight": weights[0]},
        {"name": "cautious", "constitution": "cautious", "weight": weights[1]},
    ]
    data["label"]["prompts"]["limit"] = 10
    path.write_text(yaml.safe_dump(data))
    return path


def test_config_errors_name_the_fields(tmp_path):
    base = {"constitutions": [{"name": "a", "constitution": "harmless", "weight": 1}]}
    cases = [
        ({**base, "constitution": "hhh"}, "`constitution`.*`constitutions`"),
        (
            {"constitutions": [{"name": "a", "constitution": "harmless", "weight": 1}] * 2},
            "unique; repeated: a",
        ),
        ({"constitutions": [{"name": "A b", "constitution": "harmless", "weight": 1}]}, "slug"),
        ({"constitutions": [{"name": "a", "constitution": "harmless", "weight": 0}]}, "greater than 0"),
        ({"label": {"groups": {"rule": "proportional"}}}, "label.groups needs"),
        ({**base, "label": {"groups": {"rule": "dictator"}}}, "unknown group rule"),
    ]
    for data, message in cases:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError, match=message):
            load_config(path)


def test_the_shipped_pluralistic_config_loads_and_its_groups_disagree_on_purpose():
    from cai.constitution import load_constitution

    config = load_config("pluralistic")
    assert [(g.name, g.weight) for g in config.constitutions] == [("frank", 0.6), ("cautious", 0.4)]
    assert config.label.groups.rule == "proportional"
    assert "constitution" not in config.model_dump()  # a group config dumps in the groups form
    assert load_config("pluralistic", ["seed=1"]).constitutions == config.constitutions
    for name in ("frank", "cautious"):
        constitution = load_constitution(name)
        assert 3 <= len(constitution.principles) <= 4
        assert all(p.critique and p.revision and p.compare for p in constitution.principles)


# --------------------------------------------------------------------------- the label stage


FRANK = ("direct and complete", "right to choose", "unrequested")


def by_group(prompt, options):
    """frank's principles prefer the option text that sorts later, cautious's the other one."""
    text = prompt.chat[-1]["content"]
    a = text.split("Option (A): ")[1].split("\n")[0]
    b = text.split("Option (B): ")[1].split("\n")[0]
    later = [0.8, 0.2] if a >= b else [0.2, 0.8]
    frank = any(words in " ".join(text.split()) for words in FRANK)
    return later if frank else later[::-1]


def test_label_stage_with_two_groups_records_their_hashes_and_who_decided(tmp_path):
    from cai.audit import load_audit
    from cai.constitution import load_constitution

    path = group_config(tmp_path / "c.yaml", tmp_path / "run")
    ctx = echo_context(path, by_group)
    store = ctx.stage("label").run(ctx)
    rows = load_audit(store.path)
    hashes = {name: load_constitution(name).hash for name in ("frank", "cautious")}
    assert len(rows) == 10
    for row in rows:
        assert {g.name: g.constitution_hash for g in row.groups} == hashes
        assert [g.weight for g in row.groups] == [0.6, 0.4] and [g.raw_weight for g in row.groups] == [3, 2]
        assert {v.group for v in row.votes} == {"frank", "cautious"}
        assert row.constitution == "frank"  # the first group's, what sl revised with
        assert row.decided_by[0].reason == "apportioned"
    summary = store.manifest.summary["groups"]
    assert summary["normalisation"] == 5 and summary["weights"]["frank"] == {"raw": 3, "normalised": 0.6}
    assert [(g["name"], g["decided"]) for g in summary["groups"]] == [("frank", 6), ("cautious", 4)]
    import orjson

    prefs = [orjson.loads(line) for line in (store.path / "preferences.jsonl").read_bytes().splitlines()]
    assert sorted(p["group"] for p in prefs) == ["cautious"] * 4 + ["frank"] * 6
    # the majority on the same judges gives frank every label
    path = group_config(tmp_path / "m.yaml", tmp_path / "run", rule="weighted_majority")
    ctx = echo_context(path, by_group)
    majority = load_audit(ctx.stage("label").run(ctx).path)
    assert {r.decided_by[0].group for r in majority} == {"frank"}


class Flaky(EchoBackend):
    """An echo judge whose Nth scoring call fails, as a killed engine would."""

    def __init__(self, fail_on: int, **kw):
        super().__init__(**kw)
        self.fail_on, self.scored = fail_on, 0

    def score_choices(self, prompts, options):
        self.scored += 1
        if self.scored == self.fail_on:
            raise RuntimeError("engine died")
        return super().score_choices(prompts, options)


def test_proportional_decisions_are_identical_after_a_crash_and_resume(tmp_path):
    def outputs(store) -> dict[str, str]:
        return {
            name: hashlib.sha256((store.path / name).read_bytes()).hexdigest()
            for name in ("audit.jsonl", "preferences.jsonl", "rows.jsonl")
        }

    path = group_config(tmp_path / "a.yaml", tmp_path / "whole")
    ctx = echo_context(path, by_group)
    whole = outputs(ctx.stage("label").run(ctx))

    path = group_config(tmp_path / "b.yaml", tmp_path / "crashed")
    ctx = echo_context(path, by_group)
    key = next(iter(ctx._backends))
    ctx._backends[key] = Flaky(fail_on=5, score_fn=by_group)  # 2 groups x 5 chunks: dies in chunk 3
    with pytest.raises(RuntimeError, match="engine died"):
        ctx.stage("label").run(ctx)
    assert 0 < len(ctx.store("label").committed()) < 10
    ctx = echo_context(path, by_group)
    assert outputs(ctx.stage("label").run(ctx)) == whole


GOLDEN = {
    # computed with the code before groups existed (commit 1abfc6e): one-group configs keep their
    # stage key and every output byte
    "k2": (
        "9697240070ed3cb985ebd8843ee9a56a83631479bb317c4a7999e4537fd5743e",
        "bbe2f0761ba2446662ea8ed02253fb268a18c68073b039c8367379a4325e59c1",
        "7f37f4f37ec4da012c3997b08fe01f85f91c6ae471c30759811eb01c77dda2f3",
        "580a05cfa3623956bda04f8135ce301f0f23bd6f85fc0b9f2dfb015e2591a42c",
    ),
    "k3": (
        "3677459e69ad86628f8250f5a41009438c70ee3ec592027eb2aa93180cf586d3",
        "99dfc9f7900474265543fc2592f96d9ffdbfc7c0a210c7bc819de9976043627f",
        "c3c349e4507565f3c77cc1edb28dccdfdeba28450d294f846875c477721731fa",
        "3ae6eab00fa9d4bbd458484df67d56f9d6490998f85633217d6816e9368db353",
    ),
}


@pytest.mark.parametrize("case", ["k2", "k3"])
def test_one_group_configs_keep_their_keys_and_bytes(tmp_path, case):
    def judge(prompt, options):
        text = prompt.chat[-1]["content"]
        a = text.split("Option (A): ")[1].split("\n")[0]
        b = text.split("Option (B): ")[1].split("\n")[0]
        return [0.8, 0.2] if a >= b else [0.3, 0.7]

    extra = {} if case == "k2" else {"responses": 3, "principles": {"count": 2}}
    path = write_config(tmp_path / "c.yaml", tmp_path / "run", ["label"], **extra)
    ctx = echo_context(path, judge)
    store = ctx.stage("label").run(ctx)
    files = [
        hashlib.sha256((store.path / f).read_bytes()).hexdigest()
        for f in ("audit.jsonl", "preferences.jsonl", "rows.jsonl")
    ]
    assert (store.config_hash, *files) == GOLDEN[case]
    assert "groups" not in store.manifest.summary
    assert all(r.groups is None for r in store.rows(LabelResult) for r in [r.audit])
    assert "constitutions" not in ctx.config.model_dump() and "groups" not in ctx.config.label.model_dump()


def test_audit_html_has_a_groups_section_only_for_group_runs(tmp_path):
    from cai.audit import load_audit, summarize
    from cai.report import write_report

    path = group_config(tmp_path / "c.yaml", tmp_path / "run")
    ctx = echo_context(path, by_group)
    rows = load_audit(ctx.stage("label").run(ctx).path)
    page = write_report(
        tmp_path / "r.html",
        audit=summarize(rows),
        ppo_history=None,
        eval_rows=None,
        pm_metrics=None,
        summary=None,
        title="t",
    ).read_text()
    assert '<section id="groups"><h2>Groups</h2>' in page and "6 of 10" in page and "60.0%" in page
    one = summarize([r.model_copy(update={"groups": None, "decided_by": None}) for r in rows])
    page = write_report(
        tmp_path / "o.html",
        audit=one,
        ppo_history=None,
        eval_rows=None,
        pm_metrics=None,
        summary=None,
        title="t",
    ).read_text()
    assert 'id="groups"' not in page


def test_audit_rows_round_trip_through_parquet(tmp_path):
    import pyarrow.parquet as pq

    from cai.export import write_parquet

    (result, _) = label(0, EMOJI, {"plain": 0.8, "emoji": 0.2}, "weighted_majority")
    write_parquet(tmp_path / "a.parquet", [result.audit], LabelAudit)
    (row,) = pq.read_table(tmp_path / "a.parquet").to_pylist()
    assert [g["name"] for g in row["groups"]] == ["plain", "emoji"] and row["votes"][0]["group"] == "plain"
    assert row["decided_by"][0]["reason"] == "rule"


def test_a_pluralistic_recipe_runs_and_cai_audit_shows_the_groups(tmp_path):
    import orjson
    from typer.testing import CliRunner

    from cai.cli import app
    from cai.pipeline import run_pipeline

    path = group_config(tmp_path / "c.yaml", tmp_path / "run", rule="maximin", weights=(1, 1))
    data = yaml.safe_load(path.read_text())
    data["stages"] = ["sl", "label", "mix"]  # sl revises with the first group's constitution
    path.write_text(yaml.safe_dump(data))
    ctx = echo_context(path, by_group)
    run_pipeline(ctx)
    manifest = orjson.loads((tmp_path / "run" / "manifest.json").read_bytes())
    assert manifest["constitution"]["name"] == "frank" and "constitution" not in manifest["config"]
    assert [(g["name"], g["weight"], g["share"]) for g in manifest["groups"]] == [
        ("frank", 1, 0.5),
        ("cautious", 1, 0.5),
    ]
    mixed = (ctx.store("mix").path / "preferences.jsonl").read_bytes().splitlines()
    assert any(orjson.loads(line).get("group") in ("frank", "cautious") for line in mixed)
    result = CliRunner().invoke(app, ["audit", str(tmp_path / "run"), "--groups"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "frank" in result.output and "target share" in result.output and "maximin" in result.output
