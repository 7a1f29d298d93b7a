"""Dense students for distillation: derive a dense config from a (MoE) teacher, build the model.

DeepSeek-R1's distilled models are ordinary dense transformers (Qwen2.5 and Llama 3) trained
on the MoE teacher's verified outputs. A student `dense_from: <model>` follows that recipe:

- the **tokenizer, vocabulary and special-token ids are the teacher's**, so traces need no
  re-tokenising across models and logit distillation (which compares full next-token
  distributions) works;
- the **architecture is a standard dense one**: plain multi-head / grouped-query attention
  instead of MLA, one dense SwiGLU MLP per layer instead of shared + routed experts, no
  router. Llama by default, Qwen2 with `architecture: qwen2` (the two families of R1's
  students; they differ only by Qwen2's q/k/v biases). Both run everywhere (vLLM,
  llama.cpp, every fine-tuning tool) without remote code. Llama is the default because
  transformers keeps a llama checkpoint's own tokenizer, whereas it loads the tokenizer of
  any `qwen2` checkpoint as Qwen2Tokenizer, which swaps in Qwen's pre-tokenizer and adds an
  `<|endoftext|>` token: a qwen2 student of a non-Qwen teacher would not tokenize like its
  teacher (the logits modes refuse it; see `tokenizer_mismatch`);
- the **width and depth come from the teacher unless overridden** (`num_hidden_layers`,
  `hidden_size`, `intermediate_size`, `num_attention_heads`, `num_key_value_heads`). The
  MLP width is the teacher's dense `intermediate_size` (DeepSeek's first dense layers, not its
  narrow experts), scaled with `hidden_size` when only the hidden size is overridden, so
  the MLP-to-width ratio stays the teacher's. RoPE keeps the teacher's base frequency;
  long-context scaling (YaRN) is not carried over, since it was tuned for MLA's rope dims.

Students are random-initialised from the derived config with the recipe seed. A student
with `path:` starts from those weights instead (any causal LM, e.g. a hub id), and one with
`preset:` from a tiny preset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain import artifacts
from posttrain.architecture import model_config, text_config, with_overrides
from posttrain.context import StageContext
from posttrain.errors import PosttrainError
from posttrain.models import count_parameters, load_tokenizer, save_random_init
from posttrain.recipe import DENSE_SIZE_KEYS, PathModel, PresetModel, Recipe, StudentSpec, check_dense_sizes

DENSE_ARCHITECTURES = ("llama", "qwen2")
# Config fields copied from the teacher as they are: numerics and special tokens the student must share.
COPIED_KEYS = (
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "hidden_act",
    "initializer_range",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def dense_config(teacher: Any, architecture: str = "llama", **overrides: int | None) -> Any:
    """A dense `architecture` config with the teacher's vocabulary and special tokens.

    `teacher` is a transformers config (any causal LM; typically DeepSeek-V3, Mixtral or a
    Qwen MoE). `overrides` are the size keys above; None means "derive from the teacher"."""
    from transformers import AutoConfig

    if architecture not in DENSE_ARCHITECTURES:
        raise PosttrainError(
            f"unknown dense architecture '{architecture}'", fix=f"use one of {', '.join(DENSE_ARCHITECTURES)}"
        )
    text = text_config(teacher)
    sizes = _dense_sizes(text, {k: v for k, v in overrides.items() if v is not None})
    copied = {k: getattr(text, k) for k in COPIED_KEYS if getattr(text, k, None) is not None}
    return AutoConfig.for_model(
        architecture,
        **copied,
        **sizes,
        rope_parameters={"rope_type": "default", "rope_theta": _rope_theta(text)},
    )


def _dense_sizes(teacher: Any, overrides: dict[str, int]) -> dict[str, int]:
    unknown = set(overrides) - set(DENSE_SIZE_KEYS)
    if unknown:
        raise PosttrainError(
            f"unknown size override '{sorted(unknown)[0]}'", fix=f"use {', '.join(DENSE_SIZE_KEYS)}"
        )
    hidden = overrides.get("hidden_size", teacher.hidden_size)
    intermediate = overrides.get("intermediate_size")
    if intermediate is None:
        intermediate = _multiple_of(teacher.intermediate_size * hidden / teacher.hidden_size, 8)
    heads = overrides.get("num_attention_heads", teacher.num_attention_heads)
    kv_heads = overrides.get("num_key_value_heads") or getattr(teacher, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        kv_heads = heads  # the teacher's grouping does not divide the student's heads: plain multi-head
    sizes = {
        "num_hidden_layers": overrides.get("num_hidden_layers", teacher.num_hidden_layers),
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
    }
    check_dense_sizes(sizes)
    return sizes


def _multiple_of(value: float, step: int) -> int:
    return max(step, int(round(value / step)) * step)


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" not in params:  # per-layer-type parameters
        params = next((p for p in params.values() if isinstance(p, dict) and "rope_theta" in p), {})
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def load_config(source: PathModel) -> Any:
    """The model's config as it loads: its slot's `config:` overrides applied."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        source.path, revision=source.revision, trust_remote_code=source.trust_remote_code
    )
    return with_overrides(config, source.config)


def student_config(spec: StudentSpec, recipe: Recipe) -> Any | None:
    """A student's config from the recipe alone, as `student_source` builds it (the memory plan's):
    its path's or preset's, or the dense config derived from its `dense_from` model; None when that
    model's config is not available offline."""
    if spec.path is not None:
        return model_config(recipe, spec.path)
    if spec.preset is not None:
        return model_config(recipe, PresetModel(preset=spec.preset))
    teacher = model_config(recipe, spec.dense_from)
    return None if teacher is None else dense_config(teacher, spec.architecture, **spec.size_overrides())


def student_source(spec: StudentSpec, ctx: StageContext) -> PathModel:
    """Where a student's initial weights and tokenizer live; dense students are built and saved
    first (under `<stage>/<student>/init/`, atomically), so every student trains from a path."""
    if spec.path is not None:
        return ctx.model(spec.path)
    if spec.preset is not None:
        return ctx.model(PresetModel(preset=spec.preset))
    dest = ctx.out_dir / spec.name / artifacts.STUDENT_INIT
    origin = ctx.model(spec.dense_from)  # every rank: a preset is materialised through a collective
    if not (dest / artifacts.MODEL_CONFIG).exists() and ctx.is_main:
        build_dense_student(origin, spec, ctx.seed, dest)
    ctx.barrier()
    return PathModel(path=str(dest))


def build_dense_student(teacher: PathModel, spec: StudentSpec, seed: int, dest: Path) -> Path:
    """Random-initialise the dense student derived from `teacher` and save it with the teacher's tokenizer."""
    tokenizer = load_tokenizer(teacher)
    config = dense_config(load_config(teacher), spec.architecture, **spec.size_overrides())
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return save_random_init(config, tokenizer, seed, dest)


def parameter_counts(source: PathModel) -> dict[str, int]:
    """Total (and, for MoE models, active) parameters, counted on the meta device: no weights load,
    so this is as cheap for a 671B teacher as for a tiny one."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            load_config(source), trust_remote_code=source.trust_remote_code
        )
    counts = count_parameters(model)
    counts.pop("trainable", None)
    return counts


def tokenizer_mismatch(teacher: PathModel, student: PathModel) -> str | None:
    """Why `student` cannot match `teacher`'s next-token distributions token for token, or None.

    Logit distillation compares the two models' full distributions over one vocabulary, so the
    tokenizers must map every string to the same ids and the output layers must be equally wide."""
    t_tok, s_tok = load_tokenizer(teacher), load_tokenizer(student)
    t_vocab, s_vocab = t_tok.get_vocab(), s_tok.get_vocab()
    if t_vocab != s_vocab:
        differing = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda kv: kv[1])
        example = f", e.g. {differing[0][0]!r}" if differing else ""
        return f"their vocabularies differ ({len(t_vocab)} vs {len(s_vocab)} tokens{example})"
    for attribute in ("eos_token_id", "bos_token_id"):
        if getattr(t_tok, attribute) != getattr(s_tok, attribute):
            return f"{attribute} differs ({getattr(t_tok, attribute)} vs {getattr(s_tok, attribute)})"
    t_size = text_config(load_config(teacher)).vocab_size
    s_size = text_config(load_config(student)).vocab_size
    if t_size != s_size:
        return f"their output layers differ in width (vocab_size {t_size} vs {s_size})"
    return None
