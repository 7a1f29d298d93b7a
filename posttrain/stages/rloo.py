"""RLOO stage: REINFORCE leave-one-out (Ahmadian et al. 2024) via trl's RLOOTrainer.

Like GRPO, the policy samples `num_generations` completions per prompt and the rewards score
them; each completion's advantage is its reward minus the mean reward of the *other*
completions of its prompt (no per-group scaling unless `normalize_advantages`), and trl keeps a
KL penalty to the reference (beta 0.05 by default). It takes the same `rewards:` list, data,
guards and preflight checks as grpo and writes the same `samples.jsonl` and metrics: this module
is grpo's, run with RLOOTrainer.

    - name: rloo
      kind: rloo
      model: sft
      data: {synthetic: arithmetic, n: 2000, seed: 1}
      rewards: [{name: accuracy, weight: 1.0}, {name: format, weight: 0.2}]
      train: {num_generations: 8, learning_rate: 5.0e-5, max_completion_length: 48}
"""

from posttrain.context import StageContext
from posttrain.recipe import RLOOStage
from posttrain.stages import grpo

Metrics = grpo.Metrics


def run(stage: RLOOStage, ctx: StageContext) -> Metrics:
    from trl import RLOOTrainer

    return grpo.reinforce(stage, ctx, RLOOTrainer, in_memory_samples=True)


check = grpo.check
slot = grpo.slot
workload = grpo.workload
headline = grpo.headline
outcome = grpo.outcome
loss_panel = grpo.loss_panel
