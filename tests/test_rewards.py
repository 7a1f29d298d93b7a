"""Rewards on literal strings: answer formats, the R1 template, robustness, the registry."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from posttrain.data_tools.answers import final_answer, last_boxed
from posttrain.recipe import RewardSpec
from posttrain.rewards import build_reward, check_spec, get_reward, register, reward_columns, reward_label
from posttrain.rewards.pool import ERROR, OK, TIMEOUT, WorkerPool

CASES = [json.loads(line) for line in (Path(__file__).parent / "data" / "answer_cases.jsonl").open()]


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def accuracy():
    return build_reward({"name": "accuracy"})


# --------------------------------------------------------------------------- accuracy


def test_accuracy_agrees_with_every_labelled_case(accuracy) -> None:
    scores = accuracy(completions=[c["completion"] for c in CASES], answer=[c["gold"] for c in CASES])
    wrong = [
        f"{c['note']}: gold {c['gold']!r}, completion {c['completion'][-60:]!r} -> {s}"
        for c, s in zip(CASES, scores, strict=True)
        if s != float(c["correct"])
    ]
    assert not wrong, "\n".join(wrong)
    assert (
        len(CASES) >= 100
        and sum(c["correct"] for c in CASES) > 40
        and sum(not c["correct"] for c in CASES) > 40
    )


def test_plain_text_gold_that_trl_gets_wrong(accuracy) -> None:
    """trl's accuracy_reward reads gold `1/(n+1)` as 1 and `(1, 2]` as 2, and skips `Tuesday`."""
    golds = ["1/(n+1)", "1/(n+1)", "(1, 2]", "(1, 2]", "Tuesday", "4"]
    preds = ["\\frac{1}{n+1}", "1", "(1,2]", "2", "tuesday", "4"]
    completions = [chat(f"<think>...</think><answer>{p}</answer>") for p in preds]
    assert accuracy(completions=completions, answer=golds) == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]


def test_missing_gold_is_none_and_missing_answer_is_zero(accuracy) -> None:
    scores = accuracy(
        completions=["<answer>4</answer>", "<answer>4</answer>", "no answer here"], answer=[None, "", "4"]
    )
    assert scores == [None, None, 0.0]


def test_final_answer_sources_and_precedence() -> None:
    assert final_answer("<think>\\boxed{1}</think><answer>2</answer>") == "2"
    assert final_answer("x \\boxed{\\frac{1}{2}} then \\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert final_answer("work\n#### 1,200\n") == "1,200"
    assert final_answer("<answer>a</answer> <answer> b </answer>") == "b"
    assert final_answer("<answer>so \\boxed{7}.</answer>") == "7"
    assert final_answer("<answer>unclosed") is None and final_answer("\\boxed{open") is None
    assert final_answer("#### 5", sources=["answer"]) is None
    assert last_boxed("\\boxed 5$") == "5"


@pytest.mark.parametrize(
    "completion",
    [
        None,
        42,
        {"content": None},
        [{"role": "assistant"}],
        "",
        "<answer>" * 200_000,
        "</answer>" * 200_000,
        "\\boxed{" * 200_000,
        "{" * 500_000 + "<answer>5</answer>",
        "<answer>" + "9" * 1_000_000 + "</answer>",
        "<answer>\\frac{" + "\\sqrt{" * 300 + "</answer>",
        "<answer>\x00\udcff\u202e</answer>",
    ],
    ids=lambda c: repr(c)[:30],
)
def test_malformed_or_huge_completions_score_without_raising(accuracy, completion) -> None:
    started = time.perf_counter()
    scores = accuracy(completions=[completion], answer=["4"])
    assert scores[0] in (0.0, None)
    assert time.perf_counter() - started < 10


def test_thread_safety_concurrent_calls_agree_with_the_labels() -> None:
    """Four threads share one fresh reward (its cache and the worker pool), each in its own order."""
    import random

    reward = build_reward({"name": "accuracy"})
    results: dict[int, list] = {}

    def score(k: int) -> None:
        order = random.Random(k).sample(range(len(CASES)), len(CASES))
        got = reward(
            completions=[CASES[i]["completion"] for i in order], answer=[CASES[i]["gold"] for i in order]
        )
        results[k] = [got[order.index(i)] for i in range(len(CASES))]

    threads = [threading.Thread(target=score, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == [0, 1, 2, 3]
    for got in results.values():
        assert got == [float(c["correct"]) for c in CASES]


# --------------------------------------------------------------------------- timeouts


def test_pool_kills_a_hung_item_and_carries_on() -> None:
    pool = WorkerPool("time:sleep", processes=2)
    try:
        started = time.perf_counter()
        outcomes = pool.map([(0.01,), (60,), (0.01,), ("not a number",), (0.01,)], timeout=1.0)
        assert [o.status for o in outcomes] == [OK, TIMEOUT, OK, ERROR, OK]
        assert "TypeError" in outcomes[3].value
        assert pool.restarts == 1
        assert time.perf_counter() - started < 30
        assert [o.status for o in pool.map([(0,)] * 3, timeout=1.0)] == [OK] * 3  # the pool recovered
    finally:
        pool.close()


def test_accuracy_counts_timeouts_and_dead_workers_and_logs_them(monkeypatch) -> None:
    import posttrain.rewards.accuracy as module

    monkeypatch.setattr(module, "JUDGE", "slow_judge:equivalent")
    reward = build_reward({"name": "accuracy", "timeout": 1.0, "workers": 2})
    logged: dict[str, float] = {}
    preds = ["x", "hang", "die", "raise", "y"]
    scores = reward(
        completions=[f"<answer>{p}</answer>" for p in preds],
        answer=["x"] * 5,
        log_metric=lambda k, v: logged.__setitem__(k, v),
    )
    assert scores == [1.0, None, None, None, 0.0]
    assert logged["rewards/accuracy/timeouts"] == 1
    assert logged["rewards/accuracy/errors"] == 2
    stats = reward.stats.as_dict()
    assert stats["timeouts"] == 1 and stats["samples"] == 5 and stats["none"] == 3


def test_accuracy_works_off_the_main_thread(accuracy) -> None:
    """math-verify's signal-based timeout raises outside the main thread; ours does not care."""
    out: list = []
    t = threading.Thread(
        target=lambda: out.append(accuracy(completions=["\\boxed{\\frac{2}{4}}"], answer=["0.5"]))
    )
    t.start()
    t.join(timeout=60)
    assert out == [[1.0]]


# --------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    ("text", "strict", "lenient", "tags"),
    [
        ("<think>8+5=13</think><answer>13</answer>", 1.0, 1.0, 1.0),
        ("<think>\nwork\n</think>\n<answer>\n13\n</answer>\n", 1.0, 1.0, 1.0),
        ("<think></think><answer>13</answer>", 1.0, 1.0, 1.0),
        ("<think>work</think><answer> </answer>", 0.0, 0.0, 1.0),
        ("<think>work</think>so<answer>13</answer>", 0.0, 1.0, 1.0),
        ("Sure! <think>work</think><answer>13</answer>", 0.0, 1.0, 1.0),
        ("<think>work</think><answer>13</answer> bye", 0.0, 1.0, 1.0),
        ("<think>a</think><think>b</think><answer>13</answer>", 0.0, 1.0, 0.5),
        ("<answer>13</answer><think>work</think>", 0.0, 0.0, 1.0),
        ("<think>work</think>", 0.0, 0.0, 0.5),
        ("<think>work<answer>13</answer>", 0.0, 0.0, 0.75),
        ("13", 0.0, 0.0, 0.0),
        ("", 0.0, 0.0, 0.0),
    ],
)
def test_format_strict_lenient_and_tag_count(text: str, strict: float, lenient: float, tags: float) -> None:
    completions = [text, chat(text)]
    assert build_reward({"name": "format"})(completions=completions) == [strict, strict]
    assert build_reward({"name": "format", "mode": "lenient"})(completions=completions) == [lenient, lenient]
    assert build_reward({"name": "tag_count"})(completions=completions) == [tags, tags]


def test_format_with_think_opened_by_the_chat_template() -> None:
    reward = build_reward({"name": "format", "think_prefilled": True})
    assert reward(
        completions=["reasoning</think><answer>1</answer>", "<think>r</think><answer>1</answer>"]
    ) == [1.0, 1.0]
    assert build_reward({"name": "format"})(completions=["reasoning</think><answer>1</answer>"]) == [0.0]


def test_format_on_a_huge_adversarial_completion_is_fast() -> None:
    started = time.perf_counter()
    text = "<think>" + "</think><answer>" * 100_000
    assert build_reward({"name": "format"})(completions=[text]) == [0.0]
    assert time.perf_counter() - started < 2


# --------------------------------------------------------------------------- registry and guard


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "acuracy"}, "did you mean 'accuracy'"),
        ({"name": "format", "strict": True}, "no option 'strict'"),
        ({"name": "format", "mode": "loose"}, "option 'mode'"),
        ({"name": "accuracy", "timeout": "soon"}, "option 'timeout'"),
        ({"name": "format", "model": "rm"}, "takes no `model:`"),
        ({"name": "no_such_module_xyz:fn"}, "cannot import"),
        ({"name": "json:nope"}, "has no 'nope'"),
        ({"name": "json:dumps"}, "not a reward function"),
    ],
)
def test_bad_reward_specs_fail_at_validation(spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        checked(spec)


def checked(spec: dict) -> RewardSpec:
    """A `rewards:` entry as the recipe loads it: the schema, then the registry (posttrain.loading)."""
    parsed = RewardSpec.model_validate(spec)
    check_spec(parsed.name, parsed.options, parsed.model is not None)
    return parsed


def test_user_reward_by_import_path(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "my_rewards.py").write_text(
        "from posttrain.rewards import register\n"
        "def brevity(completions, difficulty, scale: float = 1.0, **kwargs):\n"
        "    return [scale * d / max(1, len(c)) for c, d in zip(completions, difficulty)]\n"
        "@register('shouty')\n"
        "def shouty(bonus: float = 1.0):\n"
        "    def reward(completions, **kwargs):\n"
        "        return [bonus if c.isupper() else 0.0 for c in completions]\n"
        "    return reward\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = RewardSpec.model_validate({"name": "my_rewards:brevity", "scale": 2, "weight": 0.5})
    assert reward_columns(spec) == ("difficulty",) and reward_label(spec) == "brevity"
    assert build_reward(spec)(completions=["abcd"], difficulty=[2]) == [1.0]
    with pytest.raises(ValueError, match="no option 'scal'; did you mean 'scale'"):
        checked({"name": "my_rewards:brevity", "scal": 2})
    with pytest.raises(ValueError, match="option 'scale': Input should be a valid number"):
        checked({"name": "my_rewards:brevity", "scale": "big"})
    shouty = build_reward({"name": "my_rewards:shouty", "bonus": 3, "label": "loud"})
    assert shouty.__name__ == "loud" and shouty(completions=["HI", "hi"]) == [3.0, 0.0]
    assert get_reward("shouty").name == "shouty"  # importing the module registered it


def test_guard_turns_failures_into_none_per_sample() -> None:
    @register("flaky_test_reward")
    def flaky():
        def reward(completions, **kwargs):
            if "boom" in completions:
                raise RuntimeError("boom")
            return [float("nan") if c == "nan" else len(c) for c in completions]

        return reward

    reward = build_reward({"name": "flaky_test_reward"})
    logged: dict[str, float] = {}
    scores = reward(
        completions=["ab", "boom", "nan", "abc"], log_metric=lambda k, v: logged.__setitem__(k, v)
    )
    assert scores == [2.0, None, None, 3.0]
    assert logged["rewards/flaky_test_reward/errors"] == 1
    assert logged["rewards/flaky_test_reward/none_frac"] == 0.5
    assert reward.stats.as_dict()["errors"] == 1


def test_registering_two_rewards_under_one_name_fails() -> None:
    with pytest.raises(ValueError, match="registered as 'format'"):
        register("format")(lambda: None)


def test_rewards_package_imports_no_heavy_libraries() -> None:
    import subprocess

    code = "import sys, posttrain.rewards; print(sorted(m for m in ('torch','sympy','math_verify','trl') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- length, repetition, language


def test_length_is_cosine_scaled_by_correctness() -> None:
    reward = build_reward({"name": "length", "max_len": 100})
    completions = ["<answer>4</answer>"] * 4 + ["<answer>5</answer>"] * 2
    ids = [[0] * 0, [0] * 50, [0] * 100, [0] * 500, [0] * 0, [0] * 100]
    scores = reward(completions=completions, answer=["4"] * 6, completion_ids=ids)
    assert scores == pytest.approx([1.0, 0.75, 0.5, 0.5, -1.0, -0.5])
    assert reward(completions=["<answer>4</answer>"], answer=[None], completion_ids=[[0]]) == [None]


def test_overlong_is_daps_soft_punishment() -> None:
    reward = build_reward({"name": "overlong", "max_len": 100, "soft_cache": 20})
    ids = [[0] * n for n in (10, 80, 90, 100, 120)]
    assert reward(completions=["x"] * 5, completion_ids=ids) == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    assert reward(completions=["x" * 90]) == pytest.approx([-0.5])  # characters without token ids


def test_repetition_penalises_loops_in_tokens_words_or_chars() -> None:
    tokens = build_reward({"name": "repetition", "ngram_size": 2})
    assert tokens(completions=["a", "b"], completion_ids=[[1, 2, 3, 4], [5, 5, 5, 5, 5]]) == [0.0, -0.75]
    words = build_reward({"name": "repetition", "ngram_size": 2, "unit": "words"})
    assert words(completions=["one two three", "go go go go go"]) == [0.0, -0.75]
    with pytest.raises(ValueError, match="max_penalty"):
        checked({"name": "repetition", "max_penalty": 0.5})


@pytest.mark.parametrize(
    ("prompt", "completion", "expected"),
    [
        ("What is two plus two?", "<think>two and two make four</think><answer>4</answer>", 1.0),
        ("What is two plus two?", "<think>two 加 two 等于 four</think>", 3 / 6),
        ("二加二等于几？", "<think>二加二等于四</think><answer>4</answer>", 1.0),
        ("二加二等于几？", "<think>two plus two</think>", 0.0),
        ("Сколько будет два плюс два?", "<think>два плюс два = четыре</think>", 1.0),
        (
            [
                {"role": "system", "content": "Réponds."},
                {"role": "user", "content": "Combien font deux et deux ?"},
            ],
            [{"role": "assistant", "content": "<think>deux et deux font quatre</think>"}],
            1.0,
        ),  # fmt: skip
        ("What is 2+2?", "<think>2+2=4</think><answer>4</answer>", 1.0),
        ("28+35=", "<think>8+5=13</think>", None),
        ("What?", "reasoning without tags, in English", 1.0),
    ],
)
def test_language_consistency_by_script(prompt, completion, expected) -> None:
    reward = build_reward({"name": "language_consistency"})
    score = reward(prompts=[prompt], completions=[completion])[0]
    assert score == (pytest.approx(expected) if expected is not None else None)


def test_language_consistency_with_a_fixed_script() -> None:
    reward = build_reward({"name": "language_consistency", "script": "cjk"})
    assert reward(prompts=["28+35="], completions=["<think>八加五</think>"]) == [1.0]


# --------------------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def tiny_reward_model(tiny_dense: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    dest = tmp_path_factory.mktemp("rm") / "model"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_dense), num_labels=1)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(str(tiny_dense)).save_pretrained(dest)
    return dest


class StageRef:
    """A run context that resolves the stage name `rm` to a model folder."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def model(self, ref: str):
        from posttrain.recipe import PathModel

        assert ref == "rm"
        return PathModel(path=str(self.path))


def test_reward_model_scores_through_a_stage_reference(tiny_reward_model: Path) -> None:
    prompts = [[{"role": "user", "content": "1+1="}]] * 3
    completions = [chat("<answer>2</answer>"), chat("<answer>3</answer>"), chat("<answer>2</answer>")]
    reward = build_reward(
        {"name": "reward_model", "model": "rm", "batch_size": 2}, StageRef(tiny_reward_model)
    )
    scores = reward(prompts=prompts, completions=completions)
    assert all(isinstance(s, float) for s in scores) and scores[0] == pytest.approx(scores[2], abs=1e-5)
    assert scores[0] != scores[1]
    shifted = build_reward(
        {"name": "reward_model", "model": "rm", "scale": 2, "shift": 1}, StageRef(tiny_reward_model)
    )
    assert shifted(prompts=prompts[:1], completions=completions[:1])[0] == pytest.approx(
        2 * scores[0] + 1, abs=1e-4
    )


def test_reward_model_scores_each_distinct_text_once(tiny_reward_model: Path, monkeypatch) -> None:
    """A GRPO group often repeats an answer: the reward model runs on each distinct text once,
    and every copy gets that text's score, the same as scored alone."""
    from transformers import AutoModelForSequenceClassification

    rows_seen: list[int] = []
    load = AutoModelForSequenceClassification.from_pretrained

    def counting_load(*args, **kwargs):
        scorer = load(*args, **kwargs)
        scorer.register_forward_hook(
            lambda _m, _a, kw, _o: rows_seen.append(len(kw["input_ids"])), with_kwargs=True
        )
        return scorer

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", counting_load)
    reward = build_reward(
        {"name": "reward_model", "model": "rm", "batch_size": 2}, StageRef(tiny_reward_model)
    )
    prompts = [[{"role": "user", "content": "1+1="}]] * 5
    answers = ["2", "3", "2", "2", "4"]
    scores = reward(prompts=prompts, completions=[chat(f"<answer>{a}</answer>") for a in answers])
    assert rows_seen == [2, 1]  # 3 distinct texts in batches of 2
    alone = {a: reward(prompts=prompts[:1], completions=[chat(f"<answer>{a}</answer>")])[0] for a in "234"}
    assert scores == [pytest.approx(alone[a], abs=1e-5) for a in answers]
    assert scores[0] == scores[2] == scores[3]


# --------------------------------------------------------------------------- posttrain rewards score


def test_rewards_score_end_to_end(cli, tmp_path: Path) -> None:
    rows = [
        {
            "prompt": "28+35=",
            "completion": "<think>8+5=13;2+3+1=6</think><answer>63</answer>",
            "answer": "63",
        },
        {
            "completion": [{"role": "assistant", "content": "<think>.</think><answer>0.5</answer>"}],
            "answer": "1/2",
        },
        {"completion": "no tags at all", "answer": "4"},
        {"completion": "<answer>4</answer>", "answer": None},
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scored.jsonl"
    code, stdout, err = cli(
        "rewards", "score", data, "--reward", "accuracy", "--reward", "{name: format, mode: lenient, label: fmt}",
        "--out", out,
    )  # fmt: skip
    assert code == 0, err
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["rewards"]["accuracy"] for r in scored] == [1.0, 1.0, 0.0, None]
    assert [r["rewards"]["fmt"] for r in scored] == [1.0, 1.0, 0.0, 0.0]
    assert scored[0]["answer"] == "63"  # the row is repeated as it was
    lines = {line.split()[0]: line.split() for line in stdout.splitlines()[1:3]}
    assert lines["accuracy"][1:4] == ["0.6667", "0.4714", "25.0%"] and lines["fmt"][1] == "0.5000"
    assert "samples/s" in stdout and "4 rows" in stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--reward", "acuracy"], "did you mean 'accuracy'"),
        (["--reward", "{name: length}"], "needs option 'max_len'"),
        (["--reward", "{name: format, mode: [}"], "invalid YAML"),
    ],
)
def test_rewards_score_bad_rewards_exit_2(cli, tmp_path: Path, args: list[str], message: str) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"completion": "x", "answer": "1"}) + "\n")
    code, _, err = cli("rewards", "score", data, *args)
    assert code == 2 and message in err


def test_rewards_score_missing_column_and_bad_lines_exit_2(cli, tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"completion": "x"}) + "\n")
    code, _, err = cli("rewards", "score", data, "--reward", "accuracy")
    assert code == 2 and "needs column 'answer'" in err
    data.write_text(json.dumps({"completion": "x"}) + "\n{not json\n")
    code, _, err = cli("rewards", "score", data, "--reward", "format")
    assert code == 2 and "rows.jsonl:2" in err


def test_append_jsonl_survives_a_torn_last_line(tmp_path: Path) -> None:
    from posttrain import artifacts

    path = tmp_path / "samples.jsonl"
    artifacts.append_jsonl(path, [{"step": 1}])
    with open(path, "a") as f:
        f.write('{"step": 2, "compl')  # a SIGKILL mid-write
    assert artifacts.read_jsonl(path) == [{"step": 1}]
    artifacts.append_jsonl(path, [{"step": 3}])
    assert artifacts.read_jsonl(path) == [{"step": 1}, {"step": 3}]
