"""Tiny random-initialised models of the real families, each with its family's real chat template.

Nothing is downloaded: the config is written here (a few layers of width 64), the tokenizer
is the byte-level one shipped with the presets plus the family's own special tokens (its BOS,
end-of-turn and header tokens, as single tokens, as on the hub), and the chat template is the
one the family's hub repo ships (tests/data/chat_templates/, sources in its README).

    path = build_family("llama", tmp_path / "llama")   # a model folder any stage can start from
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
SMALL |= {"num_key_value_heads": 2, "max_position_embeddings": 512, "initializer_range": 0.02}
DEEPSEEK = {"q_lora_rank": None, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8}
DEEPSEEK |= {"v_head_dim": 16, "num_key_value_heads": 4, "moe_intermediate_size": 32, "n_routed_experts": 4}
DEEPSEEK |= {"num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1}
DEEPSEEK |= {"n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": True}

QWEN_TOKENS = {"bos": None, "eos": "<|im_end|>", "extra": ["<|im_start|>", "<|endoftext|>"]}
DEEPSEEK_TOKENS = {"bos": "<｜begin▁of▁sentence｜>", "eos": "<｜end▁of▁sentence｜>"}

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {
        "config": {"model_type": "llama", **SMALL},
        "template": "llama3",
        "tokens": {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>"}
        | {"extra": ["<|start_header_id|>", "<|end_header_id|>"]},
    },
    "qwen2": {
        "config": {"model_type": "qwen2", **SMALL, "tie_word_embeddings": True},
        "template": "qwen2_5",
        "tokens": QWEN_TOKENS,
    },
    "qwen3": {
        "config": {"model_type": "qwen3", **SMALL, "head_dim": 16, "tie_word_embeddings": True},
        "template": "qwen3",
        "tokens": QWEN_TOKENS,
    },
    "qwen3_moe": {
        "config": {"model_type": "qwen3_moe", **SMALL, "head_dim": 16, "moe_intermediate_size": 32}
        | {"num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": []},
        "template": "qwen3",
        "tokens": QWEN_TOKENS,
        "moe": True,
    },
    "mixtral": {
        "config": {"model_type": "mixtral", **SMALL, "num_local_experts": 4, "num_experts_per_tok": 2},
        "template": "mixtral",
        "tokens": {"bos": "<s>", "eos": "</s>", "extra": []},
        "moe": True,
    },
    "deepseek_v2": {
        "config": {"model_type": "deepseek_v2", **SMALL, **DEEPSEEK, "topk_method": "greedy"},
        "template": "deepseek_v2",
        "tokens": DEEPSEEK_TOKENS | {"extra": []},
        "moe": True,
    },
    "deepseek_v3": {
        "config": {"model_type": "deepseek_v3", **SMALL, **DEEPSEEK, "q_lora_rank": 32},
        "template": "deepseekv3",
        "tokens": DEEPSEEK_TOKENS | {"extra": ["<｜User｜>", "<｜Assistant｜>"]},
        "moe": True,
    },
    "gemma2": {
        "config": {"model_type": "gemma2", **SMALL, "head_dim": 16, "query_pre_attn_scalar": 16}
        | {"sliding_window": 64},
        "template": "gemma",
        "tokens": {"bos": "<bos>", "eos": "<end_of_turn>", "extra": ["<start_of_turn>"]},
    },
}
MOE_FAMILIES = [name for name, family in FAMILIES.items() if family.get("moe")]


def chat_template(name: str) -> str:
    """A hub chat template by its file name in tests/data/chat_templates (`llama3`, `gemma`, ...)."""
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def template_tokenizer(template: str, tokens: dict[str, Any]) -> Any:
    """The shipped byte-level tokenizer with a family's special tokens and hub chat template."""
    from transformers import AutoTokenizer

    from posttrain.models import TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    special = [t for t in (tokens["bos"], tokens["eos"], *tokens["extra"]) if t]
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    if tokens["bos"]:
        tokenizer.bos_token = tokens["bos"]
    tokenizer.eos_token = tokens["eos"]
    tokenizer.chat_template = chat_template(template)
    return tokenizer


def family_tokenizer(name: str) -> Any:
    family = FAMILIES[name]
    return template_tokenizer(family["template"], family["tokens"])


def build_family(name: str, dest: Path, seed: int = 0) -> Path:
    """A saved tiny random `name` model with its family's tokenizer and template, at `dest`."""
    from posttrain.models import config_for, save_random_init

    if (dest / "config.json").exists():
        return dest
    tokenizer = family_tokenizer(name)
    return save_random_init(config_for(FAMILIES[name]["config"], tokenizer), tokenizer, seed, dest)
