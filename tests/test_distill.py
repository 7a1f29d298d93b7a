"""Distillation: dense students from the tiny MoE, rejection sampling, resumable traces, both modes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from posttrain import artifacts, loading
from posttrain.errors import PosttrainError
from posttrain.recipe import GenerationSpec, PathModel, StudentSpec
from posttrain.traces import Verifier, kept_rows, rejection_sample, sample_traces, trace_stats

# --------------------------------------------------------------------------- dense students


def _meta_model(config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_dense_config_from_tiny_deepseek_v3_has_no_experts_and_keeps_the_vocabulary():
    from transformers import AutoConfig

    from posttrain.models import count_parameters, preset_spec
    from posttrain.students import dense_config

    teacher = AutoConfig.for_model(**preset_spec("tiny-deepseek-v3"), vocab_size=266, eos_token_id=257)
    config = dense_config(teacher, num_hidden_layers=2, hidden_size=96)
    model = _meta_model(config)
    names = [name for name, _ in model.named_modules()]
    assert config.model_type == "llama"
    assert not any("expert" in n or n.endswith(".gate") for n in names), "a dense student has no MoE modules"
    assert not hasattr(config, "n_routed_experts") and not hasattr(config, "kv_lora_rank")
    assert (config.vocab_size, config.eos_token_id, config.bos_token_id) == (266, 257, teacher.bos_token_id)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 96, 4)
    assert config.intermediate_size == 192  # the teacher's dense MLP (256) scaled with the width (128 -> 96)
    assert count_parameters(model)["total"] < count_parameters(_meta_model(teacher))["total"] / 2

    qwen = dense_config(teacher, "qwen2", intermediate_size=100)
    assert qwen.model_type == "qwen2" and qwen.num_hidden_layers == teacher.num_hidden_layers
    assert qwen.intermediate_size == 100


def test_built_student_shares_the_teacher_tokenizer(tiny_moe: Path, tmp_path: Path):
    from posttrain.students import build_dense_student, parameter_counts, tokenizer_mismatch

    spec = StudentSpec(name="s", dense_from="sft", num_hidden_layers=1, hidden_size=64)
    student = build_dense_student(PathModel(path=str(tiny_moe)), spec, 0, tmp_path / "student")
    assert tokenizer_mismatch(PathModel(path=str(tiny_moe)), PathModel(path=str(student))) is None
    counts = parameter_counts(PathModel(path=str(student)))
    teacher = parameter_counts(PathModel(path=str(tiny_moe)))
    assert "active" not in counts and teacher["active"] < teacher["total"]
    assert counts["total"] < teacher["total"] / 4


@pytest.mark.parametrize(
    ("student", "message"),
    [
        ({"name": "s", "path": "a/b", "preset": "tiny-dense"}, "exactly one of path, preset or dense_from"),
        ({"name": "s", "preset": "tiny-dense", "hidden_size": 64}, "size keys only apply with dense_from"),
        ({"name": "s", "dense_from": "sft", "hidden_size": 100, "num_attention_heads": 8}, "even size"),
        ({"name": "data", "dense_from": "sft"}, "reserved"),
    ],
)
def test_bad_students_fail_at_load_time(write_recipe, student, message):
    recipe = write_recipe(
        f"""
        name: r
        base_model: {{preset: tiny-deepseek-v3}}
        stages:
          - {{name: sft, kind: sft, data: {{synthetic: arithmetic, n: 8}}}}
          - name: distill
            kind: distill
            teacher: sft
            data: {{synthetic: arithmetic, n: 8}}
            students: [{json.dumps(student)}]
        """
    )
    with pytest.raises(PosttrainError, match=message) as info:
        loading.load(recipe)
    assert info.value.line is not None


def test_trainer_blocks_follow_the_mode(write_recipe):
    def recipe(mode: str, block: str) -> Path:
        return write_recipe(
            f"""
            name: r
            base_model: {{preset: tiny-deepseek-v3}}
            stages:
              - name: distill
                kind: distill
                teacher: {{preset: tiny-deepseek-v3}}
                mode: {mode}
                data: {{synthetic: arithmetic, n: 8}}
                students: [{{name: s, preset: tiny-dense}}]
                {block}
            """
        )

    loading.load(recipe("logits", "train: {beta: 0.5}"))
    loading.load(recipe("traces", "train: {packing: true}"))
    loading.load(recipe("traces+logits", "logits_train: {beta: 0.5}"))
    path = recipe("traces", "train: {beta: 0.5}")
    with pytest.raises(PosttrainError, match="not a field of trl.SFTConfig") as info:
        loading.load(path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "train:" in text)
    assert (info.value.key, info.value.line) == ("stages.distill.train.beta", line)
    with pytest.raises(PosttrainError, match="not a field of trl.DistillationConfig"):
        loading.load(recipe("traces+logits", "logits_train: {packing: true}"))
    with pytest.raises(PosttrainError, match="logits_train applies to mode traces"):
        loading.load(recipe("traces", "logits_train: {beta: 0.5}"))


def test_shipped_recipes_validate(cli):
    root = Path(__file__).parent.parent / "recipes"
    for name in ("demo.yaml", "r1-distill-qwen.yaml"):
        code, _, err = cli("validate", root / name)
        assert code == 0, err


def test_verifiers_come_from_the_reward_registry(write_recipe):
    from datasets import Dataset

    from posttrain.stages.distill import build_verifiers

    text = """
        name: r
        base_model: {preset: tiny-deepseek-v3}
        stages:
          - name: distill
            kind: distill
            teacher: {preset: tiny-deepseek-v3}
            data: {synthetic: arithmetic, n: 8}
            students: [{name: s, preset: tiny-dense}]
            verifiers: VERIFIERS
        """
    recipe = loading.load(
        write_recipe(text.replace("VERIFIERS", "[{name: accuracy}, {name: format, min_score: 0.5}]"))
    )
    stage = recipe.stage("distill")
    verifiers = build_verifiers(stage, None, Dataset.from_list([{"prompt": "1+1=", "answer": "2"}]))
    assert [(v.name, v.min_score) for v in verifiers] == [("accuracy", 1.0), ("format", 0.5)]
    scores = verifiers[0].fn(
        prompts=["1+1="] * 2, completions=["<answer>2</answer>", "<answer>3</answer>"], answer=["2"] * 2
    )
    assert scores == [1.0, 0.0]
    with pytest.raises(PosttrainError, match="needs column 'answer'"):
        build_verifiers(stage, None, Dataset.from_list([{"prompt": "1+1="}]))
    for bad, message in [("[{name: acuracy}]", "accuracy"), ("[{name: format, weight: 2}]", "no weight")]:
        with pytest.raises(PosttrainError, match=message):
            loading.load(write_recipe(text.replace("VERIFIERS", bad)))


def test_missing_prompt_or_verifier_columns_fail_at_load_time(write_recipe, tmp_path: Path):
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(json.dumps({"prompt": [{"role": "user", "content": "1+1="}], "solution": "2"}) + "\n")
    text = f"""
        name: r
        base_model: {{preset: tiny-deepseek-v3}}
        stages:
          - name: distill
            kind: distill
            teacher: {{preset: tiny-deepseek-v3}}
            data: {{path: {rows}COLUMNS}}
            verifiers: [{{name: accuracy}}]
            students: [{{name: s, preset: tiny-dense}}]
        """
    with pytest.raises(PosttrainError, match="no 'answer' column") as info:
        loading.load(write_recipe(text.replace("COLUMNS", "")))
    assert info.value.key == "stages.distill.data"
    loading.load(write_recipe(text.replace("COLUMNS", ", columns: {answer: solution}")))


# --------------------------------------------------------------------------- rejection sampling


def _contains(needle: str):
    """A reward with a known outcome: 1.0 when the completion contains `needle`, else 0.0."""

    def reward(prompts, completions, **columns):
        return [float(needle in c[0]["content"]) for c in completions]

    return reward


def test_rejection_sampling_keeps_only_verified_distinct_traces():
    rows = [
        {"prompt": [{"role": "user", "content": "1+1="}], "answer": "2", "messages": []},
        {"prompt": [{"role": "user", "content": "2+2="}], "answer": "4", "messages": []},
    ]
    samples = [["<a>2</a>", "<a>3</a>", "<a>2</a>", "2"], ["<a>5</a>", "<a>6</a>", "x", "y"]]

    def accuracy(prompts, completions, answer, **_):
        return [float(c[0]["content"].strip("<a/>") == a) for c, a in zip(completions, answer, strict=True)]

    def abstains(prompts, completions, **_):  # None: the verifier does not apply, which fails the sample
        return [None if c[0]["content"] == "2" else 1.0 for c in completions]

    verifiers = [
        Verifier("accuracy", accuracy),
        Verifier("format", _contains("<a>")),
        Verifier("ok", abstains),
    ]
    records = rejection_sample(rows, samples, verifiers, keep_per_prompt=2)

    first, second = records
    assert [s["passed"] for s in first["samples"]] == [True, False, True, False]
    assert first["kept"] == [0], "the duplicate passing sample is not kept twice"
    assert first["pass_rate"] == 0.5 and second["pass_rate"] == 0.0 and second["kept"] == []
    assert first["samples"][3]["scores"] == {"accuracy": 1.0, "format": 0.0, "ok": None}
    assert "messages" not in first

    kept = list(kept_rows([{"index": 7, **r} for r in records], teacher="t"))
    assert len(kept) == 1
    assert kept[0]["completion"] == [{"role": "assistant", "content": "<a>2</a>"}]
    assert (kept[0]["prompt_index"], kept[0]["sample_index"], kept[0]["teacher"]) == (7, 0, "t")
    stats = trace_stats(records)
    assert stats["pass_rate"] == 2 / 8 and stats["prompts_with_pass"] == 0.5 and stats["kept"] == 1

    loose = rejection_sample(rows, samples, [Verifier("format", _contains("<a>"), min_score=0.0)], 4)
    assert loose[1]["kept"] == [0, 1, 2, 3], "min_score 0 lets every sample through"


# --------------------------------------------------------------------------- resumable trace file


def test_trace_file_reading_ignores_torn_and_damaged_lines(tmp_path: Path):
    path = tmp_path / "t.jsonl"
    artifacts.append_jsonl(path, [{"index": 0}, {"index": 1}])
    with open(path, "a") as f:
        f.write('{"index": 2}')  # SIGKILL before the newline: parses, but is torn
    assert [r["index"] for r in artifacts.iter_jsonl(path)] == [0, 1]
    artifacts.append_jsonl(path, [{"index": 2}, {"index": 3}])
    assert [r["index"] for r in artifacts.iter_jsonl(path)] == [0, 1, 2, 3]
    path.write_text('{"index": 0}\nnot json\n{"index": 2}\n')
    assert [r["index"] for r in artifacts.iter_jsonl(path)] == [0, 2], "a damaged prompt is sampled again"


class Interrupt(Exception):
    pass


def test_trace_generation_resumes_where_it_stopped(tiny_moe: Path, tmp_path: Path):
    from posttrain.data_tools import arithmetic_rows

    rows = arithmetic_rows(4, seed=1)
    generation = GenerationSpec(max_new_tokens=6, batch_size=2, temperature=1.0, top_p=1.0)
    seen: list[str] = []

    def counting(prompts, completions, **_):
        seen.extend(p[0]["content"] for p in prompts)
        if len(seen) > 4 and crash:  # batches of 2 prompts x 2 samples
            raise Interrupt  # dies while scoring the second batch
        return [1.0] * len(completions)

    def traces(path: Path):
        return sample_traces(
            PathModel(path=str(tiny_moe)),
            rows,
            [Verifier("counting", counting)],
            samples_per_prompt=2,
            keep_per_prompt=2,
            generation=generation,
            path=path,
            seed=0,
        )

    crash = True
    path = tmp_path / "samples.jsonl"
    with pytest.raises(Interrupt):
        traces(path)
    assert [r["index"] for r in artifacts.iter_jsonl(path)] == [0, 1]
    with open(path, "a") as f:
        f.write('{"index": 2, "prompt"')  # and a torn line from the crash

    crash, seen[:] = False, []
    speed = traces(path)
    records = list(artifacts.iter_jsonl(path))
    assert [r["index"] for r in records] == list(range(4))
    assert len(seen) == 2 * 2, "only the two prompts not yet done are sampled again"
    assert speed["tokens"] > 0

    traces(tmp_path / "fresh.jsonl")
    fresh = list(artifacts.iter_jsonl(tmp_path / "fresh.jsonl"))
    assert [r["samples"] for r in fresh] == [r["samples"] for r in records], (
        "a resumed run draws the same samples"
    )


def test_vllm_backend_without_vllm_is_a_clear_error(tiny_moe: Path):
    from posttrain.generation import open_engine, vllm_usable

    if vllm_usable():
        pytest.skip("vLLM is usable here")
    engine = open_engine(PathModel(path=str(tiny_moe)), GenerationSpec(backend="vllm"))
    with pytest.raises(PosttrainError, match="vLLM is not installed"), engine:
        pass


# --------------------------------------------------------------------------- the stage


def _stage_recipe(write_recipe, tiny_moe: Path, body: str) -> Path:
    return write_recipe(
        f"""
        name: distill-test
        base_model: {{path: {tiny_moe}}}
        stages:
          - name: distill
            kind: distill
            teacher: {{path: {tiny_moe}}}
            data: {{synthetic: arithmetic, n: 8}}
{body.replace("TEACHER", str(tiny_moe))}
        eval: {{data: {{synthetic: arithmetic, split: test, n: 4}}, max_new_tokens: 8}}
        """
    )


def test_traces_mode_trains_students_and_reports_them_next_to_the_teacher(
    write_recipe, tiny_moe, cli, declared
):
    recipe = _stage_recipe(
        write_recipe,
        tiny_moe,
        """\
            samples_per_prompt: 2
            keep_per_prompt: 2
            generation: {max_new_tokens: 12, batch_size: 4}
            verifiers: [{name: format, min_score: 0.0}]   # scores every trace, rejects none
            mix: {data: {synthetic: arithmetic, n: 50, seed: 3}, ratio: 0.2}
            students:
              - {name: small, dense_from: {path: TEACHER}, num_hidden_layers: 1, hidden_size: 32}
              - {name: wide, dense_from: {path: TEACHER}, num_hidden_layers: 1, architecture: qwen2}
            train: {max_steps: 3, per_device_train_batch_size: 8, learning_rate: 1.0e-3, logging_steps: 1}
        """,
    )
    code, _, err = cli("run", recipe)
    assert code == 0, err
    stage = recipe.parent / "runs" / "distill"
    metrics = json.loads((stage / "metrics.json").read_text())
    traces = [json.loads(line) for line in (stage / "data" / "traces.jsonl").read_text().splitlines()]
    assert metrics["traces"]["samples"] == 16 and metrics["traces"]["pass_rate"] == 1.0
    assert metrics["traces"]["verifier_stats"]["format"]["samples"] == 16
    assert len(traces) == metrics["traces"]["kept"] and {"teacher", "prompt_index", "pass_rate"} <= set(
        traces[0]
    )
    assert metrics["traces"]["mix_rows"] == round(len(traces) * 0.2 / 0.8)
    teacher = metrics["teacher"]
    assert teacher["active_parameters"] < teacher["parameters"] and "accuracy" in teacher
    for name in ("small", "wide"):
        student = metrics["students"][name]
        assert (stage / name / "model" / "config.json").exists()
        assert student["train"]["sft"]["steps"] == 3
        assert student["train"]["sft"]["loss_last"] < student["train"]["sft"]["loss_first"]
        assert student["parameters"] < teacher["parameters"]
        assert {
            "accuracy",
            "accuracy_vs_teacher",
            "tokens_per_s",
            "speedup_vs_teacher",
            "trace_pass_rate",
        } <= set(student)
    assert metrics["students"]["small"]["parameters"] < metrics["students"]["wide"]["parameters"]
    assert declared(recipe.parent / "runs") == []  # teacher and students with their eval, as declared
    report = (recipe.parent / "runs" / "report.md").read_text()
    assert (
        "## Distillation" in report and "| wide | 0." in report and "| teacher | 1.01 M | 0.57 M |" in report
    )

    # Interrupted while training `small`: the rerun keeps the traces and `wide`, and trains `small` again.
    (stage / "COMPLETE").unlink()
    fingerprint = json.loads((stage / "manifest.json").read_text())["fingerprint"]
    (stage / "RUNNING").write_text(json.dumps({"fingerprint": fingerprint}))
    shutil.rmtree(stage / "small")
    kept = {
        p: p.stat().st_mtime_ns
        for p in (stage / "samples.jsonl", stage / "wide" / "model" / "model.safetensors")
    }
    code, _, err = cli("run", recipe)
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert (stage / "small" / "model" / "config.json").exists()


def test_logits_mode_runs_a_few_steps(write_recipe, tiny_moe, cli):
    recipe = _stage_recipe(
        write_recipe,
        tiny_moe,
        """\
            mode: logits
            generation: {max_new_tokens: 8}
            students: [{name: s, dense_from: {path: TEACHER}, num_hidden_layers: 1, hidden_size: 32}]
            train: {max_steps: 2, per_device_train_batch_size: 4, learning_rate: 1.0e-3, logging_steps: 1,
                    gradient_checkpointing: false, beta: 0.5}
        """,
    )
    code, _, err = cli("run", recipe)
    assert code == 0, err
    stage = recipe.parent / "runs" / "distill"
    student = json.loads((stage / "metrics.json").read_text())["students"]["s"]
    assert student["train"]["logits"]["steps"] == 2 and student["train"]["logits"]["loss_first"] is not None
    assert (stage / "s" / "model" / "model.safetensors").exists()
    assert not (stage / "data").exists(), "logit distillation writes no traces"


def test_traces_then_logits_trains_both_phases(write_recipe, tiny_moe, cli):
    recipe = _stage_recipe(
        write_recipe,
        tiny_moe,
        """\
            mode: traces+logits
            samples_per_prompt: 1
            generation: {max_new_tokens: 8}
            students: [{name: s, dense_from: {path: TEACHER}, num_hidden_layers: 1, hidden_size: 32}]
            train: {max_steps: 1, per_device_train_batch_size: 8}
            logits_train: {max_steps: 1, per_device_train_batch_size: 4, gradient_checkpointing: false}
        """,
    )
    code, _, err = cli("run", recipe)
    assert code == 0, err
    stage = recipe.parent / "runs" / "distill"
    train = json.loads((stage / "metrics.json").read_text())["students"]["s"]["train"]
    assert train["sft"]["steps"] == 1 and train["logits"]["steps"] == 1
    assert (stage / "s" / "model" / "config.json").exists()
    assert not (stage / "s" / "sft").exists(), "the SFT phase's model was only a resume point"


def test_logits_mode_refuses_a_student_with_another_tokenizer(
    write_recipe, tiny_moe, tiny_dense, tmp_path, cli
):
    from transformers import AutoModelForCausalLM

    from posttrain.models import load_tokenizer, save_pretrained

    tokenizer = load_tokenizer(PathModel(path=str(tiny_dense)))
    tokenizer.add_tokens(["<extra>"])
    other = tmp_path / "other-tokenizer"
    save_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_dense)), tokenizer, other)
    recipe = _stage_recipe(
        write_recipe,
        tiny_moe,
        f"            mode: logits\n            students: [{{name: s, path: {other}}}]\n",
    )
    code, _, err = cli("run", recipe)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "logit distillation needs one tokenizer" in line
    assert str(tiny_moe) in line and str(other) in line and "vocabularies differ" in line


def test_a_teacher_from_this_run_keeps_the_evaluation_its_stage_ran(tmp_path: Path):
    """The teacher's held-out figures come from its stage's metrics.json when that stage ran the same
    `eval:` (its manifest's eval_hash), instead of evaluating the same model a second time."""
    from posttrain.context import StageContext
    from posttrain.recipe import EvalSpec
    from posttrain.stages.distill import stage_eval

    spec = EvalSpec.model_validate({"data": {"synthetic": "arithmetic", "split": "test", "n": 4}})
    grpo = tmp_path / "grpo"
    grpo.mkdir()
    artifacts.write_json(grpo / "metrics.json", {"eval": {"accuracy": 0.42, "n": 4}})
    artifacts.write_json(
        grpo / "manifest.json", {"eval_hash": artifacts.canonical_hash(spec.model_dump(mode="json"))}
    )
    ctx = StageContext(
        stage="distill", out_dir=tmp_path / "distill", run_dir=tmp_path, seed=0,
        base_model=PathModel(path="unused"), stage_dirs={"grpo": grpo}, eval=spec,
    )  # fmt: skip
    assert stage_eval("grpo", ctx) == {"accuracy": 0.42, "n": 4}
    assert stage_eval(PathModel(path=str(grpo)), ctx) is None  # a path: no stage's evaluation to trust
    other = spec.model_copy(update={"max_new_tokens": 8})
    assert stage_eval("grpo", StageContext(**{**ctx.__dict__, "eval": other})) is None  # another eval
