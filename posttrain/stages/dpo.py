"""DPO stage: direct preference optimisation of the policy on pairs, with trl's DPOTrainer.

The policy learns to raise the log-probability of each chosen answer over the rejected one,
relative to a frozen reference (its own starting weights; with LoRA, the model with the adapter
off), so no reward model is trained. Pairs come from an `rlaif_label` stage (`data: label`) or
any prompt/chosen/rejected data, conversational or plain; without a `prompt` column (Anthropic
HH, UltraFeedback as trl ships them) the prompt is the turns chosen and rejected share. The
judge's soft label `p_chosen` filters the pairs (`soft_labels: filter`, the default: pairs the
judge was sure of) or sets robust DPO's label smoothing (`smooth`), see PreferenceStage.

A split of prompts is held out (`eval_fraction`, as the reward_model stage does): metrics.json
gives the implicit reward's pairwise accuracy and mean margin there, beta * (log pi/pi_ref of
chosen - of rejected), scored from the saved model and the reference after training.

    - name: dpo
      kind: dpo
      model: sft
      data: label
      train: {loss_type: sigmoid, beta: 0.1, learning_rate: 5.0e-6}   # any trl DPOConfig key
"""

import ast
import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

from posttrain import artifacts
from posttrain.architecture import check_moe, config_positions, model_max_positions
from posttrain.context import StageContext
from posttrain.data_tools import require_columns
from posttrain.data_tools.peek import peek_columns
from posttrain.errors import PosttrainError, did_you_mean
from posttrain.lora_targets import literal_targets
from posttrain.memory import Workload, trainer_workload
from posttrain.metrics import (
    Curves,
    Evaluated,
    MoESummary,
    NotRequired,
    ParameterCounts,
    TrainMetrics,
    TypedDict,
    trained,
)
from posttrain.models import count_parameters, load_causal_lm, load_tokenizer
from posttrain.recipe import DPOStage, PathModel, PreferenceStage, Recipe, trainer_defaults, trainer_settings
from posttrain.stages import Slot
from posttrain.stages.reward_model import Agreement, right_vs_wrong, split_by_prompt, trainer_rows
from posttrain.training import (
    applying_lora,
    callbacks,
    logged_first_last,
    lora_config,
    release,
    require_rows_left,
    save_final_model,
    train,
    train_metrics,
    trainer_args,
)

DEFAULTS = {"logging_steps": 5}
# What the console shows of each logging step (the full logs go to TensorBoard and metrics.json).
CONSOLE = (("loss", "loss", ".4f"), ("rewards/margins", "margin", ".3f"), ("rewards/accuracies", "ranked", ".3f"),
           ("learning_rate", "lr", ".2e"))  # fmt: skip
MAX_SMOOTHING = 0.45  # robust DPO divides by 1 - 2 * label_smoothing: keep it well below 0.5
# What trl logs of the implicit reward each step (first and last values go to metrics.json).
LOGGED = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
          "logps/chosen", "logps/rejected", "kl", "nll_loss", "log_odds_ratio")  # fmt: skip


class Pairs(TypedDict):
    train: int
    held_out: int
    unsure: int  # dropped by `soft_labels: filter` (p_chosen below min_p_chosen)


class SoftLabels(TypedDict):
    mode: str  # filter | smooth | ignore | none (the rows carry no p_chosen)
    mean_p_chosen: NotRequired[float]  # over the pairs trained on
    min_p_chosen: NotRequired[float]
    label_smoothing: NotRequired[float]


class HeldOut(TypedDict):
    n: int
    pairwise_accuracy: float  # the implicit reward ranks the chosen answer first
    mean_margin: float  # beta * (chosen - rejected log-ratio), mean over the pairs
    start_accuracy: float  # the reference's log-probabilities alone (the starting model's ranking)
    right_vs_wrong: NotRequired[Agreement]  # pairs with exactly one right answer (rows with `answer`)


class Metrics(Evaluated, MoESummary):
    train: TrainMetrics
    preference: dict[str, dict[str, float]]  # LOGGED, as trl logs them: {first, last}
    parameters: ParameterCounts
    pairs: Pairs
    soft_labels: SoftLabels
    rows: int  # pairs trained on
    held_out: NotRequired[HeldOut]  # when eval_fraction holds some prompts out


def run(stage: DPOStage, ctx: StageContext) -> Metrics:
    from trl import DPOTrainer

    return optimise(stage, ctx, DPOTrainer, preference_rows)


def optimise(
    stage: PreferenceStage,
    ctx: StageContext,
    trainer_class: Any,
    to_rows: Any,
    read: Any = None,
    reference_free: bool = False,
) -> Metrics:
    """The body every preference kind shares: pairs, split, soft labels, the trainer, save, metrics.
    `read` turns the loaded data into rows (default: `pairs`); `to_rows` turns the kept rows into
    what `trainer_class` reads. Only paired rows have a held-out split to score; `reference_free`
    kinds (ORPO) score it by the policy alone."""
    from transformers import set_seed

    from posttrain import moe  # loads transformers (its callbacks subclass TrainerCallback)

    set_seed(ctx.seed)
    rows = (read or pairs)(ctx.data(stage.data), stage)
    train_rows, held_out = (
        split_by_prompt(rows, stage.eval_fraction, ctx.seed) if _paired(rows) else (rows, [])
    )
    train_rows, soft, unsure = apply_soft_labels(train_rows, stage)
    source = ctx.model(stage.model)
    tokenizer = load_tokenizer(source)
    model = load_causal_lm(source)
    experts = moe.prepare(model, stage.moe, lora=stage.lora, default_router="freeze")
    smoothing = {"label_smoothing": soft["label_smoothing"]} if "label_smoothing" in soft else {}
    routers = _known(stage, moe.train_defaults(stage.moe, aux_loss_coef=0.0))  # as in RL: no aux loss
    args = trainer_args(
        stage.trainer_config,
        stage.train,
        ctx,
        **DEFAULTS,
        **fitted_max_length(stage, source),
        **smoothing,
        **routers,
    )
    with applying_lora(stage.lora, ctx.stage):
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=to_rows(train_rows),
            processing_class=tokenizer,
            peft_config=lora_config(stage.lora, model=model, modules_to_save=experts.modules_to_save),
            callbacks=[*experts.callbacks, *callbacks(ctx, stage.guard)],
        )
    require_rows_left(trainer, len(train_rows), ctx.stage)
    train(trainer, ctx, CONSOLE)
    saved = save_final_model(trainer, tokenizer, ctx, stage.lora)
    metrics: Metrics = {
        "train": train_metrics(trainer),
        "preference": logged_first_last(trainer.state.log_history, list(LOGGED)),
        "parameters": count_parameters(trainer.model),
        "pairs": {"train": len(train_rows), "held_out": len(held_out), "unsure": unsure},
        "soft_labels": soft,
        "rows": len(train_rows),
        **experts.summary(ctx.out_dir if ctx.is_main else None),
    }
    held = [trainer, model]
    del trainer, model  # `held` keeps the last references: release() drops them
    release(held)
    if len(held_out):
        beta = float(getattr(args, "beta", 0.1) or 0.1)
        metrics["held_out"] = implicit_reward_metrics(
            saved, source, held_out, beta, args.per_device_eval_batch_size, reference_free
        )
    return metrics


def _known(stage: PreferenceStage, defaults: dict[str, Any]) -> dict[str, Any]:
    """The defaults the stage's trl config has fields for (ORPO's has no router_aux_loss_coef)."""
    fields = trainer_defaults(stage.trainer_config)
    return {key: value for key, value in defaults.items() if key in fields}


# --------------------------------------------------------------------------- data


def pairs(rows: Any, stage: PreferenceStage) -> Any:
    """prompt/chosen/rejected rows (and p_chosen, answer when present). Without a `prompt` column, or
    with chosen/rejected that repeat the prompt's turns (UltraFeedback), the prompt is the turns (or
    text) that chosen and rejected share, as trl's `extract_prompt` finds it."""
    from trl.data_utils import extract_prompt

    require_columns(rows, ["chosen", "rejected"], f"a {stage.kind} stage", f"stages.{stage.name}.data")
    if not len(rows):
        raise PosttrainError("no preference pairs in the data", key=f"stages.{stage.name}.data")
    first = rows[0]
    implicit = "prompt" not in rows.column_names or (
        isinstance(first["chosen"], list)
        and first["chosen"]
        and first["chosen"][0].get("role") != "assistant"
    )
    if implicit:
        rows = rows.map(extract_prompt, remove_columns=[c for c in ["prompt"] if c in rows.column_names])
    return rows


def fitted_max_length(stage: PreferenceStage, source: PathModel) -> dict[str, int]:
    """trl's default max_length (1024) cut to the model's positions when it has fewer (a value the
    recipe sets is checked at recipe time instead)."""
    positions = config_positions(Path(source.path) / artifacts.MODEL_CONFIG)
    default = trainer_settings(stage).get("max_length")
    if "max_length" in stage.train or positions is None or default is None or default <= positions:
        return {}
    return {"max_length": positions}


def _paired(rows: Any) -> bool:
    return "chosen" in rows.column_names and "rejected" in rows.column_names


def apply_soft_labels(rows: Any, stage: PreferenceStage) -> tuple[Any, SoftLabels, int]:
    """(the pairs to train on, what was done with p_chosen, how many pairs were dropped as unsure)."""
    if "p_chosen" not in rows.column_names:
        return rows, {"mode": "none"}, 0
    p = [0.5 if v is None else float(v) for v in rows["p_chosen"]]
    if stage.soft_labels == "filter":
        keep = [i for i, v in enumerate(p) if v >= stage.min_p_chosen]
        if not keep:
            raise PosttrainError(
                f"no pair has p_chosen >= {stage.min_p_chosen} (the most confident has {max(p):.3f})",
                key=f"stages.{stage.name}.min_p_chosen",
                fix="lower min_p_chosen, or set soft_labels: smooth or ignore",
            )
        kept = rows.select(keep)
        soft: SoftLabels = {
            "mode": "filter",
            "min_p_chosen": stage.min_p_chosen,
            "mean_p_chosen": _mean(p, keep),
        }
        return kept, soft, len(rows) - len(kept)
    soft = {"mode": stage.soft_labels, "mean_p_chosen": _mean(p, range(len(p)))}
    if stage.soft_labels == "smooth":
        # Robust DPO's label_smoothing is the chance a label is flipped; the judge says 1 - p per pair.
        soft["label_smoothing"] = min(max(1.0 - soft["mean_p_chosen"], 0.0), MAX_SMOOTHING)
    return rows, soft, 0


def _mean(values: list[float], indices: Any) -> float:
    chosen = [values[i] for i in indices]
    return sum(chosen) / len(chosen)


def preference_rows(rows: Any) -> Any:
    """prompt/chosen/rejected in trl's preference format (conversational when the prompt is)."""
    return trainer_rows(rows, margin_scale=0.0)


# --------------------------------------------------------------------------- held-out metrics


def implicit_reward_metrics(
    saved: Path, reference: PathModel, rows: Any, beta: float, batch_size: int, reference_free: bool = False
) -> HeldOut:
    """Pairwise accuracy and mean margin of the implicit reward on held-out pairs: beta * log(pi /
    pi_ref) of the saved policy against its reference (the model the stage started from); for a
    reference-free kind (ORPO), beta * the policy's mean token log-probability. `start_accuracy`
    is the same ranking by the starting model alone."""
    from posttrain.judges.likelihood import logprob_sums

    items = [(p, _text(c)) for p, c in zip(rows["prompt"], rows["chosen"], strict=True)]
    items += [(p, _text(r)) for p, r in zip(rows["prompt"], rows["rejected"], strict=True)]
    scores = []
    for source in (PathModel(path=str(saved)), reference):
        tokenizer, model = load_tokenizer(source), load_policy(source)
        sums = logprob_sums(model, tokenizer, items, max(batch_size, 8))
        scores.append([total / max(count, 1) if reference_free else total for total, count in sums])
        del model
        release()
    n = len(rows)
    policy, ref = scores
    if reference_free:
        margins = [beta * (policy[i] - policy[n + i]) for i in range(n)]
    else:
        margins = [beta * ((policy[i] - ref[i]) - (policy[n + i] - ref[n + i])) for i in range(n)]
    metrics: HeldOut = {
        "n": n,
        "pairwise_accuracy": sum(m > 0 for m in margins) / n,
        "mean_margin": sum(margins) / n,
        "start_accuracy": sum(ref[i] > ref[n + i] for i in range(n)) / n,
    }
    if "answer" in rows.column_names:
        metrics["right_vs_wrong"] = right_vs_wrong(rows, margins)
    return metrics


def load_policy(source: PathModel) -> Any:
    """A saved causal LM, or a saved LoRA adapter (`lora.merge: false`) on its base model."""
    if (Path(source.path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        with literal_targets():
            return AutoPeftModelForCausalLM.from_pretrained(source.path)
    return load_causal_lm(source)


def _text(answer: Any) -> str:
    """An answer as text: a plain string, or the content of its (last) assistant turn."""
    if isinstance(answer, list):
        return "".join(str(turn.get("content", "")) for turn in answer if turn.get("role") == "assistant")
    return str(answer)


# --------------------------------------------------------------------------- checks


def check(stage: PreferenceStage, recipe: Recipe, path: tuple) -> None:
    """Recipe-time: every loss_type is one the installed trl has, MoE options fit, max_length fits."""
    check_loss_types(stage, recipe, path, "trl.trainer.dpo_trainer")
    check_common(stage, recipe, path)


def check_loss_types(stage: PreferenceStage, recipe: Recipe, path: tuple, trainer_module: str) -> None:
    """`train.loss_type` (one, or a list) against the loss types the installed trainer has a branch for."""
    losses = stage.train.get("loss_type")
    if losses is None:
        return
    known = trl_loss_types(trainer_module)
    if not isinstance(losses, str | list):
        raise recipe.error(
            (*path, "train", "loss_type"), f"expects a loss name or a list of them, got {losses!r}"
        )
    for i, loss in enumerate([losses] if isinstance(losses, str) else losses):
        if known and loss not in known:
            where = (*path, "train", "loss_type") + (() if isinstance(losses, str) else (i,))
            hint = did_you_mean(str(loss), known)
            raise recipe.error(where, f"'{loss}' is not a {stage.kind} loss_type of the installed trl",
                               f"{hint + ' ' if hint else ''}one of: {', '.join(known)}")  # fmt: skip


def check_common(stage: PreferenceStage, recipe: Recipe, path: tuple, unpaired: tuple[str, ...] = ()) -> None:
    """What every preference kind checks: the data's columns (by a peek: chosen and rejected, or
    `unpaired` ones where the kind reads those when there is a `label`), MoE options, and
    max_length against the model's positions."""
    columns = peek_columns(stage.data)
    if columns is not None:
        needed = unpaired if unpaired and "label" in columns else ("chosen", "rejected")
        missing = [c for c in needed if c not in columns]
        if missing:
            raise recipe.error((*path, "data"), f"a {stage.kind} stage needs column '{missing[0]}', but the data "
                               f"has: {', '.join(columns)}", f"map it with `columns: {{{missing[0]}: <your column>}}`")  # fmt: skip
    check_moe(stage.moe, stage.model, recipe, path)
    max_length = stage.train.get("max_length")
    positions = model_max_positions(recipe, stage.model)
    if positions is not None and max_length and max_length > positions:
        raise recipe.error(
            (*path, "train", "max_length"),
            f"max_length ({max_length}) exceeds the model's max_position_embeddings ({positions})",
            f"set train.max_length to {positions} or less",
        )


@functools.cache
def trl_loss_types(trainer_module: str = "trl.trainer.dpo_trainer") -> tuple[str, ...]:
    """The loss types an installed trl trainer has a branch for (`loss_type == "..."` in its source),
    read from disk so that checking a recipe imports no trainer."""
    spec = importlib.util.find_spec(trainer_module)
    if spec is None or spec.origin is None or not os.path.exists(spec.origin):
        return ()
    found = []
    for node in ast.walk(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.Eq)):
            continue
        name = getattr(node.left, "id", None) or getattr(node.left, "attr", None)
        value = node.comparators[0]
        if name == "loss_type" and isinstance(value, ast.Constant) and isinstance(value.value, str):
            found.append(value.value)
    return tuple(dict.fromkeys(found))


# --------------------------------------------------------------------------- preflight, memory, report


def slot(stage: PreferenceStage) -> Slot:
    """Preflight: preference pairs, cut at the trainer's max_length."""
    return Slot(
        stage.model, stage.data, ("chosen", "rejected"), max_length=trainer_settings(stage).get("max_length")
    )


def workload(stage: PreferenceStage, recipe: Recipe, shapes: dict) -> Workload | str:
    """A frozen reference copy of the policy, unless LoRA (adapter off) or precomputed reference
    log-probs make it unneeded."""
    precomputed = trainer_settings(stage).get("precompute_ref_log_probs")
    return pair_workload(stage, recipe, shapes, reference=stage.lora is None and not precomputed)


def pair_workload(stage: PreferenceStage, recipe: Recipe, shapes: dict, reference: bool) -> Workload | str:
    """The policy trains on chosen and rejected in one batch: twice the rows of the batch size."""
    train = trainer_settings(stage, **DEFAULTS)
    batch = {**train, "per_device_train_batch_size": 2 * int(train.get("per_device_train_batch_size") or 8)}
    return trainer_workload(recipe, shapes, stage.model, batch, stage.lora, stage.moe, reference=reference)


loss_panel = "preference optimisation: pairwise loss"


def outcome(metrics: Metrics, curves: Curves) -> list[str]:
    """The loss, the steps, and the implicit reward's held-out pairwise accuracy."""
    held_out = metrics.get("held_out")
    ranked = (
        [f"held-out pairwise accuracy {held_out['pairwise_accuracy']:.3f} (n={held_out['n']})"]
        if held_out
        else []
    )
    return trained(metrics.get("train"), curves) + ranked


def _right_vs_wrong(held_out: HeldOut) -> str:
    rvw = held_out.get("right_vs_wrong") or {}
    return f"; right above wrong on {rvw['accuracy']:.3f} of {rvw['n']} pairs" if rvw.get("n") else ""


def headline(name: str, metrics: Metrics, start: tuple[str, Evaluated] | None) -> list[str]:
    """Does the policy's implicit reward rank the chosen answer first on unseen prompts, and did
    held-out task accuracy move from the model it started from?"""
    lines = []
    held_out = metrics.get("held_out") or {}
    if "pairwise_accuracy" in held_out:
        lines.append(
            f"- **{name}**'s implicit reward ranks the chosen answer first on {held_out['pairwise_accuracy']:.3f} "
            f"of {held_out['n']} held-out pairs (its starting model: {held_out['start_accuracy']:.3f}; "
            f"chance 0.5), mean margin {held_out['mean_margin']:.3f}{_right_vs_wrong(held_out)}"
        )
    before = (start[1].get("eval") or {}) if start else {}
    after = metrics.get("eval") or {}
    if start is not None and before.get("accuracy") is not None and after.get("accuracy") is not None:
        gain = (after["accuracy"] - before["accuracy"]) * 100
        lines.append(f"- **{name}** moved held-out accuracy {before['accuracy']:.3f} → {after['accuracy']:.3f} "
                     f"({gain:+.1f} points over {start[0]})")  # fmt: skip
    return lines
