"""Several processes, one run: who does what under `accelerate launch` (DDP or DeepSpeed ZeRO).

Every rank runs the same plan. Work that must happen once (deciding what is cached, writing
manifests) runs on the main process through `on_main`, which hands the result, or the failure,
to every rank: a rank never waits at a barrier for a peer that has already died. Generation
(evaluation, labelling, teacher traces) is split over every rank by `map_batches`: in each
round every rank does one batch, the round's results reach every rank in batch order, and a
failure on any rank stops them all with that rank's message. So no rank idles at a barrier
while another generates, and a wait lasts one batch, not a whole evaluation. A failure inside
a collective (mid-training) ends that rank's process, and the launcher (torch.distributed.run,
under accelerate) then stops the others and names the failing rank.

The process group's timeout (how long a rank waits for its peers at a collective) is
`POSTTRAIN_DIST_TIMEOUT_S` seconds, 1800 by default, as torch's.

    accelerate launch --config_file recipes/accelerate/zero3.yaml -m posttrain run r.yaml
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")
B = TypeVar("B")
DEFAULT_TIMEOUT_S = 1800


class PeerFailed(Exception):
    """The main process failed in work it did for every rank; this rank stops too, quietly (the
    failing rank has already said why)."""


def state() -> Any:
    """accelerate's PartialState, created the way the trainers will create it.

    It is a process-wide singleton and whoever creates it first decides what it sees: without
    a GPU it must be made with `cpu=True` (as trl's `use_cpu=True` does), else a DeepSpeed
    launch on CPU finds no backend and every rank believes it is rank 0 of 1."""
    from accelerate import PartialState

    return PartialState(cpu=not has_accelerator(), timeout=timeout())


def timeout() -> timedelta:
    """How long a rank waits for its peers at a collective: `POSTTRAIN_DIST_TIMEOUT_S` seconds."""
    from posttrain.errors import PosttrainError

    value = os.environ.get("POSTTRAIN_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise PosttrainError(
            f"POSTTRAIN_DIST_TIMEOUT_S={value!r} is not a positive number of seconds",
            fix=f"export POSTTRAIN_DIST_TIMEOUT_S={DEFAULT_TIMEOUT_S}, or unset it",
        )
    return timedelta(seconds=seconds)


def has_accelerator() -> bool:
    """A GPU (CUDA), Apple MPS or Intel XPU device: without one, trainers run with `use_cpu=True`."""
    import torch

    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def launch_info() -> dict[str, Any]:
    """world_size, zero_stage (0 without DeepSpeed) and accelerate's distributed type, for manifests."""
    from accelerate.state import AcceleratorState

    kind = state().distributed_type
    if AcceleratorState._shared_state:  # a trainer has run: its view includes DeepSpeed
        kind = AcceleratorState().distributed_type
    stage = zero_stage()
    name = str(kind.value if hasattr(kind, "value") else kind)
    return {
        "world_size": state().num_processes,
        "zero_stage": stage,
        "distributed_type": "DEEPSPEED" if stage else name,
    }


def zero_stage() -> int:
    """The DeepSpeed ZeRO stage of this launch: the live accelerate plugin once a trainer made one,
    else what `accelerate launch` put in the environment; 0 without DeepSpeed."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        plugin = getattr(AcceleratorState(), "deepspeed_plugin", None)
        if plugin is not None:
            return int(plugin.zero_stage or 0)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return 0
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and os.path.exists(config_file):
        with open(config_file, encoding="utf-8") as f:
            return int(json.load(f).get("zero_optimization", {}).get("stage", 0))
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))


def leave() -> None:
    """Every rank leaves the process group together, before the interpreter exits.

    Left to exit-time destructors, the process group's C++ worker threads can be torn down while
    still joinable: a rank that finished its work then aborts ("terminate called without an
    active exception", SIGABRT) and the launcher reports a failed run. A barrier first, so no
    rank leaves while a peer still needs it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast(value: T) -> T:
    """The main process's `value`, on every rank (a no-op in a single process)."""
    from accelerate.utils import broadcast_object_list

    if state().num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` on the main process only and return its result on every rank.

    If it raises, the main process re-raises the error and every other rank raises
    `PeerFailed`, so all ranks stop together instead of waiting at the next barrier."""
    if state().num_processes == 1:
        return fn(*args, **kwargs)
    outcome: tuple[str, Any] = ("error", "the main process failed")
    error: BaseException | None = None
    if state().is_main_process:
        outcome, error = _attempt(fn, *args, **kwargs)
    status, value = broadcast(outcome)
    if error is not None:
        raise error
    if status == "error":
        raise PeerFailed(f"rank 0 failed ({value})")
    return value


def each_rank(fn: Callable[..., T], *args: Any, **kwargs: Any) -> list[T]:
    """Run `fn` on every rank; every rank gets every rank's result, in rank order.

    If it raises on any rank, every rank stops: the failing rank re-raises its own error, the
    others raise `PeerFailed` with that rank's message, so nobody waits for a rank that died."""
    if state().num_processes == 1:
        return [fn(*args, **kwargs)]
    from accelerate.utils import gather_object

    outcome, error = _attempt(fn, *args, **kwargs)
    outcomes = gather_object([outcome])
    if error is not None:
        raise error
    for rank, (status, value) in enumerate(outcomes):
        if status == "error":
            raise PeerFailed(f"rank {rank} failed ({value})")
    return [value for _, value in outcomes]


def _attempt(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[tuple[str, Any], BaseException | None]:
    """(("ok", result), None), or (("error", "Type: message"), the error) for the peers to hear of it."""
    try:
        return ("ok", fn(*args, **kwargs)), None
    except BaseException as e:  # also KeyboardInterrupt: the peers must not wait for us
        return ("error", f"{type(e).__name__}: {e}"), e


def map_batches(
    batches: Sequence[B], compute: Callable[[B], T], done: Callable[[list[tuple[B, T]]], None] | None = None
) -> list[T]:
    """`compute(batch)` for every batch, split over the ranks; the results, in batch order, on every rank.

    Rank r computes batches r, r + world_size, r + 2 * world_size, ... The batches, and so their
    results, do not depend on the world size: a greedy evaluation on 8 GPUs gives what it gives
    on 1. Without `done`, each rank works through its share and the results meet once at the end.
    With `done`, the ranks go in rounds of one batch each, and after each round its results
    reach every rank and `done(round)` runs on each (rank 0 appends them to a file, so a crash
    loses one round at most). A failure on any rank stops every rank (`each_rank`)."""
    world, rank = state().num_processes, state().process_index
    if done is None:
        shares = each_rank(lambda: [compute(b) for b in batches[rank::world]])
        return [shares[i % world][i // world] for i in range(len(batches))]
    results: list[T] = []
    for start in range(0, len(batches), world):
        mine = start + rank
        got = each_rank(lambda: compute(batches[mine]) if mine < len(batches) else None)  # noqa: B023
        finished = list(zip(batches[start : start + world], got, strict=False))
        done(finished)
        results.extend(result for _, result in finished)
    return results


@contextlib.contextmanager
def unsharded_loading() -> Iterator[None]:
    """Let this process alone build or load a whole model, even in a ZeRO-3 launch.

    Under ZeRO-3 transformers wraps `from_pretrained` / `from_config` in `deepspeed.zero.Init`,
    which partitions weights with collectives that every rank must join: on the main process
    alone (LoRA merge, preset creation, lm-eval) that waits forever, and a generation engine
    on each rank needs its whole model. This switches the partitioning off for the block and
    restores it after."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - transformers always has it
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
