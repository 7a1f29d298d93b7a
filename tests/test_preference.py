"""The preference-optimisation stages (dpo, kto): recipe-time checks (exit 2, one line), soft
labels, and tiny runs that learn a clear preference and resume after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain import artifacts


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train several times faster on one CPU thread than on two when another process
    holds the other core (bench figures on the perf branch); the in-process runs here use one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def clear_pairs(path: Path, n: int = 96, seed: int = 3, p_chosen=None) -> Path:
    """Arithmetic prompts; the chosen answer is the worked solution, the rejected one a bare wrong answer."""
    from posttrain.data_tools import arithmetic_rows

    rows = []
    for i, row in enumerate(arithmetic_rows(n, seed=seed)):
        right = row["messages"][-1]["content"]
        wrong = f"<answer>{int(row['answer']) + 1}</answer>"
        p = p_chosen(i) if p_chosen else 0.9
        rows.append({"prompt": row["prompt"], "chosen": right, "rejected": wrong, "p_chosen": p,
                     "answer": row["answer"]})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


DPO_RECIPE = """
name: tiny-dpo
seed: 0
base_model: {{path: {model}}}
stages:
  - name: dpo
    kind: dpo
    data: {{path: {data}}}
    eval_fraction: 0.25
{extra}    train: {train}
"""
TRAIN = ("{{max_steps: {steps}, per_device_train_batch_size: 8, learning_rate: 5.0e-3, beta: 0.1, "
         "gradient_checkpointing: false, logging_steps: 1, save_steps: {save}{more}}}")  # fmt: skip


def dpo_recipe(write_recipe, model, data, steps=12, save=100, more="", extra="") -> Path:
    train = TRAIN.format(steps=steps, save=save, more=more)
    return write_recipe(DPO_RECIPE.format(model=model, data=data, train=train, extra=extra))


def test_dpo_learns_a_clear_preference_on_held_out_prompts(write_recipe, cli, tiny_dense, tmp_path, declared):
    data = clear_pairs(tmp_path / "pairs.jsonl")
    recipe = dpo_recipe(write_recipe, tiny_dense, data).read_text()
    evaluated = "eval: {data: {synthetic: arithmetic, split: test, n: 4}, max_new_tokens: 8}\n"
    code, _, err = cli("run", write_recipe(recipe + evaluated))
    assert code == 0, err
    stage = tmp_path / "runs" / "dpo"
    assert (stage / "COMPLETE").exists() and (stage / "model" / "config.json").exists()
    metrics = json.loads((stage / "metrics.json").read_text())
    held = metrics["held_out"]
    assert held["n"] == metrics["pairs"]["held_out"] > 10 and metrics["pairs"]["train"] == metrics["rows"]
    assert held["pairwise_accuracy"] >= 0.8 > held["start_accuracy"] + 0.2, held
    assert held["mean_margin"] > 0
    assert metrics["train"]["loss_last"] < metrics["train"]["loss_first"]
    assert (
        metrics["preference"]["rewards/margins"]["last"] > metrics["preference"]["rewards/margins"]["first"]
    )
    assert metrics["soft_labels"] == {
        "mode": "filter",
        "min_p_chosen": 0.75,
        "mean_p_chosen": pytest.approx(0.9),
    }
    assert metrics["eval"]["n"] == 4 and 0 <= metrics["eval"]["accuracy"] <= 1  # eval after the stage
    assert held["right_vs_wrong"]["n"] == held["n"]  # every pair has one right answer
    assert declared(tmp_path / "runs") == []
    report = (tmp_path / "runs" / "report.md").read_text()
    assert "implicit reward ranks the chosen answer first" in report


def test_every_dpo_loss_type_of_the_installed_trl_trains(tiny_dense, tmp_path):
    """All of trl's loss types at once (trl sums them with `loss_weights`): every branch runs, and
    the loss stays finite."""
    import math

    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from posttrain.models import load_tokenizer
    from posttrain.recipe import PathModel
    from posttrain.stages.dpo import preference_rows, trl_loss_types

    losses = list(trl_loss_types())
    assert {"sigmoid", "ipo", "hinge", "robust", "apo_zero", "discopop"} <= set(losses)
    rows = Dataset.from_list(
        [json.loads(line) for line in clear_pairs(tmp_path / "p.jsonl", 16).read_text().splitlines()]
    )
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8, use_cpu=True,
                     bf16=False, report_to="none", logging_steps=1, gradient_checkpointing=False, loss_type=losses,
                     label_smoothing=0.1, save_strategy="no")  # fmt: skip
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dense), args=args,
                         train_dataset=preference_rows(rows), processing_class=load_tokenizer(PathModel(path=str(tiny_dense))))  # fmt: skip
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(math.isfinite(v) for v in logged)


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ("    train: {loss_type: sigmoidd}\n", "did you mean 'sigmoid'"),
        ("    train: {loss_type: [sigmoid, hinje]}\n", "did you mean 'hinge'"),
        ("    train: {betta: 0.1}\n", "did you mean 'beta'"),
        ("    soft_labels: smooth\n", "loss_type ['sigmoid'] ignores"),
        (
            "    soft_labels: smooth\n    train: {loss_type: robust, label_smoothing: 0.1}\n",
            "set one of them",
        ),
        ("    min_p_chosen: 0.4\n", "greater than or equal to 0.5"),
        ("    train: {max_length: 4096}\n", "max_position_embeddings (512)"),
        ("    moe: {bias_update_rate: 0.001}\n", "moe"),
    ],
)
def test_bad_dpo_recipes_exit_2_with_one_line(write_recipe, cli, tiny_dense, tmp_path, stage, message):
    data = clear_pairs(tmp_path / "pairs.jsonl", 4)
    head = f"name: bad\nbase_model: {{path: {tiny_dense}}}\nstages:\n  - name: dpo\n    kind: dpo\n"
    recipe = write_recipe(head + f"    data: {{path: {data}}}\n" + stage)
    code, _, err = cli("validate", recipe)
    assert code == 2, err
    assert message in err and "recipe.yaml:" in err and "Traceback" not in err


def test_missing_columns_fail_at_validation_and_in_plan(write_recipe, cli, tiny_dense, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"question": "1+1=", "good": "2", "bad": "3"}) + "\n")
    head = f"name: cols\nbase_model: {{path: {tiny_dense}}}\nstages:\n  - name: dpo\n    kind: dpo\n"
    code, _, err = cli("validate", write_recipe(head + f"    data: {{path: {data}}}\n"))
    assert code == 2 and "needs column 'chosen'" in err and "question, good, bad" in err, err
    mapped = write_recipe(
        head + f"    data: {{path: {data}, columns: {{prompt: question, chosen: good, rejected: bad}}}}\n"
    )
    code, out, err = cli("plan", mapped)
    assert code == 0 and "1 rows; columns prompt, chosen, rejected" in out + err, out + err
    kto = write_recipe(
        head.replace("kind: dpo", "kind: kto") + f"    data: {{path: {data}, columns: {{label: good}}}}\n"
    )
    code, _, err = cli("validate", kto)
    assert code == 2 and "needs column 'prompt'" in err, err


def test_soft_labels_filter_smooth_or_are_ignored():
    from datasets import Dataset

    from posttrain.recipe import DPOStage
    from posttrain.stages.dpo import apply_soft_labels

    rows = Dataset.from_dict({"prompt": ["a", "b", "c", "d"], "chosen": ["x"] * 4, "rejected": ["y"] * 4,
                              "p_chosen": [0.55, 0.7, 0.9, 1.0]})  # fmt: skip

    def stage(**options):
        return DPOStage(name="d", kind="dpo", data={"path": "x.jsonl"}, **options)

    kept, soft, unsure = apply_soft_labels(rows, stage())
    assert kept["prompt"] == ["c", "d"] and unsure == 2 and soft["mean_p_chosen"] == pytest.approx(0.95)
    kept, soft, unsure = apply_soft_labels(rows, stage(soft_labels="smooth", train={"loss_type": "robust"}))
    assert len(kept) == 4 and unsure == 0 and soft["label_smoothing"] == pytest.approx(1 - 0.7875)
    kept, soft, _ = apply_soft_labels(rows, stage(soft_labels="ignore"))
    assert len(kept) == 4 and "label_smoothing" not in soft
    assert apply_soft_labels(rows.remove_columns("p_chosen"), stage())[1] == {"mode": "none"}
    with pytest.raises(Exception, match="no pair has p_chosen >= 1"):
        apply_soft_labels(rows.select([0, 1]), stage(min_p_chosen=1.0))


def test_pairs_without_a_prompt_column_share_their_prompt():
    """Anthropic HH (text) and UltraFeedback (whole conversations) carry the prompt inside each answer."""
    from datasets import Dataset

    from posttrain.recipe import DPOStage
    from posttrain.stages.dpo import pairs

    stage = DPOStage(name="d", kind="dpo", data={"path": "x.jsonl"})
    hh = Dataset.from_dict({"chosen": ["\n\nHuman: hi\n\nAssistant: hello!"],
                            "rejected": ["\n\nHuman: hi\n\nAssistant: go away"]})  # fmt: skip
    row = pairs(hh, stage)[0]
    assert row["prompt"] == "\n\nHuman: hi\n\nAssistant:" and row["chosen"] == " hello!"
    user = {"role": "user", "content": "hi"}
    ultra = Dataset.from_list([{"prompt": "hi", "chosen": [user, {"role": "assistant", "content": "hello!"}],
                                "rejected": [user, {"role": "assistant", "content": "go away"}]}])  # fmt: skip
    row = pairs(ultra, stage)[0]
    assert row["prompt"] == [user] and row["chosen"] == [{"role": "assistant", "content": "hello!"}]


def test_memory_plan_counts_the_reference_model_unless_lora_or_precomputed():
    from posttrain import loading  # noqa: F401  (the registry's modules load through it)
    from posttrain.recipe import Recipe
    from posttrain.stages.dpo import workload

    def frozen(**options):
        recipe = Recipe.model_validate({"name": "m", "base_model": {"preset": "tiny-deepseek-v3"}, "stages": [
            {"name": "d", "kind": "dpo", "data": {"path": "x.jsonl"}, **options}]})  # fmt: skip
        return workload(recipe.stages[0], recipe, {})

    full = frozen()
    assert len(full.frozen) == 1 and full.frozen[0].params == full.model.total and full.batch == 16
    assert frozen(lora={"r": 4}).frozen == ()
    assert frozen(train={"precompute_ref_log_probs": True}).frozen == ()


def test_dpo_with_lora_on_moe_trains_the_routers_only_when_asked(write_recipe, cli, tiny_moe, tmp_path):
    from safetensors.torch import load_file

    data = clear_pairs(tmp_path / "pairs.jsonl", 32)
    extra = "    lora: {r: 4, alpha: 8, targets: [attention, shared_experts]}\n    moe: {router: train}\n"
    code, _, err = cli("run", dpo_recipe(write_recipe, tiny_moe, data, steps=3, extra=extra))
    assert code == 0, err
    stage = tmp_path / "runs" / "dpo"
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["parameters"]["trainable"] < metrics["parameters"]["total"] and "moe/load_cv" in metrics
    assert not (stage / "model" / "adapter_config.json").exists()  # merged: a plain model
    before, after = (
        load_file(tiny_moe / "model.safetensors"),
        load_file(stage / "model" / "model.safetensors"),
    )
    routers = [k for k in before if k.endswith("mlp.gate.weight")]
    assert routers and all(
        not before[k].equal(after[k]) for k in routers
    )  # trained in full (modules_to_save)


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_preference_stages_resume_after_a_kill(write_recipe, cli, tmp_path, declared, kill_when, kind):
    data = clear_pairs(tmp_path / "pairs.jsonl", 64)
    recipe = dpo_recipe(write_recipe, "x", data, steps=20, save=4).read_text()
    recipe = recipe.replace("{path: x}", "{preset: tiny-deepseek-v3}").replace("kind: dpo", f"kind: {kind}")
    if kind == "kto":  # at dpo's 5e-3 KTO drives both answers' log-probabilities down on this MoE
        recipe = recipe.replace("learning_rate: 5.0e-3", "learning_rate: 1.0e-3")
    recipe = write_recipe(recipe)
    stage = tmp_path / "runs" / "dpo"
    kill_when(recipe, stage / "checkpoints/checkpoint-4/trainer_state.json")
    assert not (stage / artifacts.COMPLETE).exists()
    code, _, err = cli("run", recipe)
    assert code == 0 and "resuming" in err, err
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 20 and metrics["held_out"]["pairwise_accuracy"] > 0.5
    assert declared(tmp_path / "runs") == []


def test_kto_learns_from_the_same_pairs_or_from_unpaired_labels(
    write_recipe, cli, tiny_dense, tmp_path, declared
):
    data = clear_pairs(tmp_path / "pairs.jsonl", 64)
    recipe = dpo_recipe(write_recipe, tiny_dense, data, steps=8).read_text().replace("kind: dpo", "kind: kto")
    code, _, err = cli("run", write_recipe(recipe))
    assert code == 0, err
    metrics = json.loads((tmp_path / "runs/dpo/metrics.json").read_text())
    assert (
        metrics["held_out"]["pairwise_accuracy"] > 0.7
        and metrics["train"]["loss_last"] < metrics["train"]["loss_first"]
    )
    assert "kl" in metrics["preference"]
    unpaired = tmp_path / "unpaired.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    unpaired.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}) + "\n"
                                for r in rows for key in ("chosen", "rejected")))  # fmt: skip
    code, _, err = cli("run", write_recipe(recipe.replace(str(data), str(unpaired)).replace("name: tiny-dpo", "name: unpaired")
                                           .replace(str(tmp_path / "runs"), str(tmp_path / "runs2"))))  # fmt: skip
    assert code == 0, err
    metrics = json.loads((tmp_path / "runs2/dpo/metrics.json").read_text())
    assert metrics["rows"] == 128 and "held_out" not in metrics and metrics["soft_labels"] == {"mode": "none"}
    assert declared(tmp_path / "runs") == declared(tmp_path / "runs2") == []


def test_bad_kto_recipes_exit_2_with_one_line(write_recipe, cli, tiny_dense, tmp_path):
    data = clear_pairs(tmp_path / "pairs.jsonl", 4)
    head = f"name: bad\nbase_model: {{path: {tiny_dense}}}\nstages:\n  - name: kto\n    kind: kto\n    data: {{path: {data}}}\n"
    for stage, message in [("    train: {loss_type: ktoo}\n", "did you mean 'kto'"),
                           ("    train: {per_device_train_batch_size: 1}\n", "at least 2 a batch"),
                           ("    soft_labels: smooth\n", "soft_labels"),
                           ("    train: {desirable_weigth: 1.0}\n", "did you mean 'desirable_weight'")]:  # fmt: skip
        code, _, err = cli("validate", write_recipe(head + stage))
        assert code == 2 and message in err and "Traceback" not in err, err


def test_orpo_runs_on_the_installed_trl_without_a_reference(
    write_recipe, cli, tiny_dense, tmp_path, declared
):
    from posttrain.recipe import Recipe
    from posttrain.stages.orpo import workload

    data = clear_pairs(tmp_path / "pairs.jsonl", 64)
    recipe = (
        dpo_recipe(write_recipe, tiny_dense, data, steps=8).read_text().replace("kind: dpo", "kind: orpo")
    )
    code, _, err = cli("run", write_recipe(recipe))
    assert code == 0, err
    metrics = json.loads((tmp_path / "runs/dpo/metrics.json").read_text())
    assert metrics["held_out"]["pairwise_accuracy"] > 0.7 and "nll_loss" in metrics["preference"]
    assert (
        metrics["train"]["loss_last"] < metrics["train"]["loss_first"] and declared(tmp_path / "runs") == []
    )
    plan = Recipe.model_validate({"name": "m", "base_model": {"preset": "tiny-dense"},
                                  "stages": [{"name": "o", "kind": "orpo", "data": {"path": "x.jsonl"}}]})  # fmt: skip
    assert workload(plan.stages[0], plan, {}).frozen == ()  # no reference model
    code, _, err = cli("validate", write_recipe(recipe.replace("beta: 0.1", "betta: 0.1")))
    assert code == 2 and "did you mean 'beta'" in err and "ORPOConfig" in err
