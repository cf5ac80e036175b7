"""Constitution loading: shipped files, a table of bad files with precise errors, hashing, sampling."""

from __future__ import annotations

import collections
import textwrap

import pytest

from cai.constitution import (
    ConstitutionError,
    ConstitutionSecurityError,
    load_constitution,
    parse_constitution,
    sample_principles,
)
from cai.hashing import derive_seed
from cai.resources import shipped_dir

GOOD = textwrap.dedent(
    """\
    name: tiny
    version: "1"
    principles:
      - id: harm
        tags: [harm]
        critique: Say how the answer is harmful.
        revision: Make it harmless.
        compare: Which is less harmful?
      - id: honest
        weight: 3
        tags: [honesty]
        critique: Say how the answer is dishonest.
        revision: Make it honest.
        compare: Which is more honest?
    """
)


@pytest.mark.parametrize("path", sorted(shipped_dir("constitutions").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_constitutions_load_and_cover_every_stage(path):
    constitution = load_constitution(path)
    assert constitution.principles
    for stage in ("critique", "revision", "compare"):
        assert constitution.select(stages=[stage]), f"{path.name} has no {stage} principle"
    assert constitution.examples.critique_revision and constitution.examples.compare


def test_harmless_constitution_covers_the_paper_categories():
    constitution = load_constitution("harmless")
    assert len(constitution.principles) >= 16
    ids = " ".join(p.id for p in constitution.principles)
    for topic in (
        "harm",
        "ethic",
        "racis",
        "sexis",
        "toxic",
        "danger",
        "illegal",
        "manipul",
        "age",
        "privacy",
    ):
        assert topic in ids, topic
    for principle in constitution.principles:
        assert principle.critique and principle.revision and principle.compare, principle.id


def test_hhh_constitution_penalises_evasive_and_preachy_answers():
    constitution = load_constitution("hhh")
    evasive = constitution.select(tags=["evasiveness"])
    assert len(evasive) >= 3
    assert {"helpful", "honest", "harmless"} <= {t for p in constitution.principles for t in p.tags}


# Each case: the YAML text, then fragments the error must contain (file, line, principle, field).
BAD = {
    "yaml-syntax": ("name: x\nversion: '1'\nprinciples: [\n", ["YAML syntax", "bad.yaml:4"]),
    "not-a-mapping": ("- just\n- a list\n", ["a constitution is a mapping"]),
    "unknown-top-key": (GOOD + "colour: blue\n", ["unknown key 'colour'", "bad.yaml:15"]),
    "unknown-principle-key": (
        GOOD.replace("    weight: 3\n", "    weight: 3\n    severity: high\n"),
        ["principle 'honest'", "principles.1.severity", "unknown key", "bad.yaml:11"],
    ),
    "duplicate-id": (
        GOOD.replace("id: honest", "id: harm"),
        ["duplicate principle id 'harm'", "principles.1.id", "bad.yaml:9"],
    ),
    "empty-text": (
        GOOD.replace("revision: Make it honest.", "revision: '   '"),
        ["principle 'honest'", "principles.1.revision", "must not be empty", "bad.yaml:13"],
    ),
    "wrong-type-weight": (
        GOOD.replace("weight: 3", "weight: heavy"),
        ["principle 'honest'", "principles.1.weight", "bad.yaml:10"],
    ),
    "negative-weight": (GOOD.replace("weight: 3", "weight: -1"), ["principles.1.weight", "greater than 0"]),
    "missing-name": (GOOD.replace("name: tiny\n", ""), ["field 'name'", "Field required"]),
    "no-principles": ('name: x\nversion: "1"\nprinciples: []\n', ["field 'principles'", "at least 1"]),
    "bad-id-slug": (GOOD.replace("id: honest", "id: Be Honest"), ["principles.1.id", "pattern"]),
    "tags-not-list": (GOOD.replace("tags: [honesty]", "tags: honesty"), ["principles.1.tags", "list"]),
    "no-stage-text": (
        'name: x\nversion: "1"\nprinciples:\n  - id: a\n    tags: [t]\n',
        ["principle 'a'", "at least one of critique, revision, compare"],
    ),
    "example-unknown-principle": (
        GOOD
        + "examples:\n  compare:\n    - principle: nope\n      prompt: p\n      response_a: a\n"
        + "      response_b: b\n      answer: A\n",
        ["examples.compare.0.principle", "unknown principle 'nope'", "bad.yaml:17"],
    ),
    "example-bad-answer": (
        GOOD
        + "examples:\n  compare:\n    - prompt: p\n      response_a: a\n"
        + "      response_b: b\n      answer: C\n",
        ["examples.compare.0.answer"],
    ),
    "duplicate-yaml-key": (
        GOOD.replace("    weight: 3\n", "    weight: 3\n    weight: 4\n"),
        ["duplicate key 'weight'", "bad.yaml:11"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_constitutions_name_file_line_principle_and_field(case, tmp_path):
    text, fragments = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConstitutionError) as info:
        load_constitution(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_every_problem_is_reported_at_once(tmp_path):
    text = GOOD.replace("weight: 3", "weight: heavy").replace("revision: Make it harmless.", "revision: ''")
    with pytest.raises(ConstitutionError) as info:
        parse_constitution(text, "two.yaml")
    assert len(info.value.problems) == 2
    assert {p.principle for p in info.value.problems} == {"harm", "honest"}


@pytest.mark.parametrize(
    "payload",
    [
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ ''|attr('__class__') }}",
        "{% for x in range(10) %}x{% endfor %}",
        "{# hidden #} Be nice.",
    ],
)
def test_template_syntax_in_constitution_text_is_a_security_error(payload):
    text = GOOD.replace("critique: Say how the answer is harmful.", f"critique: {payload!r}")
    with pytest.raises(ConstitutionSecurityError) as info:
        parse_constitution(text, "evil.yaml")
    assert "template syntax" in str(info.value)
    assert "principles.0.critique" in str(info.value)


def test_hash_is_canonical_not_textual():
    reformatted = GOOD.replace("tags: [harm]", "tags:\n      - harm") + "# a comment\n"
    assert parse_constitution(GOOD).hash == parse_constitution(reformatted).hash
    edited = GOOD.replace("Make it honest.", "Make it honest, please.")
    assert parse_constitution(GOOD).hash != parse_constitution(edited).hash


def test_select_filters_by_stage_tag_and_id():
    constitution = parse_constitution(GOOD)
    assert [p.id for p in constitution.select(tags=["honesty"])] == ["honest"]
    assert [p.id for p in constitution.select(ids=["harm"])] == ["harm"]
    with pytest.raises(KeyError, match="no principle 'nope'"):
        constitution.select(ids=["nope"])
    with pytest.raises(ValueError, match="no principle"):
        constitution.select(tags=["missing"])


def test_sampling_is_seeded_and_reproducible():
    principles = load_constitution("harmless").principles
    first = [p.id for p in sample_principles(principles, 4, seed=derive_seed(0, "row-1", 2))]
    again = [p.id for p in sample_principles(principles, 4, seed=derive_seed(0, "row-1", 2))]
    other = [p.id for p in sample_principles(principles, 4, seed=derive_seed(0, "row-1", 3))]
    assert first == again
    assert first != other
    assert len(set(first)) == 4  # without replacement


def test_sampling_honours_weights():
    principles = parse_constitution(GOOD).principles  # weights 1 and 3
    counts = collections.Counter(
        sample_principles(principles, 1, seed=derive_seed("w", i))[0].id for i in range(4000)
    )
    share = counts["honest"] / 4000
    assert 0.72 < share < 0.78  # expected 3 / (1 + 3) = 0.75
    with_replacement = sample_principles(principles, 5, seed=1, replace=True)
    assert len(with_replacement) == 5
    with pytest.raises(ValueError, match="cannot draw 3 distinct"):
        sample_principles(principles, 3, seed=1)


def test_unweighted_sampling_without_replacement_is_uniform():
    principles = parse_constitution(GOOD).principles
    counts = collections.Counter(
        sample_principles(principles, 1, seed=derive_seed("u", i), weighted=False)[0].id for i in range(4000)
    )
    assert 0.46 < counts["honest"] / 4000 < 0.54
