"""GRPO stage: reinforcement learning with verifiable rewards (DeepSeek-R1) via trl's GRPOTrainer.

For each prompt the policy samples `num_generations` completions; the rewards score them,
the group's scores become advantages, and the policy moves toward the better ones. The
result is `<stage>/model/`; every logged step's completions, with each reward and the
advantage, are appended to `<stage>/samples.jsonl`; reward means, `frac_reward_zero_std`,
the clipped-completion ratio and KL (when beta > 0) go to metrics.json and TensorBoard.

    - name: grpo
      kind: grpo
      model: sft                                   # the cold-start policy
      data: {synthetic: arithmetic, n: 2000, seed: 1}
      rewards: [{name: accuracy, weight: 1.0}, {name: format, weight: 0.2}]
      train: {num_generations: 8, learning_rate: 5.0e-5, beta: 0.0, max_completion_length: 48}
"""

import functools
import os
from pathlib import Path
from typing import Any

from posttrain import artifacts
from posttrain.architecture import check_moe, model_max_positions, own_slot, source_positions
from posttrain.context import StageContext
from posttrain.data_tools import describe
from posttrain.data_tools.peek import peek_columns
from posttrain.errors import PosttrainError
from posttrain.generation import render_prompts
from posttrain.memory import Frozen, Workload, model_shape, scorer_params, trainer_workload
from posttrain.metrics import (
    Curves,
    Evaluated,
    MoESummary,
    NotRequired,
    ParameterCounts,
    TrainMetrics,
    TypedDict,
    first_last,
    trained,
)
from posttrain.models import count_parameters, load_causal_lm, load_tokenizer, reference_kwargs
from posttrain.recipe import GRPOStage, PathModel, Recipe, RLStage, trainer_settings
from posttrain.rewards import build_reward, reward_columns, reward_label
from posttrain.stages import Slot
from posttrain.training import (
    applying_lora,
    callbacks,
    logged_first_last,
    lora_config,
    release,
    save_final_model,
    train,
    train_metrics,
    trainer_args,
)

TRL_COMPLETIONS = "completions"  # trl's folder (under checkpoints/) for each logged step's completions
# What posttrain sets unless the recipe does: log often enough to see RL move, and let trl
# write each logged step's completions (read back into samples.jsonl) without printing them.
GRPO_DEFAULTS = {"logging_steps": 5, "log_completions": True, "num_completions_to_print": 0}
RL_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "completions/clipped_ratio",
              "completions/mean_length", "kl", "entropy")  # fmt: skip

# What the console shows of each logging step (the full logs go to TensorBoard and metrics.json).
CONSOLE = (("reward", "reward", ".3f"), ("reward_std", "±", ".3f"), ("kl", "kl", ".4f"),
           ("completions/mean_length", "length", ".1f"), ("learning_rate", "lr", ".2e"))  # fmt: skip


class FirstLast(TypedDict):
    first: float  # mean of the first (up to) 3 logged values
    last: float  # and of the last 3


class HackingSummary(TypedDict):
    action: str | None  # stop | warn when the reward-hacking guard tripped, else None
    step: NotRequired[int]
    reason: NotRequired[str]
    learned: NotRequired[list[str]]
    verifiable: NotRequired[list[str]]
    curves: dict[str, list[list[float]]]  # learned | verifiable: [step, weighted mean] per logged step


class Metrics(Evaluated, MoESummary):
    train: TrainMetrics
    rl: dict[str, FirstLast]  # RL_METRICS and rewards/<label>/mean|std, as trl logs them
    rewards: dict[str, dict[str, float]]  # per reward: samples, none, errors, timeouts, samples_per_s
    parameters: ParameterCounts
    rows: int  # prompts
    samples_logged: int  # rows of samples.jsonl
    guard: NotRequired[HackingSummary]  # when a learned reward is mixed with verifiable ones


def run(stage: GRPOStage, ctx: StageContext) -> Metrics:
    from trl import GRPOTrainer

    return reinforce(stage, ctx, GRPOTrainer)


def reinforce(
    stage: RLStage, ctx: StageContext, trainer_class: Any, in_memory_samples: bool = False
) -> Metrics:
    """The body the online RL kinds share: prompts, rewards, `trainer_class` (trl's GRPOTrainer or
    RLOOTrainer, configured by the stage's trl config), samples.jsonl, save, metrics.
    `in_memory_samples`: the trainer keeps its table of logged completions in memory (RLOO)
    rather than writing it to parquet files (GRPO)."""
    from transformers import set_seed

    from posttrain import moe  # loads transformers (its callbacks subclass TrainerCallback)
    from posttrain.guards import RewardGuard  # loads transformers (a TrainerCallback)
    from posttrain.samples import SamplesLog  # loads transformers (a TrainerCallback)

    set_seed(ctx.seed)
    dataset = with_system_prompt(grpo_columns(ctx.data(stage.data), stage), stage.system_prompt)
    source = ctx.model(stage.model)
    tokenizer = load_tokenizer(source)
    args = trainer_args(
        stage.trainer_config,
        stage.train,
        ctx,
        reward_weights=[r.weight for r in stage.rewards],
        **GRPO_DEFAULTS,
        **moe.train_defaults(stage.moe, aux_loss_coef=0.0),  # aux losses hurt RL (NeMo-RL)
    )
    if args.beta and stage.lora is None:  # trl loads a reference model itself: like the policy
        args.model_init_kwargs = reference_kwargs(source)
    render_prompts(tokenizer, list(dataset["prompt"]), describe(stage.data))  # a refused turn: one line, now
    check_lengths(dataset, tokenizer, source, args.max_completion_length, ctx.stage)
    rewards = [build_reward(spec, ctx) for spec in stage.rewards]
    hacking = hacking_guard(stage, ctx)
    parquet = None if in_memory_samples else Path(args.output_dir) / TRL_COMPLETIONS
    samples = SamplesLog(ctx.out_dir / artifacts.SAMPLES, parquet)
    model = load_causal_lm(source, trainable=True)
    experts = moe.prepare(model, stage.moe, lora=stage.lora, default_router="freeze")
    with applying_lora(stage.lora, ctx.stage, model):
        trainer = trainer_class(
            model=model,
            reward_funcs=rewards,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(stage.lora, model=model, modules_to_save=experts.modules_to_save),
            callbacks=[
                *experts.callbacks,
                *callbacks(ctx, stage.guard),
                samples,
                RewardGuard(ctx.stage, rewards),
                *hacking,
            ],
        )
    samples.trainer = trainer if in_memory_samples else None
    train(trainer, ctx, CONSOLE)
    if ctx.is_main:
        samples.collect()
    save_final_model(trainer, tokenizer, ctx, stage.lora, source)
    labels = [reward_label(spec) for spec in stage.rewards]
    metrics: Metrics = {
        "train": train_metrics(trainer),
        "rl": rl_metrics(trainer.state.log_history, labels),
        "rewards": {reward.name: reward.stats.as_dict() for reward in rewards},
        "parameters": count_parameters(trainer.model),
        "rows": len(dataset),
        "samples_logged": samples.rows,
        **experts.summary(ctx.out_dir if ctx.is_main else None),
        **({"guard": hacking[0].summary()} if hacking else {}),
    }
    held = [trainer, model]
    del trainer, model  # `held` keeps the last references: release() drops them
    release(held)
    return metrics


def hacking_guard(stage: RLStage, ctx: StageContext) -> list[Any]:
    """The reward-hacking guard, when the stage mixes a learned reward (one with a `model:`: a reward
    model, a judge) with verifiable ones and its guard watches for it; else nothing."""
    from posttrain.reward_hacking import HackingGuard  # loads transformers (a TrainerCallback)

    learned = {reward_label(r): r.weight for r in stage.rewards if r.model is not None and r.weight > 0}
    verifiable = {reward_label(r): r.weight for r in stage.rewards if r.model is None and r.weight > 0}
    if not (learned and verifiable and stage.guard.reward_hacking_steps):
        return []
    return [
        HackingGuard(
            ctx.stage, learned, verifiable, stage.guard.reward_hacking_steps, stage.guard.reward_hacking
        )
    ]


def grpo_columns(dataset: Any, stage: RLStage) -> Any:
    """Keep `prompt` and the columns the rewards read; say which are missing, before any model loads."""
    problem = missing_column(stage, dataset.column_names)
    if problem:
        raise PosttrainError(problem, key=f"stages.{stage.name}.data", fix=_column_fix(problem))
    return dataset.select_columns(["prompt", *reward_data_columns(stage)])


def with_system_prompt(dataset: Any, system_prompt: str | None) -> Any:
    """Every prompt as a conversation that opens with `system_prompt` (unless it has a system turn)."""
    if system_prompt is None:
        return dataset

    def conversation(row: dict[str, Any]) -> dict[str, Any]:
        prompt = row["prompt"]
        turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        if not (turns and turns[0].get("role") == "system"):
            turns = [{"role": "system", "content": system_prompt}, *turns]
        return {"prompt": turns}

    return dataset.map(conversation)


def reward_data_columns(stage: RLStage) -> list[str]:
    """The dataset columns the stage's rewards read, each once."""
    return list(dict.fromkeys(c for spec in stage.rewards for c in reward_columns(spec)))


def missing_column(stage: RLStage, columns: list[str]) -> str | None:
    """'<who> needs column <c>, but the data has: ...' for the first missing column, else None."""
    needs = [(stage.kind.upper(), "prompt")] + [
        (f"reward '{reward_label(r)}'", c) for r in stage.rewards for c in reward_columns(r)
    ]
    for who, column in needs:
        if column not in columns:
            return f"{who} needs column '{column}', but the data has: {', '.join(columns)}"
    return None


def _column_fix(problem: str) -> str:
    column = problem.split("needs column '")[1].split("'")[0]
    return f"map it with `columns: {{{column}: <your column>}}`"


# --------------------------------------------------------------------------- checks


def check(stage: RLStage, recipe: Recipe, path: tuple) -> None:
    """Recipe-time checks (no weights, no data loading beyond a peek): batch, columns, MoE, lengths."""
    train = trainer_settings(stage, **GRPO_DEFAULTS)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    generation_batch = train["generation_batch_size"] or (
        train["per_device_train_batch_size"]
        * world
        * (train["steps_per_generation"] or train["gradient_accumulation_steps"])
    )
    if generation_batch % train["num_generations"]:
        raise recipe.error(
            (*path, "train", "num_generations"),
            f"the generation batch ({generation_batch} = per_device_train_batch_size "
            f"{train['per_device_train_batch_size']} x {world} process(es) x steps per generation) "
            f"is not divisible by num_generations ({train['num_generations']})",
            "make per_device_train_batch_size (or gradient_accumulation_steps) a multiple of num_generations",
        )
    _check_columns(stage, recipe, path)
    check_moe(stage.moe, stage.model, recipe, path)
    slot = own_slot(recipe, stage.model)
    if train.get("use_vllm") and slot is not None and slot.config:
        raise recipe.error(
            (*path, "train", "use_vllm"), "trl's vLLM generation loads the model without `config:` overrides",
            "bake them into the model's config.json, or set use_vllm: false",
        )  # fmt: skip
    max_positions = model_max_positions(recipe, stage.model)
    completion = train["max_completion_length"]
    if max_positions is not None and completion is not None and completion >= max_positions:
        raise recipe.error(
            (*path, "train", "max_completion_length"),
            f"max_completion_length ({completion}) leaves no room for the prompt in the model's "
            f"max_position_embeddings ({max_positions})",
            f"lower it below {max_positions}",
        )


def _check_columns(stage: RLStage, recipe: Recipe, path: tuple) -> None:
    columns = peek_columns(stage.data)
    problem = missing_column(stage, columns) if columns is not None else None
    if problem:  # unknown columns are checked again at stage start, before the model loads
        raise recipe.error((*path, "data"), problem, _column_fix(problem))


def check_lengths(
    dataset: Any, tokenizer: Any, source: PathModel, max_completion: int | None, stage: str
) -> None:
    """The longest prompt plus max_completion_length must fit the model's positions."""
    positions = source_positions(source)
    if positions is None or max_completion is None:
        return
    sample = dataset.select(range(min(len(dataset), 2000)))
    longest = max((len(tokenizer(p, add_special_tokens=False)["input_ids"])
                   for p in render_prompts(tokenizer, list(sample["prompt"]))), default=0)  # fmt: skip
    if longest + max_completion > positions:
        raise PosttrainError(
            f"the longest prompt ({longest} tokens) plus max_completion_length ({max_completion}) "
            f"exceeds the model's max_position_embeddings ({positions})",
            key=f"stages.{stage}.train.max_completion_length",
            fix="lower max_completion_length or shorten the prompts",
        )


# --------------------------------------------------------------------------- preflight, memory, report


def slot(stage: RLStage) -> Slot:
    """Preflight: prompts with the rewards' columns, each followed by max_completion_length new
    tokens; the rewards run on a few rows."""
    columns = ("prompt", *reward_data_columns(stage))
    new_tokens = trainer_settings(stage).get("max_completion_length")
    check = functools.partial(preflight_prompts, stage.system_prompt)
    return Slot(stage.model, stage.data, columns, new_tokens, rewards=tuple(stage.rewards), row_check=check)


def preflight_prompts(system_prompt: str | None, tokenizer: Any, rows: Any, label: str) -> list[str]:
    """Preflight: the prompts render as the stage will build them, with its `system_prompt`."""
    render_prompts(tokenizer, list(with_system_prompt(rows, system_prompt)["prompt"]), label)
    return []


def workload(stage: RLStage, recipe: Recipe, shapes: dict) -> Workload | str:
    """The policy, trl's reference (beta > 0, no LoRA), the models the rewards hold, trl's vLLM."""
    held = reward_models(stage, recipe, shapes)
    if isinstance(held, str):
        return held
    settings = trainer_settings(stage)
    return trainer_workload(recipe, shapes, stage.model, settings, stage.lora, stage.moe, frozen=held)


def reward_models(stage: RLStage, recipe: Recipe, shapes: dict) -> tuple[Frozen, ...] | str:
    """The models the stage's rewards load: a reward model (a sequence classifier) or a local AI
    judge, each whole on every GPU (posttrain loads them, not DeepSpeed); a served judge costs
    nothing here. A reason string when one's config is not available offline."""
    held = []
    for spec in stage.rewards:
        if spec.model is None:
            continue
        judge = spec.options.get("judge") or {}
        name = spec.model.path if isinstance(spec.model, PathModel) else str(spec.model)
        role = {"reward_model": "reward model", "judge": "judge"}.get(
            spec.name, f"reward {reward_label(spec)}"
        )
        if judge.get("backend") == "openai":
            note = f"served at {judge.get('base_url')}: nothing on the training GPUs"
            held.append(Frozen(f"{role} '{name}'", 0, sharded=False, note=note))
            continue
        model = model_shape(recipe, spec.model, shapes)
        if model is None:
            return f"{role} '{name}': model config not available offline"
        size = scorer_params(model) if spec.name == "reward_model" else model.total
        held.append(Frozen(f"{role} '{name}'", size, sharded=False))
    return tuple(held)


loss_panel = None  # about 0 by construction: reward.png shows what it optimises


def outcome(metrics: Metrics, curves: Curves) -> list[str]:
    """How the mean reward moved (the loss says nothing), and the steps."""
    reward = (metrics.get("rl") or {}).get("reward")
    moved = (reward["first"], reward["last"]) if reward else first_last(curves.get("reward", []))
    return ([f"reward {moved[0]:.3f} → {moved[1]:.3f}"] if moved else []) + trained(
        metrics.get("train"), curves, loss=False
    )


def headline(name: str, metrics: Metrics, start: tuple[str, Evaluated] | None) -> list[str]:
    """Did RL beat the model it started from, on held-out accuracy (and sampled pass@1)? And did the
    reward-hacking guard stop or warn, and why?"""
    tripped = (metrics.get("guard") or {}).get("reason")
    lines = [f"- **{name}**: {tripped}"] if tripped else []
    before = (start[1].get("eval") or {}) if start else {}
    after = metrics.get("eval") or {}
    if start is None or before.get("accuracy") is None or after.get("accuracy") is None:
        return lines
    sampled = (before.get("pass_at_1"), after.get("pass_at_1"))
    pass_at_1 = (
        f"; pass@1 {sampled[0]:.3f} → {sampled[1]:.3f} ({(sampled[1] - sampled[0]) * 100:+.1f})"
        if None not in sampled
        else ""
    )
    gain = (after["accuracy"] - before["accuracy"]) * 100
    verb = "lowered" if gain < 0 else "lifted"
    return [*lines, f"- **{name}** {verb} held-out accuracy {before['accuracy']:.3f} → {after['accuracy']:.3f} "
                    f"({gain:+.1f} points over {start[0]}{pass_at_1})"]  # fmt: skip


# --------------------------------------------------------------------------- logging


def rl_metrics(history: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """First and last logged value (mean of up to 3 log steps each) of the RL signals."""
    keys = [*RL_METRICS, *(f"rewards/{label}/{s}" for label in labels for s in ("mean", "std"))]
    keys += sorted({k for h in history for k in h if k.startswith("rewards/") and k not in keys})
    return logged_first_last(history, keys)
