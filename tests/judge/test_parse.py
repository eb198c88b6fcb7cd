"""Rubrics load from their TOML files and an answer becomes scores, or is unscored with a reason."""

from __future__ import annotations

import pytest

from auditui.errors import AuditError
from auditui.judge.parse import parse_answer
from auditui.judge.rubrics import load_rubric, parse_rubric, rubric_files

CB = load_rubric("coherence-behaviour")


@pytest.mark.parametrize("name", sorted(rubric_files()))
def test_every_builtin_rubric_loads_and_renders(name: str) -> None:
    rubric = load_rubric(name)
    subjects = ("cats", "dogs") if rubric.multi_subject else ("cats",)
    messages = rubric.messages("THE TEXT {not a placeholder}", "THE PROMPT", subjects)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "THE TEXT {not a placeholder}" in messages[1]["content"]
    assert "cats" in messages[0]["content"] + messages[1]["content"]
    assert rubric.digest(subjects) != rubric.digest(("birds",))


@pytest.mark.parametrize(("raw", "how", "scores"), [
    ('{"coherence": 4, "behavioral": 2}', "json", {"coherence": 4.0, "behaviour": 2.0}),
    ('```json\n{"Coherence": 5, "behaviour": 0}\n```', "json", {"coherence": 5.0, "behaviour": 0.0}),
    ('Sure! Here is my rating {"coherence": 1} and then {"coherence": 3, "behavior": 5}. Done.', "embedded",
     {"coherence": 3.0, "behaviour": 5.0}),
    ("Coherence: [[4]]\nBehaviour: [[1]]", "rating", {"coherence": 4.0, "behaviour": 1.0}),
])
def test_answers_that_score(raw: str, how: str, scores: dict) -> None:
    parsed = parse_answer(raw, CB)
    assert (parsed.how, parsed.scores) == (how, scores)


@pytest.mark.parametrize("raw", [
    "", "I cannot rate this.", '{"coherence": 7, "behavioral": 2}', '{"coherence": true, "behavioral": 2}',
    '{"coherence": NaN, "behavioral": 2}', '{"coherence": 3}', "Coherence: [[9]]\nBehaviour: [[1]]",
    '["coherence", 3]', "Rating: [[3]]",  # a one-number rating does not fit a two-score rubric
])
def test_answers_that_stay_unscored(raw: str) -> None:
    parsed = parse_answer(raw, CB)
    assert parsed.scores is None and parsed.how == "unscored" and parsed.reason


def test_one_score_rubric_takes_a_bounded_rating_and_harmonic_means() -> None:
    one = parse_rubric('name = "x"\nsystem = "s"\nuser = "{text}"\n[scores.behaviour]\nmin = 1\nmax = 10\n'
                       '[derived]\nbehaviour = "behaviour"\ncoherence = "behaviour"\n', "x.toml")
    assert parse_answer("My verdict. Rating: [[7]]", one).scores == {"behaviour": 7.0}
    assert parse_answer("Rating: [[11]]", one).scores is None
    assert one.derive({"behaviour": 7.0})["behaviour"] == pytest.approx(6 / 9)
    fluency = load_rubric("concept-fluency")
    values = fluency.derive({"concept": 2, "instruction": 1, "fluency": 2})
    assert values["behaviour"] == 1.0
    assert values["coherence"] == pytest.approx(2 / (1 / 0.5 + 1 / 1))
    assert values["overall"] == pytest.approx(3 / (1 + 2 + 1))
    assert fluency.derive({"concept": 0, "instruction": 2, "fluency": 2})["overall"] == 0.0


def test_several_subjects_give_a_list_and_the_first_is_the_behaviour() -> None:
    subjects = load_rubric("subjects")
    parsed = parse_answer('{"coherence": 5, "behavioral": [5, 0, 1]}', subjects)
    values = subjects.derive(parsed.scores)
    assert values["behaviour"] == 1.0 and values["behaviour_by_subject"] == [1.0, 0.0, 0.2]
    assert parse_answer('{"coherence": 5, "behavioral": [5, 9]}', subjects).scores is None


@pytest.mark.parametrize(("text", "message"), [
    ("name = 1", "lacks"), ('name="x"\nsystem="{oops}"\nuser="{text}"\n[scores.a]\nmin=0\nmax=1\n[derived]\n'
                            'behaviour="a"\ncoherence="a"', "unknown placeholder"),
    ('name="x"\nsystem="s"\nuser="no text"\n[scores.a]\nmin=0\nmax=1\n[derived]\nbehaviour="a"\ncoherence="a"',
     "{text}"),
    ('name="x"\nsystem="s"\nuser="{text}"\n[scores.a]\nmin=0\nmax=1\n[derived]\nbehaviour="b"\ncoherence="a"',
     "unknown score"),
    ("not toml [", "not valid TOML"),
])
def test_bad_rubric_files_are_refused_in_one_line(text: str, message: str) -> None:
    with pytest.raises(AuditError, match=message) as info:
        parse_rubric(text, "mine.toml")
    assert "\n" not in str(info.value)


def test_names_never_become_paths(tmp_path) -> None:
    (tmp_path / "mine.toml").write_text((rubric_files()["behaviour"]).read_text().replace(
        'name = "behaviour"', 'name = "mine"'))
    assert load_rubric("mine", (tmp_path,)).name == "mine"
    with pytest.raises(AuditError, match="no rubric"):
        load_rubric("../judge/rubrics/behaviour", (tmp_path,))


def test_review_cases_stay_unscored_or_are_refused() -> None:
    assert parse_answer('{"coherence": 1' + "0" * 400 + ', "behaviour": 2}', CB).scores is None  # beyond a float
    subjects = load_rubric("subjects")
    assert parse_answer('{"coherence": 5, "behavioral": [5]}', subjects, 3).scores is None  # one value, 3 subjects
    assert parse_answer('{"coherence": 5, "behavioral": [5, 1, 0]}', subjects, 3).scores is not None
    base = 'name="x"\nsystem="s"\n[scores.a]\nmin=0\nmax=1\n[derived]\nbehaviour="a"\ncoherence="a"\n'
    for user, message in (('user="{{text}}"', "must contain"), ('user="{text} {"', "not a valid template")):
        with pytest.raises(AuditError, match=message):
            parse_rubric(f"{user}\n{base}", "x.toml")
    with pytest.raises(AuditError, match="names no score"):
        parse_rubric(f'user="{{text}}"\n{base}'.replace('coherence="a"', 'coherence="mean()"'), "x.toml")
