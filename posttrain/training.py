"""What every trainer-driven stage shares: trl config defaults, LoRA, resume, final save, cleanup.

Stages call trl's trainers directly (no subclasses); these helpers only move the recipe's
settings into trl and the trained weights into the run directory.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from posttrain import artifacts
from posttrain.artifacts import read_json
from posttrain.context import StageContext
from posttrain.distributed import has_accelerator, unsharded_loading
from posttrain.errors import PosttrainError
from posttrain.lora_targets import literal_targets, named_targets, peft_targets
from posttrain.models import drop_unbacked_quantization, prepared, pretrained_kwargs, with_inherited_options
from posttrain.recipe import GuardSpec, LoraSpec, PathModel, trainer_config_class


def trainer_args(config: str, train: dict[str, Any], ctx: StageContext, **defaults: Any) -> Any:
    """Build trl's `config` dataclass from the recipe's `train:` block over posttrain's defaults.

    Checkpoints go to `<stage>/checkpoints` (removed once the stage is COMPLETE); TensorBoard
    logs to `<stage>/logs`. Without a GPU, `use_cpu=True` (also under DeepSpeed, whose batch
    check fails otherwise) and bf16 off unless the recipe asks for it."""
    cls = trainer_config_class(config)
    # Under ZeRO-3, gather the shards into one model at save time (accelerate's default writes a
    # DeepSpeed checkpoint instead of a model); the launch's own config still wins.
    os.environ.setdefault("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "true")
    kwargs: dict[str, Any] = {
        "output_dir": str(ctx.out_dir / artifacts.CHECKPOINTS),
        "seed": ctx.seed,
        "save_total_limit": 2,
        "report_to": "none",
        "disable_tqdm": False,
        **defaults,
    }
    if not has_accelerator():
        kwargs.update(use_cpu=True, bf16=False)
    kwargs.update(train)
    # The runner pushes the finished model/ (merged, with its card); the Trainer would push checkpoints.
    kwargs["push_to_hub"] = False
    kwargs["report_to"] = named_integrations(kwargs["report_to"], ctx.stage)
    try:
        args = cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise PosttrainError(f"{str(e).splitlines()[0]}", key=f"stages.{ctx.stage}.train") from None
    # transformers adds integrations of its own accord (kubeflow inside a Kubeflow TrainJob): drop them
    args.report_to = [r for r in args.report_to if r in kwargs["report_to"]]
    return args


def named_integrations(report_to: Any, stage: str) -> list[str]:
    """The remote trackers a recipe's `report_to` names, and only those: nothing leaves the machine
    unless the recipe asks. "all" (every installed integration, wandb and comet among them) is
    refused; TensorBoard is posttrain's own callback, always on and local, so it is not passed on."""
    named = [report_to] if isinstance(report_to, str) or report_to is None else list(report_to)
    if "all" in named:
        raise PosttrainError(
            "report_to 'all' would send metrics to every installed tracker",
            key=f"stages.{stage}.train.report_to",
            fix="name the ones you want, e.g. report_to: [wandb] (TensorBoard logs locally anyway)",
        )
    return [r for r in named if r not in (None, "none", "tensorboard")]


def callbacks(ctx: StageContext, guard: GuardSpec | None = None) -> list[Any]:
    """What every trainer gets: Ctrl-C saves a checkpoint and stops (the stage resumes next run),
    the stage's `guard:` watches for NaN losses and reward collapse, torch's CPU threads follow the
    free cores, and TensorBoard logs go to `<stage>/logs`, always on and local: nothing leaves the
    machine by default."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    from posttrain.guards import (  # loads transformers (TrainerCallbacks)
        CpuThreads,
        GracefulStop,
        TrainingGuard,
    )

    guard = guard or GuardSpec()
    watched = guard.model_dump(
        include=set(GuardSpec.model_fields)
    )  # an RL guard's other checks are the stage's
    found: list[Any] = [GracefulStop(), TrainingGuard(ctx.stage, **watched), CpuThreads()]
    if ctx.is_main:
        found.append(TensorBoardCallback(SummaryWriter(log_dir=str(ctx.out_dir / artifacts.LOGS))))
    return found


def lora_config(
    spec: LoraSpec | None, task_type: str = "CAUSAL_LM", model: Any = None, modules_to_save: list[str] = ()
) -> Any:
    """peft's LoraConfig for the recipe's `lora:` block; named `targets` are looked up in `model`,
    and `modules_to_save` (e.g. MoE routers with `moe.router: train`) are trained in full."""
    if spec is None:
        return None
    from peft import LoraConfig

    kwargs = spec.peft_kwargs()
    targets = named_targets(spec, model)
    if targets is not None:
        kwargs.update(peft_targets(model, targets))
    if modules_to_save:
        kwargs["modules_to_save"] = [*(kwargs.get("modules_to_save") or []), *modules_to_save]
    try:
        return LoraConfig(task_type=task_type, **kwargs)
    except (ValueError, TypeError) as e:
        raise PosttrainError(f"invalid LoRA options: {str(e).splitlines()[0]}") from None


@contextlib.contextmanager
def applying_lora(spec: LoraSpec | None, stage: str, model: Any) -> Iterator[None]:
    """Around building a trainer with `lora_config(spec, model=model)`: named targets (also the
    ones `all-linear` stands for on an MoE model) apply as written (lora_targets.literal_targets),
    and targets that match no module of the model are one line instead of peft's traceback."""
    from peft import NoMatchingPeftModuleError

    try:
        with literal_targets(named_targets(spec, model) is not None):
            yield
    except NoMatchingPeftModuleError as e:
        raise PosttrainError(
            (str(e).strip().splitlines() or ["LoRA targets match no module"])[0],
            key=f"stages.{stage}.lora",
            fix="name the model's Linear layers (e.g. q_proj, o_proj), or use `targets: [attention, ...]`",
        ) from None


def require_rows_left(trainer: Any, rows: int, stage: str) -> None:
    """trl drops the rows that truncation to `max_length` leaves without a token to learn from;
    when it drops them all, say so before training (trl would fail in its sampler)."""
    left = trainer.train_dataset
    if rows and left is not None and hasattr(left, "__len__") and len(left) == 0:
        raise PosttrainError(
            f"all {rows} rows lose every completion token when truncated to max_length "
            f"{trainer.args.max_length}: nothing to train on",
            key=f"stages.{stage}.train.max_length",
            fix="raise train.max_length (`posttrain plan` shows the rows' token lengths) or shorten the prompts",
        )


def last_checkpoint(ctx: StageContext) -> str | None:
    """The newest complete Trainer checkpoint of an interrupted run of this same stage config.

    The Trainer writes a checkpoint folder file by file, trainer_state.json last; a folder a
    kill cut short is deleted here rather than resumed from (transformers would pick it)."""
    folder = ctx.out_dir / artifacts.CHECKPOINTS
    if not ctx.resume or not folder.is_dir():
        return None
    found = sorted(
        (p for p in folder.glob("checkpoint-*") if p.name.rpartition("-")[2].isdigit()),
        key=lambda p: int(p.name.rpartition("-")[2]),
    )
    complete = [p for p in found if read_json(p / "trainer_state.json") is not None]
    if ctx.is_main:
        for torn in found:
            if torn not in complete:
                shutil.rmtree(torn, ignore_errors=True)
    ctx.barrier()
    resumable = [p for p in complete if not _at_last_step(p)]
    return str(resumable[-1]) if resumable else None


def _at_last_step(checkpoint: Path) -> bool:
    """A checkpoint of the final step (a kill after training, before COMPLETE). Resuming from it,
    transformers trains one step past max_steps when that is inside an epoch, so the run resumes
    from the checkpoint before it instead and ends where an uninterrupted run does."""
    state = read_json(checkpoint / "trainer_state.json") or {}
    return bool(state.get("max_steps")) and state.get("global_step", 0) >= state["max_steps"]


def train(trainer: Any, ctx: StageContext, shown: tuple[tuple[str, str, str], ...]) -> None:
    """`trainer.train()` from the last checkpoint of an interrupted run, with posttrain's console:
    one line per logging step with the `shown` metrics (the stage kind's), in place of the
    Trainer's raw dicts, which still reach TensorBoard and the stage's metrics."""
    from posttrain.step_log import StepLog, use_step_log

    inside = ctx.out_dir.is_relative_to(ctx.run_dir)
    log = StepLog(ctx.out_dir.relative_to(ctx.run_dir).as_posix() if inside else ctx.stage, shown)
    use_step_log(trainer, log)
    try:
        trainer.train(resume_from_checkpoint=resume_checkpoint(trainer, ctx))
    finally:
        log.close()


def resume_checkpoint(trainer: Any, ctx: StageContext) -> str | None:
    """`last_checkpoint`, with its weights already loaded into `trainer.model`: pass it to
    `trainer.train(resume_from_checkpoint=...)`.

    transformers saves checkpoints in the hub layout (an MoE's fused experts split into one tensor
    per expert) but the Trainer resumes with a plain `load_state_dict`, which skips those keys and
    silently keeps the experts' starting weights (huggingface/transformers#48805). Loading through
    `from_pretrained` converts them back; the Trainer's own load then changes nothing, and its
    warning about exactly those keys is dropped."""
    checkpoint = last_checkpoint(ctx)
    model = trainer.model
    if (
        checkpoint is None
        or trainer.is_deepspeed_enabled
        or trainer.is_fsdp_enabled
        or hasattr(model, "peft_config")
    ):
        return checkpoint  # DeepSpeed / FSDP / adapter checkpoints are loaded in their own layout
    saved = _checkpoint_keys(Path(checkpoint))
    keys = set(model.state_dict())
    if saved is not None and not keys <= saved:
        loaded = type(model).from_pretrained(checkpoint, dtype=model.dtype)
        model.load_state_dict(loaded.state_dict())
        del loaded
        _LOADED_KEYS.keys |= keys ^ saved
        logging.getLogger("transformers.trainer").addFilter(_LOADED_KEYS)  # once: same object
    return checkpoint


class _LoadedKeyWarnings(logging.Filter):
    """Drops a Trainer "missing/unexpected keys in the checkpoint" warning that lists only keys
    `resume_checkpoint` already loaded; each key is excused once, so a later load still warns."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(("There were missing keys", "There were unexpected keys")):
            return True
        listed = set(re.findall(r"'([^']+)'", message))
        if not listed or not listed <= self.keys:
            return True
        self.keys -= listed
        return False


_LOADED_KEYS = _LoadedKeyWarnings()


def _checkpoint_keys(checkpoint: Path) -> set[str] | None:
    index = read_json(checkpoint / "model.safetensors.index.json")
    if index is not None:
        return set(index.get("weight_map", {}))
    if not (checkpoint / "model.safetensors").exists():
        return None
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def save_final_model(
    trainer: Any, tokenizer: Any, ctx: StageContext, lora: LoraSpec | None, source: PathModel | None = None
) -> Path:
    """Write the trained model to `<stage>/model/` atomically (LoRA merged unless `merge: false`).

    `trainer.save_model` gathers sharded (ZeRO-3) weights; merging reloads the saved adapter
    on the main process, so it works the same however training was distributed. The merge loads
    the base as `source` (the slot it trained from) says, in full precision: a QLoRA or FP8 base
    is merged dequantised, and the saved config claims no quantisation its weights lack."""
    dest = ctx.out_dir / artifacts.MODEL
    partial = ctx.out_dir / artifacts.MODEL_PARTIAL
    if ctx.is_main:
        shutil.rmtree(partial, ignore_errors=True)
    config = getattr(trainer.model, "config", None)
    if getattr(config, "output_router_logits", False):
        # trl's SFTTrainer turns router logits on to add the MoE aux loss; saved that way, the model
        # computes the aux loss inside generate(), which breaks Mixtral / Qwen-MoE decoding with
        # padded batches (the next stage's GRPO, evaluation or teacher). Training passes it per call.
        config.output_router_logits = False
    trainer.save_model(str(partial))
    if ctx.is_main:
        for junk in ("training_args.bin",):
            (partial / junk).unlink(missing_ok=True)
        tokenizer.save_pretrained(str(partial))
        if lora is not None and lora.merge:
            merge_adapter(partial, tokenizer, source)
        drop_unbacked_quantization(partial)
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)
    ctx.barrier()
    return dest


def merge_adapter(folder: Path, tokenizer: Any, source: PathModel | None = None) -> None:
    """Replace the LoRA adapter in `folder` by its base model with the adapter merged in; the base
    loads as `source` (the slot it trained from) says, in full precision (a QLoRA or FP8 base is
    merged dequantised), or as the adapter's config names it."""
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

    source = source or PathModel(path=str(folder))
    base = with_inherited_options(source).model_copy(update={"quantization": None})
    kwargs = pretrained_kwargs(base, trainable=True)
    with unsharded_loading(), literal_targets():  # main process only: no ZeRO-3 partitioning
        if json.loads((folder / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS":
            # A reward model: one scalar label, and the pad id that locates each sequence's last token.
            merged = AutoPeftModelForSequenceClassification.from_pretrained(
                str(folder), num_labels=1, **kwargs
            )
            merged = merged.merge_and_unload()
            merged.config.pad_token_id = tokenizer.pad_token_id
        else:
            merged = AutoPeftModelForCausalLM.from_pretrained(str(folder), **kwargs).merge_and_unload()
    merged = prepared(merged, source, trainable=False)  # records the loading options in its config
    shutil.rmtree(folder)
    merged.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def train_metrics(trainer: Any) -> dict[str, Any]:
    """Loss at the first and last logging step (did it fall?), steps, runtime and throughput."""
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    final = next((h for h in reversed(history) if "train_runtime" in h), {})
    metrics: dict[str, Any] = {
        "steps": trainer.state.global_step,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_min": min(losses) if losses else None,
        "runtime_s": final.get("train_runtime"),
        "samples_per_s": final.get("train_samples_per_second"),
    }
    tokens = [h["num_tokens"] for h in history if "num_tokens" in h]
    if tokens and final.get("train_runtime"):
        metrics["tokens"] = tokens[-1]
    return metrics


def logged_first_last(history: list[dict[str, Any]], keys: list[str]) -> dict[str, dict[str, float]]:
    """{key: {first, last}} for each key a trainer logged: the mean of its first (up to) 3 logged
    values and of its last 3, so one noisy step does not stand for the start or the end."""
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        values = [h[key] for h in history if isinstance(h.get(key), int | float)]
        if values:
            window = min(3, len(values))
            out[key] = {"first": sum(values[:window]) / window, "last": sum(values[-window:]) / window}
    return out


def release(held: list[Any] | None = None) -> None:
    """Free a finished stage's trainer and models so the next stage (or student) starts clean.

    `held` must hold the last references to them: the caller moves its own into it and deletes
    its names (`held = [trainer, model]; del trainer, model; release(held)`), since nothing here
    can drop a reference the caller keeps. The trainers' accelerator state is freed first, then
    `held` is emptied, and the garbage collector (trainers sit in reference cycles) and the CUDA
    cache run last."""
    import torch

    _free_accelerator_state(held or [])  # in a function of its own: no loop variable outlives it
    if held is not None:
        held.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _free_accelerator_state(objects: list[Any]) -> None:
    for obj in objects:
        if hasattr(obj, "accelerator"):
            obj.accelerator.free_memory()
