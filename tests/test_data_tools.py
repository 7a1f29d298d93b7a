"""data_tools: loaders and formats, column mapping, templates, chat shaping, mixtures, hygiene,
curricula, answer extraction, and `posttrain data inspect` — on small files the tests write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.data_tools import DataReport, load_rows
from posttrain.data_tools.answers import extract_answer
from posttrain.data_tools.curriculum import curriculum_order
from posttrain.data_tools.hygiene import EvalGrams, find_duplicates
from posttrain.data_tools.mixture import plan_counts
from posttrain.errors import PosttrainError
from posttrain.recipe import CurriculumSpec, DedupSpec, FileData, MixtureData, SyntheticData

RECORDS = [
    {"question": "What is two plus three?", "solution": "2+3=5\n#### 5", "level": 2},
    {"question": "What is ten minus four?", "solution": "10-4=6\n#### 6", "level": 1},
    {"question": "What is seven times six?", "solution": "7*6=42\n#### 42", "level": 3},
]


def write_records(folder: Path, fmt: str, records: list[dict] = RECORDS, name: str = "data") -> Path:
    import pandas as pd

    path = folder / f"{name}.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "json":
        path.write_text(json.dumps(records))
    elif fmt == "csv":
        pd.DataFrame(records).to_csv(path, index=False)
    elif fmt == "parquet":
        pd.DataFrame(records).to_parquet(path)
    return path


def data(**fields) -> FileData:
    return FileData.model_validate(fields)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_each_format_loads_with_columns_mapped(tmp_path: Path, fmt: str) -> None:
    path = write_records(tmp_path, fmt)
    rows = load_rows(data(path=str(path), columns={"prompt": "question", "answer": "solution"}))
    assert len(rows) == 3
    assert {"prompt", "answer", "level"} <= set(rows.column_names)
    assert "question" not in rows.column_names
    # text prompts become a user turn, so every model sees its own chat template
    assert rows[0]["prompt"] == [{"role": "user", "content": "What is two plus three?"}]
    assert rows[2]["answer"].endswith("#### 42")


def test_a_folder_of_files_and_a_split_slice(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    write_records(folder, "jsonl", RECORDS[:2], name="a")
    write_records(folder, "jsonl", RECORDS[2:], name="b")
    assert len(load_rows(data(path=str(folder)))) == 3
    assert len(load_rows(data(path=str(folder), split="train[:2]"))) == 2


def test_folder_mixing_file_types_and_missing_paths_are_errors(tmp_path: Path) -> None:
    write_records(tmp_path, "jsonl")
    write_records(tmp_path, "csv")
    with pytest.raises(PosttrainError, match="mixes file types"):
        load_rows(data(path=str(tmp_path)))
    with pytest.raises(PosttrainError, match="no such file"):
        load_rows(data(path=str(tmp_path / "absent.jsonl")))


def test_an_unreachable_hub_id_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(PosttrainError, match="cannot load hub dataset 'no-such-org/no-such-set'"):
        load_rows(data(path="no-such-org/no-such-set", split="train"))


def test_a_missing_column_lists_the_columns_the_file_has(tmp_path: Path) -> None:
    path = write_records(tmp_path, "jsonl")
    with pytest.raises(PosttrainError, match="no column 'problem'; the data has: question, solution, level"):
        load_rows(data(path=str(path), columns={"prompt": "problem"}))


def test_template_builds_the_prompt_and_system_prompt_adds_a_turn(tmp_path: Path) -> None:
    records = [{"q": "Capital of France?", "choices": ["Paris", "Rome"], "a": "A"}]
    path = write_records(tmp_path, "jsonl", records)
    spec = data(
        path=str(path),
        template="{q}\n\nOptions: {choices}",
        columns={"answer": "a"},
        system_prompt="Answer with a letter.",
    )
    row = load_rows(spec)[0]
    assert row["prompt"] == [
        {"role": "system", "content": "Answer with a letter."},
        {"role": "user", "content": "Capital of France?\n\nOptions: A) Paris, B) Rome"},
    ]
    with pytest.raises(PosttrainError, match="template names column 'question'; the data has: q, choices, a"):
        load_rows(data(path=str(path), template="{question}"))


def test_sharegpt_conversations_and_a_system_column(tmp_path: Path) -> None:
    records = [
        {
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
            "sys": "Be kind.",
        }
    ]
    path = write_records(tmp_path, "jsonl", records)
    rows = load_rows(data(path=str(path), columns={"messages": "conversations", "system": "sys"}))
    assert rows[0]["messages"] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    assert "system" not in rows.column_names


def test_as_chat_false_keeps_raw_text(tmp_path: Path) -> None:
    path = write_records(tmp_path, "jsonl")
    rows = load_rows(data(path=str(path), columns={"prompt": "question"}, as_chat=False))
    assert rows[0]["prompt"] == "What is two plus three?"


def test_another_stages_data_folder(tmp_path: Path) -> None:
    (tmp_path / "label" / "data").mkdir(parents=True)
    write_records(tmp_path / "label" / "data", "jsonl")
    rows = load_rows("label", stage_dirs={"label": tmp_path / "label"})
    assert len(rows) == 3


# --------------------------------------------------------------------------- hygiene


def test_exact_and_near_duplicates_are_found() -> None:
    base = "the quick brown fox jumps over the lazy dog near the quiet river bank today"
    texts = [
        base,
        base.upper() + "  ",  # exact after normalisation
        base.replace("today", "tonight"),  # one word of fifteen changed: near
        "an entirely different sentence about training small language models on arithmetic",
    ]
    found = find_duplicates(texts, DedupSpec(threshold=0.7))
    assert found == {1: (0, "exact"), 2: (0, "near")}
    assert find_duplicates(texts, DedupSpec(near=False)) == {1: (0, "exact")}


def test_dedup_in_a_recipe_block_reports_what_it_removed(tmp_path: Path) -> None:
    path = write_records(tmp_path, "jsonl", [*RECORDS, RECORDS[0], {**RECORDS[1], "level": 9}])
    report = DataReport()
    rows = load_rows(data(path=str(path), columns={"prompt": "question"}, dedup=True), report=report)
    assert len(rows) == 3
    assert report.steps[0]["step"] == "dedup" and report.steps[0]["removed"] == 2
    assert report.steps[0]["examples"][0]["kind"] == "exact"


def test_decontamination_removes_rows_sharing_an_eval_ngram(tmp_path: Path) -> None:
    train = [
        {"question": "Natalia sold clips to 48 of her friends in April, and then half as many in May."},
        {"question": "A farmer has 12 cows and buys 5 more; how many cows are there now in total?"},
        {"question": "Natalia sold clips to 48 of her friends in April. How many in May?"},  # 8-gram shared
        {"question": "What is 12+34="},
    ]
    evals = [
        {"problem": "Natalia sold clips to 48 of her friends in April, and then some more."},
        {"problem": "12+34="},  # shorter than 8 words: matches as a whole
        {"problem": "12-34="},
    ]
    train_path = write_records(tmp_path, "jsonl", train, name="train")
    eval_path = write_records(tmp_path, "jsonl", evals, name="eval")
    against = {"path": str(eval_path), "columns": {"prompt": "problem"}}
    report = DataReport()
    spec = data(path=str(train_path), columns={"prompt": "question"}, decontaminate={"against": [against]})
    rows = load_rows(spec, report=report)
    assert [r["prompt"][0]["content"] for r in rows] == [train[1]["question"]]
    step = report.steps[-1]
    assert step["step"] == "decontaminate" and step["removed"] == 3
    assert step["examples"][0]["matched"] == "natalia sold clips to 48 of her friends"


def test_short_eval_prompts_match_whole_and_keep_operators_apart() -> None:
    grams = EvalGrams.of(["12+34=", "hi"], n=8)
    assert grams.match("so 12 + 34 = 46") == "12 + 34 ="
    assert grams.match("12-34=") is None
    assert grams.match("hi there") is None  # two words are too short to decontaminate on


# --------------------------------------------------------------------------- mixtures and curricula


def test_plan_counts_by_weight_and_count() -> None:
    assert plan_counts([100, 100], [3, 1], [None, None], 40) == [30, 10]
    assert plan_counts([100, 10], [1, 1], [None, None], None) == [10, 10]  # the scarcer source limits
    assert plan_counts([100, 5, 50], [1, None, 1], [None, 7, None], 27) == [10, 7, 10]


def test_mixture_draws_by_plan_and_shuffles_with_the_seed(tmp_path: Path) -> None:
    path = write_records(tmp_path, "jsonl")
    spec = MixtureData.model_validate(
        {
            "mix": [
                {"data": {"synthetic": "arithmetic", "n": 40}, "weight": 3},
                {
                    "data": {"path": str(path), "columns": {"prompt": "question", "answer": "solution"}},
                    "count": 5,
                },
            ],
            "n": 20,
        }
    )
    report = DataReport()
    rows = load_rows(spec, seed=1, report=report)
    assert len(rows) == 20
    assert set(rows.column_names) == {"prompt", "answer"}  # the columns both sources share
    from_file = sum(r["prompt"][0]["content"].startswith("What is") for r in rows)
    assert from_file == 5
    assert [s["repeated"] for s in report.steps if s["step"] == "mix"] == [0, 2]  # 5 drawn from 3 rows
    assert rows["answer"] == load_rows(spec, seed=1)["answer"]
    assert rows["answer"] != load_rows(spec, seed=2)["answer"]


def test_mixture_validation() -> None:
    with pytest.raises(ValueError, match="weight or a count"):
        MixtureData.model_validate({"mix": [{"data": "x.jsonl", "weight": 1, "count": 2}]})
    with pytest.raises(ValueError, match="counts add up to 5 but n is 4"):
        MixtureData.model_validate({"mix": [{"data": "x.jsonl", "count": 5}], "n": 4})


def test_curriculum_orders_and_buckets() -> None:
    scores = [3.0, 1.0, 2.0, 1.0, 3.0, 2.0]
    order = curriculum_order(scores, CurriculumSpec(), seed=0)
    assert [scores[i] for i in order] == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    down = curriculum_order(scores, CurriculumSpec(order="descending"), seed=0)
    assert [scores[i] for i in down] == [3.0, 3.0, 2.0, 2.0, 1.0, 1.0]
    banded = curriculum_order(scores, CurriculumSpec(buckets=3), seed=0)
    assert sorted(scores[i] for i in banded[:2]) == [1.0, 1.0] and sorted(banded) == list(range(6))


def test_curriculum_on_synthetic_difficulty() -> None:
    spec = SyntheticData.model_validate(
        {"synthetic": "arithmetic", "n": 30, "curriculum": {"by": "difficulty"}}
    )
    difficulty = load_rows(spec)["difficulty"]
    assert difficulty == sorted(difficulty) and difficulty[0] < difficulty[-1]


# --------------------------------------------------------------------------- answers


def test_extract_answer_is_the_whole_cascade() -> None:
    assert extract_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"
    assert extract_answer(r"<answer>5</answer> \boxed{6}") == "5"
    assert extract_answer(r"first \boxed{1}, finally $\boxed{\frac{1}{\sqrt{2}}}$") == r"\frac{1}{\sqrt{2}}"
    assert extract_answer(r"\boxed{6}" + "\n#### 7") == "6"
    assert extract_answer("3 + 4 = 7\n#### 1,234") == "1,234"
    assert extract_answer(r"unclosed \boxed{1") is None
    assert extract_answer("no answer here") is None


# --------------------------------------------------------------------------- inspect


def test_data_inspect_cli(tmp_path: Path, cli) -> None:
    path = write_records(tmp_path, "jsonl", [*RECORDS, RECORDS[0]])
    out = tmp_path / "out"
    code, stdout, stderr = cli(
        "data", "inspect", path, "--columns", "prompt=question,completion=solution", "--out", out, "--json"
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["rows"] == 4
    assert {"prompt", "completion", "level"} <= set(summary["columns"])
    assert summary["duplicates"]["exact"] == 1
    assert "<|user|>What is two plus three?<|assistant|>" in summary["examples"][0]
    lengths = summary["token_lengths"]
    assert 0 < lengths["min"] <= lengths["p50"] <= lengths["p99"] <= lengths["max"]
    histogram = Path(summary["histogram"])
    assert histogram.parent == out and histogram.read_bytes().startswith(b"\x89PNG")


def test_data_inspect_bad_columns_exit_2(tmp_path: Path, cli) -> None:
    path = write_records(tmp_path, "jsonl")
    code, _, stderr = cli("data", "inspect", path, "--columns", "prompt=nope")
    assert code == 2 and "no column 'nope'" in stderr
    code, _, stderr = cli("data", "inspect", path, "--columns", "prompt")
    assert code == 2 and "expected canonical=source" in stderr
