"""Generation from an OpenAI-compatible server (`backend: server`): an evaluate stage and a distill
stage's teacher traces come from a fake server, and neither stage loads the model it serves.
On 2 processes, a server error on rank 1's share stops both ranks with rank 1's message."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from fake_openai import CompletionServer
from test_distributed import BASE, launch, write

from posttrain import artifacts

MISSING = "/nonexistent/served-model"  # loading it would fail: the stages must not


def arithmetic(prompt: str, body: dict) -> tuple[int, str]:
    """The right answer when the first number is even, a wrong one otherwise; 400 on 'boom'."""
    if "boom" in prompt:
        return 400, "this server refuses the word boom"
    a, op, b = re.match(r"\s*(-?\d+)\s*([-+*])\s*(-?\d+)", prompt).groups()
    value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    return 200, f"<think>{a} {op} {b}</think>\n<answer>{value if int(a) % 2 == 0 else value + 1}</answer>"


@pytest.fixture
def server():
    fake = CompletionServer(arithmetic)
    yield fake
    fake.close()


def served(server: CompletionServer) -> dict:
    return {"base_url": server.url, "model": "fake-r1", "api_key_env": None}


def first_even(prompt) -> bool:
    text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
    return int(re.match(r"\s*(-?\d+)", text).group(1)) % 2 == 0


def test_evaluate_a_served_model_loads_nothing(server, write_recipe, cli, tmp_path):
    recipe = write_recipe(yaml.safe_dump({
        "name": "served", "base_model": {"path": MISSING},
        "stages": [{"name": "eval-r1", "kind": "evaluate", "k": 3, "max_new_tokens": 32,
                    "data": {"synthetic": "arithmetic", "n": 20, "seed": 3}, "server": served(server)}],
    }))  # fmt: skip
    code, out, err = cli("run", recipe)
    assert code == 0, out + err
    stage = tmp_path / "runs" / "eval-r1"
    result = json.loads((stage / artifacts.METRICS).read_text())
    rows = [json.loads(line) for line in (stage / artifacts.EVAL_SAMPLES).read_text().splitlines()]
    assert result["eval"]["accuracy"] == pytest.approx(sum(first_even(r["prompt"]) for r in rows) / 20)
    assert result["eval"]["pass_at_1"] == result["eval"]["accuracy"]  # this server is deterministic
    assert result["model"] == f"fake-r1 at {server.url}"
    greedy = [r for r in server.requests if r["temperature"] == 0.0]
    sampled = [r for r in server.requests if r["temperature"] > 0.0]
    assert len(greedy) == 20 and len(sampled) == 60
    assert len({r["seed"] for r in sampled}) == 60  # every sample its own seed
    assert all(r["path"] == "/v1/chat/completions" and r["model"] == "fake-r1" for r in server.requests)


def test_distill_from_a_served_teacher_loads_no_teacher(server, write_recipe, cli, tmp_path):
    recipe = write_recipe(yaml.safe_dump({
        "name": "served", **BASE,
        "eval": {"data": {"synthetic": "arithmetic", "n": 8, "seed": 9}, "max_new_tokens": 8},
        "stages": [{
            "name": "distill", "kind": "distill", "teacher": {"path": MISSING},
            "data": {"synthetic": "arithmetic", "n": 12, "seed": 5}, "samples_per_prompt": 2,
            "verifiers": [{"name": "accuracy"}],
            "generation": {"max_new_tokens": 32, "batch_size": 4, "server": served(server)},
            "students": [{"name": "small", "dense_from": {"preset": "tiny-deepseek-v3"}, "num_hidden_layers": 1}],
            "train": {"max_steps": 1, "per_device_train_batch_size": 2, "save_strategy": "no"},
        }],
    }))  # fmt: skip
    code, out, err = cli("run", recipe)
    assert code == 0, out + err
    stage = tmp_path / "runs" / "distill"
    records = list(artifacts.iter_jsonl(stage / artifacts.SAMPLES))
    assert len(records) == 12 and len(server.requests) == 24
    for record in records:  # the verifier keeps exactly the server's right answers
        assert record["kept"] == ([0] if first_even(record["prompt"]) else [])
    result = json.loads((stage / artifacts.METRICS).read_text())
    assert result["teacher"] == {"model": MISSING}  # not evaluated (served), not counted (no config)
    assert "accuracy" in result["students"]["small"]


def test_a_server_error_on_rank_1_stops_both_ranks(server, tmp_path):
    """Rows 4-7 are the second batch, rank 1's: the server refuses one of them."""
    rows = [{"prompt": f"{i}+1= boom" if i == 6 else f"{i}+1=", "answer": str(i + 1)} for i in range(8)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"data": {"path": str(tmp_path / "eval.jsonl")}, "batch_size": 4, "max_new_tokens": 8,
            "server": {**served(server), "max_retries": 0}}  # fmt: skip
    recipe = {"name": "broken", "output_dir": str(tmp_path / "runs"), **BASE,
              "stages": [{"name": "eval-r1", "kind": "evaluate", **spec}]}  # fmt: skip
    done = launch(write(tmp_path / "recipe.yaml", recipe), "--multi_gpu", timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "error (rank 1/2)" in output and "answered 400" in output
    assert re.search(
        r"stopping \(rank 0/2\): rank 1 failed \(PosttrainError: generation server .* answered 400", output
    )
    assert not (tmp_path / "runs" / "eval-r1" / "COMPLETE").exists()


def right_on_even_seeds(prompt: str, body: dict) -> tuple[int, str]:
    """Samples that differ by seed: the right answer for even seeds, one off for odd ones."""
    a, op, b = re.match(r"\s*(-?\d+)\s*([-+*])\s*(-?\d+)", prompt).groups()
    value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    return 200, f"<answer>{value + body['seed'] % 2}</answer>"


def test_labelling_candidates_from_a_served_policy(write_recipe, cli, tmp_path):
    fake = CompletionServer(right_on_even_seeds)
    try:
        recipe = write_recipe(yaml.safe_dump({
            "name": "served", "base_model": {"path": MISSING},
            "stages": [{"name": "label", "kind": "rlaif_label", "policy": {"path": MISSING},
                        "data": {"synthetic": "arithmetic", "n": 6, "seed": 2}, "samples_per_prompt": 3,
                        "sampling": {"server": served(fake), "max_new_tokens": 16},
                        "judge": {"backend": "reward", "reward": {"name": "accuracy"}}}],
        }))  # fmt: skip
        code, out, err = cli("run", recipe)
    finally:
        fake.close()
    assert code == 0, out + err
    stage = tmp_path / "runs" / "label"
    result = json.loads((stage / artifacts.METRICS).read_text())
    assert result["candidates"]["source"] == "policy" and result["kept"] > 0
    assert result["agreement_with_answer"]["accuracy"] == 1.0  # the judge keeps the right answer
    assert len(fake.requests) == 18 and len({r["seed"] for r in fake.requests}) == 18
