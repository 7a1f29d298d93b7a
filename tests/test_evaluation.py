"""Evaluation: scoring, pass@k / maj@k, the `evaluate` stage, gates, recipe checks, the run report."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from posttrain import loading
from posttrain.evaluation import majority_index, sample_metrics, score

TINY_EVAL = """
eval:
  data: {synthetic: arithmetic, split: test, n: 6}
  max_new_tokens: 12
  k: 2
"""


def with_eval(body: str) -> str:
    return textwrap.dedent(body) + TINY_EVAL


def test_score_extracts_and_normalises() -> None:
    completions = [
        "<think>2+3=5</think><answer>5</answer>",
        "the answer is \\boxed{1,000}",
        "<answer>7</answer>",
        "no final answer",
        "<think>half</think><answer>0.5</answer>",
    ]
    answers = ["5", "It costs 1000.\n#### 1000", "8", "3", "\\frac{1}{2}"]
    correct, formatted = score(completions, answers)
    assert correct == [True, True, False, False, True]
    assert formatted == [True, False, False, False, True]


def test_pass_and_majority_over_samples() -> None:
    sampled = [
        ["<answer>5</answer>", "<answer>4</answer>", "<answer>5</answer>"],  # 2/3, majority right
        ["<answer>1</answer>", "<answer>9</answer>", "<answer>9</answer>"],  # 1/3, majority wrong
        ["nothing", "<answer>0</answer>", "<answer>0</answer>"],  # 0/3
    ]
    correct = [score(s, [a] * 3)[0] for s, a in zip(sampled, ["5", "1", "2"], strict=True)]
    metrics = sample_metrics(sampled, correct)
    assert metrics["pass_at_1"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert metrics["pass_at_k"] == pytest.approx(2 / 3)
    assert metrics["maj_at_k"] == pytest.approx(1 / 3)
    assert majority_index(["x", "<answer>3</answer>", "<answer>3.</answer>"]) == 1  # `3.` votes for 3


# --------------------------------------------------------------------------- recipe checks


def test_evaluate_stage_takes_eval_defaults_and_decontamination_resolves(write_recipe) -> None:
    path = write_recipe(
        with_eval("""
        name: r
        base_model: {preset: tiny-dense}
        stages:
          - {name: base, kind: evaluate, k: 4}
          - name: sft
            kind: sft
            data: {synthetic: arithmetic, n: 10, decontaminate: true}
        """)
    )
    recipe = loading.load(path)
    base, sft = recipe.stages
    assert base.data.split == "test" and base.max_new_tokens == 12 and base.k == 4
    assert [spec.split for spec in sft.data.decontaminate.against] == ["test"]


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ("- {name: a, kind: evaluate, gate: {min_accuracy: 0.5}}", "evaluate stage needs `data:`"),
        (
            "- {name: a, kind: sft, data: {synthetic: arithmetic}, gate: {min_accuracy: 0.5}}",
            "stages.a.gate: a gate needs an evaluation",
        ),
        (
            "- {name: a, kind: sft, data: {synthetic: arithmetic, decontaminate: true}}",
            "nothing to decontaminate",
        ),
        (
            "- {name: a, kind: sft, data: {synthetic: arithmetic, curriculum: {by: difficulty}}}",
            "train_sampling_strategy: sequential",
        ),
        ("- {name: a, kind: sft, data: {path: x.jsonl, template: 'no fields'}}", "template names no column"),
        ("- {name: a, kind: sft, data: {synthetic: arithmetic}, gate: {}}", "a gate needs a threshold"),
    ],
)
def test_recipe_load_errors(write_recipe, cli, stages: str, message: str) -> None:
    path = write_recipe(f"name: r\nbase_model: {{preset: tiny-dense}}\nstages:\n  {stages}\n")
    code, _, stderr = cli("validate", path)
    assert code == 2
    assert message in stderr.replace("\n", " ")


def test_missing_file_columns_fail_at_recipe_load(write_recipe, cli, tmp_path: Path) -> None:
    (tmp_path / "gsm.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    path = write_recipe(
        f"""
        name: r
        base_model: {{preset: tiny-dense}}
        stages:
          - name: a
            kind: sft
            data: {{path: {tmp_path / "gsm.jsonl"}, columns: {{prompt: problem}}}}
        """
    )
    code, _, stderr = cli("validate", path)
    assert code == 2
    text = stderr.replace("\n", " ")
    assert (
        "stages.a.data.columns" in text
        and "no column 'problem'" in text
        and "it has: question, answer" in text
    )


def test_pass_at_1_gate_needs_samples(write_recipe, cli) -> None:
    path = write_recipe(
        """
        name: r
        base_model: {preset: tiny-dense}
        stages:
          - {name: a, kind: evaluate, k: 1, gate: {min_pass_at_1: 0.5}}
        eval: {data: {synthetic: arithmetic, split: test}}
        """
    )
    code, _, stderr = cli("validate", path)
    assert code == 2 and "pass@1 needs k > 1" in stderr


def test_harness_is_validated(write_recipe, cli, local_task: Path) -> None:
    """Task names are checked against lm-eval's index (its own tasks and include_path's): the local
    task passes, the typo is named."""
    from posttrain.harness import installed, task_metrics

    path = write_recipe(
        f"""
        name: r
        base_model: {{preset: tiny-dense}}
        stages:
          - {{name: a, kind: evaluate, harness: {{tasks: [tiny_arith, gsm8k_typo_task], include_path: {local_task}}}}}
        eval: {{data: {{synthetic: arithmetic, split: test}}}}
        """
    )
    code, _, stderr = cli("validate", path)
    assert code == 2
    expected = "unknown lm-eval task 'gsm8k_typo_task'" if installed() else "pip install 'posttrain[eval]'"
    assert expected in stderr.replace("\n", " ")
    values = {"alias": "gsm8k", "sample_len": 1319, "exact_match,strict-match": 0.25}
    values["exact_match_stderr,strict-match"] = 0.01
    assert task_metrics(values) == {"exact_match,strict-match": 0.25}


# --------------------------------------------------------------------------- tiny runs


def test_gate_stops_the_pipeline_then_eval_and_report_after_training(
    write_recipe, cli, tmp_path: Path, declared
) -> None:
    """A random base model misses its gate: the pipeline stops, that stage stays COMPLETE. With the
    gate lowered it is cached (not re-run), SFT trains, is evaluated, and report.md shows both."""
    path = write_recipe(
        with_eval("""
        name: gated
        base_model: {preset: tiny-deepseek-v3}
        stages:
          - {name: base, kind: evaluate, gate: {min_accuracy: 0.5}}
          - name: sft
            kind: sft
            data: {synthetic: arithmetic, n: 64, dedup: true, decontaminate: true}
            train: {max_steps: 4, per_device_train_batch_size: 16, learning_rate: 3.0e-3,
                    logging_steps: 1, save_steps: 100, gradient_checkpointing: false}
        """)
    )
    run = tmp_path / "runs"
    code, _, stderr = cli("run", path)
    assert code == 2
    line = stderr.replace("\n", " ")
    assert "stages.base.gate" in line and "stage 'base' failed its gate" in line
    assert "accuracy 0.000 < min_accuracy 0.500" in line
    assert (run / "base" / "COMPLETE").exists() and not (run / "sft").exists()
    base = json.loads((run / "base" / "metrics.json").read_text())["eval"]
    assert base["n"] == 6 and {"pass_at_1", "pass_at_k", "maj_at_k", "format_rate", "mean_length"} <= set(
        base
    )
    samples = [json.loads(line) for line in (run / "base" / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and {"prompt", "completion", "answer", "correct", "samples"} <= set(samples[0])
    assert "| base | evaluate | complete |" in (run / "report.md").read_text()

    code, _, stderr = cli("run", path, "--set", "stages.base.gate.min_accuracy=0.0")
    assert code == 0, stderr
    assert "base: cached" in stderr
    metrics = json.loads((run / "sft" / "metrics.json").read_text())
    assert metrics["train"]["loss_last"] < metrics["train"]["loss_first"]
    assert metrics["eval"]["n"] == 6 and "accuracy" in metrics["eval"]
    assert (run / "sft" / "eval_samples.jsonl").exists()
    hygiene = json.loads((run / "sft" / "data_report.json").read_text())["steps"]
    assert [s["step"] for s in hygiene] == ["dedup", "decontaminate"]

    report = (run / "report.md").read_text()
    assert report.startswith("# gated")
    assert "| stage | kind | status | time (s) | training | data | accuracy | pass@1 |" in report
    sft_row = next(line for line in report.splitlines() if line.startswith("| sft |"))
    assert "loss " in sft_row and "64 rows, −0 dup, −0 contaminated" in sft_row
    assert "accuracy ≥ 0 ✓" in report
    for plot in ("loss.png", "accuracy.png"):
        assert (run / plot).read_bytes().startswith(b"\x89PNG")
    assert "![loss](loss.png)" in report and not (run / "reward.png").exists()

    assert declared(run) == []  # an evaluate stage's and a trainer's `eval`, as declared
    (run / "report.md").unlink()
    code, _, stderr = cli("report", run)
    assert code == 0, stderr
    assert (run / "report.md").read_text() == report


@pytest.mark.parametrize("name", ["demo.yaml", "gsm8k.yaml"])
def test_shipped_recipes_validate(name: str) -> None:
    recipe = loading.load(Path(__file__).parents[1] / "recipes" / name)
    assert recipe.eval is not None


def greedy_continuations(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """What the model writes after each prompt, greedily: the text a harness run must have scored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


@pytest.fixture(scope="module")
def local_task(tiny_dense: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one lm-eval task YAML, `tiny_arith`, over a local JSONL file: four prompts whose
    targets are tiny_dense's own greedy continuations for the first two and not for the last two.
    One folder for the module, so lm-eval indexes its ~15k tasks once (posttrain caches the index)."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    prompts = [f"{i}+1=" for i in range(4)]  # one length: no padding, so batching cannot change them
    continuations = greedy_continuations(tiny_dense, prompts, max_new_tokens=8)
    targets = continuations[:2] + ["#" + text for text in continuations[2:]]
    rows = [json.dumps({"q": q, "a": a}) for q, a in zip(prompts, targets, strict=True)]
    (folder / "arith.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "tiny_arith.yaml").write_text(
        textwrap.dedent(
            f"""
            task: tiny_arith
            dataset_path: json
            dataset_kwargs: {{data_files: {{test: {folder / "arith.jsonl"}}}}}
            test_split: test
            output_type: generate_until
            doc_to_text: "{{{{q}}}}"
            doc_to_target: "{{{{a}}}}"
            generation_kwargs: {{until: ["<|eos|>"], max_gen_toks: 8, do_sample: false}}
            metric_list: [{{metric: exact_match}}]
            """
        )
    )
    return folder


def test_harness_runs_a_local_task_on_the_tiny_model(
    tiny_dense: Path, local_task: Path, tmp_path: Path
) -> None:
    """lm-eval (in [dev]) on a task YAML over a local JSONL file, offline: two of the four targets are
    the model's own greedy continuations, so exact match must come out 0.5 exactly."""
    from types import SimpleNamespace

    from posttrain.artifacts import HARNESS_RESULTS
    from posttrain.harness import run_harness
    from posttrain.recipe import HarnessSpec, PathModel

    # raw prompts: through the chat template this random model ends at once, and '' would match ''
    spec = HarnessSpec(
        tasks=["tiny_arith"], include_path=str(local_task), batch_size=4, apply_chat_template=False
    )
    ctx = SimpleNamespace(seed=0, is_main=True, out_dir=tmp_path)
    results = run_harness(PathModel(path=str(tiny_dense)), spec, ctx)
    assert results == {"tiny_arith": {"exact_match,none": 0.5}}
    output = json.loads((tmp_path / HARNESS_RESULTS).read_text())
    assert output["results"]["tiny_arith"]["exact_match,none"] == 0.5
    assert output["n-samples"]["tiny_arith"]["effective"] == 4


def test_report_reads_reward_curves_and_data_reports(tmp_path: Path) -> None:
    """A GRPO-like stage (reward logged to TensorBoard) and a stage still running, from files alone."""
    import yaml
    from torch.utils.tensorboard import SummaryWriter

    from posttrain import artifacts
    from posttrain.report import write_report

    stages = [
        {"name": "grpo", "kind": "grpo", "gate": {"min_accuracy": 0.5}},
        {"name": "distill", "kind": "distill"},
    ]
    (tmp_path / "recipe.resolved.yaml").write_text(yaml.safe_dump({"name": "rl", "stages": stages}))
    grpo = tmp_path / "grpo"
    writer = SummaryWriter(log_dir=str(grpo / "logs"))
    for step, (loss, reward) in enumerate([(0.9, 0.1), (0.7, 0.3), (0.6, 0.45)], 1):
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/reward", reward, step)
    writer.close()
    artifacts.write_json(grpo / "data_report.json", {"steps": [
        {"step": "decontaminate", "source": "train.jsonl", "rows_in": 10, "removed": 2,
         "examples": [{"removed": "What is 2+2?", "matched": "what is 2 + 2 ?"}]},
    ]})  # fmt: skip
    metrics = {
        "train": {"steps": 3},
        "eval": {"accuracy": 0.4, "n": 10, "format_rate": 0.9},
        "wall_time_s": 5.0,
    }
    artifacts.finish_stage(grpo, {"stage": "grpo"}, metrics)
    artifacts.write_json(tmp_path / "distill" / artifacts.RUNNING, {"fingerprint": "x"})

    report = write_report(tmp_path).read_text()
    grpo_row = next(line for line in report.splitlines() if line.startswith("| grpo |"))
    assert "reward 0.100 → 0.450" in grpo_row and "3 steps" in grpo_row
    assert "loss" not in grpo_row  # about 0 by construction in RL: the reward says what moved
    assert "−2 contaminated" in grpo_row and "accuracy ≥ 0.5 ✗" in grpo_row and "| 0.400 |" in grpo_row
    assert "| distill | distill | running |" in report
    assert "decontaminate removed 2 of 10 rows from `train.jsonl`" in report
    for plot in ("reward", "accuracy"):
        assert f"![{plot}]({plot}.png)" in report
        assert (tmp_path / f"{plot}.png").read_bytes().startswith(b"\x89PNG")
    assert "loss.png" not in report  # GRPO's loss alone: nothing worth a loss panel


def test_report_headlines_say_whether_each_stage_did_its_job() -> None:
    from posttrain.report import StageSummary, headlines

    def stage(name: str, kind: str, metrics: dict, source: str | None = None) -> StageSummary:
        return StageSummary(name, kind, "complete", metrics, [], {}, None, source)

    lines = headlines([
        stage("sft", "sft", {"eval": {"accuracy": 0.41}}),
        stage("label", "rlaif_label", {"kept": 90, "pairs_judged": 100,
                                       "agreement_with_answer": {"n": 40, "accuracy": 0.9}}),
        stage("rm", "reward_model", {"held_out": {"n": 50, "accuracy": 0.8,
                                                  "right_vs_wrong": {"n": 20, "accuracy": 0.85}}}),
        stage("grpo", "grpo", {"eval": {"accuracy": 0.535}}, source="sft"),
        stage("distill", "distill", {"teacher": {"accuracy": 0.5}, "students": {
            "base": {"accuracy": 0.45, "accuracy_vs_teacher": 0.9, "parameters_vs_teacher": 0.4}}}),
    ])  # fmt: skip
    assert lines == [
        "- **label**: the judge kept 90 of 100 pairs and agrees with the reference answer on 0.900 of 40 "
        "pairs with one right answer",
        "- **rm** ranks the chosen answer first on 0.800 of 50 held-out pairs, 0.850 on right-vs-wrong "
        "pairs (n=20) (chance: 0.5)",
        "- **grpo** lifted held-out accuracy 0.410 → 0.535 (+12.5 points over sft)",
        "- **distill/base** keeps 90% of the teacher's accuracy (0.450 vs 0.500) with 40% of its parameters",
    ]


def test_plots_have_a_panel_per_loss_family_integer_steps_and_visible_zeros(
    monkeypatch, tmp_path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from posttrain import report
    from posttrain.report import StageSummary

    figures = []
    monkeypatch.setattr(report, "_save", lambda figure, path: figures.append(figure))

    def stage(name, kind, metrics, curves=None, parts=None) -> StageSummary:
        return StageSummary(name, kind, "complete", metrics, [], curves or {}, None, None, parts or {})

    stages = [
        stage("sft", "sft", {"eval": {"accuracy": 0.0, "n": 4, "pass_at_1": 0.25}},
              {"loss": [(1, 2.0), (2, 1.5), (3, 1.2)]}),
        stage("rm", "reward_model", {}, {"loss": [(1, 0.69), (2, 0.6)]}),
        stage("grpo", "grpo", {"eval": {"accuracy": 0.5, "n": 4}},
              {"loss": [(1, 0.0), (2, 0.0)], "reward": [(1, 0.2), (2, 0.4)]}),
        stage("distill", "distill", {"students": {"small": {"accuracy": 0.25, "parameters": 10,
                                                            "eval": {"accuracy": 0.25, "n": 4}}}},
              parts={"small": {"loss": [(2, 3.0), (4, 2.5)]}}),
    ]  # fmt: skip
    assert report.plot_curves(stages, "loss", tmp_path / "loss.png")
    [loss] = figures
    titles = [a.get_title() for a in loss.axes]
    assert titles == [
        "SFT: token cross-entropy",
        "reward model: pairwise loss",
        "distillation students: token cross-entropy",
    ]  # fmt: skip (no GRPO "loss")
    assert [line.get_label() for line in loss.axes[2].get_lines()] == ["distill/small"]
    loss.canvas.draw()
    ticks = [t.get_text() for t in loss.axes[1].get_xticklabels() if t.get_text()]
    assert ticks and all(t.lstrip("−-").isdigit() for t in ticks)  # integer steps only
    assert "1.200" in [t.get_text() for t in loss.axes[0].texts]  # the last value, written at the line's end

    assert report.plot_accuracy(stages, tmp_path / "accuracy.png")
    axes = figures[-1].axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["sft", "grpo", "distill/small"]
    labels = [t.get_text() for t in axes.texts]
    assert labels.count("0.00") == 1 and "0.25" in labels  # sft's 0 accuracy is labelled, not invisible
    assert len(axes.patches) == 4  # 3 accuracies + sft's pass@1: no zero-height bar for a missing metric
