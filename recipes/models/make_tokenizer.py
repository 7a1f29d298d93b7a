"""Regenerate the tiny presets' tokenizer in recipes/models/tokenizer/ (committed; run by hand).

Byte-level with no merges: every ASCII character is one token and any other text still
round-trips through its UTF-8 bytes, so non-English chains of thought decode exactly.
`<think>`, `</think>`, `<answer>`, `</answer>` are added as *non-special* tokens: GRPO decodes
completions with skip_special_tokens=True, and special tags would vanish before the rewards
see them. The chat template marks assistant turns with {% generation %} so trl can train on
assistant tokens only, and ends each assistant turn with the EOS token it must learn to emit.

    python recipes/models/make_tokenizer.py
"""

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|eos|>{% endgeneration %}"
    "{%- else -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def build() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        padding_side="right",
    )


if __name__ == "__main__":
    build().save_pretrained(Path(__file__).parent / "tokenizer")
