"""Load a model and tokenizer from a path or hub id, build the tiny presets, save results.

Presets are small random-initialised models built from `recipes/models/<name>.json` with the
character-level tokenizer in `recipes/models/tokenizer/` (both ship in the package), so
every stage runs offline on a CPU in seconds. A preset is written once into the run
directory, after which it is a model path like any other.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib.resources import files
from pathlib import Path
from typing import Any

from posttrain import artifacts
from posttrain.errors import PosttrainError, did_you_mean, one_of
from posttrain.lora_targets import literal_targets
from posttrain.recipe import PathModel

PRESETS = Path(str(files("posttrain.recipes") / "models"))
SMALL_MODEL = 10_000_000  # parameters; below this a CPU runs the model fastest on one thread
TOKENIZER_DIR = PRESETS / "tokenizer"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.json"))


def preset_spec(name: str) -> dict[str, Any]:
    """The JSON spec of a tiny preset (`recipes/models/<name>.json`): config keys without the vocabulary."""
    path = PRESETS / f"{name}.json"
    if not path.exists():
        names = preset_names()
        raise PosttrainError(f"unknown model preset '{name}'", fix=did_you_mean(name, names) or one_of(names))
    return json.loads(path.read_text())


def materialize_preset(name: str, seed: int, dest: Path) -> Path:
    """Build preset `name` with weights drawn from `seed` and save it (with tokenizer) at `dest`.

    Written to a temporary folder and renamed, so a crash never leaves half a model behind."""
    if (dest / artifacts.MODEL_CONFIG).exists():
        return dest
    from transformers import AutoConfig, AutoTokenizer

    spec = preset_spec(name)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    config = AutoConfig.for_model(
        **spec,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return save_random_init(config, tokenizer, seed, dest)


def save_random_init(config: Any, tokenizer: Any, seed: int, dest: Path) -> Path:
    """Random-initialise a causal LM from `config` with weights drawn from `seed` and save it, with
    `tokenizer` and a generation config that knows its pad and EOS tokens, atomically at `dest`."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    save_pretrained(model, tokenizer, dest)
    return dest


def save_pretrained(model: Any, tokenizer: Any, dest: Path) -> None:
    """Save model + tokenizer atomically: into `dest.partial`, then one rename."""
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    if dest.exists():
        shutil.rmtree(dest)
    partial.rename(dest)


def _from_pretrained_kwargs(source: PathModel) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": source.trust_remote_code}
    if source.revision:
        kwargs["revision"] = source.revision
    return kwargs


def _check_exists(source: PathModel) -> None:
    path = Path(source.path)
    looks_local = source.path.startswith((".", "/", "~")) or path.exists() or source.path.count("/") > 1
    if (
        looks_local
        and not (path / artifacts.MODEL_CONFIG).exists()
        and not (path / "adapter_config.json").exists()
    ):
        raise PosttrainError(
            f"no model at '{source.path}' (no config.json)", fix="check the path, or finish that stage"
        )
    if not looks_local:
        from posttrain.hub import check_model_id

        check_model_id(source.path, source.revision)


def load_tokenizer(source: PathModel) -> Any:
    """The tokenizer that ships with the model; a pad token is set to EOS when it has none."""
    from transformers import AutoTokenizer

    _check_exists(source)
    path = source.path
    adapter = Path(path) / "adapter_config.json"
    if adapter.exists() and not (Path(path) / "tokenizer_config.json").exists():
        path = json.loads(adapter.read_text())["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(path, **_from_pretrained_kwargs(source))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(name: str | None) -> Any:
    import torch

    if name in (None, "auto"):
        return "auto" if name == "auto" else None
    return getattr(torch, name)


def load_causal_lm(source: PathModel, **kwargs: Any) -> Any:
    """A causal LM from a path or hub id; a saved LoRA adapter is loaded on its base and merged."""
    from transformers import AutoModelForCausalLM

    _check_exists(source)
    kwargs = {**_from_pretrained_kwargs(source), **kwargs}
    dtype = torch_dtype(source.dtype)
    if dtype is not None:
        kwargs.setdefault("dtype", dtype)
    if (Path(source.path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        with literal_targets():  # the saved adapter config already names v5 modules
            return cpu_threads(
                AutoPeftModelForCausalLM.from_pretrained(source.path, **kwargs).merge_and_unload()
            )
    return cpu_threads(AutoModelForCausalLM.from_pretrained(source.path, **kwargs))


_TORCH_THREADS: list[int] = []  # torch's own thread count, read before the first change


def cpu_threads(model: Any) -> Any:
    """Without an accelerator, run a model under SMALL_MODEL parameters on one CPU thread; returns it.

    Its matrices are too small to split: a second thread only adds a barrier to every op, and a
    barrier waits out a whole scheduler slice whenever another process has the other core. On a
    shared 2-core machine one thread generated 17x and trained 8-37x faster (bench/threads_bench.py;
    results differ from two threads' only by float rounding, as reductions split differently).
    A bigger model gets torch's default back; `POSTTRAIN_CPU_THREADS` sets the count, and an
    explicit `OMP_NUM_THREADS` is left alone."""
    import torch

    if torch.accelerator.is_available() or (
        "OMP_NUM_THREADS" in os.environ and "POSTTRAIN_CPU_THREADS" not in os.environ
    ):
        return model
    if not _TORCH_THREADS:
        _TORCH_THREADS.append(torch.get_num_threads())
    small = sum(numel(p) for p in model.parameters()) < SMALL_MODEL
    wanted = os.environ.get("POSTTRAIN_CPU_THREADS") or (1 if small else _TORCH_THREADS[0])
    torch.set_num_threads(int(wanted))
    return model


def count_parameters(model: Any) -> dict[str, int]:
    """Total and trainable parameters; for MoE models also the parameters active per token."""
    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    counts = {"total": total, "trainable": trainable}
    config = getattr(model, "config", None)
    n_experts = getattr(config, "n_routed_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if n_experts and top_k:
        routed = sum(
            numel(p) for n, p in model.named_parameters() if ".experts." in n or n.endswith(".experts")
        )
        counts["active"] = total - routed + routed * top_k // n_experts
    return counts


def numel(param: Any) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it away (`ds_numel`)."""
    return int(getattr(param, "ds_numel", None) or param.numel())
