"""Score a JSONL file of completions with rewards: `posttrain rewards score` (test a reward first).

Each row holds `completion` (text or a message list), optionally `prompt`, and the columns
the rewards read (e.g. `answer`). Rows are scored in batches, as GRPO would call the
reward; the summary gives each reward's mean, std, share of None, errors, timeouts and
throughput.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from posttrain.errors import PosttrainError
from posttrain.recipe import PathModel, RewardSpec
from posttrain.rewards import build_reward, reward_columns
from posttrain.rewards.registry import check_spec
from posttrain.rewards.text import completion_text

BATCH = 256


class PathResolver:
    """`model:` outside a run: a path or hub id as given (stage names mean nothing here)."""

    def model(self, ref: Any) -> PathModel:
        return ref if isinstance(ref, PathModel) else PathModel(path=str(ref))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file; a line that is not a JSON object is an error naming the line."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a BOM, as `posttrain run` accepts it
    except FileNotFoundError:
        raise PosttrainError("no such file", file=str(path)) from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise PosttrainError(f"cannot read: {type(e).__name__}", file=str(path)) from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PosttrainError(f"not JSON: {e.msg}", file=str(path), line=number) from None
        if not isinstance(row, dict) or "completion" not in row:
            raise PosttrainError(
                "each row must be an object with a 'completion'", file=str(path), line=number
            )
        if not _is_completion(row["completion"]):
            raise PosttrainError(
                f"'completion' is {json.dumps(row['completion'])[:40]}, not text or a list of messages",
                file=str(path),
                line=number,
                fix='write the completion as a string, or as [{"role": "assistant", "content": "..."}]',
            )
        rows.append(row)
    if not rows:
        raise PosttrainError("no rows", file=str(path))
    return rows


def _is_completion(value: Any) -> bool:
    """Text, or a conversation: a list of {role, content} messages (trl's conversational form)."""
    if isinstance(value, str):
        return True
    return isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value)


def parse_reward(text: str) -> Any:
    """`accuracy`, `my_pkg.mod:fn`, or a YAML mapping `{name: format, mode: lenient}`."""
    value: Any = text
    if text.lstrip().startswith("{"):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PosttrainError(f"--reward {text}: invalid YAML ({e})") from None
    try:
        spec = RewardSpec.model_validate(value if isinstance(value, dict) else {"name": value})
    except ValidationError as e:
        message = e.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
        raise PosttrainError(f"--reward {text}: {message}") from None
    try:
        check_spec(spec.name, spec.options, spec.model is not None)
    except ValueError as e:
        raise PosttrainError(f"--reward {text}: {e}") from None
    return spec


def score_rows(
    rows: list[dict[str, Any]], specs: list[Any], tokenizer: Any = None, label: str = "data"
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Each row with `rewards: {name: score}`, and per-reward summary statistics."""
    columns = sorted({k for row in rows for k in row})
    for spec in specs:
        missing = [c for c in reward_columns(spec) if c not in columns]
        if missing:
            raise PosttrainError(
                f"reward '{spec.name}' needs column '{missing[0]}', but the rows have: {', '.join(columns)}",
                file=label,
                fix=f"add '{missing[0]}' to every row",
            )
    rewards = [build_reward(spec, PathResolver()) for spec in specs]
    scores: dict[str, list[float | None]] = {r.name: [] for r in rewards}
    for start in range(0, len(rows), BATCH):
        batch = rows[start : start + BATCH]
        kwargs = {c: [row.get(c) for row in batch] for c in columns if c not in ("prompt", "completion")}
        if tokenizer is not None:
            kwargs["completion_ids"] = [_token_ids(tokenizer, row["completion"]) for row in batch]
        prompts = [row.get("prompt") for row in batch]
        completions = [row["completion"] for row in batch]
        for reward in rewards:
            scores[reward.name].extend(reward(prompts=prompts, completions=completions, **kwargs))
    scored = [
        {**row, "rewards": {name: values[i] for name, values in scores.items()}} for i, row in enumerate(rows)
    ]
    return scored, {r.name: summarize(scores[r.name], r.stats.as_dict()) for r in rewards}


def summarize(values: list[float | None], stats: dict[str, float]) -> dict[str, float]:
    present = [v for v in values if v is not None]
    mean = sum(present) / len(present) if present else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in present) / len(present)) if present else math.nan
    return {
        "mean": mean,
        "std": std,
        "none_frac": 1 - len(present) / len(values) if values else 0.0,
        "errors": stats.get("errors", 0),
        "timeouts": stats.get("timeouts", 0),
        "samples_per_s": stats.get("samples_per_s", 0.0),
        "n": len(values),
    }


def _token_ids(tokenizer: Any, completion: Any) -> list[int]:
    return tokenizer(completion_text(completion), add_special_tokens=False)["input_ids"]
