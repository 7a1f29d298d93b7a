"""From candidate answers to preference labels: pairs, both orders, averaging, dropping, metrics.

Every pair (a, b) is judged twice, a shown first and b shown first, and p(a better) is the
mean of the two (Lee et al. 2023), which cancels a judge's position bias. A pair is dropped
when the judge gave no usable verdict (`invalid`), when its two orders disagree by more than
`max_disagreement` (`inconsistent`), or when p is within `min_margin` of 0.5 (`tie`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from posttrain.data_tools import extract_answer, require_columns
from posttrain.errors import PosttrainError
from posttrain.judges import Judge, PairQuery
from posttrain.judges.cache import JudgeCache, cache_key
from posttrain.rewards.text import completion_text


@dataclasses.dataclass(frozen=True)
class Pair:
    row: int  # the prompt's row
    a: int  # indices into that row's answers
    b: int


@dataclasses.dataclass(frozen=True)
class JudgedPair:
    """Both orders of one pair, as P(a is better): `p_ab` with a shown first, `p_ba` with b first."""

    pair: Pair
    p_ab: float | None
    p_ba: float | None
    rationales: tuple[str | None, str | None] = (None, None)  # (a shown first, b shown first)
    scores: tuple[float, float] | None = None  # a pointwise judge's raw scores of (a, b)
    mass: tuple[float | None, float | None] = (None, None)

    @property
    def valid(self) -> bool:
        return self.p_ab is not None and self.p_ba is not None

    @property
    def p(self) -> float:
        return (self.p_ab + self.p_ba) / 2

    @property
    def disagreement(self) -> float:
        return abs(self.p_ab - self.p_ba)


def candidate_pairs(answers: Sequence[Sequence[str]], max_per_row: int | None, seed: int) -> list[Pair]:
    """All pairs of distinct answers of each row (a seeded sample of `max_per_row` when given)."""
    pairs: list[Pair] = []
    for row, texts in enumerate(answers):
        distinct = list({text: i for i, text in reversed(list(enumerate(texts)))}.values())
        combos = list(itertools.combinations(sorted(distinct), 2))
        if max_per_row is not None and len(combos) > max_per_row:
            combos = sorted(random.Random(f"{seed}:{row}").sample(combos, max_per_row))
        pairs.extend(Pair(row, a, b) for a, b in combos)
    return pairs


def judge_pairs(
    judge: Judge,
    cache: JudgeCache,
    prompts: Sequence[Any],
    answers: Sequence[Sequence[str]],
    pairs: list[Pair],
    columns: Sequence[dict[str, Any]] | None = None,
) -> list[JudgedPair]:
    """Judge every pair in both orders, through the cache. `columns[row]` holds the row's values
    of the dataset columns a pointwise judge reads (`judge.columns`)."""
    if judge.score is not None:
        return _judge_pointwise(judge, cache, prompts, answers, pairs, columns)
    queries = [
        PairQuery(prompts[p.row], answers[p.row][first], answers[p.row][second])
        for p in pairs
        for first, second in ((p.a, p.b), (p.b, p.a))
    ]
    keys = [cache_key(judge.id, q.prompt, q.first, q.second) for q in queries]
    verdicts = cache.map(
        keys, lambda idx: judge.compare([queries[i] for i in idx]), judge.batch_size, "judging (both orders)"
    )
    judged = []
    for i, pair in enumerate(pairs):
        ab, ba = verdicts[2 * i], verdicts[2 * i + 1]
        judged.append(
            JudgedPair(
                pair,
                p_ab=ab["p_first"],
                p_ba=None if ba["p_first"] is None else 1.0 - ba["p_first"],
                rationales=(ab.get("rationale"), ba.get("rationale")),
                mass=(ab.get("mass"), ba.get("mass")),
            )
        )
    return judged


def _judge_pointwise(
    judge: Judge,
    cache: JudgeCache,
    prompts: Sequence[Any],
    answers: Sequence[Sequence[str]],
    pairs: list[Pair],
    columns: Sequence[dict[str, Any]] | None,
) -> list[JudgedPair]:
    """Score each answer once; a position-free judge gives both orders the same p."""
    needed = sorted({(p.row, i) for p in pairs for i in (p.a, p.b)})
    items = [
        (prompts[row], answers[row][i], {c: columns[row][c] for c in judge.columns} if columns else {})
        for row, i in needed
    ]
    keys = [cache_key(judge.id, prompt, answer, *([cols] if cols else [])) for prompt, answer, cols in items]
    values = cache.map(
        keys,
        lambda idx: [{"score": s} for s in judge.score([items[i] for i in idx])],
        judge.batch_size,
        "judging (each answer)",
    )
    score = {item: v["score"] for item, v in zip(needed, values, strict=True)}
    judged = []
    for pair in pairs:
        sa, sb = score[(pair.row, pair.a)], score[(pair.row, pair.b)]
        p = None if sa is None or sb is None else _sigmoid((sa - sb) / judge.temperature)
        scores = None if p is None else (sa, sb)
        judged.append(JudgedPair(pair, p_ab=p, p_ba=p, scores=scores))
    return judged


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def decide(judged: JudgedPair, min_margin: float, max_disagreement: float) -> str:
    """`kept`, or why the pair is dropped: `invalid`, `inconsistent`, `tie`."""
    if not judged.valid:
        return "invalid"
    if judged.disagreement > max_disagreement:
        return "inconsistent"
    if abs(judged.p - 0.5) < min_margin:
        return "tie"
    return "kept"


def best_vs_worst(judged: list[JudgedPair], decisions: list[str]) -> list[str]:
    """Keep one pair per prompt: its most preferred answer against its least preferred one,
    ranked by mean p(better) over every valid pair the answer is in. Others become `unselected`."""
    wins: dict[tuple[int, int], list[float]] = {}
    for j in judged:
        if j.valid:
            wins.setdefault((j.pair.row, j.pair.a), []).append(j.p)
            wins.setdefault((j.pair.row, j.pair.b), []).append(1.0 - j.p)
    mean = {key: sum(v) / len(v) for key, v in wins.items()}
    rows: dict[int, list[int]] = {}
    for row, i in mean:
        rows.setdefault(row, []).append(i)
    selected = set()
    for row, indices in rows.items():
        best = max(indices, key=lambda i: (mean[(row, i)], -i))
        worst = min(indices, key=lambda i: (mean[(row, i)], i))
        selected.add((row, min(best, worst), max(best, worst)))
    return [
        d if d != "kept" or (j.pair.row, j.pair.a, j.pair.b) in selected else "unselected"
        for j, d in zip(judged, decisions, strict=True)
    ]


def preference_record(
    judged: JudgedPair, prompt: Any, answers: Sequence[str], judge: Judge, principles_hash: str | None
) -> dict[str, Any]:
    """One row of preferences.jsonl, oriented so that `chosen` is the preferred answer; `scores`
    are both raw orders as P(chosen better), with chosen shown first and shown second."""
    a_wins = judged.p >= 0.5
    first, second = (judged.p_ab, judged.p_ba) if a_wins else (1.0 - judged.p_ba, 1.0 - judged.p_ab)
    r_ab, r_ba = judged.rationales
    record = {
        "prompt": prompt,
        "chosen": answers[judged.pair.a if a_wins else judged.pair.b],
        "rejected": answers[judged.pair.b if a_wins else judged.pair.a],
        "p_chosen": max(judged.p, 1.0 - judged.p),
        "scores": {"chosen_first": first, "chosen_second": second},
        "judge": judge.id,
        "principles_hash": principles_hash,
        "rationale": None
        if r_ab is None and r_ba is None
        else {"chosen_first": r_ab if a_wins else r_ba, "chosen_second": r_ba if a_wins else r_ab},
    }
    if judged.scores is not None:
        sa, sb = judged.scores
        record["judge_scores"] = {"chosen": sa, "rejected": sb} if a_wins else {"chosen": sb, "rejected": sa}
    return record


def label_metrics(judged: list[JudgedPair], decisions: list[str]) -> dict[str, Any]:
    """How many pairs were judged, kept and dropped (and why); how consistent and position-biased
    the judge was across the two orders of each pair."""
    valid = [j for j in judged if j.valid]
    reasons = Counter(d for d in decisions if d != "kept")
    consistent = [j for j in valid if (j.p_ab - 0.5) * (j.p_ba - 0.5) > 0]
    # How often the answer shown first won, over both orders: 0.5 for a judge without position bias.
    first_wins = [j.p_ab > 0.5 for j in valid] + [j.p_ba < 0.5 for j in valid]
    masses = [m for j in valid for m in j.mass if m is not None]
    kept = [j for j, d in zip(judged, decisions, strict=True) if d == "kept"]
    metrics: dict[str, Any] = {
        "pairs_judged": len(judged),
        "kept": len(kept),
        "dropped": sum(reasons.values()),
        "dropped_by_reason": {r: reasons.get(r, 0) for r in ("invalid", "inconsistent", "tie", "unselected")},
        "position_consistency": len(consistent) / len(valid) if valid else None,
        "first_position_win_rate": sum(first_wins) / len(first_wins) if first_wins else None,
        "mean_p_chosen": sum(max(j.p, 1 - j.p) for j in kept) / len(kept) if kept else None,
    }
    if masses:
        metrics["mean_label_mass"] = sum(masses) / len(masses)
    return metrics


def nothing_kept(metrics: dict[str, Any], min_margin: float, max_disagreement: float) -> PosttrainError:
    """The error for a labelling that kept no pair, with the fix for its main reason."""
    judged, reasons = metrics["pairs_judged"], metrics["dropped_by_reason"]
    if judged == 0:
        return PosttrainError(
            "no pairs to judge: every prompt's answers were identical",
            fix="sample more diverse answers: raise sampling.temperature or samples_per_prompt",
        )
    main = max(reasons, key=lambda r: reasons[r])
    where = "label/metrics.json has the counts"
    if main == "invalid":
        return PosttrainError(
            f"the judge gave no usable verdict on {reasons['invalid']} of {judged} pairs",
            fix=f"its reply must end with `Verdict: <label>` (check the judge model, its labels and max_tokens); {where}",
        )
    if main == "inconsistent":
        rate = metrics.get("first_position_win_rate")
        bias = f" (the answer shown first won {rate:.0%} of the time)" if rate is not None else ""
        return PosttrainError(
            f"the judge's two orders disagreed on {reasons['inconsistent']} of {judged} pairs{bias}",
            fix=f"a position-biased judge: use a stronger one, or raise max_disagreement (now {max_disagreement}); {where}",
        )
    return PosttrainError(
        f"the judge kept no pairs out of {judged}: {reasons}",
        fix=f"sample more diverse answers (sampling.temperature), or lower min_margin (now {min_margin}); {where}",
    )


def agreement(judged: list[JudgedPair], decisions: list[str], truth: dict[tuple[int, int], bool]) -> dict:
    """How often the kept labels prefer the answer a reference prefers. `truth[(row, i)]` says
    whether answer i of row is the good one; only pairs with exactly one good answer count."""
    hits = []
    for j, d in zip(judged, decisions, strict=True):
        good_a, good_b = truth.get((j.pair.row, j.pair.a)), truth.get((j.pair.row, j.pair.b))
        if d == "kept" and good_a is not None and good_b is not None and good_a != good_b:
            hits.append((j.p >= 0.5) == good_a)
    return {"n": len(hits), "accuracy": sum(hits) / len(hits) if hits else None}


# --------------------------------------------------------------------------- answers and truths from data rows


def judge_columns(rows: Any, columns: tuple[str, ...]) -> list[dict[str, Any]] | None:
    """Each row's values of the dataset columns the judge reads (a reward judge's `answer`)."""
    if not columns:
        return None
    require_columns(rows, columns, "the judge's reward", "data")
    return [
        dict(zip(columns, values, strict=True)) for values in zip(*(rows[c] for c in columns), strict=True)
    ]


def given_answers(rows: Any) -> list[list[str]]:
    """Answers the data brings: a `responses` list per row, or its `chosen` and `rejected`."""
    if "responses" in rows.column_names:
        return [[completion_text(a) for a in r] for r in rows["responses"]]
    if "chosen" in rows.column_names and "rejected" in rows.column_names:
        return [
            [completion_text(c), completion_text(r)]
            for c, r in zip(rows["chosen"], rows["rejected"], strict=True)
        ]
    raise PosttrainError(
        f"without a `policy`, rlaif_label takes its answers from the data's `responses` (or `chosen` and "
        f"`rejected`) column; the data has: {', '.join(rows.column_names)}",
        fix="add `policy: <stage or model>` to sample answers, or map a column with `columns:`",
    )


def verified(answers: list[list[str]], reference: Any) -> dict[tuple[int, int], bool]:
    """Which answers have the reference `answer` in their <answer> tag."""
    return {
        (row, i): extract_answer(text) == str(reference[row]).strip()
        for row, texts in enumerate(answers)
        for i, text in enumerate(texts)
    }


def human_choices(rows: Any, answers: list[list[str]], from_data: bool) -> dict[tuple[int, int], bool]:
    """The human-preferred answer of each row: `human_choice` (an index into the answers, or the
    preferred text), or `chosen` when the answers came from chosen/rejected columns."""
    if "human_choice" in rows.column_names:
        truth = {}
        for row, choice in enumerate(rows["human_choice"]):
            if choice is None:
                continue
            texts = answers[row]
            best = texts.index(choice) if isinstance(choice, str) and choice in texts else choice
            if isinstance(best, int) and 0 <= best < len(texts):
                truth.update({(row, i): i == best for i in range(len(texts))})
        return truth
    if from_data and "responses" not in rows.column_names and "chosen" in rows.column_names:
        return {(row, i): i == 0 for row in range(len(answers)) for i in (0, 1)}
    return {}
