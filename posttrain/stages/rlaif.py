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

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from posttrain import artifacts
from posttrain.data_tools import require_columns
from posttrain.judges import build_judge, load_local_model, principles_hash
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
from posttrain.recipe import OpenAIJudgeSpec, PresetModel, RewardJudgeSpec, RlaifLabelStage

if TYPE_CHECKING:
    from posttrain.runner import StageContext

PREFERENCES = "data/preferences.jsonl"
CANDIDATES = "candidates.jsonl"
SUMMARY = "label_metrics.json"


def run(stage: RlaifLabelStage, ctx: StageContext) -> dict[str, Any]:
    stage = presets_resolved(stage, ctx)
    if ctx.is_main:
        artifacts.write_json(ctx.out_dir / SUMMARY, label(stage, ctx))
    ctx.barrier()
    return artifacts.read_json(ctx.out_dir / SUMMARY)


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


def label(stage: RlaifLabelStage, ctx: StageContext) -> dict[str, Any]:
    from transformers import set_seed

    set_seed(ctx.seed)
    rows = ctx.data(stage.data)
    require_columns(rows, ["prompt"], "rlaif_label", "data")
    prompts = list(rows["prompt"])
    answers, sampling = candidates(stage, ctx, rows)

    judge = build_judge(stage.judge, ctx)
    cache = JudgeCache(ctx.run_dir / "cache" / "judges" / f"{judge.id}.jsonl")
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
    artifacts.write_atomic(ctx.out_dir / PREFERENCES, text)

    metrics = {
        "prompts": len(prompts),
        **label_metrics(judged, decisions),
        "candidates": sampling,
        "judge": {"id": judge.id, "cache_hits": cache.hits, "cache_misses": cache.misses},
        **judge_accuracy(rows, answers, judged, decisions, from_data=stage.policy is None),
    }
    if not records:  # the counts stay on disk, to see why
        error = nothing_kept(metrics, stage.min_margin, stage.max_disagreement)
        artifacts.write_json(ctx.out_dir / artifacts.METRICS, {**metrics, "problem": str(error)})
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
    path = ctx.out_dir / CANDIDATES
    if ctx.resume and path.exists():
        saved = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        if len(saved) == len(rows):
            return saved, {"source": "policy", "resumed": True}
    answers, sampling = sample(stage, ctx, list(rows["prompt"]))
    artifacts.write_atomic(path, "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers))
    return answers, sampling


def sample(stage: RlaifLabelStage, ctx: StageContext, prompts: list[Any]) -> tuple[list[list[str]], dict]:
    from posttrain.generation import generate, render_prompts
    from posttrain.training import release

    tokenizer, model = load_local_model(stage.policy, ctx)
    options = stage.sampling
    answers, speed = generate(
        model,
        tokenizer,
        render_prompts(tokenizer, prompts),
        max_new_tokens=options.max_new_tokens,
        batch_size=options.batch_size,
        num_return_sequences=stage.samples_per_prompt,
        do_sample=True,
        temperature=options.temperature,
        top_p=options.top_p,
        description=f"candidates ({stage.samples_per_prompt} per prompt)",
    )
    release(model)
    distinct = sum(len(set(a)) for a in answers) / max(len(answers), 1)
    return answers, {
        "source": "policy",
        "distinct_per_prompt": distinct,
        "tokens_per_s": speed["tokens_per_s"],
    }
