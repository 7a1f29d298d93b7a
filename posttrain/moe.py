"""Mixture-of-Experts training: router metrics, router freezing, bias balancing, ZeRO-3 leaf modules.

Any trainer stage makes a model MoE-aware in one call and reports on it in another:

    moe_setup = moe.prepare(model, stage.moe, lora=stage.lora)       # before building the trainer
    trainer = XTrainer(..., callbacks=[*moe_setup.callbacks, *callbacks(ctx)])
    metrics.update(moe_setup.summary(ctx.out_dir if ctx.is_main else None))

On a dense model `prepare` does nothing. The pieces are usable alone: `RouterLoad` counts
tokens per expert with forward hooks (also for a frozen teacher under `torch.no_grad`),
`RouterMetrics` is the TrainerCallback that logs `moe/...` scalars and moves DeepSeek-V3's
`e_score_correction_bias` after each step, `freeze_routers` and `register_zero3_leaf_modules`
do what they say.

A MoE block is found by shape, not by class name (`architecture.moe_blocks`: a module with an
`experts` child and a `gate` or `router` child; DeepSeek-V2/V3 and their remote code, Mixtral,
Qwen-MoE, GPT-OSS...); what a `moe:` block may ask of it is `architecture.moe_problem`, checked
when the recipe loads and again here on the loaded model.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from posttrain import artifacts
from posttrain.architecture import (
    block_routers,
    expert_count,
    has_bias_balancing,
    moe_blocks,
    require_moe_fits,
)
from posttrain.distributed import state, zero_stage
from posttrain.recipe import LoraSpec, MoESpec

if TYPE_CHECKING:
    import torch


# --------------------------------------------------------------------------- finding the pieces


def router_names(model: Any) -> list[str]:
    """Full module names of the routers, e.g. for peft's `modules_to_save`."""
    names = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if "experts" in children and ("gate" in children or "router" in children):
            names.append(f"{name}.{'gate' if 'gate' in children else 'router'}")
    return names


# --------------------------------------------------------------------------- one-call setup


@dataclasses.dataclass
class MoESetup:
    """What `prepare` did to a model: callbacks to hand the trainer, routers to keep trainable
    under LoRA, and the summary of what the routers did."""

    callbacks: list[Any]
    modules_to_save: list[str]
    metrics: RouterMetrics | None = None

    def summary(self, out_dir: Path | None = None) -> dict[str, Any]:
        """`moe/...` metrics of the training run; with `out_dir`, also the expert-load heatmap there."""
        if self.metrics is None:
            return {}
        summary = self.metrics.summary()
        if out_dir is not None and summary:
            plot_expert_load(expert_shares(summary), Path(out_dir) / artifacts.MOE_HEATMAP)
        return summary


def prepare(
    model: Any, spec: MoESpec, *, lora: LoraSpec | None = None, default_router: str = "train"
) -> MoESetup:
    """Apply a stage's `moe:` block to `model` before its trainer is built; a no-op for dense models.

    `default_router` is the stage kind's choice when the recipe says nothing (RL stages freeze).
    Under LoRA the routers stay frozen unless `router: train`, which trains them in full
    through peft's `modules_to_save`."""
    blocks = moe_blocks(model)
    if spec.model_fields_set:
        require_moe_fits(spec, model, blocks)
    if not blocks:
        return MoESetup([], [])
    router = spec.router or ("freeze" if lora is not None else default_router)
    if router == "freeze":
        freeze_routers(model)
    register_zero3_leaf_modules(model)
    metrics = RouterMetrics(bias_update_rate=spec.bias_update_rate) if spec.metrics else None
    if metrics is None and spec.bias_update_rate:
        metrics = RouterMetrics(bias_update_rate=spec.bias_update_rate, log=False)
    save = router_names(model) if lora is not None and router == "train" else []
    return MoESetup([metrics] if metrics else [], save, metrics)


def train_defaults(spec: MoESpec, aux_loss_coef: float | None = None) -> dict[str, Any]:
    """trl config defaults implied by the `moe:` block (trl owns the aux loss itself);
    `aux_loss_coef` is the stage kind's default (RL stages pass 0: no aux loss unless asked)."""
    coef = spec.aux_loss_coef if spec.aux_loss_coef is not None else aux_loss_coef
    return {} if coef is None else {"router_aux_loss_coef": coef}


def freeze_routers(model: Any) -> int:
    """Stop gradient updates to every router weight; returns how many parameters were frozen."""
    frozen = 0
    for block in moe_blocks(model).values():
        for router in block_routers(block):
            for param in router.parameters():
                if param.requires_grad:
                    param.requires_grad_(False)
                    frozen += int(getattr(param, "ds_numel", None) or param.numel())
    return frozen


def register_zero3_leaf_modules(model: Any) -> list[str]:
    """Under ZeRO-3, make each MoE block a DeepSpeed leaf module: its parameters are gathered
    together on entry, so ranks that route tokens to different experts still issue the same
    collectives (otherwise a rank that skips an expert waits forever for the others). Returns
    the block classes registered; nothing happens outside ZeRO-3."""
    if zero_stage() != 3:
        return []
    from deepspeed.utils import set_z3_leaf_modules

    classes = sorted({type(b) for b in moe_blocks(model).values()}, key=lambda c: c.__name__)
    if classes:
        set_z3_leaf_modules(model, classes)
    return [c.__name__ for c in classes]


# --------------------------------------------------------------------------- counting tokens


class RouterLoad:
    """Forward hooks on every router that count routed tokens per expert and the router entropy.

    Each router's output gives its chosen experts (the integer tensor; DeepSeek-V3's choice
    includes the correction bias) and its logits (for the entropy). Padding is left out when
    the model was called with a 2-D `attention_mask`. With `training_only`, only forward passes
    that build a graph count, so generation and reference-model passes do not, and neither does
    gradient checkpointing's second run of a layer inside the backward pass (it would count every
    token twice, at twice the cost).

    `take()` returns the counts since the last call, summed over all ranks, as one tensor of
    shape [layers, experts + 2]: token counts per expert, then the entropy sum and the tokens."""

    def __init__(self, model: Any, *, training_only: bool = True) -> None:
        self.blocks = moe_blocks(model)
        self.labels = list(self.blocks)
        self.n_experts, self.top_k = expert_count(model)
        self.training_only = training_only
        self._pending: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._handles = [model.register_forward_pre_hook(self._on_model_call, with_kwargs=True)]
        for row, block in enumerate(self.blocks.values()):
            sigmoid = has_bias_balancing(block)
            for router in block_routers(block):
                self._handles.append(router.register_forward_hook(self._hook(row, sigmoid)))

    def _on_model_call(self, module: Any, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask if mask is not None and mask.dim() == 2 else None

    def _hook(self, row: int, sigmoid: bool) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            import torch

            if self.training_only and (not torch.is_grad_enabled() or _in_backward()):
                return
            with torch.no_grad():
                self._count(row, *_indices_and_logits(output, self.n_experts, self.top_k), sigmoid)

        return hook

    def _count(self, row: int, indices: Any, logits: Any, sigmoid: bool) -> None:
        import torch

        if indices is None:
            return
        indices = indices.reshape(-1, indices.shape[-1])
        keep = None
        if self._mask is not None and self._mask.numel() == indices.shape[0]:
            keep = self._mask.reshape(-1).to(indices.device).bool()
            indices = indices[keep]
        if self._pending is None:
            self._pending = torch.zeros(len(self.labels), self.n_experts + 2, device=indices.device)
        stats = self._pending[row]
        stats[: self.n_experts] += torch.bincount(indices.reshape(-1), minlength=self.n_experts)[
            : self.n_experts
        ].to(stats.dtype)
        stats[-1] += indices.shape[0]
        if logits is not None:
            logits = logits.reshape(-1, logits.shape[-1]).float()
            if keep is not None and logits.shape[0] == keep.shape[0]:
                logits = logits[keep]
            stats[-2] += router_entropy(logits, sigmoid).sum().to(stats.dtype)

    def take(self) -> torch.Tensor:
        """Counts since the last call, summed over ranks (every rank must call it together)."""
        import torch

        pending = self._pending
        if pending is None:
            pending = torch.zeros(len(self.labels), self.n_experts + 2, device=state().device)
        self._pending = None
        if state().num_processes > 1:
            pending = pending.to(state().device)
            torch.distributed.all_reduce(pending)
        return pending.detach().double().cpu()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> RouterLoad:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _in_backward() -> bool:
    """True while autograd runs a backward pass (torch.utils.checkpoint asks the same way)."""
    import torch

    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def _indices_and_logits(output: Any, n_experts: int, top_k: int) -> tuple[Any, Any]:
    """(expert indices [tokens, k], router logits [tokens, experts] or None) from a router's output."""
    import torch

    tensors = [t for t in (output if isinstance(output, tuple | list) else (output,)) if torch.is_tensor(t)]
    indices = next((t for t in tensors if not t.is_floating_point()), None)
    logits = next((t for t in tensors if t.is_floating_point() and t.shape[-1] == n_experts), None)
    if indices is None and logits is not None and top_k:
        indices = logits.topk(top_k, dim=-1).indices
    return indices, logits


def router_entropy(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """Per-token entropy of the routing distribution, divided by log(experts): 1 = uniform, 0 = one
    expert. DeepSeek-V3 scores experts with a sigmoid (normalised here), others with a softmax."""
    import torch

    if sigmoid:
        scores = logits.sigmoid()
        probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
    else:
        probs = torch.softmax(logits, dim=-1)
    entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1)
    return entropy / math.log(logits.shape[-1])


# --------------------------------------------------------------------------- metrics


def load_metrics(stats: Any, labels: list[str]) -> dict[str, float]:
    """`moe/...` scalars from a [layers, experts + 2] count tensor (see `RouterLoad.take`).

    Per layer and averaged over layers: `load_cv` (std / mean of tokens per expert, 0 = perfectly
    balanced), `router_entropy` (normalised), `dead_experts` (experts that got no token; summed),
    `max_load` (the busiest expert's tokens over the mean; 1 = balanced)."""
    counts = stats[:, :-2]
    tokens = stats[:, -1]
    out: dict[str, float] = {}
    per_layer: dict[str, list[float]] = {"load_cv": [], "router_entropy": [], "max_load": []}
    dead_total = 0
    for row, label in enumerate(labels):
        if tokens[row] <= 0:
            continue
        layer = counts[row]
        mean = float(layer.mean())
        cv = float(layer.std(unbiased=False)) / mean if mean else 0.0
        dead = int((layer == 0).sum())
        entropy = float(stats[row, -2] / tokens[row])
        max_load = float(layer.max()) / mean if mean else 0.0
        out[f"moe/{label}/load_cv"] = round(cv, 4)
        out[f"moe/{label}/router_entropy"] = round(entropy, 4)
        out[f"moe/{label}/dead_experts"] = dead
        out[f"moe/{label}/max_load"] = round(max_load, 3)
        per_layer["load_cv"].append(cv)
        per_layer["router_entropy"].append(entropy)
        per_layer["max_load"].append(max_load)
        dead_total += dead
    if per_layer["load_cv"]:
        for key, values in per_layer.items():
            out[f"moe/{key}"] = round(sum(values) / len(values), 4)
        out["moe/dead_experts"] = dead_total
    return out


def expert_shares(summary: dict[str, Any]) -> dict[str, list[float]]:
    """{layer: share of routed tokens per expert} from a summary's `moe/<layer>/expert_share` keys."""
    shares = {}
    for key, value in summary.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "expert_share":
            shares[parts[1]] = value
    return shares


class RouterMetrics(TrainerCallback):
    """Router metrics at every logging step (into the trainer's logs, so TensorBoard
    gets them as `moe/...`) and, with `bias_update_rate`, DeepSeek-V3's auxiliary-loss-free
    balancing: after every optimizer step each expert's `e_score_correction_bias` moves by the
    rate against its load (up when under-loaded, down when over-loaded), with the same update
    on every rank because the counts are summed over ranks first.

    Put it before the TensorBoard callback so the scalars reach the log it writes."""

    def __init__(self, bias_update_rate: float = 0.0, log: bool = True) -> None:
        self.bias_update_rate = bias_update_rate
        self.log = log
        self.load: RouterLoad | None = None
        self.window: Any = None
        self.total: Any = None
        self.history: list[dict[str, float]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.load = RouterLoad(model)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.load is None:
            return
        step = self.load.take()
        self.window = step if self.window is None else self.window + step
        self.total = step if self.total is None else self.total + step
        if self.bias_update_rate:
            update_expert_bias(self.load.blocks, step[:, :-2], self.bias_update_rate)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.load is None or self.window is None or logs is None or "loss" not in logs:
            return
        metrics = load_metrics(self.window, self.load.labels)
        self.window = None
        self.history.append(metrics)
        if self.log:
            logs.update(metrics)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.load is not None:
            self.load.close()

    def summary(self) -> dict[str, Any]:
        """Whole-run metrics: per-layer expert shares (for the heatmap) and entropy over all steps,
        `load_cv` averaged over the logged windows with its first and last values, and the
        experts that received no token at all."""
        if self.load is None or self.total is None:
            return {}
        labels = self.load.labels
        summary = load_metrics(self.total, labels)
        if self.history:
            windows = [h["moe/load_cv"] for h in self.history if "moe/load_cv" in h]
            summary["moe/load_cv"] = round(sum(windows) / len(windows), 4)
            summary["moe/load_cv_first"] = windows[0]
            summary["moe/load_cv_last"] = windows[-1]
        counts = self.total[:, :-2]
        for row, label in enumerate(labels):
            total = float(counts[row].sum())
            summary[f"moe/{label}/expert_share"] = [
                round(float(c) / total, 5) if total else 0.0 for c in counts[row]
            ]
        if self.bias_update_rate:
            summary["moe/bias_update_rate"] = self.bias_update_rate
        return summary


def update_expert_bias(blocks: dict[str, Any], counts: Any, rate: float) -> None:
    """bias += rate * sign(mean load - load), per layer (DeepSeek-V3, section 2.1.2)."""
    import torch

    for row, block in enumerate(blocks.values()):
        load = counts[row]
        if float(load.sum()) == 0:
            continue
        delta = rate * torch.sign(load.mean() - load)
        for router in block_routers(block):
            bias = router.e_score_correction_bias
            bias.add_(delta.to(device=bias.device, dtype=bias.dtype))


# --------------------------------------------------------------------------- the picture


def plot_expert_load(shares: dict[str, list[float]], path: Path, title: str | None = None) -> Path | None:
    """A layers x experts heatmap of each expert's share of its layer's routed tokens."""
    if not shares:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(shares)
    grid = [shares[label] for label in labels]
    n_experts = len(grid[0])
    fig, ax = plt.subplots(figsize=(min(2 + 0.35 * n_experts, 16), 1.2 + 0.4 * len(labels)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("expert")
    ax.set_title(title or f"share of routed tokens per expert (uniform = {1 / n_experts:.3f})")
    fig.colorbar(image, ax=ax, label="share")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
