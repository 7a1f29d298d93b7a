"""Load a model and tokenizer from a path or hub id, build the tiny presets, save results.

Presets are small random-initialised models built from `recipes/models/<name>.json` with the
character-level tokenizer in `recipes/models/tokenizer/` (both ship in the package), so
every stage runs offline on a CPU in seconds. A preset is written once into the run
directory, after which it is a model path like any other.
"""

from __future__ import annotations

import json
import shutil
from importlib.resources import files
from pathlib import Path
from typing import Any

from posttrain import artifacts
from posttrain.cpu import follow_free_cores
from posttrain.errors import PosttrainError, did_you_mean, one_of
from posttrain.lora_targets import literal_targets
from posttrain.recipe import PathModel, Quantization

PRESETS = Path(str(files("posttrain.recipes") / "models"))
TOKENIZER_DIR = PRESETS / "tokenizer"
# The key of a saved config.json that records the loading options of the model it came from.
LOADING_RECORD = "posttrain_loaded_with"
# What a model inherits from the record in its config when its own slot does not say.
INHERITED_OPTIONS = ("dtype", "attn_implementation")


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
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    return save_random_init(config_for(preset_spec(name), tokenizer), tokenizer, seed, dest)


def config_for(spec: dict[str, Any], tokenizer: Any) -> Any:
    """The transformers config of `spec` (`model_type` and sizes) sized to `tokenizer`: its
    vocabulary and its BOS, EOS and pad ids."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        **spec,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


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
    drop_unbacked_quantization(partial)
    if dest.exists():
        shutil.rmtree(dest)
    partial.rename(dest)


# The safetensors dtypes that a checkpoint claiming each quantisation must hold some weights in.
QUANTIZED_DTYPES = {"fp8": {"F8_E4M3", "F8_E5M2"}, "bitsandbytes": {"U8", "I8"}}


def drop_unbacked_quantization(folder: Path) -> bool:
    """Remove a saved config's `quantization_config` when no weight has that quantisation's dtype
    (a dequantised FP8 or QLoRA model must not claim FP8 or 4-bit weights: loaders would
    misread it); True when it did. Methods not listed in QUANTIZED_DTYPES are left as they are."""
    config = artifacts.read_json(folder / artifacts.MODEL_CONFIG)
    method = (config or {}).get("quantization_config", {}).get("quant_method")
    wanted = QUANTIZED_DTYPES.get(method)
    if wanted is None or wanted & safetensors_dtypes(folder):
        return False
    del config["quantization_config"]
    artifacts.write_json(folder / artifacts.MODEL_CONFIG, config)
    return True


def safetensors_dtypes(folder: Path) -> set[str]:
    """The dtypes of every tensor in a folder's safetensors files, from their headers alone."""
    found: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with file.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        found |= {t["dtype"] for name, t in header.items() if name != "__metadata__"}
    return found


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


def pretrained_kwargs(source: PathModel, trainable: bool = False) -> dict[str, Any]:
    """`from_pretrained` keyword arguments for a model slot's loading options.

    `config:` overrides go in as config keyword arguments (dict values merged into the config's
    own). A block-FP8 checkpoint (DeepSeek-V3/R1's `quant_method: fp8`) loads dequantised, to
    its own dtype (bf16 for DeepSeek-V3/R1), when `trainable`: FP8 linear layers take no
    gradient. A frozen copy keeps transformers' choice: FP8 on a GPU that runs it (compute
    capability 8.9+), dequantised elsewhere."""
    kwargs: dict[str, Any] = {"trust_remote_code": source.trust_remote_code}
    if source.revision:
        kwargs["revision"] = source.revision
    if source.dtype is not None:
        kwargs["dtype"] = source.dtype  # a string: trl's model_init_kwargs take it as it is
    if source.attn_implementation is not None:
        kwargs["attn_implementation"] = source.attn_implementation
    config = source_config(source) if source.config or trainable else None
    if source.config:
        kwargs.update(config_overrides(config, source.config))
    if source.quantization is not None:
        kwargs["quantization_config"] = bitsandbytes_config(source.quantization)
    elif trainable and quant_method(config) == "fp8":
        from transformers import FineGrainedFP8Config

        kwargs["quantization_config"] = FineGrainedFP8Config(dequantize=True)
    return kwargs


def reference_kwargs(source: PathModel) -> dict[str, Any]:
    """trl's `model_init_kwargs` for the frozen copy trl loads itself (GRPO's reference model), so
    that it loads like the policy: same config overrides, dtype and attention. A quantised policy
    trains LoRA, whose reference is the policy with its adapters off, so no quantisation here."""
    kwargs = pretrained_kwargs(with_inherited_options(source))
    kwargs.pop("quantization_config", None)
    return kwargs


def source_config(source: PathModel) -> Any:
    """The model's transformers config as saved (a saved adapter's: its base model's), or None."""
    from transformers import AutoConfig

    path = source.path
    adapter = Path(path) / "adapter_config.json"
    if adapter.exists():
        path = json.loads(adapter.read_text())["base_model_name_or_path"]
    try:
        return AutoConfig.from_pretrained(
            path, revision=source.revision, trust_remote_code=source.trust_remote_code
        )
    except (OSError, ValueError):
        return None


def config_overrides(config: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """`config:` overrides checked against the model's config (each key must be one of its keys),
    a dict value merged over the config's own (`rope_parameters: {rope_type: yarn, ...}` keeps
    `rope_theta`)."""
    merged: dict[str, Any] = {}
    for key, value in overrides.items():
        problem = override_problem(config, key)
        if problem:
            raise PosttrainError(problem[0], key=f"model.config.{key}", fix=problem[1])
        current = getattr(config, key, None) if config is not None else None
        merged[key] = {**current, **value} if isinstance(value, dict) and isinstance(current, dict) else value
    return merged


def override_problem(config: Any, key: str) -> tuple[str, str] | None:
    """(message, fix) when `key` is not a key of `config`; None when it is, or the config is unknown."""
    if config is None or hasattr(config, key):
        return None
    known = sorted(config.to_dict())
    return (
        f"{config.model_type} configs have no '{key}'",
        did_you_mean(key, known) or "use a key of the model's config.json",
    )


def quant_method(config: Any) -> str | None:
    """The quantisation a checkpoint's config declares (`fp8`, `bitsandbytes`, ...), or None."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    return quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method


def bitsandbytes_config(spec: Quantization) -> Any:
    """transformers' BitsAndBytesConfig for a `quantization:` block; one line when bitsandbytes
    (or its backend for this machine) is missing."""
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401 (only to fail here, with the fix, rather than mid-load)
    except (ImportError, RuntimeError) as e:
        raise PosttrainError(
            f"quantization needs bitsandbytes, which does not load here ({str(e).splitlines()[0]})",
            key="model.quantization",
            fix="pip install bitsandbytes (0.48+ has a CPU backend), or remove `quantization:`",
        ) from None
    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quant_type,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, spec.compute_dtype),
    )


def with_inherited_options(source: PathModel) -> PathModel:
    """`source` with the dtype and attention implementation recorded in a local model's config
    (the model a stage started from was loaded with them), where its own slot sets none."""
    config = artifacts.read_json(Path(source.path) / artifacts.MODEL_CONFIG) or {}
    record = config.get(LOADING_RECORD) or {}
    inherited = {k: record[k] for k in INHERITED_OPTIONS if k in record and k not in source.model_fields_set}
    return (
        PathModel.model_validate({**source.model_dump(exclude_unset=True), **inherited})
        if inherited
        else source
    )


def load_tokenizer(source: PathModel) -> Any:
    """The tokenizer that ships with the model; a pad token is set to EOS when it has none."""
    from transformers import AutoTokenizer

    _check_exists(source)
    path = source.path
    adapter = Path(path) / "adapter_config.json"
    if adapter.exists() and not (Path(path) / "tokenizer_config.json").exists():
        path = json.loads(adapter.read_text())["base_model_name_or_path"]
    options = {
        "trust_remote_code": source.trust_remote_code,
        **({"revision": source.revision} if source.revision else {}),
    }
    tokenizer = AutoTokenizer.from_pretrained(path, **options)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(source: PathModel, trainable: bool = False, **kwargs: Any) -> Any:
    """A causal LM from a path or hub id, loaded as its slot says (`pretrained_kwargs`); a saved
    LoRA adapter is loaded on its base and merged. `trainable`: the copy a trainer updates (FP8
    weights dequantised; a k-bit base prepared for QLoRA), else a frozen one (reference, judge,
    teacher, evaluation) that may keep FP8 weights where the GPU runs them."""
    from transformers import AutoModelForCausalLM

    _check_exists(source)
    source = with_inherited_options(source)
    kwargs = {**pretrained_kwargs(source, trainable), **kwargs}
    if (Path(source.path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        with literal_targets():  # the saved adapter config already names v5 modules
            model = AutoPeftModelForCausalLM.from_pretrained(source.path, **kwargs).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    follow_free_cores()  # torch's CPU threads: one per core no other process is busy on
    return prepared(model, source, trainable)


def prepared(model: Any, source: PathModel, trainable: bool) -> Any:
    """`model` with its loading options recorded in its config (saved with it: a later stage that
    starts from this model inherits dtype and attention), and, for a trainable k-bit model, peft's
    k-bit preparation (norms in float32, input gradients for the adapters)."""
    record = {**getattr(model.config, LOADING_RECORD, {}), **source.load_options()}
    if record:  # nothing set: the saved config stays as transformers writes it
        setattr(model.config, LOADING_RECORD, record)
    if trainable and source.quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
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
