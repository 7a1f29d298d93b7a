"""Score completions with a trained reward model exactly the way trl's RewardTrainer trained it.

A `reward_model` stage saves a standard transformers sequence-classification model (one label,
tokenizer and pad token saved beside it). What it reads:

- a conversational prompt (a list of messages): the chat template over the prompt plus the
  completion as the assistant turn (`apply_chat_template(messages, tokenize=True)`), so the
  score sits on the template's end-of-turn token;
- a text prompt: `prompt + completion + eos`, tokenized with the tokenizer's special tokens.

The score is `logits[:, 0]` at the last non-pad token (transformers finds it from the pad id).

    model = AutoModelForSequenceClassification.from_pretrained("runs/demo/rm/model")
    tokenizer = AutoTokenizer.from_pretrained("runs/demo/rm/model")
    rm_scores(model, tokenizer, prompts, completions)
"""

from __future__ import annotations

from typing import Any


def rm_input_ids(tokenizer: Any, prompt: Any, completion: Any) -> list[int]:
    """Token ids the reward model reads for one (prompt, completion), as trl tokenizes pairs.
    `completion` is text or trl's conversational form (a list with the assistant message)."""
    if isinstance(prompt, list):
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        return tokenizer.apply_chat_template([*prompt, *completion], tokenize=True, return_dict=True)[
            "input_ids"
        ]
    text = completion if isinstance(completion, str) else completion[-1]["content"]
    text = prompt + text
    if not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return tokenizer(text=text)["input_ids"]


def rm_scores(
    model: Any, tokenizer: Any, prompts: list[Any], completions: list[Any], batch_size: int = 32
) -> list[float]:
    """The reward model's scalar for each (prompt, completion), batched and right-padded."""
    import torch

    from posttrain.generation import model_device

    scores: list[float] = []
    pad = tokenizer.pad_token_id
    for i in range(0, len(prompts), batch_size):
        ids = [
            rm_input_ids(tokenizer, p, c)
            for p, c in zip(prompts[i : i + batch_size], completions[i : i + batch_size], strict=True)
        ]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = torch.tensor(x)
            mask[row, : len(x)] = 1
        device = model_device(model)
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        scores.extend(logits[:, 0].float().tolist())
    return scores
