"""Tests for dirl.data: loaders, validation errors, templates and the synthetic tasks."""

from __future__ import annotations

import ast
import json
import operator
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from dirl.data import (
    PROMPT_TEMPLATES,
    TASKS,
    DataError,
    get_task,
    load_prompt_rows,
    load_rows,
    load_sft_rows,
    render_prompt,
    split_of,
    to_prompt_messages,
    to_sft_messages,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# Row counts stated in shared/data/README.md.
SHARED_COUNTS = {
    "math500": 500, "gsm8k_test": 1319, "gsm8k_train": 7473, "math_train": 7497, "aime24": 30,
    "aime25": 30, "olympiadbench": 675, "countdown_test": 256, "sudoku4x4_test": 500, "humaneval": 164,
}
# Length bounds documented in dirl/data/tasks.py for the default parameters.
BOUNDS = {"arithmetic": (10, 40), "countdown": (40, 64), "sudoku": (16, 33), "code": (36, 14)}

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared/data not present")


def both_splits(name: str, num_train: int, num_test: int, seed: int) -> list[dict]:
    task = get_task(name)
    return task.generate("train", num_train, seed=seed) + task.generate("test", num_test, seed=seed)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- safe evaluators

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def eval_exact(expr: str) -> Fraction:
    """Evaluate + - * / integer arithmetic exactly with Fractions (no eval())."""
    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        raise ValueError(f"unexpected syntax in {expr!r}")
    return walk(ast.parse(expr, mode="eval"))


def check_steps(steps: list[str]) -> None:
    """Every worked step 'a<op>b=c' is arithmetically right."""
    for step in steps:
        lhs, rhs = step.split("=")
        assert eval_exact(lhs) == int(rhs), step


# ----------------------------------------------------------------------------- shared data

@needs_shared
@pytest.mark.parametrize("name,count", sorted(SHARED_COUNTS.items()))
def test_shared_files_row_counts(name: str, count: int) -> None:
    rows = load_rows(SHARED_DATA / f"{name}.jsonl", required=("id", "question", "answer"))
    assert len(rows) == count
    assert len({r["id"] for r in rows}) == count
    assert len(load_prompt_rows(str(SHARED_DATA / f"{name}.jsonl"))) == count
    sft = load_sft_rows(SHARED_DATA / f"{name}.jsonl", limit=5)
    assert len(sft) == 5 and all(to_sft_messages(r, "dirl_math")[1]["content"] for r in sft)


@needs_shared
def test_shared_data_covers_readme() -> None:
    assert {p.stem for p in SHARED_DATA.glob("*.jsonl")} == set(SHARED_COUNTS)


# ----------------------------------------------------------------------------- round trips

def _roundtrip_rows() -> list[list[dict]]:
    """Row sets with strings, ints, lists and nulls: task rows plus shared files when present."""
    sets = [load_rows("task:countdown", limit=50), load_rows("task:sudoku:test", limit=50)]
    if SHARED_DATA.is_dir():
        sets += [load_rows(SHARED_DATA / f"{name}.jsonl") for name in ("olympiadbench", "gsm8k_test")]
    return sets


def test_parquet_json_and_saved_dataset_roundtrip(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    for k, rows in enumerate(_roundtrip_rows()):
        from_jsonl = load_rows(write_jsonl(tmp_path / f"r{k}.jsonl", rows))
        assert from_jsonl == rows
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"r{k}.parquet")
        assert load_rows(tmp_path / f"r{k}.parquet") == from_jsonl
        (tmp_path / f"r{k}.json").write_text(json.dumps(rows))
        assert load_rows(tmp_path / f"r{k}.json") == from_jsonl
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / f"ds{k}"))
        assert load_rows(tmp_path / f"ds{k}") == from_jsonl
        assert load_rows(tmp_path / f"ds{k}", limit=3) == from_jsonl[:3]


def test_saved_datasetdict_split(tmp_path: Path) -> None:
    import datasets

    train, test = load_rows("task:arithmetic", limit=20), load_rows("task:arithmetic:test", limit=10)
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(train), test=datasets.Dataset.from_list(test)
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_rows(tmp_path / "dd", split="test") == test
    assert load_rows(str(tmp_path / "dd"), split="train") == train
    with pytest.raises(DataError, match="split"):
        load_rows(tmp_path / "dd")


def test_hf_to_json_lines_with_json_suffix(tmp_path: Path) -> None:
    import datasets

    rows = load_rows("task:sudoku", limit=5)
    datasets.Dataset.from_list(rows).to_json(str(tmp_path / "lines.json"))  # JSON Lines despite .json
    assert load_rows(tmp_path / "lines.json") == rows


# ----------------------------------------------------------------------------- bad input

def test_invalid_json_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n\n{"question": "b" "answer": "2"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON \(Expecting ',' delimiter"):
        load_rows(path)


def test_missing_field_names_file_line_field(tmp_path: Path) -> None:
    rows = [{"id": 1, "question": "q", "answer": "a"}, {"id": 2, "problem": "p"}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_prompt_rows(path)
    assert str(err.value) == f"{path}:2: missing field 'question' (row has: id, problem)"
    with pytest.raises(DataError, match=r"m\.jsonl:2: missing field 'question'"):
        load_sft_rows(path)


def test_empty_answer(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(16)] + [{"question": "q", "answer": "  "}]
    path = write_jsonl(tmp_path / "math.jsonl", rows)
    with pytest.raises(DataError, match=r"math\.jsonl:17: field 'answer' is empty"):
        load_rows(path, required=("question", "answer"))
    assert len(load_rows(path, required=("question",))) == 17  # only required fields are checked


def test_messages_without_assistant_turn(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, bad])
    with pytest.raises(DataError, match=r"chat\.jsonl:2: field 'messages' has no non-empty assistant turn"):
        load_sft_rows(path)
    assert to_sft_messages(good, "plain") == good["messages"]
    assert to_prompt_messages(good, "plain") == good["messages"][:1]


def test_sft_row_without_response_and_non_object(tmp_path: Path) -> None:
    rows = [{"question": "q", "answer": "1"}, {"question": "q", "hint": "h"}]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    with pytest.raises(DataError, match=r"s\.jsonl:2: missing field 'answer'.*row has: question, hint"):
        load_sft_rows(path)
    path = write_jsonl(tmp_path / "l.jsonl", [[1, 2]])
    with pytest.raises(DataError, match=r"l\.jsonl:1: expected a JSON object"):
        load_rows(path)


def test_parquet_error_names_row_and_field(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": "a", "answer": "1"}, {"question": "b", "answer": ""}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet:row 1: field 'answer' is empty"):
        load_prompt_rows(tmp_path / "p.parquet")


def test_non_local_sources_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a local file.*hub"):
        load_rows("openai/gsm8k")
    with pytest.raises(DataError, match="unknown task 'nope'"):
        load_rows("task:nope")
    (tmp_path / "x.csv").write_text("question,answer\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_rows(tmp_path / "x.csv")
    with pytest.raises(DataError, match="names split 'test'"):
        load_rows("task:sudoku:test", split="train")
    with pytest.raises(DataError, match="not a dataset saved"):
        load_rows(tmp_path)


# ----------------------------------------------------------------------------- templates

def test_dirl_math_keeps_literal_boxed() -> None:
    text = render_prompt("dirl_math", {"question": "What is {x}?", "answer": "1"})
    assert text == "What is {x}?\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert render_prompt("plain", {"question": "2+2="}) == "2+2="
    assert render_prompt("Q: {question} ({id})", {"question": "q", "id": 7}) == "Q: q (7)"
    assert "<answer>" in render_prompt("countdown", {"question": "Numbers: [1, 2]\nTarget: 3"})
    assert "0102" in render_prompt("sudoku", {"question": "0102"})


def test_template_errors() -> None:
    with pytest.raises(DataError, match=r"unknown prompt template 'mathy'.*dirl_math.*plain"):
        render_prompt("mathy", {"question": "q"})
    with pytest.raises(DataError, match=r"needs field 'question' \(row has: problem\)"):
        render_prompt("dirl_math", {"problem": "q"})
    with pytest.raises(DataError, match="literal braces"):
        render_prompt("{question} in \\boxed{}", {"question": "q"})
    assert set(PROMPT_TEMPLATES) >= {"plain", "dirl_math", "countdown", "sudoku"}


def test_sft_and_prompt_messages() -> None:
    row = {"question": "Q", "answer": "4", "solution": "2+2=4"}
    assert to_sft_messages(row, "plain") == [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "2+2=4"},
    ]
    assert to_sft_messages({**row, "response": "R"}, "plain")[1]["content"] == "R"
    assert to_sft_messages({"question": "Q", "answer": "4"}, "plain")[1]["content"] == "4"
    assert to_sft_messages({"question": "Q", "solution": ["a", "b"]}, "plain")[1]["content"] == "a\n\nb"
    prompt = to_prompt_messages(row, "dirl_math")
    assert len(prompt) == 1 and prompt[0]["role"] == "user"
    assert prompt[0]["content"].endswith("\\boxed{}.")


# ----------------------------------------------------------------------------- tasks

@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_deterministic_and_seeded(name: str) -> None:
    task = get_task(name)
    a, b = task.generate("train", 200, seed=1), task.generate("train", 200, seed=1)
    c = task.generate("train", 200, seed=2)
    assert a == b
    assert [r["question"] for r in a] != [r["question"] for r in c]
    assert len({r["question"] for r in a}) == 200  # distinct within a split
    assert task.reward in {"gsm8k", "countdown", "sudoku", "code"} and task.prompt_template == "plain"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_splits_disjoint(name: str) -> None:
    task = get_task(name)
    train = {r["question"] for seed in (0, 1) for r in task.generate("train", 1000, seed=seed)}
    test = {r["question"] for seed in (0, 1) for r in task.generate("test", 250, seed=seed)}
    assert len(train) > 1000 and len(test) > 250  # seeds overlap only partly
    assert not train & test
    assert {split_of(q) for q in test} == {"test"}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_length_bounds_and_ascii(name: str) -> None:
    max_prompt, max_response = BOUNDS[name]
    rows = load_rows(f"task:{name}", limit=2000, required=("id", "question", "answer", "response"))
    for row in rows:
        prompt = to_prompt_messages(row, get_task(name).prompt_template)[0]["content"]
        response = to_sft_messages(row, "plain")[1]["content"]
        assert len(prompt) <= max_prompt and len(response) <= max_response, row
        assert all(ch == "\n" or 32 <= ord(ch) < 127 for ch in prompt + response)


def test_arithmetic_answers_right() -> None:
    for row in both_splits("arithmetic", 2000, 300, seed=3):
        question, (*steps, final) = row["question"], row["response"].split("\n")
        assert question.endswith("=") and final == f"#### {row['answer']}"
        assert eval_exact(question[:-1]) == int(row["answer"]) >= 0
        check_steps(steps)
        assert row["solution"] == row["response"]


def _check_countdown(row: dict) -> None:
    *steps, last = row["response"].split("\n")
    expr = re.fullmatch(r"<answer>(.+)</answer>", last).group(1)
    assert eval_exact(expr) == row["target"] == int(row["answer"])
    assert Counter(int(t) for t in re.findall(r"\d+", expr)) == Counter(row["numbers"])
    assert row["question"] == f"Numbers: {row['numbers']}\nTarget: {row['target']}"
    check_steps(steps)


def test_countdown_answers_right() -> None:
    for row in both_splits("countdown", 1000, 200, seed=4):
        assert len(row["numbers"]) == 3 and all(1 <= n <= 20 for n in row["numbers"])
        _check_countdown(row)
    for row in get_task("countdown", num_numbers=4, max_number=99).generate("train", 100, seed=4):
        assert len(row["numbers"]) == 4
        _check_countdown(row)


@needs_shared
def test_countdown_question_format_matches_shared_file() -> None:
    shared = load_rows(SHARED_DATA / "countdown_test.jsonl", limit=20)
    for row in shared:
        assert row["question"] == f"Numbers: {row['numbers']}\nTarget: {row['target']}"


def test_sudoku_answers_right() -> None:
    for row in both_splits("sudoku", 1000, 200, seed=5):
        sol, puzzle = row["solution"], row["puzzle"]
        grid = [[int(sol[4 * r + c]) for c in range(4)] for r in range(4)]
        groups = grid + [list(col) for col in zip(*grid)]
        groups += [[grid[r + i][c + j] for i in (0, 1) for j in (0, 1)] for r in (0, 2) for c in (0, 2)]
        assert all(sorted(g) == [1, 2, 3, 4] for g in groups), sol
        assert all(p in ("0", s) for p, s in zip(puzzle, sol)) and len(puzzle) == 16
        assert puzzle.count("0") == row["num_empty"] and 6 <= row["num_empty"] <= 10
        assert row["question"] == puzzle and row["answer"] == sol
        assert row["response"] == f"<answer>{sol}</answer>"


def test_task_params_and_errors() -> None:
    easy = get_task("arithmetic", max_operands=2, max_operand=9, ops="+")
    rows = easy.generate("train", 20, seed=0)
    assert all(re.fullmatch(r"\d\+\d=", r["question"]) for r in rows)
    assert get_task("arithmetic").params["max_operands"] == 3  # the registry copy is untouched
    with pytest.raises(ValueError, match="no parameter"):
        get_task("sudoku", size=9)
    with pytest.raises(ValueError, match="too small"):
        easy.generate("test", 100, seed=0)  # only 81 distinct d+d problems exist
