"""RLAIF label stage: AI-judged preference labels (Lee et al. 2023).

A policy writes `samples_per_prompt` answers per prompt (or the data brings its own:
`responses`, or `chosen` + `rejected`); every pair of distinct answers is judged in both
orders; p(a better) is the mean of the two, which cancels the judge's position bias; pairs
whose orders disagree, or whose p is too close to 0.5, are dropped and counted. Judge calls
are cached on disk (`<run>/cache/judges/<judge id>.jsonl`), so a re-run or a crash pays for
none of them twice. Writes `<stage>/data/preferences.jsonl` (prompt, chosen, rejected,
p_chosen, both raw order scores, judge id, principles hash, rationale) for a reward model.

    - name: label
      kind: rlaif_label
      policy: sft
      data: {synthetic: arithmetic, n: 500}
      samples_per_prompt: 4
      judge: {backend: likelihood, model: judge-sft}   # or hf / openai, see posttrain/judges/

Under `accelerate launch` the main process labels while the others wait; for long labelling
jobs run this stage alone (`posttrain run r.yaml --only label`) so no barrier times out.
"""

import json
from typing import Any

from posttrain import artifacts
from posttrain.context import StageContext
from posttrain.data_tools import describe, require_columns
from posttrain.distributed import on_main, unsharded_loading
from posttrain.generation import Sampling, generate_all, open_engine
from posttrain.judges import build_judge, principles_hash
from posttrain.judges.cache import JudgeCache
from posttrain.judges.labels import (
    agreement,
    best_vs_worst,
    candidate_pairs,
    decide,
    given_answers,
    human_choices,
    judge_columns,
    judge_pairs,
    label_metrics,
    nothing_kept,
    preference_record,
    verified,
)
from posttrain.metrics import Curves, Evaluated, NotRequired, Timed, TypedDict
from posttrain.recipe import OpenAIJudgeSpec, PresetModel, RewardJudgeSpec, RlaifLabelStage
from posttrain.stages import Slot


class Agreement(TypedDict):
    n: int  # kept pairs the reference can decide (exactly one right answer; a human's choice)
    accuracy: float | None


class JudgeCalls(TypedDict):
    id: str
    cache_hits: int
    cache_misses: int


class Metrics(Timed):
    prompts: int
    pairs_judged: int
    kept: int
    dropped: int
    dropped_by_reason: dict[str, int]  # invalid, inconsistent, tie, unselected
    position_consistency: float | None
    first_position_win_rate: float | None  # 0.5 for a judge without position bias
    mean_p_chosen: float | None
    mean_label_mass: NotRequired[float]
    candidates: dict[str, Any]  # where the answers came from, and how diverse they were
    judge: JudgeCalls
    candidate_accuracy: NotRequired[float]  # when the rows carry a reference `answer`
    agreement_with_answer: NotRequired[Agreement]
    agreement_with_human: NotRequired[Agreement]


def run(stage: RlaifLabelStage, ctx: StageContext) -> Metrics:
    stage = presets_resolved(stage, ctx)
    with unsharded_loading():  # each rank holds whole models (policy, judge) for its share
        metrics = label(stage, ctx)  # every rank samples and judges a share; rank 0 writes
    on_main(artifacts.write_json, ctx.out_dir / artifacts.LABEL_METRICS, metrics)
    return metrics


check = None  # the schema checks the judge block and its principles
workload = None  # trains nothing


def slot(stage: RlaifLabelStage) -> Slot:
    """Preflight: prompts for the policy, which writes max_new_tokens per candidate."""
    return Slot(stage.policy, stage.data, ("prompt",), stage.sampling.max_new_tokens)


loss_panel = None  # trains nothing


def outcome(metrics: Metrics, curves: Curves) -> list[str]:
    """What the judge kept, and how often it agrees with the reference answer."""
    parts = [f"kept {metrics['kept']} of {metrics['pairs_judged']} pairs"]
    agreement = metrics.get("agreement_with_answer")
    if agreement and agreement["n"]:
        parts.append(f"agrees with the answer on {agreement['accuracy']:.3f} (n={agreement['n']})")
    return parts


def headline(name: str, metrics: Metrics, start: tuple[str, Evaluated] | None) -> list[str]:
    """How many pairs the judge kept, and how often it agrees with the reference answer."""
    agreement = metrics.get("agreement_with_answer") or {}
    if not agreement.get("n"):
        return []
    return [f"- **{name}**: the judge kept {metrics.get('kept')} of {metrics.get('pairs_judged')} "
            f"pairs and agrees with the reference answer on {agreement['accuracy']:.3f} of "
            f"{agreement['n']} pairs with one right answer"]  # fmt: skip


def presets_resolved(stage: RlaifLabelStage, ctx: StageContext) -> RlaifLabelStage:
    """The stage with its preset models materialised, by every rank together (`ctx.model` waits
    for all ranks on a preset), so that the main process can then load them alone."""

    def resolve(block: Any, key: str) -> Any:
        ref = getattr(block, key, None)
        return block.model_copy(update={key: ctx.model(ref)}) if isinstance(ref, PresetModel) else block

    judge = stage.judge
    if isinstance(judge, RewardJudgeSpec):
        judge = judge.model_copy(update={"reward": resolve(judge.reward, "model")})
    elif not isinstance(judge, OpenAIJudgeSpec):
        judge = resolve(judge, "model")
    return resolve(stage, "policy").model_copy(update={"judge": judge})


def label(stage: RlaifLabelStage, ctx: StageContext) -> Metrics:
    from transformers import set_seed

    set_seed(ctx.seed)
    rows = ctx.data(stage.data)
    require_columns(rows, ["prompt"], "rlaif_label", "data")
    prompts = list(rows["prompt"])
    answers, sampling = candidates(stage, ctx, rows)

    judge = build_judge(stage.judge, ctx)
    cache = JudgeCache(
        ctx.run_dir / artifacts.CACHE / artifacts.JUDGE_CACHE / f"{judge.id}.jsonl", ctx.is_main
    )
    ctx.barrier()  # every rank has read the cache before rank 0 appends to it
    pairs = candidate_pairs(answers, stage.max_pairs_per_prompt, ctx.seed)
    judged = judge_pairs(judge, cache, prompts, answers, pairs, judge_columns(rows, judge.columns))
    judge.close()
    decisions = [decide(j, stage.min_margin, stage.max_disagreement) for j in judged]
    if stage.pairs == "best_vs_worst":
        decisions = best_vs_worst(judged, decisions)

    reference = rows["answer"] if "answer" in rows.column_names else None
    records = []
    for j, decision in zip(judged, decisions, strict=True):
        if decision == "kept":
            record = preference_record(
                j, prompts[j.pair.row], answers[j.pair.row], judge, principles_hash(judge.principles)
            )
            records.append(record if reference is None else {**record, "answer": str(reference[j.pair.row])})
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    on_main(artifacts.write_atomic, ctx.out_dir / artifacts.PREFERENCES, text)

    metrics: Metrics = {
        "prompts": len(prompts),
        **label_metrics(judged, decisions),
        "candidates": sampling,
        "judge": {"id": judge.id, "cache_hits": cache.hits, "cache_misses": cache.misses},
        **judge_accuracy(rows, answers, judged, decisions, from_data=stage.policy is None),
    }
    if not records:  # the counts stay on disk, to see why
        error = nothing_kept(metrics, stage.min_margin, stage.max_disagreement)
        on_main(artifacts.write_json, ctx.out_dir / artifacts.METRICS, {**metrics, "problem": str(error)})
        raise error
    return metrics


def judge_accuracy(
    rows: Any, answers: list[list[str]], judged: list, decisions: list[str], from_data: bool
) -> dict:
    """How often the kept labels agree with the reference `answer` (on pairs with one right answer)
    and with a human's choice, when the data has them; and how many candidates were right."""
    metrics: dict[str, Any] = {}
    if "answer" in rows.column_names:
        truth = verified(answers, rows["answer"])
        metrics["candidate_accuracy"] = sum(truth.values()) / max(len(truth), 1)
        metrics["agreement_with_answer"] = agreement(judged, decisions, truth)
    human = human_choices(rows, answers, from_data)
    if human:
        metrics["agreement_with_human"] = agreement(judged, decisions, human)
    return metrics


def candidates(stage: RlaifLabelStage, ctx: StageContext, rows: Any) -> tuple[list[list[str]], dict]:
    """Each prompt's answers: sampled from the policy (kept in candidates.jsonl, so a resumed stage
    judges the same ones), or taken from the data."""
    if stage.policy is None:
        return given_answers(rows), {"source": "data"}
    path = ctx.out_dir / artifacts.CANDIDATES
    if ctx.resume and path.exists():
        saved = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        if len(saved) == len(rows):
            return saved, {"source": "policy", "resumed": True}
    answers, sampling = sample(stage, ctx, list(rows["prompt"]))
    text = "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers)
    on_main(artifacts.write_atomic, path, text)
    return answers, sampling


def sample(stage: RlaifLabelStage, ctx: StageContext, prompts: list[Any]) -> tuple[list[list[str]], dict]:
    """The policy's candidates, the prompts split over every rank (`generation.generate_all`)."""
    options = stage.sampling
    sampling = Sampling(
        options.max_new_tokens, stage.samples_per_prompt, do_sample=True,
        temperature=options.temperature, top_p=options.top_p,
    )  # fmt: skip
    source = None if options.served else ctx.model(stage.policy)
    with open_engine(source, options) as engine:
        generated = generate_all(
            engine, engine.render(prompts, describe(stage.data)), sampling, batch_size=options.batch_size,
            seed=ctx.seed, description=f"candidates ({stage.samples_per_prompt} per prompt)",
        )  # fmt: skip
    answers = generated.outputs
    distinct = sum(len(set(a)) for a in answers) / max(len(answers), 1)
    return answers, {
        "source": "policy",
        "distinct_per_prompt": distinct,
        "tokens_per_s": generated.stats["tokens_per_s"],
    }
