"""`posttrain data inspect`: what a dataset looks like to the model before any training.

Loads a source exactly as a recipe would (with `columns:` / `template:`), renders a few rows
through the model's chat template, and reports rows, columns, token-length percentiles and
duplicates, with a PNG histogram of the lengths. With `loss_mask`, each example also shows
which of its tokens SFT would train on (the same mask the sft stage uses, see chat_mask):

    posttrain data inspect data/train.jsonl --columns prompt=question,answer=solution --model Qwen/Qwen2.5-0.5B
    posttrain data inspect chats.jsonl --model meta-llama/Llama-3.1-8B-Instruct --loss-mask
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.data_tools.chat_mask import describe_masking, masking_path, row_mask, trained_text
from posttrain.data_tools.chat_template import read_chat_template
from posttrain.data_tools.hygiene import find_duplicates, row_text
from posttrain.data_tools.loading import load_rows
from posttrain.errors import PosttrainError
from posttrain.models import TOKENIZER_DIR, load_tokenizer, preset_names
from posttrain.recipe import DedupSpec, FileData, PathModel

PERCENTILES = (50, 90, 95, 99)
DEFAULT_TOKENIZER = "tiny-deepseek-v3"


def parse_columns(text: str | None) -> dict[str, str]:
    """`prompt=question,answer=solution` as {canonical: source}."""
    columns: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        canonical, sep, source = part.partition("=")
        if not sep or not canonical.strip() or not source.strip():
            raise PosttrainError(f"--columns '{part}': expected canonical=source, e.g. prompt=question")
        columns[canonical.strip()] = source.strip()
    return columns


def load_tokenizer_for(model: str | None) -> Any:
    """A preset's tokenizer (the shipped one) or that of a model path / hub id."""
    name = model or DEFAULT_TOKENIZER
    if name in preset_names():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    return load_tokenizer(PathModel(path=name))


def render_row(tokenizer: Any, row: dict[str, Any]) -> str:
    """The text the model would see for a row: a conversation, prompt + reply, or plain text."""

    def chat(messages: list, generation: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    if isinstance(row.get("messages"), list):
        return chat(row["messages"])
    prompt = row.get("prompt")
    reply = next((row[c] for c in ("completion", "chosen") if row.get(c) is not None), None)
    if isinstance(prompt, list):
        if isinstance(reply, list):
            return chat(prompt + reply)
        return chat(prompt, generation=True) + (reply or "")
    if prompt is not None:
        return str(prompt) + (reply if isinstance(reply, str) else "")
    return row_text(row)


def masked_example(tokenizer: Any, row: dict[str, Any], label: str, index: int) -> dict[str, Any]:
    """One example as SFT trains on it: its text, the loss-carrying tokens decoded, and the text in
    runs of trained / untrained tokens (what the terminal colours)."""
    ids, mask = row_mask(tokenizer, row, label, index)
    runs: list[dict[str, Any]] = []
    for token, trained in zip(ids, mask, strict=True):
        if runs and runs[-1]["trained"] == bool(trained):
            runs[-1]["ids"].append(token)
        else:
            runs.append({"trained": bool(trained), "ids": [token]})
    return {
        "text": tokenizer.decode(ids, skip_special_tokens=False),
        "trained_text": trained_text(tokenizer, ids, mask),
        "trained_tokens": sum(mask),
        "tokens": len(ids),
        "runs": [{"text": tokenizer.decode(r["ids"]), "trained": r["trained"]} for r in runs],
    }


def percentiles(lengths: list[int]) -> dict[str, float]:
    import numpy as np

    values = np.array(lengths or [0])
    found = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}
    return {"min": int(values.min()), **found, "max": int(values.max()), "mean": float(values.mean())}


def plot_lengths(lengths: list[int], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.hist(lengths, bins=min(50, max(5, len(set(lengths)))))
    axes.set(xlabel="tokens per row", ylabel="rows", title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)


def inspect_data(
    source: str,
    *,
    columns: dict[str, str] | None = None,
    template: str | None = None,
    split: str | None = None,
    name: str | None = None,
    model: str | None = None,
    examples: int = 3,
    out_dir: Path = Path("."),
    loss_mask: bool = False,
    chat_template: str | None = None,
) -> dict[str, Any]:
    """Rows, columns, rendered examples, token-length percentiles, duplicates, and the histogram path;
    with `loss_mask`, each example as {text, trained_text, runs} and the conversations' masking path."""
    spec = FileData(path=source, columns=columns or {}, template=template, split=split, name=name)
    rows = load_rows(spec)
    tokenizer = load_tokenizer_for(model)
    if chat_template is not None:
        tokenizer.chat_template = read_chat_template(chat_template, "--chat-template")
    rendered = [render_row(tokenizer, row) for row in rows]
    lengths = (
        [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]] if rendered else []
    )
    duplicates = find_duplicates([row_text(row) for row in rows], DedupSpec())
    stem = Path(source.rstrip("/")).stem or "data"
    histogram = Path(out_dir) / f"{stem}.lengths.png"
    plot_lengths(lengths, f"{source}: {len(rows)} rows", histogram)
    extra: dict[str, Any] = {}
    if loss_mask:
        shown = [masked_example(tokenizer, rows[i], source, i + 1) for i in range(min(examples, len(rows)))]
        extra = {"examples": shown, "masking": describe_masking(masking_path(tokenizer))}
    return {
        "source": source,
        "rows": len(rows),
        "columns": list(rows.column_names),
        "tokenizer": model or f"{DEFAULT_TOKENIZER} (preset)",
        "token_lengths": percentiles(lengths),
        "duplicates": {
            "exact": sum(kind == "exact" for _, kind in duplicates.values()),
            "near": sum(kind == "near" for _, kind in duplicates.values()),
        },
        "examples": rendered[:examples],
        "histogram": str(histogram),
        **extra,
    }
