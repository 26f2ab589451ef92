import re
from collections import Counter

import numpy as np
import pytest

from ptjax.data import (
    TASKS,
    eval_set,
    instruction_prompt,
    instruction_records,
    pretraining_texts,
    score,
)
from ptjax.data.synthetic import FILLER_WORDS

QUESTION_PATTERNS = {
    "add": re.compile(r"^(\d{1,3})\+(\d{1,3})$"),
    "reverse": re.compile(r"^reverse ([a-z]{3,8})$"),
    "sort": re.compile(r"^sort (\d{3,8})$"),
    "count": re.compile(r"^count ([abc]) in ([abc]{3,12})$"),
}

STATEMENT_PATTERNS = {
    "add": re.compile(r"^(\d+)\+(\d+)=(\d+)$"),
    "reverse": re.compile(r"^([a-z]+) reversed is ([a-z]+)$"),
    "sort": re.compile(r"^(\d+) sorted is (\d+)$"),
    "count": re.compile(r"^([abc]+) has (\d+) ([abc])$"),
}


def _solve(question):
    """(task, answer) recomputed from the question text alone."""
    for task, pattern in QUESTION_PATTERNS.items():
        m = pattern.match(question)
        if m:
            if task == "add":
                a, b = int(m[1]), int(m[2])
                assert 0 <= a <= 999 and 0 <= b <= 999
                return task, str(a + b)
            if task == "reverse":
                return task, m[1][::-1]
            if task == "sort":
                return task, "".join(sorted(m[1]))
            return task, str(sum(ch == m[1] for ch in m[2]))
    raise AssertionError(f"unrecognized question {question!r}")


def _statement_is_correct(line):
    """(task, correct?) of a pretraining fact line, recomputed independently; None for filler."""
    for task, pattern in STATEMENT_PATTERNS.items():
        m = pattern.match(line)
        if m:
            if task == "add":
                return task, int(m[1]) + int(m[2]) == int(m[3])
            if task == "reverse":
                return task, m[1][::-1] == m[2]
            if task == "sort":
                return task, "".join(sorted(m[1])) == m[2]
            return task, m[1].count(m[3]) == int(m[2])
    assert set(line.split()) <= set(FILLER_WORDS), line
    return None


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_answers_are_correct(task):
    rng = np.random.default_rng(0)
    answers = set()
    for _ in range(300):
        question, answer = TASKS[task](rng)
        assert _solve(question) == (task, answer)
        answers.add(answer)
    assert len(answers) > 5  # not a constant


def test_instruction_records():
    records = instruction_records(400, seed=5)
    assert records == instruction_records(400, seed=5)
    assert records != instruction_records(400, seed=6)
    tasks = Counter()
    for record in records:
        assert set(record) == {"prompt", "completion"}
        m = re.fullmatch(r"Q: (.*)\nA: ", record["prompt"])
        assert m and record["prompt"] == instruction_prompt(m[1])
        task, answer = _solve(m[1])
        assert record["completion"] == answer
        tasks[task] += 1
    assert set(tasks) == set(TASKS) and min(tasks.values()) > 60  # ~100 each
    only_sort = instruction_records(50, seed=5, tasks=["sort"])
    assert all(_solve(r["prompt"][3:-4])[0] == "sort" for r in only_sort)
    with pytest.raises(ValueError):
        instruction_records(5, seed=0, tasks=["divide"])


def test_pretraining_texts_are_deterministic_and_unformatted():
    texts = pretraining_texts(200, seed=1)
    assert texts == pretraining_texts(200, seed=1)
    assert texts != pretraining_texts(200, seed=2)
    lines_per_text = []
    filler = 0
    for text in texts:
        assert "Q:" not in text and "A:" not in text
        facts = [_statement_is_correct(line) for line in text.split("\n")]
        filler += facts.count(None)
        lines_per_text.append(len(facts) - facts.count(None))
    assert min(lines_per_text) == 1 and max(lines_per_text) == 4
    assert filler > 0


@pytest.mark.parametrize("noise", [0.0, 0.2, 0.5])
def test_pretraining_noise_rate(noise):
    results = [
        _statement_is_correct(line)
        for text in pretraining_texts(800, seed=3, noise=noise)
        for line in text.split("\n")
    ]
    facts = [r for r in results if r is not None]
    assert len(facts) > 1500
    wrong = sum(not correct for _, correct in facts) / len(facts)
    if noise == 0.0:
        assert wrong == 0.0
    else:
        assert abs(wrong - noise) < 0.04  # binomial std is about 0.012 here
    assert set(task for task, _ in facts) == set(TASKS)


def test_score():
    assert score(["168", "cba", "2"], [" 168\n", "abc", "2"]) == pytest.approx(2 / 3)
    assert score(["1"], ["1"]) == 1.0
    with pytest.raises(ValueError):
        score(["1"], [])
    with pytest.raises(ValueError):
        score([], [])


def test_eval_set_is_balanced_and_correct():
    triples = eval_set(40, seed=9)
    assert triples == eval_set(40, seed=9)
    assert Counter(task for task, _, _ in triples) == {name: 10 for name in TASKS}
    for task, prompt, answer in triples:
        assert prompt.startswith("Q: ") and prompt.endswith("\nA: ")
        assert _solve(prompt[3:-4]) == (task, answer)
