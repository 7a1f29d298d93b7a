"""Data hygiene: exact and near-duplicate removal, and decontamination against evaluation sets.

- `deduplicate`: exact duplicates by normalised text (case and whitespace ignored), then
  near-duplicates by MinHash LSH over word n-grams (datasketch), each candidate confirmed
  by its estimated Jaccard similarity. The first row of a group is kept.
- `decontaminate`: drops training rows whose prompt shares a word n-gram with any evaluation
  prompt (open-r1 uses 8-grams). An evaluation prompt shorter than n words (`12+34=`) counts
  as one gram of its own length, so short problems are caught too.

Every removal is recorded in a `DataReport` (counts and a few examples), which the runner
writes to `<stage>/data_report.json` and the run report summarises.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

from posttrain.artifacts import read_json, write_json
from posttrain.errors import PosttrainError
from posttrain.recipe import DecontaminateSpec, DedupSpec

TEXT_COLUMNS = ("prompt", "messages", "completion", "chosen", "rejected", "text")
TOKEN = re.compile(r"\w+|[^\w\s]")
MIN_GRAM = 3  # evaluation prompts shorter than this many words are too short to match on
EXAMPLES = 3


@dataclasses.dataclass
class DataReport:
    """What data preparation did: one entry per step and source, with a few removed examples."""

    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def add(
        self, step: str, source: str, rows_in: int, removed: int, examples: list | None = None, **details: Any
    ) -> None:
        entry = {"step": step, "source": source, "rows_in": rows_in, "removed": removed, **details}
        self.steps.append({**entry, "examples": examples[:EXAMPLES]} if examples else entry)

    def removed(self, step: str) -> int:
        return sum(s["removed"] for s in self.steps if s["step"] == step)

    def save(self, path: Path) -> None:
        """Merge into `path`, replacing earlier entries of the same step and source (a resumed stage)."""
        if not self.steps:
            return
        mine = {(s["step"], s["source"]) for s in self.steps}
        old = (read_json(path) or {}).get("steps", [])
        steps = [s for s in old if (s.get("step"), s.get("source")) not in mine] + self.steps
        write_json(path, {"steps": steps})


# --------------------------------------------------------------------------- text of a row


def flatten(value: Any, roles: tuple[str, ...] | None = None) -> str:
    """The text of a cell: a string, or the contents of a conversation (only `roles`, if given)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if roles is not None and value.get("role") not in roles:
            return ""
        return flatten(value.get("content"))
    if isinstance(value, list):
        return "\n".join(t for t in (flatten(item, roles) for item in value) if t)
    return str(value)


def row_text(row: dict[str, Any], columns: list[str] | tuple[str, ...] | None = None) -> str:
    """The text that identifies a row: its text columns (or `columns`), joined."""
    names = columns or [c for c in TEXT_COLUMNS if c in row]
    return "\n".join(flatten(row.get(c)) for c in names)


def prompt_text(row: dict[str, Any]) -> str:
    """The question a row asks: the user turns of its prompt or conversation, else its text."""
    if "prompt" in row:
        return flatten(row["prompt"], roles=("user",))
    if "messages" in row:
        return flatten(row["messages"], roles=("user",))
    return row_text(row)


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks: `12+34=` is four words, `12-34=` differs from it."""
    return TOKEN.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> set[str]:
    return {" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def _shingles(tokens: list[str], n: int) -> set[str]:
    return _ngrams(tokens, n) if len(tokens) >= n else {" ".join(tokens)}


def _preview(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- dedup


def find_duplicates(texts: list[str], spec: DedupSpec) -> dict[int, tuple[int, str]]:
    """{index of a duplicate row: (index of the kept row it repeats, "exact" | "near")}."""
    duplicates: dict[int, tuple[int, str]] = {}
    first: dict[str, int] = {}
    tokens = [words(t) for t in texts]
    for i, toks in enumerate(tokens):
        key = hashlib.blake2b(" ".join(toks).encode(), digest_size=16).hexdigest()
        if key in first:
            duplicates[i] = (first[key], "exact")
        else:
            first[key] = i
    if spec.near:
        duplicates.update(_near_duplicates(tokens, spec, skip=set(duplicates)))
    return duplicates


def _near_duplicates(tokens: list[list[str]], spec: DedupSpec, skip: set[int]) -> dict[int, tuple[int, str]]:
    from datasketch import MinHash, MinHashLSH

    todo = [i for i in range(len(tokens)) if i not in skip and tokens[i]]
    shingles = [[s.encode() for s in _shingles(tokens[i], spec.ngram)] for i in todo]
    hashes = MinHash.bulk(shingles, num_perm=spec.num_perm)
    lsh = MinHashLSH(threshold=spec.threshold, num_perm=spec.num_perm)
    kept: dict[int, Any] = {}
    found: dict[int, tuple[int, str]] = {}
    for i, minhash in zip(todo, hashes, strict=True):
        match = next((j for j in lsh.query(minhash) if kept[j].jaccard(minhash) >= spec.threshold), None)
        if match is None:
            lsh.insert(i, minhash)
            kept[i] = minhash
        else:
            found[i] = (match, "near")
    return found


def deduplicate(dataset: Any, spec: DedupSpec, report: DataReport, source: str) -> Any:
    """The rows with duplicates removed (first of each group kept); the report says what went."""
    columns = spec.on or [c for c in TEXT_COLUMNS if c in dataset.column_names]
    missing = [c for c in columns if c not in dataset.column_names]
    if missing or not columns:
        raise PosttrainError(
            f"{source}: dedup needs text columns, but the data has: {', '.join(dataset.column_names)}",
            fix="set `dedup: {on: [<your text columns>]}`",
        )
    texts = [row_text(row, columns) for row in dataset.select_columns(columns)]
    duplicates = find_duplicates(texts, spec)
    examples = [
        {"removed": _preview(texts[i]), "duplicate_of": _preview(texts[j]), "kind": kind}
        for i, (j, kind) in sorted(duplicates.items())[:EXAMPLES]
    ]
    report.add("dedup", source, len(texts), len(duplicates), examples)
    if not duplicates:
        return dataset
    return dataset.select([i for i in range(len(texts)) if i not in duplicates])


# --------------------------------------------------------------------------- decontamination


@dataclasses.dataclass
class EvalGrams:
    """The n-grams of a set of evaluation prompts; short prompts are kept whole, by length."""

    n: int
    grams: set[str]
    short: dict[int, set[str]]

    @classmethod
    def of(cls, prompts: list[str], n: int) -> EvalGrams:
        grams: set[str] = set()
        short: dict[int, set[str]] = {}
        for text in prompts:
            tokens = words(text)
            if len(tokens) >= n:
                grams |= _ngrams(tokens, n)
            elif len(tokens) >= MIN_GRAM:
                short.setdefault(len(tokens), set()).add(" ".join(tokens))
        return cls(n, grams, short)

    def match(self, text: str) -> str | None:
        """The first evaluation n-gram found in `text`, or None."""
        tokens = words(text)
        for size, grams in [(self.n, self.grams), *self.short.items()]:
            for i in range(len(tokens) - size + 1):
                gram = " ".join(tokens[i : i + size])
                if gram in grams:
                    return gram
        return None


def decontaminate(
    dataset: Any, eval_sets: list[Any], spec: DecontaminateSpec, report: DataReport, source: str
) -> Any:
    """The rows whose prompt shares no n-gram with any evaluation prompt."""
    prompts = [prompt_text(row) for eval_rows in eval_sets for row in eval_rows]
    grams = EvalGrams.of(prompts, spec.ngram)
    hits: dict[int, str] = {}
    for i, row in enumerate(dataset):
        gram = grams.match(prompt_text(row))
        if gram is not None:
            hits[i] = gram
    examples = [
        {"removed": _preview(prompt_text(dataset[i])), "matched": gram}
        for i, gram in list(hits.items())[:EXAMPLES]
    ]
    report.add("decontaminate", source, len(dataset), len(hits), examples)
    if not hits:
        return dataset
    return dataset.select([i for i in range(len(dataset)) if i not in hits])
