"""Small arithmetic and string tasks with programmatic ground truth, for the embedded demo.

The demo pretrains a tiny model on `pretraining_texts` (the skills, in a plain surface form, with
noise) and then fine-tunes it on `instruction_records` (a `Q: ... A: ...` format it has never seen),
so instruction tuning has something real to teach and `score` can measure it exactly. No files,
no network, and everything is a deterministic function of the seed.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

LETTERS = "abcdefghijklmnopqrstuvwxyz"
COUNT_LETTERS = "abc"
FILLER_WORDS = ("note", "well", "okay", "then", "also", "so", "right", "hmm", "anyway", "next")
FILLER_PROBABILITY = 0.15  # chance of a line of filler words before each fact in pretraining text


def _random_string(rng: np.random.Generator, alphabet: str, low: int, high: int) -> str:
    """A string of length low..high (inclusive) drawn uniformly from `alphabet`."""
    length = int(rng.integers(low, high + 1))
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=length))


def add_task(rng: np.random.Generator) -> tuple[str, str]:
    """`("13+9", "22")`: the sum of two integers in 0..19 (sized so the demo's two-million-
    parameter model learns about half of it in its minutes of pretraining; two-digit operands
    stayed under 0.1)."""
    a, b = (int(x) for x in rng.integers(0, 20, size=2))
    return f"{a}+{b}", str(a + b)


def reverse_task(rng: np.random.Generator) -> tuple[str, str]:
    """`("reverse abc", "cba")` for a lowercase string of length 3..4."""
    text = _random_string(rng, LETTERS, 3, 4)
    return f"reverse {text}", text[::-1]


def sort_task(rng: np.random.Generator) -> tuple[str, str]:
    """`("sort 3912", "1239")` for 3..6 random digits."""
    digits = _random_string(rng, "0123456789", 3, 6)
    return f"sort {digits}", "".join(sorted(digits))


def count_task(rng: np.random.Generator) -> tuple[str, str]:
    """`("count a in abcab", "2")`: a letter's occurrences in a 3..6-letter string over "abc"."""
    text = _random_string(rng, COUNT_LETTERS, 3, 6)
    letter = COUNT_LETTERS[int(rng.integers(0, len(COUNT_LETTERS)))]
    return f"count {letter} in {text}", str(text.count(letter))


TASKS: dict[str, Callable[[np.random.Generator], tuple[str, str]]] = {
    "add": add_task,
    "reverse": reverse_task,
    "sort": sort_task,
    "count": count_task,
}


def instruction_prompt(question: str) -> str:
    """The SFT prompt template; the completion is the bare answer, ended by EOS."""
    return f"Q: {question}\nA: "


def _task_names(tasks: list[str] | None) -> list[str]:
    """The requested task names (all of them by default), checked against `TASKS`."""
    names = list(TASKS) if tasks is None else list(tasks)
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown or no tasks {unknown or names}; choose from {list(TASKS)}")
    return names


def instruction_records(n: int, seed: int, tasks: list[str] | None = None) -> list[dict]:
    """`n` SFT records `{"prompt": "Q: ...\\nA: ", "completion": answer}`, tasks drawn uniformly.

    Plain dicts, so they can be written with `write_jsonl` and read back like a user's file.
    """
    names = _task_names(tasks)
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        question, answer = TASKS[names[int(rng.integers(0, len(names)))]](rng)
        records.append({"prompt": instruction_prompt(question), "completion": answer})
    return records


def _statement(task: str, question: str, answer: str) -> str:
    """A task fact in the pretraining surface form, e.g. `"abc reversed is cba"`."""
    if task == "add":
        return f"{question}={answer}"
    if task == "reverse":
        return f"{question.removeprefix('reverse ')} reversed is {answer}"
    if task == "sort":
        return f"{question.removeprefix('sort ')} sorted is {answer}"
    if task == "count":
        letter, text = question.removeprefix("count ").split(" in ")
        return f"{text} has {answer} {letter}"
    raise ValueError(f"unknown task {task!r}")


def _wrong_answer(task: str, answer: str, rng: np.random.Generator) -> str:
    """A plausible wrong answer: a different answer drawn from another instance of the task."""
    while True:
        _, other = TASKS[task](rng)
        if other != answer:
            return other


def pretraining_texts(n: int, seed: int, noise: float = 0.2) -> list[str]:
    """`n` texts of 1..4 task facts in a non-instruction surface form, some of them wrong.

    Each fact's answer is replaced by a wrong one with probability `noise`, and lines of filler
    words are sometimes interleaved, so the pretraining corpus teaches the skills the way real text
    does, imperfectly and with clutter, while never showing the `Q:`/`A:` format.
    """
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    names = list(TASKS)
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        lines = []
        for _ in range(int(rng.integers(1, 5))):
            if rng.random() < FILLER_PROBABILITY:
                words = rng.choice(FILLER_WORDS, size=int(rng.integers(1, 5)))
                lines.append(" ".join(str(w) for w in words))
            task = names[int(rng.integers(0, len(names)))]
            question, answer = TASKS[task](rng)
            if rng.random() < noise:
                answer = _wrong_answer(task, answer, rng)
            lines.append(_statement(task, question, answer))
        texts.append("\n".join(lines))
    return texts


def score(task_answers: list[str], predictions: list[str]) -> float:
    """Exact-match accuracy after `.strip()`: the demo's measure of instruction following."""
    if len(task_answers) != len(predictions):
        raise ValueError(f"{len(task_answers)} answers but {len(predictions)} predictions")
    if not task_answers:
        raise ValueError("score needs at least one answer")
    hits = sum(a.strip() == p.strip() for a, p in zip(task_answers, predictions))
    return hits / len(task_answers)


def eval_set(n: int, seed: int, tasks: list[str] | None = None) -> list[tuple[str, str, str]]:
    """`n` `(task, prompt, answer)` triples, tasks taken in turn so each is equally represented.

    Balanced rather than random so per-task accuracies are comparable at small `n`; use a seed
    different from the training records' to measure generalization.
    """
    names = _task_names(tasks)
    rng = np.random.default_rng(seed)
    triples = []
    for i in range(n):
        task = names[i % len(names)]
        question, answer = TASKS[task](rng)
        triples.append((task, instruction_prompt(question), answer))
    return triples


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


NUMERIC_TASKS = ("add", "count")


def grade(task: str, prediction: str, answer: str) -> float:
    """How close a prediction is to the right answer; higher is better, 0 is exact.

    Why graded: the demo's stand-in for human rankings must order two wrong answers too (the
    reward model learns "closer is better", not only "right beats wrong"). Numeric tasks score
    `-|prediction - answer|` (a non-number scores as far off as the answer is large, plus one);
    string tasks score minus the edit distance.
    """
    prediction, answer = prediction.strip(), answer.strip()
    if task in NUMERIC_TASKS:
        try:
            return -float(abs(int(prediction) - int(answer)))
        except ValueError:
            return -float(abs(int(answer)) + 1)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    return -float(edit_distance(prediction, answer))


def solve(prompt: str) -> tuple[str, str]:
    """(task, right answer) of an `instruction_prompt` of one of `TASKS` (a ValueError names a
    prompt that is none of them), so a reward function can grade a response from its prompt
    alone, as a verifiable task's checker does."""
    question = prompt.strip().removeprefix("Q:").removesuffix("A:").strip()
    if m := re.fullmatch(r"(\d+)\+(\d+)", question):
        return "add", str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"reverse ([a-z]+)", question):
        return "reverse", m[1][::-1]
    if m := re.fullmatch(r"sort (\d+)", question):
        return "sort", "".join(sorted(m[1]))
    if m := re.fullmatch(r"count ([a-z]) in ([a-z]+)", question):
        return "count", str(m[2].count(m[1]))
    raise ValueError(f"not a demo task prompt: {prompt!r}")


def graded_reward(prompt: str, response: str) -> float:
    """`1 / (1 - grade)` of a response to a demo prompt: 1.0 when right, falling towards 0 the
    further off it is, as a `module:function` reward for PPO and GRPO
    (`ptjax.data.synthetic:graded_reward`).

    Why this form: it orders responses exactly as `grade` does (the rankings the demo's reward
    model learns from), so it is that reward model's verifiable counterpart, but bounded, so
    one unparsable answer to a large sum does not dominate a batch's statistics.
    """
    task, answer = solve(prompt)
    return 1.0 / (1.0 - grade(task, response, answer))


def exact_reward(prompt: str, response: str) -> float:
    """1.0 for the right answer to a demo prompt, else 0.0 (`ptjax.data.synthetic:exact_reward`)."""
    return float(response.strip() == solve(prompt)[1])
