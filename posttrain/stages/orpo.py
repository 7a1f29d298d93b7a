"""ORPO stage: odds-ratio preference optimisation with trl's experimental ORPOTrainer.

ORPO (Hong et al. 2024) is SFT on each chosen answer plus a penalty on the log odds of the
rejected one against it, in one loss and with no reference model: the policy's memory is all it
costs. It reads the same pairs and soft labels as the dpo stage and goes through the same
`dpo.optimise` (held-out split, LoRA, MoE, resume, metrics); its held-out implicit reward is
beta times the policy's mean token log-probability, as ORPO's own reward is. The trainer is
experimental in trl 1.16 (`trl.experimental.orpo`): its API may change with trl.

    - name: orpo
      kind: orpo
      model: sft
      data: label
      train: {beta: 0.1, learning_rate: 8.0e-6}   # any key of trl.experimental.orpo.ORPOConfig
"""

from posttrain.context import StageContext
from posttrain.memory import Workload
from posttrain.recipe import ORPOStage, Recipe
from posttrain.stages import dpo

Metrics = dpo.Metrics


def run(stage: ORPOStage, ctx: StageContext) -> Metrics:
    from trl.experimental.orpo import ORPOTrainer

    return dpo.optimise(stage, ctx, ORPOTrainer, dpo.preference_rows, reference_free=True)


check = dpo.check_common  # ORPO has one loss; MoE and max_length as for dpo
slot = dpo.slot
headline = dpo.headline
outcome = dpo.outcome
loss_panel = dpo.loss_panel


def workload(stage: ORPOStage, recipe: Recipe, shapes: dict) -> Workload | str:
    """Chosen and rejected in one batch, and no reference model."""
    return dpo.pair_workload(stage, recipe, shapes, reference=False)
