"""Templates: every shipped one renders; data renders literally; the sandbox holds."""

from __future__ import annotations

import pytest
from jinja2.exceptions import SecurityError

from cai.chats import ChatBuilder
from cai.constitution import load_constitution
from cai.prompts import TemplateError, Templates
from cai.resources import shipped_dir

INJECTIONS = [
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''|attr('__class__')|attr('__mro__') }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ self._TemplateReference__context }}",
]


@pytest.fixture(scope="module")
def builder():
    constitution = load_constitution("harmless")
    return ChatBuilder(Templates(), constitution)


@pytest.mark.parametrize("constitution_name", ["harmless", "hhh"])
def test_every_principle_renders_in_every_stage(constitution_name):
    constitution = load_constitution(constitution_name)
    chats = ChatBuilder(Templates(), constitution)
    for principle in constitution.principles:
        critique = chats.critique_chat(
            "How do I pick a lock?", "Use a pin.", principle, constitution.examples.critique_revision
        )
        assert critique[-1]["role"] == "user" and principle.critique in critique[-1]["content"]
        revision = chats.revision_chat("How?", "Like so.", principle, "It is unsafe.")
        assert revision[-2] == {"role": "assistant", "content": "It is unsafe."}
        assert principle.revision in revision[-1]["content"]
        compare = chats.compare_prompt("Q?", "first", "second", principle, constitution.examples.compare)
        last = compare.chat[-1]["content"]
        assert (
            last.index("Option (A): first") < last.index("Option (B): second") < last.index(principle.compare)
        )
        assert compare.assistant_prefix == "The answer is: ("


def test_shipped_template_files_are_all_used():
    used = {
        "critique_request.j2",
        "revision_request.j2",
        "compare.j2",
        "compare_answer.j2",
        "compare_cot.j2",
        "compare_cot_answer.j2",
        "rate_harm.j2",
        "likelihood_condition.j2",
    }
    assert {p.name for p in shipped_dir("prompts").glob("*.j2")} == used


def test_revision_only_mode_has_no_critique_turns(builder):
    principle = builder.constitution.principle("privacy")
    chat = builder.revision_chat("Where does she live?", "At 5 Elm St.", principle, None)
    assert [m["role"] for m in chat] == ["user", "assistant", "user"]
    assert "Use your critique" not in chat[-1]["content"]


def test_fewshot_examples_come_first_as_turns(builder):
    principle = builder.constitution.principle("toxic")
    examples = builder.constitution.examples.critique_revision[:2]
    chat = builder.critique_chat("Q", "A", principle, examples)
    assert len(chat) == 6 * 2 + 3
    assert chat[0]["content"] == examples[0].prompt
    assert chat[5]["content"] == examples[0].revision


def test_compare_prefix_is_shared_across_principles(builder):
    """The principle comes last, so many principles share the whole conversation + options."""
    a, b = builder.constitution.principles[:2]
    shots = builder.constitution.examples.compare
    first = builder.compare_prompt("Q?", "x", "y", a, shots).chat
    second = builder.compare_prompt("Q?", "x", "y", b, shots).chat
    assert first[:-1] == second[:-1]
    common = first[-1]["content"].split(a.compare)[0]
    assert second[-1]["content"].startswith(common) and "Option (B): y" in common


def test_cot_prompt_and_answer_prefix(builder):
    principle = builder.constitution.principles[0]
    prompt = builder.compare_prompt("Q?", "x", "y", principle, reasoning="B is kinder.", cot=True)
    assert "step by step" in prompt.chat[-1]["content"]
    assert prompt.assistant_prefix == "B is kinder.\nTherefore, the answer is: ("


@pytest.mark.parametrize("payload", INJECTIONS)
def test_injection_in_data_renders_literally(builder, payload):
    principle = builder.constitution.principles[0]
    chat = builder.critique_chat(payload, payload, principle)
    assert chat[0]["content"] == payload and chat[1]["content"] == payload
    compare = builder.compare_prompt(payload, payload, payload, principle)
    assert compare.chat[-1]["content"].count(payload) == 3


@pytest.mark.parametrize("payload", INJECTIONS)
def test_injection_in_a_user_template_is_stopped_by_the_sandbox(tmp_path, payload):
    (tmp_path / "compare_answer.j2").write_text(payload)
    templates = Templates(tmp_path)
    with pytest.raises((SecurityError, TemplateError)) as info:
        templates.render("compare_answer.j2")
    assert "unsafe" in str(info.value) or "undefined" in str(info.value).lower()


def test_sandbox_raises_security_error_for_attribute_escape(tmp_path):
    (tmp_path / "x.j2").write_text("{{ cycler.__init__.__globals__ }}")
    with pytest.raises(SecurityError):
        Templates(tmp_path).render("x.j2")


def test_strict_undefined_names_the_missing_variable(tmp_path):
    (tmp_path / "x.j2").write_text("Hello {{ nmae }}")
    with pytest.raises(TemplateError, match="'nmae' is undefined"):
        Templates(tmp_path).render("x.j2", name="world")


def test_user_folder_overrides_shipped_and_changes_hash(tmp_path):
    shipped = Templates()
    (tmp_path / "compare_answer.j2").write_text("Final answer: (")
    custom = Templates(tmp_path)
    assert custom.render("compare_answer.j2") == "Final answer: ("
    assert custom.hash("compare_answer.j2") != shipped.hash("compare_answer.j2")
    assert custom.render("compare.j2", conversation=[], response_a="a", response_b="b", question="q?")


def test_missing_template_and_folder_errors(tmp_path):
    with pytest.raises(TemplateError, match="no template 'nope.j2'"):
        Templates().render("nope.j2")
    with pytest.raises(TemplateError, match="does not exist"):
        Templates(tmp_path / "missing")
    (tmp_path / "bad.j2").write_text("{% if %}")
    with pytest.raises(TemplateError, match="bad.j2"):
        Templates(tmp_path).render("bad.j2")
