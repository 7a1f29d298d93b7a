"""Which tokens of an SFT row carry the loss, whatever the chat template.

A conversation trains on every assistant turn and nothing else. Where the template marks
assistant output with `{% generation %}`, trl's mask is used (`MARKERS`). Most hub templates
(Llama 3, Mistral, Gemma, DeepSeek-V3, Qwen2.5) have no markers, so the spans are derived here
(`DERIVED`) from the template's own renderings, which makes no assumption about its tokens:

- the turn's content is where the whole conversation's text changes when that turn's content
  changes (robust to templates that render earlier turns differently once more follow, as
  Qwen3 and DeepSeek-R1 do with reasoning, or that move the system prompt, as Mistral does);
- before it, whatever the template writes after its generation prompt (an empty thinking
  block, say) is the model's to produce, so it is trained; the generation prompt is not;
- after it, the end-of-turn text the template writes when the conversation ends on that turn
  (`<|eot_id|>`, `<|im_end|>`, `</s>`...), trailing whitespace aside: the model must learn to stop.

Tokens that overlap a span carry loss, as transformers' own marker mask counts them.
`prompt` + `completion` rows train on the completion, `text` rows on every token (trl's rules).
"""

from __future__ import annotations

from typing import Any

from posttrain.data_tools.chat_template import has_generation_markers, render_chat
from posttrain.errors import PosttrainError

MARKERS = "markers"  # the template's {% generation %} markers, through trl's assistant_only_loss
DERIVED = "derived"  # spans derived by posttrain from the template's renderings

Span = tuple[int, int]  # [start, end) in characters of the rendered text


def masking_path(tokenizer: Any) -> str:
    return MARKERS if has_generation_markers(tokenizer) else DERIVED


def describe_masking(path: str) -> str:
    """One line for preflight and `data inspect`: how a conversation's loss is masked."""
    if path == MARKERS:
        return "loss on assistant turns via the template's {% generation %} markers (trl's mask)"
    return "loss on assistant turns via spans posttrain derives from the template (it has no markers)"


def _render(tokenizer: Any, messages: list[dict[str, Any]], **options: Any) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **options)


def _changed(text: str, other: str) -> Span:
    """The region of `text` that differs from `other` (their common prefix and suffix cut off)."""
    limit = min(len(text), len(other))
    start = 0
    while start < limit and text[start] == other[start]:
        start += 1
    tail = 0
    while tail < limit - start and text[-1 - tail] == other[-1 - tail]:
        tail += 1
    return start, len(text) - tail


def _content_span(tokenizer: Any, messages: list[dict[str, Any]], i: int, text: str) -> Span:
    """Where turn i's content sits in `text` (the rendering of `messages`)."""
    other = "" if messages[i]["content"] else "x"
    variant = [*messages[:i], {**messages[i], "content": other}, *messages[i + 1 :]]
    return _changed(text, _render(tokenizer, variant))


def _generation_prompt(tokenizer: Any, before: list[dict[str, Any]]) -> str:
    """What the template adds to open an assistant turn after `before` (e.g. `<|im_start|>assistant\\n`)."""
    try:
        opened = _render(tokenizer, before, add_generation_prompt=True)
        closed = _render(tokenizer, before) if before else ""
    except Exception:  # a template that cannot render this prefix alone (e.g. no user turn yet)
        return ""
    return opened[len(closed) :] if opened.startswith(closed) else ""


def _end_of_turn(tokenizer: Any, through: list[dict[str, Any]]) -> str:
    """What the template writes after an assistant turn's content when the conversation ends there."""
    alone = _render(tokenizer, through)
    _, end = _content_span(tokenizer, through, len(through) - 1, alone)
    return alone[end:].rstrip()


def assistant_spans(
    tokenizer: Any, messages: list[dict[str, Any]], label: str, row: int
) -> tuple[str, list[Span]]:
    """The rendered conversation and, per assistant turn, the characters the model must produce."""
    text = render_chat(tokenizer, messages, label, row)
    spans: list[Span] = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start, end = _content_span(tokenizer, messages, i, text)
        head = _generation_prompt(tokenizer, messages[:i])
        at = text.rfind(head, spans[-1][1] if spans else 0, start) if head else -1
        if at >= 0:
            start = at + len(head)
        stop = _end_of_turn(tokenizer, messages[: i + 1])
        if stop and text.startswith(stop, end):
            end += len(stop)
        spans.append((start, end))
    return text, spans


def token_mask(offsets: list[tuple[int, int]], spans: list[Span]) -> list[int]:
    """1 for every token that overlaps a span (spans and offsets both in order)."""
    mask = [0] * len(offsets)
    k = 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        mask[t] = int(end > spans[k][0] and start < spans[k][1])
    return mask


def derived_mask(
    tokenizer: Any, messages: list[dict[str, Any]], label: str, row: int
) -> tuple[list[int], list[int]]:
    """input_ids and assistant mask of a conversation, spans derived from the template."""
    text, spans = assistant_spans(tokenizer, messages, label, row)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), token_mask(encoded["offset_mapping"], spans)


def marker_mask(
    tokenizer: Any, messages: list[dict[str, Any]], label: str, row: int
) -> tuple[list[int], list[int]]:
    """input_ids and assistant mask from the template's {% generation %} markers (what trl trains on)."""
    render_chat(tokenizer, messages, label, row)  # a rejected turn is one line, not a traceback
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def conversation_mask(tokenizer: Any, messages: Any, label: str, row: int) -> tuple[list[int], list[int]]:
    """A conversation's tokens and loss mask, by the path its template takes."""
    mask = marker_mask if masking_path(tokenizer) == MARKERS else derived_mask
    return mask(tokenizer, messages, label, row)


def row_mask(tokenizer: Any, row: dict[str, Any], label: str, index: int) -> tuple[list[int], list[int]]:
    """Any SFT row's tokens and loss mask: assistant turns, the completion, or all of `text`."""
    if row.get("messages") is not None:
        return conversation_mask(tokenizer, row["messages"], label, index)
    prompt, completion = row.get("prompt"), row.get("completion")
    if prompt is not None and completion is not None:
        if isinstance(prompt, list):
            head = render_chat(tokenizer, prompt, label, index, add_generation_prompt=True)
            whole = render_chat(tokenizer, [*prompt, *completion], label, index)
        else:
            eos = tokenizer.eos_token or ""
            head, whole = prompt, prompt + completion + ("" if completion.endswith(eos) else eos)
        ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
        prompt_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        shared = next((k for k, (a, b) in enumerate(zip(ids, prompt_ids, strict=False)) if a != b), None)
        cut = min(len(prompt_ids), len(ids)) if shared is None else shared
        return ids, [0] * cut + [1] * (len(ids) - cut)
    ids = tokenizer(str(row.get("text") or ""), add_special_tokens=False)["input_ids"]
    return ids, [1] * len(ids)


def trained_text(tokenizer: Any, ids: list[int], mask: list[int]) -> str:
    """The loss-carrying tokens decoded, concatenated (`data inspect --json`'s `trained_text`)."""
    return tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)


def sft_tokens(dataset: Any, tokenizer: Any, label: str) -> Any:
    """Conversations as `input_ids` + `assistant_masks` with derived spans, which trl's SFTTrainer
    turns into labels (it skips its own tokenisation for rows that have `input_ids`). A row with
    no assistant token is one line naming it: it would train on nothing."""

    def tokenize(row: dict[str, Any], index: int) -> dict[str, Any]:
        ids, mask = derived_mask(tokenizer, row["messages"], label, index + 1)
        if not any(mask):
            raise untrained(label, index + 1)
        return {"input_ids": ids, "assistant_masks": mask}

    return dataset.map(tokenize, with_indices=True, remove_columns=dataset.column_names)


def untrained(label: str, row: int) -> PosttrainError:
    """A conversation none of whose tokens would carry loss."""
    return PosttrainError(
        "no assistant turn carries loss in this conversation",
        file=label,
        line=row,
        fix="give every conversation an assistant turn, or drop the row",
    )
