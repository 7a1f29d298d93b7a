"""Evaluate stage: score a model on a held-out set (and optionally lm-eval suites); train nothing.

Use it to measure the base model before training, a model from outside the recipe, or a
stage's model with other settings (more samples, another data set). It writes metrics.json
(`eval`) and eval_samples.jsonl, no model; a `gate:` on it stops the pipeline like any other.

    - name: eval-sft
      kind: evaluate
      model: sft                       # a stage, {path: ...}, {preset: ...}; absent = base_model
      data: {path: data/test.jsonl, columns: {prompt: question}}   # absent = the recipe's eval.data
      k: 8
      temperature: 0.6
      gate: {min_pass_at_1: 0.5}

Every rank generates for a share of the prompts. With `server: {base_url, model}` the stage
evaluates a served model (`vllm serve deepseek-ai/DeepSeek-R1 ...`) and loads nothing itself.
"""

from posttrain.context import StageContext
from posttrain.evaluation import evaluate_model
from posttrain.metrics import EvalMetrics, Timed
from posttrain.recipe import EvalOptions, EvalSpec, EvaluateStage
from posttrain.stages import Slot


class Metrics(Timed):
    eval: EvalMetrics
    model: str  # the path evaluated


def run(stage: EvaluateStage, ctx: StageContext) -> Metrics:
    spec = EvalSpec(data=stage.data, **{field: getattr(stage, field) for field in EvalOptions.model_fields})
    if spec.server is not None:  # a served model: nothing to load here
        return {
            "eval": evaluate_model(None, spec, ctx),
            "model": f"{spec.server.model} at {spec.server.base_url}",
        }
    source = ctx.model(stage.model)
    return {"eval": evaluate_model(source, spec, ctx), "model": source.path}


check = None  # the schema's evaluation checks cover it (data, gates, harness tasks)
workload = None  # trains nothing
headline = None  # the report's table row is its result
outcome = None  # trains nothing: its evaluation is the table row
loss_panel = None


def slot(stage: EvaluateStage) -> Slot:
    """Preflight: prompts with reference answers, each followed by max_new_tokens new tokens."""
    return Slot(stage.model, stage.data, ("prompt", "answer"), stage.max_new_tokens)
