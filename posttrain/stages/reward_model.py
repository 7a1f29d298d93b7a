"""Reward-model stage: a Bradley-Terry reward model with trl's RewardTrainer.

A scalar sequence-classification head on `model` (a stage, a path, or the base model) learns
to score `chosen` above `rejected`. Soft labels become margins (Llama 2 style): the loss is
-log sigmoid(r_chosen - r_rejected - margin) with margin = margin_scale * logit(p_chosen), p
capped at 0.95, so clear preferences ask for a wider gap than near-ties. A held-out split of
prompts measures pairwise accuracy, mean margin, calibration (accuracy by confidence bucket)
and, when the rows carry a reference `answer`, accuracy on pairs where one answer is right
and the other wrong. `<stage>/model/` is a standard transformers model: load it with
`AutoModelForSequenceClassification.from_pretrained`; GRPO scores with it through the
`reward_model` reward (`{name: reward_model, model: rm}`), which reads pairs as trl trained on them.

    - name: rm
      kind: reward_model
      model: sft
      data: label                          # an rlaif_label stage, or a prompt/chosen/rejected file
      train: {num_train_epochs: 2}         # any trl RewardConfig key
"""

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from posttrain.context import StageContext
from posttrain.cpu import follow_free_cores
from posttrain.data_tools import extract_answer, require_columns
from posttrain.errors import PosttrainError
from posttrain.memory import Workload, trainer_workload
from posttrain.metrics import (
    Curves,
    Evaluated,
    NotRequired,
    ParameterCounts,
    TrainMetrics,
    TypedDict,
    trained,
)
from posttrain.models import (
    count_parameters,
    load_tokenizer,
    prepared,
    pretrained_kwargs,
    with_inherited_options,
)
from posttrain.recipe import PathModel, Recipe, RewardModelStage, trainer_settings
from posttrain.rewards.reward_model import reward_model
from posttrain.rewards.text import completion_text
from posttrain.stages import Slot
from posttrain.training import (
    applying_lora,
    callbacks,
    lora_config,
    release,
    save_final_model,
    train,
    train_metrics,
    trainer_args,
)

MAX_LABEL_P = 0.95  # soft labels above this give the same margin (logit(0.95) = 2.94)
BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

# What the console shows of each logging step (the full logs go to TensorBoard and metrics.json).
CONSOLE = (("accuracy", "accuracy", ".3f"), ("margin", "margin", ".3f"), ("loss", "loss", ".4f"),
           ("learning_rate", "lr", ".2e"))  # fmt: skip


class Pairs(TypedDict):
    train: int
    held_out: int


class Agreement(TypedDict):
    n: int  # pairs with exactly one right answer
    accuracy: float | None


class HeldOut(TypedDict):
    n: int
    accuracy: float  # the chosen answer scored above the rejected one
    mean_margin: float
    calibration: dict[str, Any]  # accuracy by confidence bucket, and the ECE
    right_vs_wrong: NotRequired[Agreement]  # when the rows carry a reference `answer`


class Metrics(Evaluated):
    train: TrainMetrics
    parameters: ParameterCounts
    pairs: Pairs
    held_out: NotRequired[HeldOut]  # when eval_fraction holds some prompts out


def run(stage: RewardModelStage, ctx: StageContext) -> Metrics:
    from transformers import set_seed
    from trl import RewardTrainer

    set_seed(ctx.seed)
    rows = ctx.data(stage.data)
    require_columns(rows, ["prompt", "chosen", "rejected"], "a reward model", "data")
    train_rows, held_out = split_by_prompt(rows, stage.eval_fraction, ctx.seed)
    if not len(train_rows):
        raise PosttrainError(
            f"no pairs left to train on: {len(rows)} pairs, all held out",
            fix="lower eval_fraction, or add data",
        )
    source = ctx.model(stage.model)
    tokenizer = load_tokenizer(source)
    model = load_reward_model(source)
    args = trainer_args("RewardConfig", stage.train, ctx)
    with applying_lora(stage.lora, ctx.stage, model):
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=trainer_rows(train_rows, stage.margin_scale),
            eval_dataset=trainer_rows(held_out, stage.margin_scale) if len(held_out) else None,
            processing_class=tokenizer,
            peft_config=lora_config(stage.lora, task_type="SEQ_CLS", model=model),
            callbacks=callbacks(ctx, stage.guard),
        )
    train(trainer, ctx, CONSOLE)
    saved = save_final_model(trainer, tokenizer, ctx, stage.lora, source)
    metrics: Metrics = {
        "train": train_metrics(trainer),
        "parameters": count_parameters(trainer.model),
        "pairs": {"train": len(train_rows), "held_out": len(held_out)},
    }
    held = [trainer, model]
    del trainer, model  # `held` keeps the last references: release() drops them
    release(held)
    if len(held_out):
        metrics["held_out"] = held_out_metrics(saved, held_out, args.per_device_eval_batch_size)
    return metrics


check = None  # the schema's checks cover it


def slot(stage: RewardModelStage) -> Slot:
    """Preflight: preference pairs, cut at the trainer's max_length."""
    columns = ("prompt", "chosen", "rejected")
    return Slot(stage.model, stage.data, columns, max_length=trainer_settings(stage).get("max_length"))


def workload(stage: RewardModelStage, recipe: Recipe, shapes: dict) -> Workload | str:
    return trainer_workload(recipe, shapes, stage.model, trainer_settings(stage), stage.lora)


loss_panel = "reward model: pairwise loss"


def outcome(metrics: Metrics, curves: Curves) -> list[str]:
    held_out = metrics.get("held_out")
    ranked = (
        [f"held-out pairwise accuracy {held_out['accuracy']:.3f} (n={held_out['n']})"] if held_out else []
    )
    return trained(metrics.get("train"), curves) + ranked


def headline(name: str, metrics: Metrics, start: tuple[str, Evaluated] | None) -> list[str]:
    """Does the reward model rank the chosen answer first on held-out pairs (and right above wrong)?"""
    held_out = metrics.get("held_out") or {}
    if "accuracy" not in held_out:
        return []
    rvw = held_out.get("right_vs_wrong") or {}
    extra = f", {rvw['accuracy']:.3f} on right-vs-wrong pairs (n={rvw['n']})" if rvw.get("n") else ""
    return [f"- **{name}** ranks the chosen answer first on {held_out['accuracy']:.3f} of "
            f"{held_out['n']} held-out pairs{extra} (chance: 0.5)"]  # fmt: skip


def load_reward_model(source: PathModel) -> Any:
    """`source` with a fresh scalar head (one label) on its body; a causal-LM checkpoint's LM head
    is dropped. float32 unless the recipe sets a dtype (trl's RewardTrainer default)."""
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    source = with_inherited_options(source)
    kwargs = {"dtype": "float32", **pretrained_kwargs(source, trainable=True), "num_labels": 1}
    with suppress_seqcls_warning():  # the new head is missing from the checkpoint, as it should be
        model = AutoModelForSequenceClassification.from_pretrained(source.path, **kwargs)
    follow_free_cores()
    return prepared(model, source, trainable=True)


def split_by_prompt(rows: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """(train, held-out) with every pair of a prompt on the same side, chosen by a hash of the
    prompt, so held-out prompts are unseen."""

    def held(prompt: Any) -> bool:
        text = f"{seed}:{json.dumps(prompt, sort_keys=True, ensure_ascii=False)}"
        return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 16**8 < fraction

    flags = [held(p) for p in rows["prompt"]]
    train = rows.select([i for i, f in enumerate(flags) if not f])
    return train, rows.select([i for i, f in enumerate(flags) if f])


def trainer_rows(rows: Any, margin_scale: float) -> Any:
    """prompt/chosen/rejected in trl's preference format (conversational when the prompt is a list
    of messages), with `margin` from the soft label `p_chosen`, else from a `margin` column."""
    conversational = isinstance(rows[0]["prompt"], list) if len(rows) else False
    soft = margin_scale > 0 and "p_chosen" in rows.column_names
    given = not soft and "margin" in rows.column_names

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        out = {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
        for key in ("chosen", "rejected"):
            if conversational and isinstance(row[key], str):
                out[key] = [{"role": "assistant", "content": row[key]}]
        if soft:
            p = 0.5 if row["p_chosen"] is None else min(max(float(row["p_chosen"]), 0.5), MAX_LABEL_P)
            out["margin"] = margin_scale * _logit(p)
        elif given:
            out["margin"] = float(row["margin"] or 0.0)
        return out

    return rows.map(convert, remove_columns=rows.column_names)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def held_out_metrics(saved: Path, rows: Any, batch_size: int) -> HeldOut:
    """Pairwise accuracy, mean margin and calibration on held-out pairs; accuracy on right-vs-wrong
    pairs when rows carry a reference `answer`. Scored by the saved model through the
    `reward_model` reward, exactly as GRPO will score with it."""
    score = reward_model(model=PathModel(path=str(saved)), batch_size=batch_size)
    prompts = list(rows["prompt"])
    chosen = score(prompts=prompts, completions=list(rows["chosen"]))
    rejected = score(prompts=prompts, completions=list(rows["rejected"]))
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    metrics: HeldOut = {
        "n": len(margins),
        "accuracy": sum(m > 0 for m in margins) / len(margins),
        "mean_margin": sum(margins) / len(margins),
        "calibration": calibration(margins),
    }
    if "answer" in rows.column_names:
        metrics["right_vs_wrong"] = right_vs_wrong(rows, margins)
    del score  # its model's last reference
    release()
    return metrics


def calibration(margins: list[float]) -> dict[str, Any]:
    """Accuracy by predicted confidence: the RM's P(its preferred answer is the labelled one) is
    sigmoid(|margin|); buckets of width 0.1 from 0.5, and the expected calibration error."""
    buckets = []
    error = 0.0
    for low, high in zip(BUCKETS, BUCKETS[1:], strict=False):
        inside = [
            m for m in margins if low <= _confidence(m) < high or (high == 1.0 and _confidence(m) == 1.0)
        ]
        if not inside:
            continue
        accuracy = sum(m > 0 for m in inside) / len(inside)
        confidence = sum(_confidence(m) for m in inside) / len(inside)
        error += len(inside) / len(margins) * abs(accuracy - confidence)
        buckets.append(
            {
                "confidence": f"{low:.1f}-{high:.1f}",
                "n": len(inside),
                "accuracy": accuracy,
                "mean_confidence": confidence,
            }
        )
    return {"buckets": buckets, "ece": error}


def _confidence(margin: float) -> float:
    return 1.0 / (1.0 + math.exp(-abs(margin)))


def right_vs_wrong(rows: Any, margins: list[float]) -> dict[str, Any]:
    """How often the RM scores the right answer above the wrong one, over pairs with exactly one
    right answer (checked against the reference, not the judge's label)."""
    hits = []
    for row, margin in zip(rows, margins, strict=True):
        reference = str(row["answer"]).strip()
        good_chosen = extract_answer(completion_text(row["chosen"])) == reference
        good_rejected = extract_answer(completion_text(row["rejected"])) == reference
        if good_chosen != good_rejected:
            hits.append((margin > 0) == good_chosen)
    return {"n": len(hits), "accuracy": sum(hits) / len(hits) if hits else None}
