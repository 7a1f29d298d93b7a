"""SFT stage: supervised fine-tuning with trl's SFTTrainer, full or LoRA.

The cold start of the R1 pipeline and plain instruction tuning alike. Rows hold `messages`
(loss on assistant turns only, by default), `prompt` + `completion` (loss on the completion),
or `text` (loss on everything). The result is `<stage>/model/` (LoRA merged unless
`lora.merge: false`, which saves the adapter alone).

    - name: sft
      kind: sft
      data: {synthetic: arithmetic, n: 4000}
      lora: {r: 16, targets: [attention, shared_experts]}   # or null: full fine-tune
      chat_template: llama3                                 # optional: a .jinja file or a trl built-in
      moe: {bias_update_rate: 0.001}                        # DeepSeek-V3 loss-free balancing
      train: {num_train_epochs: 2, learning_rate: 3.0e-3}              # any trl SFTConfig key
"""

import functools
from typing import Any

from posttrain.architecture import check_moe
from posttrain.context import StageContext
from posttrain.data_tools import describe
from posttrain.data_tools.chat_mask import (
    DERIVED,
    MARKERS,
    describe_masking,
    masking_path,
    sft_tokens,
    untrained,
)
from posttrain.data_tools.chat_template import read_chat_template, render_chat
from posttrain.errors import PosttrainError
from posttrain.memory import Workload, trainer_workload
from posttrain.metrics import Curves, Evaluated, MoESummary, ParameterCounts, TrainMetrics, trained
from posttrain.models import count_parameters, load_causal_lm, load_tokenizer
from posttrain.recipe import Recipe, SFTStage, trainer_settings
from posttrain.rewards.text import completion_text
from posttrain.stages import Slot
from posttrain.training import (
    applying_lora,
    callbacks,
    lora_config,
    release,
    require_rows_left,
    save_final_model,
    train,
    train_metrics,
    trainer_args,
)

SFT_FORMATS = (["messages"], ["prompt", "completion"], ["text"])

# What the console shows of each logging step (the full logs go to TensorBoard and metrics.json).
CONSOLE = (("loss", "loss", ".4f"), ("learning_rate", "lr", ".2e"))


class Metrics(Evaluated, MoESummary):
    train: TrainMetrics
    parameters: ParameterCounts
    rows: int  # training rows


def run(stage: SFTStage, ctx: StageContext) -> Metrics:
    from transformers import set_seed
    from trl import SFTTrainer

    from posttrain import moe  # loads transformers (its callbacks subclass TrainerCallback)

    set_seed(ctx.seed)
    dataset = sft_rows(ctx.data(stage.data), stage.data)
    source = ctx.model(stage.model)
    tokenizer = load_tokenizer(source)
    if stage.chat_template is not None:  # trained with, and saved with the model
        tokenizer.chat_template = read_chat_template(
            stage.chat_template, f"stages.{stage.name}.chat_template"
        )
    masking = conversation_masking(stage, tokenizer, dataset.column_names)
    dataset = prepare_conversations(dataset, tokenizer, masking, describe(stage.data))
    model = load_causal_lm(source)
    experts = moe.prepare(model, stage.moe, lora=stage.lora)
    args = trainer_args(
        "SFTConfig",
        {**stage.train, "assistant_only_loss": masking == MARKERS} if masking else stage.train,
        ctx,
        **moe.train_defaults(stage.moe),
    )
    with applying_lora(stage.lora, ctx.stage):
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(stage.lora, model=model, modules_to_save=experts.modules_to_save),
            callbacks=[*experts.callbacks, *callbacks(ctx, stage.guard)],
        )
    require_rows_left(trainer, len(dataset), ctx.stage)
    train(trainer, ctx, CONSOLE)
    save_final_model(trainer, tokenizer, ctx, stage.lora)
    metrics: Metrics = {
        "train": train_metrics(trainer),
        "parameters": count_parameters(trainer.model),
        "rows": len(dataset),
        **experts.summary(ctx.out_dir if ctx.is_main else None),
    }
    held = [trainer, model]
    del trainer, model  # `held` keeps the last references: release() drops them
    release(held)
    return metrics


def conversation_masking(stage: SFTStage, tokenizer: Any, columns: list[str]) -> str | None:
    """MARKERS or DERIVED for conversations trained on their assistant turns; None for other rows,
    or with `train.assistant_only_loss: false` (every token trains)."""
    if "messages" not in columns or not stage.train.get("assistant_only_loss", True):
        return None
    return masking_path(tokenizer)


def prepare_conversations(dataset: Any, tokenizer: Any, masking: str | None, label: str) -> Any:
    """Every conversation rendered now, before the model loads (a refused turn names its row); on
    the derived path, tokenised with its assistant mask for trl."""
    if masking == DERIVED:
        return sft_tokens(dataset, tokenizer, label)
    if "messages" in dataset.column_names:
        for row, messages in enumerate(dataset["messages"], 1):
            render_chat(tokenizer, messages, label, row)
            if masking == MARKERS and not any(turn["role"] == "assistant" for turn in messages):
                raise untrained(label, row)
    return dataset


def check(stage: SFTStage, recipe: Recipe, path: tuple) -> None:
    """The `moe:` block asks only for what the model has (from its config, before any weights load);
    `chat_template:` names a file or a built-in."""
    check_moe(stage.moe, stage.model, recipe, path)
    if stage.chat_template is not None:
        try:
            read_chat_template(stage.chat_template)
        except PosttrainError as e:
            raise recipe.error((*path, "chat_template"), e.message, e.fix) from None


def slot(stage: SFTStage) -> Slot:
    """Preflight: the rows in any SFT format, cut at the trainer's max_length."""
    max_length = trainer_settings(stage).get("max_length")
    return Slot(
        stage.model,
        stage.data,
        None,
        max_length=max_length,
        row_format=functools.partial(sft_rows, data=stage.data),
        row_check=functools.partial(preflight_rows, stage),
    )


def preflight_rows(stage: SFTStage, tokenizer: Any, rows: Any, label: str) -> list[str]:
    """Preflight: the rows go through what `run` does to them before training; say how their loss is masked."""
    if stage.chat_template is not None:
        tokenizer.chat_template = read_chat_template(
            stage.chat_template, f"stages.{stage.name}.chat_template"
        )
    rows = sft_columns(rows)
    masking = conversation_masking(stage, tokenizer, rows.column_names)
    prepare_conversations(rows, tokenizer, masking, label)
    if masking is not None:
        return [describe_masking(masking)]
    if "messages" in rows.column_names or "text" in rows.column_names:
        return ["loss on every token"]
    return ["loss on the completion"]


def workload(stage: SFTStage, recipe: Recipe, shapes: dict) -> Workload | str:
    return trainer_workload(recipe, shapes, stage.model, trainer_settings(stage), stage.lora, stage.moe)


headline = None  # the report's table row says it all: loss, evaluation
loss_panel = "SFT: token cross-entropy"


def outcome(metrics: Metrics, curves: Curves) -> list[str]:
    return trained(metrics.get("train"), curves)


def sft_rows(dataset: Any, data: Any) -> Any:
    """The rows in the first SFT format they have, unless none has anything to learn from."""
    return require_text(sft_columns(dataset), describe(data))


def sft_columns(dataset: Any) -> Any:
    """Keep the columns of the first SFT format the data has; say which exist when none fits."""
    for columns in SFT_FORMATS:
        if all(c in dataset.column_names for c in columns):
            return dataset.select_columns(columns)
    raise PosttrainError(
        f"SFT needs a 'messages' column, 'prompt' + 'completion', or 'text'; the data has: {', '.join(dataset.column_names)}",
        fix="map yours with `columns: {messages: <your column>}`",
    )


def require_text(dataset: Any, label: str) -> Any:
    """The dataset, unless no row has anything to learn from: every completion, assistant turn or
    text empty would train an unchanged model and mark it COMPLETE. Stops at the first row with
    text, so real data costs one row."""
    columns = dataset.column_names
    column = "messages" if "messages" in columns else "completion" if "completion" in columns else "text"
    for row in dataset.select_columns([column]):
        if completion_text(row[column]).strip():
            return dataset
    what = {"messages": "assistant turns", "completion": "completions", "text": "texts"}[column]
    found = f"all {len(dataset)} rows have empty {what}" if len(dataset) else "no rows"
    raise PosttrainError(
        f"{label}: {found}: nothing to train on",
        fix="check the data file and its `columns:` mapping; drop empty rows",
    )
