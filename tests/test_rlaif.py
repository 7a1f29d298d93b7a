"""RLAIF: judges, both-order averaging, the judge cache, the label and reward-model stages.

Layers: pure labelling logic on a judge whose position bias is known; the cache on disk (torn
lines, re-runs); the `openai` backend against a real HTTP server on 127.0.0.1; the `hf` and
`likelihood` backends on a tiny model; the stages end to end through the CLI.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from fake_openai import VERDICT_A, ScriptedServer, chat_reply

from posttrain.errors import PosttrainError
from posttrain.judges import Judge, PairQuery
from posttrain.judges.cache import JudgeCache, cache_key
from posttrain.judges.labels import (
    Pair,
    agreement,
    best_vs_worst,
    candidate_pairs,
    decide,
    judge_pairs,
    label_metrics,
    preference_record,
)
from posttrain.judges.prompt import pairwise_prompt, parse_verdict
from posttrain.recipe import load_principles


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def biased_judge(bias: float, calls: list | None = None) -> Judge:
    """A pairwise judge that knows each answer's quality (the number in it) but adds `bias` to
    the logit of whichever answer is shown first."""

    def compare(queries: list[PairQuery]) -> list[dict]:
        if calls is not None:
            calls.append(len(queries))
        return [{"p_first": sigmoid(float(q.first) - float(q.second) + bias)} for q in queries]

    return Judge(id=f"biased-{bias}", batch_size=4, compare=compare)


# --------------------------------------------------------------------------- pure labelling


def test_candidate_pairs_skip_duplicates_and_sample_reproducibly():
    pairs = candidate_pairs([["1", "2", "1", "3"], ["5", "5"]], None, 0)
    assert pairs == [Pair(0, 0, 1), Pair(0, 0, 3), Pair(0, 1, 3)]
    sampled = candidate_pairs([[str(i) for i in range(6)]], 4, seed=1)
    assert len(sampled) == 4 and sampled == candidate_pairs([[str(i) for i in range(6)]], 4, seed=1)


def test_both_orders_cancel_a_known_position_bias(tmp_path: Path):
    answers = [["0", "0.2", "3"]]  # qualities: a near-tie (0 vs 0.2) and two clear gaps
    judge = biased_judge(bias=2.0)
    judged = judge_pairs(
        judge, JudgeCache(tmp_path / "c.jsonl"), ["q"], answers, candidate_pairs(answers, None, 0)
    )
    by_pair = {(j.pair.a, j.pair.b): j for j in judged}
    near = by_pair[(0, 1)]
    # Shown first, either answer wins: the raw orders contradict each other...
    assert near.p_ab > 0.5 and near.p_ba < 0.5
    # ...and their mean is the unbiased preference, sigmoid(d+b)/2 + sigmoid(d-b)/2, close to 0.5.
    assert near.p == pytest.approx((sigmoid(-0.2 + 2) + sigmoid(-0.2 - 2)) / 2)
    assert decide(near, min_margin=0.05, max_disagreement=0.9) == "tie"
    assert decide(near, min_margin=0.05, max_disagreement=0.5) == "inconsistent"
    clear = by_pair[(0, 2)]  # 0 vs 3: the better answer wins in both orders
    assert clear.p < 0.2 and decide(clear, 0.05, 0.9) == "kept"
    record = preference_record(clear, "q", answers[0], judge, None)
    assert (record["chosen"], record["rejected"]) == ("3", "0")
    assert record["p_chosen"] == pytest.approx(1 - clear.p)
    assert record["scores"]["chosen_first"] == pytest.approx(sigmoid(3 + 2))
    assert record["scores"]["chosen_second"] == pytest.approx(sigmoid(3 - 2))

    decisions = [decide(j, 0.05, 0.9) for j in judged]
    metrics = label_metrics(judged, decisions)
    assert metrics["pairs_judged"] == 3 and metrics["kept"] == 2
    assert metrics["dropped_by_reason"]["tie"] == 1
    assert metrics["position_consistency"] == pytest.approx(2 / 3)
    assert metrics["first_position_win_rate"] > 0.5  # the bias shows
    truth = {(0, 0): False, (0, 1): False, (0, 2): True}
    assert agreement(judged, decisions, truth) == {"n": 2, "accuracy": 1.0}


def test_a_judge_that_always_picks_the_first_answer_keeps_nothing(tmp_path: Path):
    def first(queries):
        return [{"p_first": 0.9} for _ in queries]

    judge = Judge(id="first", batch_size=8, compare=first)
    answers = [["1", "2", "3"], ["4", "5"]]
    judged = judge_pairs(
        judge, JudgeCache(tmp_path / "c.jsonl"), ["a", "b"], answers, candidate_pairs(answers, None, 0)
    )
    assert all(j.p == pytest.approx(0.5) for j in judged)
    decisions = [decide(j, 0.05, 0.5) for j in judged]
    metrics = label_metrics(judged, decisions)
    assert metrics["kept"] == 0 and metrics["dropped_by_reason"]["inconsistent"] == 4
    assert metrics["position_consistency"] == 0.0 and metrics["first_position_win_rate"] == 1.0


def test_invalid_verdicts_are_dropped_and_counted(tmp_path: Path):
    def sometimes(queries):
        return [{"p_first": None if q.first == "2" else 0.8} for q in queries]

    answers = [["1", "2", "3"]]
    judged = judge_pairs(
        Judge(id="x", batch_size=8, compare=sometimes), JudgeCache(tmp_path / "c.jsonl"), ["q"], answers,
        candidate_pairs(answers, None, 0),
    )  # fmt: skip
    decisions = [decide(j, 0.05, 0.9) for j in judged]
    assert label_metrics(judged, decisions)["dropped_by_reason"]["invalid"] == 2


def test_pointwise_judge_scores_each_answer_once(tmp_path: Path):
    seen = []

    def score(items):
        seen.extend(items)
        return [float(answer) for _, answer, _ in items]

    judge = Judge(id="pw", batch_size=16, score=score, temperature=0.5)
    answers = [["1", "2", "4"]]
    judged = judge_pairs(
        judge, JudgeCache(tmp_path / "c.jsonl"), ["q"], answers, candidate_pairs(answers, None, 0)
    )
    assert sorted(a for _, a, _ in seen) == ["1", "2", "4"]
    j = next(j for j in judged if (j.pair.a, j.pair.b) == (0, 2))
    assert j.p_ab == j.p_ba == pytest.approx(sigmoid((1 - 4) / 0.5))
    assert preference_record(j, "q", answers[0], judge, None)["judge_scores"] == {
        "chosen": 4.0,
        "rejected": 1.0,
    }


def test_best_vs_worst_keeps_one_pair_per_prompt(tmp_path: Path):
    answers = [["1", "5", "3", "2"]]
    judged = judge_pairs(
        biased_judge(0.0), JudgeCache(tmp_path / "c.jsonl"), ["q"], answers, candidate_pairs(answers, None, 0)
    )
    decisions = best_vs_worst(judged, [decide(j, 0.05, 0.5) for j in judged])
    kept = [j for j, d in zip(judged, decisions, strict=True) if d == "kept"]
    assert [(j.pair.a, j.pair.b) for j in kept] == [(0, 1)]  # "5" against "1"
    assert decisions.count("unselected") == 5


# --------------------------------------------------------------------------- cache


def test_cache_hits_on_rerun_and_survives_a_torn_line(tmp_path: Path):
    path = tmp_path / "cache" / "judge.jsonl"
    calls: list[int] = []
    answers = [["1", "2", "3"], ["4", "6"]]
    pairs = candidate_pairs(answers, None, 0)
    first = judge_pairs(biased_judge(1.0, calls), JudgeCache(path), ["a", "b"], answers, pairs)
    assert sum(calls) == 8  # 4 pairs x 2 orders, in batches of 4
    assert calls == [4, 4]

    with open(path, "a") as f:
        f.write('{"key": "torn-by-a-crash", "val')  # a SIGKILL mid-write
    cache = JudgeCache(path)
    assert len(cache) == 8 and path.read_text().endswith("\n")  # the torn tail is cut off
    calls.clear()
    again = judge_pairs(biased_judge(1.0, calls), cache, ["a", "b"], answers, pairs)
    assert calls == [] and cache.hits == 8 and cache.misses == 0
    assert [j.p for j in again] == [j.p for j in first]

    cache.put_many([(cache_key("j", "p", "x", "y"), {"p_first": 0.3})])
    assert JudgeCache(path).get(cache_key("j", "p", "x", "y")) == {"p_first": 0.3}
    other = judge_pairs(biased_judge(1.5, calls), JudgeCache(path), ["a", "b"], answers, pairs)
    assert sum(calls) == 8 and other[0].p != first[0].p  # another judge id: its own results


# --------------------------------------------------------------------------- prompt


def test_principles_from_a_list_a_file_or_a_shipped_constitution(tmp_path: Path):
    assert load_principles(["  Be right. ", ""]) == ["Be right."]
    path = tmp_path / "rules.txt"
    path.write_text("# mine\nBe brief.\n\nBe kind.\n")
    assert load_principles(str(path)) == ["Be brief.", "Be kind."]
    assert len(load_principles("default")) >= 4 and "correct" in " ".join(load_principles("math"))
    with pytest.raises(ValueError, match="did you mean 'math'"):
        load_principles("maths")


def test_pairwise_prompt_and_strict_verdicts():
    text = pairwise_prompt("2+2=", "4", "5", ["Be correct."], ("1", "2"), rationale=True)
    assert "1. Be correct." in text and "Answer 1:\n4" in text and "Answer 2:\n5" in text
    assert '"Verdict: 1" or "Verdict: 2"' in text and "Rationale:" in text
    assert parse_verdict("Rationale: the first is right.\nVerdict: A", ("A", "B")) == 1.0
    assert parse_verdict("**Verdict: B**", ("A", "B")) == 0.0
    assert parse_verdict("B", ("A", "B")) == 0.0
    assert parse_verdict("I think A is better", ("A", "B")) is None
    assert parse_verdict("", ("A", "B")) is None


# --------------------------------------------------------------------------- openai backend over HTTP


@pytest.fixture
def serve():
    servers: list[ScriptedServer] = []

    def start(*script: tuple) -> ScriptedServer:
        servers.append(ScriptedServer(list(script)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def openai_judge(url: str, **options):
    from posttrain.judges.openai import build
    from posttrain.recipe import OpenAIJudgeSpec

    spec = {
        "backend": "openai",
        "base_url": url,
        "model": "judge",
        "api_key_env": None,
        "principles": ["Be right."],
    }
    return build(OpenAIJudgeSpec(**{**spec, **options}), None, "openai-test")


def test_openai_judge_reads_label_logprobs(serve):
    server = serve(("reply", VERDICT_A))
    judge = openai_judge(server.url)
    [verdict] = judge.compare([PairQuery([{"role": "user", "content": "2+2="}], "4", "5")])
    assert verdict["p_first"] == pytest.approx(0.6 / 0.8)  # " A" against " B" + "B"
    assert verdict["mass"] == pytest.approx(0.8)
    body = server.requests[0]
    assert body["model"] == "judge" and body["logprobs"] is True and body["top_logprobs"] == 20
    assert (
        "Answer A:\n4" in body["messages"][0]["content"] and "1. Be right." in body["messages"][0]["content"]
    )


def test_openai_judge_parses_the_verdict_line_without_logprobs(serve):
    replies = iter([chat_reply("Rationale: 4 is right.\nVerdict: B"), chat_reply("Both are fine.")])
    server = serve(("reply", lambda body: next(replies)))
    judge = openai_judge(server.url, rationale=True, logprobs=False, max_concurrency=1)
    first, second = judge.compare([PairQuery("2+2=", "5", "4"), PairQuery("2+2=", "4", "5")])
    assert first == {"p_first": 0.0, "rationale": "Rationale: 4 is right.", "mass": None}
    assert second["p_first"] is None  # no strict verdict: no label (the pair is dropped as invalid)
    assert "logprobs" not in server.requests[0] and server.requests[0]["max_tokens"] == 512


def test_openai_judge_retries_errors_and_timeouts_with_backoff(serve):
    server = serve(("status", 503), ("hang", 1.0), ("status", 429), ("reply", VERDICT_A))
    judge = openai_judge(server.url, timeout_s=0.3, max_retries=3, backoff_s=0.01)
    started = time.perf_counter()
    [verdict] = judge.compare([PairQuery("q", "a", "b")])
    assert verdict["p_first"] == pytest.approx(0.75)
    assert len(server.requests) == 4 and time.perf_counter() - started < 5

    failing = serve(("status", 500))
    with pytest.raises(PosttrainError, match="failed 3 times .*HTTP 500"):
        openai_judge(failing.url, max_retries=2, backoff_s=0.01).compare([PairQuery("q", "a", "b")])
    assert len(failing.requests) == 3


def test_openai_judge_fails_fast_on_client_errors_and_sends_the_key(serve, monkeypatch):
    server = serve(("status", 401))
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    with pytest.raises(PosttrainError, match="answered 401"):
        openai_judge(server.url, api_key_env="JUDGE_KEY", backoff_s=0.01).compare([PairQuery("q", "a", "b")])
    assert len(server.requests) == 1 and server.headers[0]["Authorization"] == "Bearer sk-test"
    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(PosttrainError, match="JUDGE_KEY is not set"):
        openai_judge(server.url, api_key_env="JUDGE_KEY")


def test_openai_judge_limits_concurrency(serve):
    def slow(body):
        time.sleep(0.05)
        return VERDICT_A

    server = serve(("reply", slow))
    judge = openai_judge(server.url, max_concurrency=3)
    verdicts = judge.compare([PairQuery("q", str(i), "x") for i in range(12)])
    judge.close()
    assert len(verdicts) == 12 and 1 < server.peak <= 3


def test_openai_judge_reuses_connections(serve):
    server = serve(("reply", VERDICT_A))
    judge = openai_judge(server.url, max_concurrency=2)
    judge.compare([PairQuery("q", str(i), "x") for i in range(20)])
    judge.close()
    assert len(server.requests) == 20 and len(server.connections) <= 2  # keep-alive, not one per call


def test_openai_judge_says_once_that_the_server_ignores_logprobs(serve, capsys):
    server = serve(("reply", chat_reply("Verdict: A")))  # asked for logprobs, sent none
    judge = openai_judge(server.url, max_concurrency=2)
    verdicts = judge.compare([PairQuery("q", str(i), "x") for i in range(6)])
    assert [v["p_first"] for v in verdicts] == [1.0] * 6 and all(v["mass"] is None for v in verdicts)
    err = capsys.readouterr().err
    assert err.count("returns no logprobs") == 1 and "Verdict:" in err
    judge = openai_judge(server.url, logprobs=False)  # not asked: nothing to say
    judge.compare([PairQuery("q", "a", "b")])
    assert "logprobs" not in capsys.readouterr().err


def test_openai_judge_stores_a_rationale_only_when_asked(serve):
    server = serve(("reply", chat_reply("Both look fine to me, but the first is shorter.\nVerdict: A")))
    [quiet] = openai_judge(server.url, logprobs=False).compare([PairQuery("q", "a", "b")])
    [asked] = openai_judge(server.url, logprobs=False, rationale=True).compare([PairQuery("q", "a", "b")])
    assert quiet == {"p_first": 1.0, "rationale": None, "mass": None}
    assert asked["rationale"] == "Both look fine to me, but the first is shorter."


@pytest.mark.parametrize(
    ("reply", "reason", "hint"),
    [
        ("I cannot decide.", "invalid", "no usable verdict on 6 of 6 pairs"),
        (
            "Verdict: A",
            "inconsistent",
            "two orders disagreed on 6 of 6 pairs (the answer shown first won 100%",
        ),
    ],
)
def test_a_label_stage_that_keeps_nothing_says_why_and_leaves_its_counts(
    serve, write_recipe, cli, tmp_path: Path, reply: str, reason: str, hint: str
):
    server = serve(("reply", chat_reply(reply)))
    data = tmp_path / "answers.jsonl"
    rows = [{"prompt": f"{i}+1=", "responses": [f"<answer>{i + 1}</answer>", f"<answer>{i}</answer>", "?"]}
            for i in range(2)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(f"""
        name: nothing-kept
        base_model: {{preset: tiny-dense}}
        stages:
          - name: label
            kind: rlaif_label
            data: {{path: {data}}}
            judge: {{backend: openai, base_url: "{server.url}", model: m, api_key_env: null, logprobs: false}}
        """)
    code, _, err = cli("run", recipe)
    assert code == 2 and hint in err and "Traceback" not in err, err
    metrics = json.loads((tmp_path / "runs" / "label" / "metrics.json").read_text())
    assert metrics["pairs_judged"] == 6 and metrics["kept"] == 0
    assert metrics["dropped_by_reason"][reason] == 6 and hint in metrics["problem"]
    assert not (tmp_path / "runs" / "label" / "COMPLETE").exists()


# --------------------------------------------------------------------------- local judges on a tiny model


def stage_context(tmp_path: Path):
    from posttrain.context import StageContext
    from posttrain.recipe import PresetModel

    return StageContext(
        stage="label", out_dir=tmp_path / "label", run_dir=tmp_path, seed=0,
        base_model=PresetModel(preset="tiny-dense"), stage_dirs={},
    )  # fmt: skip


QUESTION = [{"role": "user", "content": "23+5="}]
RIGHT = "<think>3+5=8;2+0=2</think><answer>28</answer>"
WRONG = "<answer>29</answer>"


def test_hf_judge_reads_label_probabilities_from_a_tiny_model(tmp_path: Path, tiny_dense: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.judges import build_judge
    from posttrain.judges.hf import label_tokens
    from posttrain.recipe import HFJudgeSpec

    spec = HFJudgeSpec(
        backend="hf", model={"path": str(tiny_dense)}, principles=["Be correct."], batch_size=2
    )
    judge = build_judge(spec, stage_context(tmp_path))
    assert judge.id.startswith("hf-") and judge.principles == ["Be correct."]
    queries = [
        PairQuery(QUESTION, RIGHT, WRONG),
        PairQuery(QUESTION, WRONG, RIGHT),
        PairQuery("1+1=", "2", "3"),
    ]
    verdicts = judge.compare(queries)

    tokenizer = AutoTokenizer.from_pretrained(tiny_dense)
    model = AutoModelForCausalLM.from_pretrained(tiny_dense).eval()
    assert label_tokens(tokenizer, ("A", "B"))[0] == "Verdict: "  # characters: the space is its own token
    a, b = tokenizer.convert_tokens_to_ids(["A", "B"])
    for query, verdict in zip(queries, verdicts, strict=True):
        question = query.prompt if isinstance(query.prompt, str) else query.prompt[0]["content"]
        user = pairwise_prompt(question, query.first, query.second, ["Be correct."])
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text + "Verdict: ", add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            probs = model(**ids).logits[0, -1].softmax(-1)
        assert verdict["p_first"] == pytest.approx(float(probs[a] / (probs[a] + probs[b])), abs=1e-4)
        assert verdict["mass"] == pytest.approx(float(probs[a] + probs[b]), abs=1e-4)
        assert verdict["rationale"] is None

    with_rationale = build_judge(
        spec.model_copy(update={"rationale": True, "rationale_max_new_tokens": 6}), stage_context(tmp_path)
    )
    assert with_rationale.id != judge.id
    reasoned = with_rationale.compare(queries[:1])[0]
    assert isinstance(reasoned["rationale"], str) and 0 < reasoned["p_first"] < 1
    assert reasoned["p_first"] != pytest.approx(verdicts[0]["p_first"], abs=1e-6)  # read after the rationale
    with pytest.raises(PosttrainError, match="not single tokens"):
        label_tokens(tokenizer, ("first", "second"))


def test_likelihood_judge_scores_mean_answer_log_likelihood(tmp_path: Path, tiny_moe: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.judges import build_judge
    from posttrain.recipe import LikelihoodJudgeSpec

    spec = LikelihoodJudgeSpec(backend="likelihood", model={"path": str(tiny_moe)}, batch_size=3)
    judge = build_judge(spec, stage_context(tmp_path))
    items = [(QUESTION, RIGHT, {}), (QUESTION, WRONG, {}), ("plain text prompt ", "and an answer", {})]
    scores = judge.score(items)
    assert judge.score(items[1:2]) == pytest.approx(scores[1:2], abs=1e-5)  # padding changes nothing

    tokenizer = AutoTokenizer.from_pretrained(tiny_moe)
    model = AutoModelForCausalLM.from_pretrained(tiny_moe).eval()
    head = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(head + WRONG + "<|eos|>", add_special_tokens=False, return_tensors="pt")["input_ids"]
    start = len(tokenizer(head, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    expected = logprobs[torch.arange(start - 1, ids.shape[1] - 1), ids[0, start:]].mean()
    assert scores[1] == pytest.approx(float(expected), abs=1e-4)


# --------------------------------------------------------------------------- recipes


def test_judge_blocks_are_validated_at_load_time(write_recipe, cli):
    base = """
        name: t
        base_model: {preset: tiny-dense}
        stages:
          - name: label
            kind: rlaif_label
            policy: {preset: tiny-dense}
            data: {synthetic: arithmetic, n: 8}
            JUDGE
        """
    cases = {
        "judge: {backend: openia, base_url: 'http://x/v1', model: m}": "backend: unknown judge backend 'openia'; did you mean 'openai'?",
        "judge: {backend: openai, base_url: 'http://x/v1', model: m, api_key_env: sk-abc123}": "never put the key itself",
        "judge: {backend: openai, base_url: 'localhost:8000', model: m}": "must start with http://",
        "judge: {backend: hf, model: sft}": "'sft' is not a stage of this recipe",
        "judge: {backend: hf, model: {preset: tiny-dense}, principles: constitution.txt}": "neither a file nor a shipped constitution",
        "judge: {backend: hf, model: {preset: tiny-dense}, labels: [A, A]}": "two different",
        "judge: {backend: likelihood, model: {preset: tiny-dense}, temprature: 1}": "did you mean 'temperature'",
        "judge: {model: {preset: tiny-dense}}": "judge has no 'backend'",
    }
    for judge, message in cases.items():
        code, _, err = cli("validate", write_recipe(base.replace("JUDGE", judge)))
        assert code == 2 and message in " ".join(err.split()), (judge, err)
    ok = base.replace("JUDGE", "judge: {backend: hf, model: {preset: tiny-dense}, principles: math}")
    assert cli("validate", write_recipe(ok))[0] == 0
    code, _, err = cli(
        "validate", write_recipe(ok.replace("    data:", "    samples_per_prompt: 1\n            data:"))
    )
    assert code == 2 and "greater than or equal to 2" in err


@pytest.mark.parametrize("name", ["demo.yaml", "rlaif-hh.yaml"])
def test_shipped_recipes_validate(name: str):
    from posttrain import loading

    recipe = loading.load(Path(__file__).parents[1] / "recipes" / name)
    kinds = [s.kind for s in recipe.stages]
    assert "rlaif_label" in kinds and "reward_model" in kinds


# --------------------------------------------------------------------------- stages end to end


def test_label_then_reward_model_and_a_rerun_that_hits_the_cache(
    write_recipe, cli, tiny_dense: Path, tmp_path: Path
):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from posttrain.recipe import PathModel
    from posttrain.rewards.reward_model import reward_model

    recipe = write_recipe(f"""
        name: rlaif
        base_model: {{path: {tiny_dense}}}
        stages:
          - name: label
            kind: rlaif_label
            policy: {{preset: tiny-dense}}       # random weights: every sample differs
            data: {{synthetic: arithmetic, n: 24}}
            samples_per_prompt: 3
            sampling: {{max_new_tokens: 10, batch_size: 24}}
            judge: {{backend: likelihood, model: {{path: {tiny_dense}}}, temperature: 0.01}}
          - name: rm
            kind: reward_model
            data: label
            eval_fraction: 0.25
            train: {{num_train_epochs: 2, per_device_train_batch_size: 8, learning_rate: 1.0e-3,
                     gradient_checkpointing: false, logging_steps: 1, save_strategy: "no"}}
        eval: {{data: {{synthetic: arithmetic, split: test, n: 2}}, max_new_tokens: 2}}
        """)
    code, _, err = cli("run", recipe)
    assert code == 0, err
    run = tmp_path / "runs"
    records = [json.loads(line) for line in (run / "label/data/preferences.jsonl").read_text().splitlines()]
    label = json.loads((run / "label/metrics.json").read_text())
    # The console: the label row says what was kept, the RM's steps show accuracy and margin, its
    # closing line the held-out accuracy.
    lines = err.splitlines()
    assert "✓ label in " in err and f"kept {label['kept']} of 72 pairs" in err
    steps = [line for line in lines if line.startswith("  rm  step ")]
    assert len(steps) >= 2 and all("accuracy " in line and "margin " in line for line in steps)
    assert any(line.startswith("✓ rm in ") and "held-out pairwise accuracy" in line for line in lines)
    assert label["pairs_judged"] == 72 and label["kept"] == len(records) > 30
    assert label["kept"] + label["dropped"] == label["pairs_judged"]
    assert label["position_consistency"] == 1.0  # a pointwise judge has no positions
    assert label["judge"]["cache_misses"] == 72 and label["agreement_with_answer"]["n"] == 0
    first = records[0]
    assert {
        "prompt",
        "chosen",
        "rejected",
        "p_chosen",
        "scores",
        "judge",
        "principles_hash",
        "rationale",
        "answer",
    } <= set(first)
    assert first["p_chosen"] >= 0.55 and first["judge_scores"]["chosen"] > first["judge_scores"]["rejected"]

    rm = json.loads((run / "rm/metrics.json").read_text())
    assert rm["train"]["loss_last"] < rm["train"]["loss_first"]
    assert "eval" not in rm  # a reward model does not generate: the recipe's eval skips it
    held = rm["held_out"]
    assert (
        held["n"] == rm["pairs"]["held_out"] > 0
        and sum(b["n"] for b in held["calibration"]["buckets"]) == held["n"]
    )
    model = AutoModelForSequenceClassification.from_pretrained(run / "rm/model")
    tokenizer = AutoTokenizer.from_pretrained(run / "rm/model")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id is not None
    # GRPO's `reward_model` reward reads a pair exactly as trl's RewardTrainer tokenized it.
    chosen, rejected = reward_model(model=PathModel(path=str(run / "rm/model")))(
        prompts=[first["prompt"]] * 2, completions=[first["chosen"], first["rejected"]]
    )
    conversation = [*first["prompt"], {"role": "assistant", "content": first["chosen"]}]
    ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    assert chosen == pytest.approx(float(model(**ids).logits[0, 0].detach()), abs=1e-4) and chosen != rejected

    # A crash mid-stage: the same config resumes with the saved candidates and the cached verdicts.
    from posttrain import artifacts

    fingerprint = json.loads((run / "label/manifest.json").read_text())["fingerprint"]
    artifacts.invalidate(run / "label")
    artifacts.write_json(run / "label" / artifacts.RUNNING, {"fingerprint": fingerprint})
    code, _, err = cli("run", recipe, "--only", "label")
    assert code == 0, err
    resumed = json.loads((run / "label/metrics.json").read_text())
    assert resumed["candidates"]["resumed"] is True
    assert resumed["judge"] == {**label["judge"], "cache_hits": 72, "cache_misses": 0}

    # A forced re-run starts the stage over (its folder is wiped) and still pays for no judge call.
    code, _, err = cli("run", recipe, "--only", "label", "--force", "label")
    assert code == 0, err
    again = json.loads((run / "label/metrics.json").read_text())
    assert again["judge"] == {**label["judge"], "cache_hits": 72, "cache_misses": 0}
    assert (run / "label/data/preferences.jsonl").read_text().splitlines()[0] == json.dumps(
        first, ensure_ascii=False
    )


def test_reward_model_learns_a_clear_preference_with_lora(
    write_recipe, cli, tiny_dense: Path, tmp_path: Path
):
    from posttrain.data_tools import arithmetic_rows

    rows = []
    for row in arithmetic_rows(160, seed=3):
        right = row["messages"][-1]["content"]
        wrong = f"<answer>{int(row['answer']) + 1}</answer>"
        rows.append(
            {
                "prompt": row["prompt"],
                "chosen": right,
                "rejected": wrong,
                "p_chosen": 0.9,
                "answer": row["answer"],
            }
        )
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(f"""
        name: rm
        base_model: {{path: {tiny_dense}}}
        stages:
          - name: rm
            kind: reward_model
            data: {{path: {data}}}
            eval_fraction: 0.2
            lora: {{r: 8, alpha: 16}}
            train: {{num_train_epochs: 1, per_device_train_batch_size: 16, learning_rate: 1.0e-2,
                     gradient_checkpointing: false, logging_steps: 1}}
        """)
    code, _, err = cli("run", recipe)
    assert code == 0, err
    metrics = json.loads((tmp_path / "runs/rm/metrics.json").read_text())
    held = metrics["held_out"]
    assert metrics["parameters"]["trainable"] < metrics["parameters"]["total"]  # LoRA + the score head
    assert held["accuracy"] >= 0.9 and held["mean_margin"] > 0
    assert held["right_vs_wrong"]["n"] == held["n"] and held["right_vs_wrong"]["accuracy"] == held["accuracy"]
    assert not (tmp_path / "runs/rm/model/adapter_config.json").exists()  # merged: a plain model


def test_answers_and_human_choices_can_come_from_the_data():
    from datasets import Dataset

    from posttrain.judges.labels import given_answers, human_choices

    pairs = Dataset.from_list([
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello!"}],
         "rejected": [{"role": "assistant", "content": "go away"}]},
    ])  # fmt: skip
    assert given_answers(pairs) == [["hello!", "go away"]]
    assert human_choices(pairs, [["hello!", "go away"]], from_data=True) == {(0, 0): True, (0, 1): False}
    assert human_choices(pairs, [["x", "y", "z"]], from_data=False) == {}  # sampled answers: no human label
    by_index = Dataset.from_list([{"prompt": "q1", "responses": ["a", "b", "c"], "human_choice": 2}])
    assert human_choices(by_index, given_answers(by_index), from_data=True) == {
        (0, 0): False, (0, 1): False, (0, 2): True,
    }  # fmt: skip
    by_text = Dataset.from_list([{"prompt": "q2", "responses": ["d", "e"], "human_choice": "d"}])
    assert human_choices(by_text, given_answers(by_text), from_data=True) == {(0, 0): True, (0, 1): False}
    with pytest.raises(PosttrainError, match="without a `policy`"):
        given_answers(Dataset.from_list([{"prompt": "q"}]))


# --------------------------------------------------------------------------- rewards as judges, judges as rewards


def test_reward_backend_judges_with_a_registered_reward(tmp_path: Path):
    from posttrain.judges import build_judge
    from posttrain.recipe import RewardJudgeSpec

    judge = build_judge(
        RewardJudgeSpec(backend="reward", reward={"name": "accuracy"}), stage_context(tmp_path)
    )
    assert judge.columns == ("answer",) and judge.id.startswith("reward-")
    also_right = "<think></think><answer>28</answer>"
    answers = [[RIGHT, WRONG, also_right], [WRONG, "no answer at all"]]
    pairs = candidate_pairs(answers, None, 0)
    columns = [{"answer": "28"}, {"answer": None}]  # the second row has no gold answer: not judged
    judged = judge_pairs(
        judge, JudgeCache(tmp_path / "c.jsonl"), [QUESTION, QUESTION], answers, pairs, columns
    )
    decisions = [decide(j, 0.05, 0.5) for j in judged]
    assert decisions == ["kept", "tie", "kept", "invalid"]
    record = preference_record(judged[0], QUESTION, answers[0], judge, None)
    assert (record["chosen"], record["rejected"]) == (RIGHT, WRONG) and record["p_chosen"] > 0.99


def test_judge_reward_scores_completions_during_rl(tmp_path: Path, tiny_dense: Path):
    from posttrain.recipe import RewardSpec
    from posttrain.rewards import build_reward, check_spec
    from posttrain.rewards.judge import pointwise_scores

    ctx = stage_context(tmp_path)
    pointwise = build_reward(
        RewardSpec(name="judge", model={"path": str(tiny_dense)}, judge={"backend": "likelihood"}), ctx
    )
    completions = [[{"role": "assistant", "content": c}] for c in (RIGHT, WRONG, RIGHT)]
    scores = pointwise(prompts=[QUESTION] * 3, completions=completions)
    assert scores[0] == pytest.approx(scores[2]) and all(s < 0 for s in scores)
    judged: list[tuple] = []  # a repeated (prompt, completion) is judged once and shares the score

    def length_judge(items: list[tuple]) -> list[float]:
        judged.extend(items)
        return [len(text) for _, text, _ in items]

    prompts = [QUESTION, QUESTION, "other", QUESTION]
    assert pointwise_scores(length_judge, prompts, ["ab", "c", "ab", "ab"]) == [2, 1, 2, 2]
    assert [(p, t) for p, t, _ in judged] == [(QUESTION, "ab"), (QUESTION, "c"), ("other", "ab")]

    spec = RewardSpec(
        name="judge", model={"path": str(tiny_dense)}, judge={"backend": "hf", "principles": ["Be right."]}
    )
    pairwise = build_reward(spec, ctx)
    other = [{"role": "user", "content": "7-2="}]
    prompts = [QUESTION, QUESTION, QUESTION, other, other, [{"role": "user", "content": "alone"}]]
    texts = [RIGHT, WRONG, RIGHT, "<answer>5</answer>", "<answer>9</answer>", "x"]
    scores = pairwise(prompts=prompts, completions=texts)
    p = scores[3]  # a group of two: p(better) against the only peer, both orders averaged
    assert 0 < p < 1 and scores[4] == pytest.approx(1 - p)
    assert scores[0] == pytest.approx(scores[2]) and scores[0] == pytest.approx((0.5 + (1 - scores[1])) / 2)
    assert scores[5] is None  # no peer to compare with
    with pytest.raises(ValueError, match="not inside `judge:`"):  # as the recipe loads it (posttrain.loading)
        check_spec("judge", {"judge": {"backend": "hf", "model": "c/d"}}, has_model=True)


def test_reward_model_margins_split_and_calibration():
    from datasets import Dataset

    from posttrain.stages.reward_model import calibration, split_by_prompt, trainer_rows

    rows = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": "a", "rejected": "b", "p_chosen": p}
         for i, p in enumerate([0.5, 0.75, 0.999])]
    )  # fmt: skip
    out = trainer_rows(rows, margin_scale=2.0)
    assert out[0]["chosen"] == [{"role": "assistant", "content": "a"}]
    assert out["margin"] == pytest.approx([0.0, 2 * math.log(3), 2 * math.log(0.95 / 0.05)])  # capped at 0.95
    assert "margin" not in trainer_rows(rows, margin_scale=0.0).column_names

    many = Dataset.from_list([{"prompt": f"q{i % 100}", "chosen": "a", "rejected": "b"} for i in range(300)])
    train, held = split_by_prompt(many, 0.25, seed=0)
    assert len(train) + len(held) == 300 and 30 <= len(held) <= 120
    assert not set(train["prompt"]) & set(held["prompt"])  # a prompt's pairs stay on one side

    result = calibration([0.1, 0.2, 3.0, -3.0])
    low, high = result["buckets"]
    assert (low["confidence"], low["n"], low["accuracy"]) == ("0.5-0.6", 2, 1.0)
    assert (high["confidence"], high["n"], high["accuracy"]) == ("0.9-1.0", 2, 0.5)
    assert result["ece"] == pytest.approx(
        0.5 * abs(1 - low["mean_confidence"]) + 0.5 * abs(0.5 - high["mean_confidence"])
    )
