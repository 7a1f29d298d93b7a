"""Distillation stage: one or more dense students from a (MoE) teacher, in one recipe step.

DeepSeek-R1's distilled models are dense Qwen/Llama models fine-tuned on ~800k samples that
the MoE model wrote and verifiers filtered. `mode` picks how knowledge moves:

- `traces` (R1): the teacher samples `samples_per_prompt` answers per prompt; those that pass
  every verifier are kept (up to `keep_per_prompt` distinct ones, see posttrain/traces.py),
  optionally mixed with other SFT data, written to `<stage>/data/traces.jsonl`, and every
  student is SFT-trained on them (loss on the completion). The raw samples with their scores
  are in `<stage>/samples.jsonl`, which a restarted stage resumes.
- `logits`: on-policy generalised-JSD distillation with trl's DistillationTrainer: the student
  writes, the teacher's full next-token distribution grades every token. Needs one tokenizer,
  which is checked before anything loads.
- `traces+logits`: SFT on the traces, then the on-policy phase (`logits_train:`).

Each student lands in `<stage>/<student>/model/` with its own metrics.json; the stage's
metrics put the students next to the teacher: parameters, held-out accuracy, generation
tokens/s, and the trace pass rate.

    - name: distill
      kind: distill
      teacher: grpo
      mode: traces
      data: {synthetic: arithmetic, n: 2000}
      samples_per_prompt: 4
      verifiers: [{name: accuracy}, {name: format}]
      students:
        - {name: small, dense_from: grpo, num_hidden_layers: 2}
        - {name: base, dense_from: grpo, num_hidden_layers: 3, hidden_size: 96}
      train: {num_train_epochs: 2}     # trl SFTConfig keys (DistillationConfig in mode logits)
"""

import dataclasses
import shutil
from importlib.util import find_spec
from typing import Any

from posttrain import artifacts
from posttrain.context import StageContext
from posttrain.data_tools import require_columns
from posttrain.data_tools.mixture import concatenate
from posttrain.data_tools.peek import peek_columns
from posttrain.distributed import on_main
from posttrain.errors import PosttrainError
from posttrain.evaluation import eval_hash, evaluate_model
from posttrain.memory import PROMPT_TOKENS, Frozen, ModelShape, Phase, Workload, model_shape, trainer_workload
from posttrain.metrics import Curves, EvalMetrics, Evaluated, NotRequired, Timed, TrainMetrics, TypedDict
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.recipe import DistillStage, MixSpec, PathModel, Recipe, StudentSpec, trainer_defaults
from posttrain.rewards import build_reward, reward_columns, reward_label
from posttrain.stages import Slot
from posttrain.students import parameter_counts, student_config, student_source, tokenizer_mismatch
from posttrain.traces import Verifier, kept_rows, sample_traces, trace_stats
from posttrain.training import (
    callbacks,
    release,
    save_final_model,
    train,
    train_metrics,
    trainer_args,
)

# Folders of the stage itself, so no student may take their name (each student has <stage>/<name>/).
RESERVED = (artifacts.DATA, artifacts.TEACHER, artifacts.CHECKPOINTS, artifacts.LOGS)

# What the console shows of each student's logging steps (the full logs go to TensorBoard and metrics.json).
CONSOLE = (("loss", "loss", ".4f"), ("learning_rate", "lr", ".2e"))


class Description(TypedDict):
    """One model's size, and (with the recipe's `eval:`) its held-out accuracy and speed."""

    model: str
    parameters: NotRequired[int]  # unknown for a served teacher whose config is not at hand
    active_parameters: NotRequired[int]  # an MoE teacher's parameters per token
    accuracy: NotRequired[float]
    tokens_per_s: NotRequired[float]
    eval: NotRequired[EvalMetrics]


class Student(Description):
    init: str  # where its weights started
    train: dict[str, TrainMetrics]  # per phase: sft, logits
    parameters_vs_teacher: NotRequired[float]
    accuracy_vs_teacher: NotRequired[float | None]  # None where the teacher scores 0
    speedup_vs_teacher: NotRequired[float | None]
    trace_pass_rate: NotRequired[float]


class TraceStats(TypedDict):
    prompts: int
    samples: int
    pass_rate: float  # samples that passed every verifier
    prompts_with_pass: float
    kept: int
    verifier_means: dict[str, float]
    sampling_tokens_per_s: float | None
    verifier_stats: dict[str, dict[str, float]]
    mix_rows: NotRequired[int]
    train_rows: int


class Metrics(Timed):
    mode: str
    teacher: Description
    traces: NotRequired[TraceStats]  # traces modes
    rows: int  # what the students train on
    students: dict[str, Student]


def run(stage: DistillStage, ctx: StageContext) -> Metrics:
    from transformers import set_seed

    set_seed(ctx.seed)
    rows = ctx.data(stage.data)
    require_columns(rows, ["prompt"], "distillation", f"stages.{stage.name}.data")
    verifiers = build_verifiers(stage, ctx, rows)
    teacher = ctx.model(stage.teacher)
    sources = {spec.name: student_source(spec, ctx) for spec in stage.students}
    if stage.mode != "traces":
        check_tokenizers(teacher, sources)
    metrics: Any = {
        "mode": stage.mode,
        "teacher": describe_teacher(stage, teacher, _sub(ctx, artifacts.TEACHER)),
    }
    traces = None
    if stage.mode != "logits":
        traces, metrics["traces"] = make_traces(stage, ctx, teacher, rows, verifiers)
    metrics["rows"] = len(traces) if traces is not None else len(rows)  # what the students train on
    prompts = rows.select_columns(["prompt"])
    metrics["students"] = {
        spec.name: distill_student(stage, spec, sources[spec.name], teacher, traces, prompts, ctx)
        for spec in stage.students
    }
    return compare(metrics)


def check(stage: DistillStage, recipe: Recipe, path: tuple) -> None:
    """Recipe-time checks (data peeked, no weights): no student takes the name of one of the
    stage's own folders, the prompts carry the columns the verifiers read, and `mix:` data is SFT
    data. Unknown columns are checked again when the stage starts."""
    for student in stage.students:
        if student.name in RESERVED:
            raise recipe.error(path, f"student name '{student.name}' is reserved (a folder of the stage)")
    columns = peek_columns(stage.data)
    needed = ["prompt", *(c for spec in stage.verifiers for c in reward_columns(spec))]
    missing = [c for c in needed if columns is not None and c not in columns]
    if missing:
        raise recipe.error(
            (*path, "data"),
            f"the prompts have no '{missing[0]}' column (they have: {', '.join(columns or [])})",
            f"map one with `columns: {{{missing[0]}: <your column>}}`",
        )
    mixed = peek_columns(stage.mix.data) if stage.mix is not None else None
    if mixed is not None and "messages" not in mixed and not {"prompt", "completion"} <= set(mixed):
        raise recipe.error(
            (*path, "mix", "data"),
            f"mix data needs 'messages' or 'prompt' + 'completion' (it has: {', '.join(mixed)})",
            "map them with `columns:`",
        )


def slot(stage: DistillStage) -> Slot:
    """Preflight: prompts for the teacher, which writes max_new_tokens each; verifiers run on a few rows."""
    return Slot(
        stage.teacher,
        stage.data,
        ("prompt",),
        stage.generation.max_new_tokens,
        rewards=tuple(stage.verifiers),
        reward_kind="verifier",
    )


def workload(stage: DistillStage, recipe: Recipe, shapes: dict) -> list[Phase]:
    """What runs one after another (the plan's peak is the largest, see memory.plan_phases): the
    teacher's sampling in the traces modes, then each student's full training, beside the frozen
    teacher in its logits phase (trl's DistillationTrainer holds it, sharded by DeepSpeed)."""
    teacher = model_shape(recipe, stage.teacher, shapes)
    phases = [Phase("teacher sampling", _sampling(stage, teacher))] if stage.mode != "logits" else []
    for spec in stage.students:
        config = student_config(spec, recipe)
        for block, trl_config in stage.trainer_blocks().items():
            logits = trl_config == "DistillationConfig"
            settings = {**trainer_defaults(trl_config), **getattr(stage, block)}
            held = (Frozen("teacher", teacher.total),) if logits and teacher is not None else ()
            work = (
                trainer_workload(recipe, shapes, None, settings, reference=False, frozen=held, config=config)
                if config is not None and (teacher is not None or not logits)
                else NOT_OFFLINE
            )
            phases.append(Phase(f"student '{spec.name}' ({'logits' if logits else 'sft'})", work))
    return phases


NOT_OFFLINE = "model config not available offline"
VLLM_UTILIZATION = 0.9  # vllm.LLM's default gpu_memory_utilization


def _sampling(stage: DistillStage, teacher: ModelShape | None) -> Workload | str:
    """The teacher generating traces: whole on each GPU with its KV cache, or in vLLM's share."""
    generation = stage.generation
    if generation.served:
        return "the teacher is served (generation.server): nothing on these GPUs"
    if teacher is None:
        return NOT_OFFLINE
    vllm = generation.backend == "vllm" or (generation.backend == "auto" and find_spec("vllm") is not None)
    options = generation.vllm if vllm else {}
    return Workload(
        model=teacher,
        trainable=0,
        lora=False,
        inference=True,
        generating=generation.batch_size * stage.samples_per_prompt,
        seq=PROMPT_TOKENS + generation.max_new_tokens,
        vllm=float(options.get("gpu_memory_utilization", VLLM_UTILIZATION)) if vllm else 0.0,
        tensor_parallel=int(options.get("tensor_parallel_size", 1)),
    )


loss_panel = "distillation students: token cross-entropy"


def outcome(metrics: Metrics, curves: Curves) -> list[str]:
    """Each model's held-out accuracy and size, teacher first (when the recipe evaluates)."""
    models = {"teacher": metrics["teacher"], **metrics["students"]}
    if not all("accuracy" in m for m in models.values()):
        return []
    sizes = {n: f" ({m['parameters'] / 1e6:.2f}M)" if "parameters" in m else "" for n, m in models.items()}
    return ["accuracy " + ", ".join(f"{n} {m['accuracy']:.3f}{sizes[n]}" for n, m in models.items())]


def headline(name: str, metrics: Metrics, start: tuple[str, Evaluated] | None) -> list[str]:
    """Did each student keep up with the teacher, for its share of the teacher's size?"""
    teacher = metrics.get("teacher") or {}
    lines = []
    for student, m in (metrics.get("students") or {}).items():
        if m.get("accuracy_vs_teacher") is not None and m.get("parameters_vs_teacher") is not None:
            lines.append(f"- **{name}/{student}** keeps {m['accuracy_vs_teacher']:.0%} of the teacher's accuracy "
                         f"({m['accuracy']:.3f} vs {teacher.get('accuracy', 0):.3f}) with "
                         f"{m['parameters_vs_teacher']:.0%} of its parameters")  # fmt: skip
    return lines


def _sub(ctx: StageContext, *parts: str) -> StageContext:
    """The context of a part of the stage: the same run, its own folder (model/, checkpoints/, logs/)."""
    return dataclasses.replace(ctx, out_dir=ctx.out_dir.joinpath(*parts))


def check_tokenizers(teacher: PathModel, sources: dict[str, PathModel]) -> None:
    for name, source in sources.items():
        why = tokenizer_mismatch(teacher, source)
        if why:
            raise PosttrainError(
                f"logit distillation needs one tokenizer, but teacher '{teacher.path}' and student '{name}' "
                f"('{source.path}') differ: {why}",
                fix="use mode: traces, or a student with the teacher's tokenizer (dense_from)",
            )


# --------------------------------------------------------------------------- traces


def make_traces(
    stage: DistillStage, ctx: StageContext, teacher: PathModel, rows: Any, verifiers: list[Verifier]
) -> tuple[Any, TraceStats]:
    """Sample and verify teacher traces (resumably), write `data/traces.jsonl`, add the `mix:` rows."""
    from datasets import Dataset

    samples, traces = ctx.out_dir / artifacts.SAMPLES, ctx.out_dir / artifacts.TRACES
    speed = sample_traces(
        None if stage.generation.served else teacher,  # a served teacher is not loaded here
        rows.to_list(),
        verifiers,
        samples_per_prompt=stage.samples_per_prompt,
        keep_per_prompt=stage.keep_per_prompt,
        generation=stage.generation,
        path=samples,
        seed=ctx.seed,
    )  # every rank samples a share
    on_main(artifacts.write_jsonl, traces, kept_rows(artifacts.iter_jsonl(samples), teacher.path))
    stats = {**trace_stats(artifacts.iter_jsonl(samples)), "sampling_tokens_per_s": speed.get("tokens_per_s")}
    stats["verifier_stats"] = {v.name: v.fn.stats.as_dict() for v in verifiers if hasattr(v.fn, "stats")}
    if stats["kept"] == 0:
        raise PosttrainError(
            f"no teacher trace passed the verifiers ({len(rows)} prompts × {stage.samples_per_prompt} samples)",
            fix="check the teacher and the verifiers' min_score, or raise samples_per_prompt",
        )
    kept = Dataset.from_json(str(traces))
    dataset = kept.select_columns(["prompt", "completion"])
    if stage.mix is not None:
        mix = mix_rows(stage.mix, ctx, len(dataset))
        stats["mix_rows"] = len(mix)
        dataset = concatenate([dataset, mix], f"stages.{stage.name}.mix").shuffle(seed=ctx.seed)
    stats["train_rows"] = len(dataset)
    return dataset, stats


def build_verifiers(stage: DistillStage, ctx: StageContext, rows: Any) -> list[Verifier]:
    """The stage's `verifiers:` as rewards from the registry (posttrain.rewards), each with the
    score a trace needs from it; the prompts must carry the columns they read (e.g. `answer`)."""
    verifiers = []
    for spec in stage.verifiers:
        require_columns(rows, reward_columns(spec), f"verifier '{spec.name}'", f"stages.{stage.name}.data")
        verifiers.append(Verifier(reward_label(spec), build_reward(spec, ctx), spec.min_score))
    return verifiers


def mix_rows(mix: MixSpec, ctx: StageContext, n_traces: int) -> Any:
    """`ratio` of the final training set from `mix.data`: ratio / (1 - ratio) rows per trace, drawn
    with the recipe seed (all of them when the data has fewer), as `prompt` + `completion`."""
    rows = ctx.data(mix.data)
    want = round(n_traces * mix.ratio / (1 - mix.ratio))
    rows = rows.shuffle(seed=ctx.seed).select(range(min(want, len(rows))))
    if "messages" in rows.column_names:
        return rows.map(_split_conversation, remove_columns=rows.column_names)
    require_columns(rows, ["prompt", "completion"], "mix", "mix.data")
    return rows.select_columns(["prompt", "completion"])


def _split_conversation(row: dict[str, Any]) -> dict[str, Any]:
    """A conversation as prompt (every turn before the last) + completion (the last, assistant turn)."""
    messages = row["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise PosttrainError("mix: every conversation must end with an assistant turn")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


# --------------------------------------------------------------------------- students


def distill_student(
    stage: DistillStage,
    spec: StudentSpec,
    source: PathModel,
    teacher: PathModel,
    traces: Any,
    prompts: Any,
    ctx: StageContext,
) -> Student:
    """Train one student through the mode's phases into `<stage>/<student>/model/`, then measure it.

    A phase that finished before an interruption is not run again (its metrics file is its marker);
    a phase that was cut short resumes from its last checkpoint."""
    sctx = _sub(ctx, spec.name)
    done = artifacts.read_json(sctx.out_dir / artifacts.METRICS)
    if done is not None:
        return done
    phases = {"traces": ["sft"], "logits": ["logits"], "traces+logits": ["sft", "logits"]}[stage.mode]
    trained: dict[str, Any] = {}
    for i, phase in enumerate(phases):
        pctx = sctx if i == len(phases) - 1 else _sub(sctx, phase)
        marker = pctx.out_dir / artifacts.PHASE_MARKER.format(phase=phase)
        if artifacts.read_json(marker) is None:
            if phase == "sft":
                result = sft_student(source, traces, stage, pctx)
            else:
                train = stage.logits_train if stage.mode == "traces+logits" else stage.train
                result = on_policy_student(source, teacher, prompts, train, stage, pctx)
            artifacts.write_json(marker, result)
            shutil.rmtree(pctx.out_dir / artifacts.CHECKPOINTS, ignore_errors=True)
        trained[phase] = artifacts.read_json(marker)
        source = PathModel(path=str(pctx.out_dir / artifacts.MODEL))
    metrics = {"init": _init_of(spec), **describe(source, sctx), "train": trained}
    artifacts.write_json(sctx.out_dir / artifacts.METRICS, metrics)
    for phase in phases[:-1]:  # an earlier phase's model was only a resume point
        shutil.rmtree(sctx.out_dir / phase, ignore_errors=True)
    return metrics


def sft_student(source: PathModel, traces: Any, stage: DistillStage, ctx: StageContext) -> dict[str, Any]:
    """SFT on the kept traces with trl's SFTTrainer (loss on the teacher's completion only)."""
    from trl import SFTTrainer

    tokenizer = load_tokenizer(source)
    model = load_causal_lm(source, trainable=True)
    trainer = SFTTrainer(
        model=model,
        args=trainer_args("SFTConfig", stage.train, ctx),
        train_dataset=traces,
        processing_class=tokenizer,
        callbacks=callbacks(ctx, stage.guard),
    )
    held = [trainer, model]
    del trainer, model  # `held` keeps the last references: fit() releases them
    return fit(held, tokenizer, ctx)


def on_policy_student(
    source: PathModel,
    teacher: PathModel,
    prompts: Any,
    train: dict[str, Any],
    stage: DistillStage,
    ctx: StageContext,
) -> dict[str, Any]:
    """On-policy generalised-JSD distillation with trl's DistillationTrainer: the student samples
    completions and learns the teacher's next-token distribution on them (`beta` picks the divergence)."""
    from trl import DistillationTrainer

    tokenizer = load_tokenizer(source)
    tokenizer.padding_side = "left"
    model = load_causal_lm(source, trainable=True)
    teacher_model = load_causal_lm(teacher)
    args = trainer_args(
        "DistillationConfig", train, ctx, max_completion_length=stage.generation.max_new_tokens
    )
    trainer = DistillationTrainer(
        model=model,
        teacher_model=teacher_model,
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        callbacks=callbacks(ctx, stage.guard),
    )
    held = [trainer, model, teacher_model]
    del trainer, model, teacher_model  # `held` keeps the last references: fit() releases them
    return fit(held, tokenizer, ctx)


def fit(held: list[Any], tokenizer: Any, ctx: StageContext) -> dict[str, Any]:
    """Train `held[0]` (from the last checkpoint of an interrupted run), save `model/` atomically,
    and free the trainer and the models `held` holds the last references to."""
    trainer = held[0]
    train(trainer, ctx, CONSOLE)
    save_final_model(trainer, tokenizer, ctx, None)
    metrics = train_metrics(trainer)
    del trainer
    release(held)
    return metrics


def _init_of(spec: StudentSpec) -> str:
    if spec.path is not None:
        return f"path {spec.path.path if isinstance(spec.path, PathModel) else spec.path}"
    if spec.preset is not None:
        return f"preset {spec.preset}"
    return f"{spec.architecture} dense_from {spec.dense_from} {spec.size_overrides() or ''}".strip()


# --------------------------------------------------------------------------- metrics


def describe_teacher(stage: DistillStage, teacher: PathModel, ctx: StageContext) -> Description:
    """The teacher's size, and its held-out accuracy unless `teacher_eval` is off (the default
    for a served teacher: evaluating it here would load it after all). A served teacher with
    `teacher_eval: true` is evaluated through its server."""
    if not stage.evaluates_teacher:
        return describe(teacher, dataclasses.replace(ctx, eval=None), counts_required=False)
    if stage.generation.served:
        served = {"backend": "server", "server": stage.generation.server}
        return describe(None, dataclasses.replace(ctx, eval=ctx.eval and ctx.eval.model_copy(update=served)),
                        counts_required=False, name=teacher.path)  # fmt: skip
    return describe(teacher, ctx, evaluated=stage_eval(stage.teacher, ctx))


def stage_eval(ref: Any, ctx: StageContext) -> EvalMetrics | None:
    """The held-out evaluation that recipe stage `ref` already ran with this `eval:` (its manifest's
    eval_hash matches), so that a teacher from this run is not evaluated twice; None otherwise."""
    folder = ctx.stage_dirs.get(ref) if isinstance(ref, str) else None
    if folder is None or ctx.eval is None:
        return None
    manifest = artifacts.read_json(folder / artifacts.MANIFEST) or {}
    if manifest.get("eval_hash") != eval_hash(ctx.eval):
        return None
    return (artifacts.read_json(folder / artifacts.METRICS) or {}).get("eval")


def describe(
    source: PathModel | None,
    ctx: StageContext,
    counts_required: bool = True,
    name: str | None = None,
    evaluated: EvalMetrics | None = None,
) -> Description:
    """Parameters, held-out accuracy and greedy generation tokens/s of one model (cached in its
    folder); every rank evaluates a share of the prompts, unless `evaluated` holds the model's
    evaluation already. A served model's size is counted when its config is at hand
    (`counts_required=False`), and `source` is None when it is evaluated through its server."""
    saved = artifacts.read_json(ctx.out_dir / artifacts.DESCRIPTION)
    if saved is not None:
        return saved
    about: Description = {"model": name or (source.path if source else "")}
    try:
        counts = parameter_counts(source or PathModel(path=about["model"]))
    except (OSError, ValueError, PosttrainError):  # a hub id offline, a served name with no config
        if counts_required:
            raise
        counts = {}
    about |= {"parameters": counts["total"]} if "total" in counts else {}
    about |= {"active_parameters": counts["active"]} if "active" in counts else {}
    if ctx.eval is not None:
        result = evaluated or evaluate_model(source, ctx.eval, ctx)
        about.update(accuracy=result["accuracy"], tokens_per_s=result["tokens_per_s"], eval=result)
    on_main(_save_description, ctx, about)
    return about


def _save_description(ctx: StageContext, about: Description) -> None:
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(ctx.out_dir / artifacts.DESCRIPTION, about)


def compare(metrics: Metrics) -> Metrics:
    """Each student's accuracy, size and speed as fractions of the teacher's, and the trace pass rate."""
    teacher = metrics["teacher"]
    pass_rate = (metrics.get("traces") or {}).get("pass_rate")
    for student in metrics["students"].values():
        if "parameters" in teacher:  # a served teacher's size may be unknown here
            student["parameters_vs_teacher"] = student["parameters"] / teacher["parameters"]
        if "accuracy" in teacher:  # None where the teacher scores 0: no ratio to take
            student["accuracy_vs_teacher"] = _ratio(student["accuracy"], teacher["accuracy"])
            student["speedup_vs_teacher"] = _ratio(student["tokens_per_s"], teacher["tokens_per_s"])
        if pass_rate is not None:
            student["trace_pass_rate"] = pass_rate
    return metrics


def _ratio(value: float, reference: float) -> float | None:
    return value / reference if reference else None
