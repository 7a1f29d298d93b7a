"""KTO stage: Kahneman-Tversky optimisation of the policy with trl's KTOTrainer.

KTO needs no pairs, only answers marked desirable or not. From pairs (an `rlaif_label` stage's,
or any prompt/chosen/rejected data, read as the dpo stage reads them) each chosen answer is a
desirable example and each rejected one an undesirable example; the judge's soft labels filter
the pairs first (`soft_labels: filter`). Unpaired data is rows of prompt/completion with a
boolean `label`. Everything else (held-out pairs and the implicit reward's pairwise accuracy
on them, LoRA, MoE, resume, metrics) is the dpo stage's, through `dpo.optimise`.

    - name: kto
      kind: kto
      model: sft
      data: label                       # or {path: unpaired.jsonl}: prompt, completion, label
      train: {beta: 0.1, learning_rate: 5.0e-6, per_device_train_batch_size: 8}  # any trl KTOConfig key
"""

from typing import Any

from posttrain.context import StageContext
from posttrain.data_tools import require_columns
from posttrain.errors import PosttrainError
from posttrain.recipe import KTOStage, Recipe, trainer_settings
from posttrain.stages import Slot, dpo

Metrics = dpo.Metrics
UNPAIRED = ("prompt", "completion", "label")


def run(stage: KTOStage, ctx: StageContext) -> Metrics:
    from trl import KTOTrainer

    return dpo.optimise(stage, ctx, KTOTrainer, kto_rows, read=examples)


def examples(rows: Any, stage: KTOStage) -> Any:
    """Unpaired rows (prompt, completion, a boolean label) as they are; anything else as pairs."""
    if "label" not in rows.column_names:
        return dpo.pairs(rows, stage)
    require_columns(rows, UNPAIRED, "a kto stage with a `label` column", f"stages.{stage.name}.data")
    bad = next((i for i, label in enumerate(rows["label"]) if not isinstance(label, bool)), None)
    if bad is not None:
        raise PosttrainError(
            f"row {bad + 1}: `label` is {rows[bad]['label']!r}, not true or false",
            key=f"stages.{stage.name}.data",
            fix="label each completion true (desirable) or false (undesirable)",
        )
    return rows


def kto_rows(rows: Any) -> Any:
    """Pairs in trl's preference format (KTOTrainer unpairs them), or prompt/completion/label rows
    with a plain completion turned into an assistant turn when the prompt is a conversation."""
    if "label" not in rows.column_names:
        return dpo.preference_rows(rows)

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        completion = row["completion"]
        if isinstance(row["prompt"], list) and isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        return {"prompt": row["prompt"], "completion": completion, "label": row["label"]}

    return rows.map(convert, remove_columns=rows.column_names)


def check(stage: KTOStage, recipe: Recipe, path: tuple) -> None:
    """Recipe-time: loss_type, MoE, max_length (as dpo), and a batch of more than one example
    where the loss estimates KL from the other completions of the batch."""
    dpo.check_loss_types(stage, recipe, path, "trl.trainer.kto_trainer")
    dpo.check_common(stage, recipe, path, unpaired=UNPAIRED)
    train = trainer_settings(stage, **dpo.DEFAULTS)
    if train.get("loss_type") != "apo_zero_unpaired" and int(train["per_device_train_batch_size"]) < 2:
        raise recipe.error(
            (*path, "train", "per_device_train_batch_size"),
            "KTO estimates its KL term from the other completions of a batch, so it needs at least 2 a batch",
            "set per_device_train_batch_size to 2 or more",
        )


def slot(stage: KTOStage) -> Slot:
    """Preflight: pairs (or unpaired prompt/completion rows), cut at the trainer's max_length."""
    return Slot(stage.model, stage.data, None, max_length=trainer_settings(stage).get("max_length"),
                row_format=_row_format)  # fmt: skip


def _row_format(rows: Any) -> Any:
    """Preflight's column check: pairs, or unpaired rows with a label."""
    needed = UNPAIRED if "label" in rows.column_names else ("chosen", "rejected")
    require_columns(rows, needed, "a kto stage")
    return rows


workload = dpo.workload  # each row and its KL completion go through policy and reference together


headline = dpo.headline
outcome = dpo.outcome
loss_panel = dpo.loss_panel
