"""`reward_model`: score with a trained sequence-classification reward model.

`model:` is a stage name (that stage's `model/`, e.g. the RLAIF reward model) or a path /
hub id. Each prompt + completion is rendered with the reward model's chat template (the way
it was trained) and scored by the logit of its single output, in batches, without gradients,
on the GPU when there is one. A text repeated in the batch is scored once. The model loads
once, when the reward is built.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from posttrain.models import load_tokenizer, pretrained_kwargs, with_inherited_options
from posttrain.rewards.registry import RewardFunc, register
from posttrain.rewards.text import completion_text


@register("reward_model")
def reward_model(
    model: Any,
    batch_size: Annotated[int, Field(gt=0)] = 16,
    max_length: Annotated[int, Field(gt=0)] | None = None,
    scale: float = 1.0,
    shift: float = 0.0,
) -> RewardFunc:
    """The reward model's score of (prompt, completion), times `scale` plus `shift`.

    `max_length` truncates long inputs (default: the model's max_position_embeddings);
    `batch_size` completions are scored at once."""
    import torch
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(model)
    model = with_inherited_options(model)
    scorer = AutoModelForSequenceClassification.from_pretrained(model.path, **pretrained_kwargs(model)).eval()
    if torch.cuda.is_available():
        scorer = scorer.to("cuda")
    if scorer.config.pad_token_id is None:
        scorer.config.pad_token_id = tokenizer.pad_token_id
    limit = max_length or getattr(scorer.config, "max_position_embeddings", None) or 2048
    device = next(scorer.parameters()).device

    def reward_model_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        texts = [
            render(tokenizer, p, c)
            for p, c in zip(prompts or [""] * len(completions), completions, strict=True)
        ]
        # A GRPO group often repeats an answer word for word (half of the demo's late batches):
        # each distinct text is scored once.
        unique = list(dict.fromkeys(texts))
        scores: dict[str, float] = {}
        for i in range(0, len(unique), batch_size):
            batch_texts = unique[i : i + batch_size]
            batch = tokenizer(
                batch_texts,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=limit,
                add_special_tokens=False,
            ).to(device)
            with torch.inference_mode():
                logits = scorer(**batch).logits[:, 0].float()
            scores.update(zip(batch_texts, (logits * scale + shift).tolist(), strict=True))
        return [scores[text] for text in texts]

    return reward_model_reward


def render(tokenizer: Any, prompt: Any, completion: Any) -> str:
    """Prompt + completion as the reward model saw its training pairs: the chat template for
    conversations (when the tokenizer has one), plain concatenation otherwise."""
    if isinstance(prompt, list) and getattr(tokenizer, "chat_template", None):
        messages = [*prompt, {"role": "assistant", "content": completion_text(completion)}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_str = prompt if isinstance(prompt, str) else "".join(m.get("content", "") for m in prompt or [])
    text = prompt_str + completion_text(completion)
    eos = tokenizer.eos_token or ""
    return text if text.endswith(eos) else text + eos  # trl's RewardTrainer ends text pairs with EOS
