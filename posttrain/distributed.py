"""How this process was launched (plain python, accelerate DDP, DeepSpeed ZeRO), for manifests."""

from __future__ import annotations

from typing import Any


def launch_info() -> dict[str, Any]:
    """world_size, zero_stage (0 without DeepSpeed) and accelerate's distributed type."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    state = PartialState()
    zero_stage = 0
    if AcceleratorState._shared_state:
        plugin = getattr(AcceleratorState(), "deepspeed_plugin", None)
        zero_stage = int(getattr(plugin, "zero_stage", 0) or 0) if plugin else 0
    return {
        "world_size": state.num_processes,
        "zero_stage": zero_stage,
        "distributed_type": str(
            state.distributed_type.value
            if hasattr(state.distributed_type, "value")
            else state.distributed_type
        ),
    }
