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
from posttrain.rewards import build_reward, get_reward, register, reward_columns, reward_label
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
        RewardSpec.model_validate(spec)


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
        RewardSpec.model_validate({"name": "my_rewards:brevity", "scal": 2})
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
