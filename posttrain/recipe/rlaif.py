"""RLAIF: the judges that compare two answers (`hf`, `likelihood`, `openai`, `reward`
backends, chosen by `backend:` through JUDGE_BACKENDS), the `rlaif_label` stage that has a
policy write candidates and a judge label preference pairs, and the `reward_model` stage that
trains a Bradley-Terry reward model on those pairs."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field

from posttrain.errors import did_you_mean
from posttrain.recipe.base import ModelRef, Strict, tagged_union
from posttrain.recipe.data import DataSpec
from posttrain.recipe.generation import Backend, Endpoint
from posttrain.recipe.stages import GuardSpec, StageBase
from posttrain.recipe.training import LoraSpec, RewardSpec

CONSTITUTIONS = Path(str(files("posttrain.recipes") / "principles"))  # shipped data, no code


def constitution_names() -> list[str]:
    return sorted(p.stem for p in CONSTITUTIONS.glob("*.txt"))


def load_principles(value: list[str] | str) -> list[str]:
    """Principles as a list: given inline, read from a file (one per line, `#` comments), or a
    shipped constitution by name (`default`, `math`)."""
    if isinstance(value, list):
        principles = [p.strip() for p in value if p.strip()]
    else:
        path = Path(value).expanduser()
        if not path.is_file():
            path = CONSTITUTIONS / f"{value}.txt"
        if not path.is_file():
            hint = did_you_mean(value, constitution_names())
            raise ValueError(
                f"principles '{value}' is neither a file nor a shipped constitution "
                f"({', '.join(constitution_names())}){'; ' + hint if hint else ''}"
            )
        lines = path.read_text(encoding="utf-8").splitlines()
        principles = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not principles:
        raise ValueError("principles must hold at least one principle")
    return principles


# A list of principles, or a file of them (one per line), or the name of a constitution that ships in
# recipes/principles/ (`default`, `math`). Stored as the list itself, so editing the file re-runs the stage.
Principles = Annotated[list[str] | str, AfterValidator(load_principles)]


def _labels(value: tuple[str, str]) -> tuple[str, str]:
    if not all(label.strip() for label in value) or value[0].strip() == value[1].strip():
        raise ValueError(f"labels must be two different non-blank strings, got {list(value)}")
    return value


Labels = Annotated[tuple[str, str], AfterValidator(_labels)]  # what the judge answers for "first" / "second"


class HFJudgeSpec(Strict):
    """A local transformers causal LM compares two answers; the verdict is its next-token probability
    of each label after `Verdict:`, so the label is a probability, never parsed text."""

    backend: Literal["hf"]
    model: ModelRef  # a stronger model: a stage name, {path: ...} or a hub id
    principles: Principles = "default"
    labels: Labels = ("A", "B")  # each must be one token right after "Verdict:"
    rationale: bool = False  # write a short rationale first (chain of thought), then read the verdict
    rationale_max_new_tokens: int = Field(256, gt=0)
    chat_template: bool = True  # wrap the judge prompt in the judge's chat template when it has one
    batch_size: int = Field(8, gt=0)
    runtime_keys: ClassVar[frozenset[str]] = frozenset({"batch_size"})


class LikelihoodJudgeSpec(Strict):
    """Preference by a stronger model's mean token log-likelihood of each answer given the prompt:
    p(A better) = sigmoid((ll_A - ll_B) / temperature). Needs no instruction following (offline, tiny)."""

    backend: Literal["likelihood"]
    model: ModelRef
    temperature: float = Field(0.1, gt=0)  # nats of mean log-likelihood per unit of preference logit
    batch_size: int = Field(32, gt=0)
    runtime_keys: ClassVar[frozenset[str]] = frozenset({"batch_size"})


class OpenAIJudgeSpec(Endpoint):
    """Any OpenAI-compatible chat endpoint (vLLM, SGLang, a hosted API). Reads the label's logprobs
    when the server returns them, else the strict `Verdict: A` line of the reply."""

    backend: Literal["openai"]
    principles: Principles = "default"
    labels: Labels = ("A", "B")
    rationale: bool = False
    max_tokens: int = Field(512, gt=0)  # room for the rationale; a bare verdict needs a few tokens
    temperature: float = Field(0.0, ge=0)
    logprobs: bool = True
    top_logprobs: int = Field(20, ge=1, le=20)
    runtime_keys: ClassVar[frozenset[str]] = frozenset(
        {"api_key_env", "max_concurrency", "timeout_s", "max_retries", "backoff_s"}
    )


class RewardJudgeSpec(Strict):
    """Any registered reward as the judge (verifiable domains): p(a better) = sigmoid((r_a - r_b) /
    temperature). The reward reads its dataset columns (e.g. `answer`) from the prompt's row."""

    backend: Literal["reward"]
    reward: RewardSpec  # {name: accuracy}, with the reward's own options
    temperature: float = Field(0.1, gt=0)
    batch_size: int = Field(64, gt=0)
    runtime_keys: ClassVar[frozenset[str]] = frozenset({"batch_size"})


JUDGE_BACKENDS: dict[str, type[Strict]] = {
    "hf": HFJudgeSpec,
    "likelihood": LikelihoodJudgeSpec,
    "openai": OpenAIJudgeSpec,
    "reward": RewardJudgeSpec,
}


JudgeSpec = tagged_union("backend", JUDGE_BACKENDS, "judge")


class SamplingSpec(Backend):
    """How the policy writes its candidate answers (and where: `backend:`, posttrain/recipe/generation.py)."""

    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(32, gt=0)


class RlaifLabelStage(StageBase):
    """AI-judged preference labels (RLAIF, Lee et al. 2023): a policy writes candidate answers,
    a judge compares each pair in both orders, and the averaged soft label is kept when the two
    orders agree and the preference is clear. Writes `<stage>/data/preferences.jsonl`."""

    kind: Literal["rlaif_label"]
    policy: ModelRef | None = (
        None  # writes the candidates; absent: the data's `responses` (or chosen/rejected)
    )
    data: DataSpec  # rows with `prompt` (and `answer`, `human_choice` to measure the judge)
    samples_per_prompt: int = Field(4, ge=2)
    sampling: SamplingSpec = SamplingSpec()
    pairs: Literal["all", "best_vs_worst"] = "all"  # every pair, or one per prompt after judging them all
    max_pairs_per_prompt: int | None = Field(None, gt=0)  # a seeded sample of the pairs when there are more
    judge: JudgeSpec
    min_margin: float = Field(0.05, ge=0, lt=0.5)  # drop a pair whose p(A better) is this close to 0.5
    max_disagreement: float = Field(0.5, ge=0, le=1)  # drop a pair whose two orders differ by more
    start_field: ClassVar[str | None] = "policy"


class RewardModelStage(StageBase):
    """A Bradley-Terry reward model with trl's RewardTrainer: a scalar sequence-classification head
    on `model`, trained on prompt/chosen/rejected pairs, with soft labels as margins. A held-out split
    of prompts measures pairwise accuracy, mean margin and calibration."""

    kind: Literal["reward_model"]
    model: ModelRef | None = None  # a stage name, {path: ...} or {preset: ...}; absent = base_model
    data: DataSpec  # a label stage, or a file with prompt/chosen/rejected (p_chosen optional)
    margin_scale: float = Field(1.0, ge=0)  # margin = scale * logit(p_chosen); 0 turns margins off
    eval_fraction: float = Field(0.1, ge=0, lt=1)  # share of prompts held out for the metrics
    lora: LoraSpec | None = None
    guard: GuardSpec = GuardSpec()  # NaN/inf loss: stop (default) or warn
    train: dict[str, Any] = {}  # keys of trl's RewardConfig
    trainer_config: ClassVar[str | None] = "RewardConfig"
    generative: ClassVar[bool] = False
