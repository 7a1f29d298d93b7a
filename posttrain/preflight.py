"""Preflight: what a run would trip over, found in seconds and before any weights load.

`posttrain run --dry-run` and `posttrain plan` call `preflight(recipe)` after the schema checks.
For every stage it loads the tokenizer (from the model's folder, or the preset's shipped one)
and the stage's data, then checks what the stage itself checks only when it starts, possibly
hours into a run: the columns the stage and its rewards read, prompt + completion lengths
against the model's positions and the trainer's `max_length` (how many rows would be cut),
and every reward and verifier, run on a few real rows with the reference answer as the
completion. Each finding is one line; a problem makes the command exit 2. A trainer block
with trl's `use_vllm: true` needs a CUDA GPU and an importable vllm here, and in server mode a
server that answers trl's health check (`vllm_findings`; `posttrain run` checks it too).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any

from posttrain.architecture import model_max_positions, model_source
from posttrain.artifacts import completed_manifest
from posttrain.data_tools import HubUnreachable, describe, load_rows, require_columns
from posttrain.data_tools.arithmetic import split_size
from posttrain.data_tools.chat_template import render_chat
from posttrain.errors import PosttrainError
from posttrain.generation import render_prompts
from posttrain.memory import Cluster, ModelShape, params, plan_phases, plan_stage, recommend
from posttrain.models import TOKENIZER_DIR, load_tokenizer
from posttrain.recipe import PresetModel, Recipe, StageBase, SyntheticData, trainer_defaults
from posttrain.rewards import build_reward
from posttrain.rewards.text import completion_text
from posttrain.runner import order_stages
from posttrain.stages import Slot, stage_module

SAMPLE_ROWS = 2000  # rows tokenised per data slot for the length checks
REWARD_ROWS = 4  # rows each reward is run on
SKIPPED_POSITIONS = (
    "max_position_embeddings check skipped: the model's config cannot be read here "
    "(a hub model not in the cache; HF_HUB_OFFLINE)"
)


@dataclass(frozen=True)
class Finding:
    """One line of the preflight: a problem (the run would fail or silently cut data), a warning
    (it would run, much slower than it need) or a fact."""

    where: str  # `stages.<name>` or `eval`
    message: str
    problem: bool = False
    fix: str | None = None
    warning: bool = False

    def line(self) -> str:
        mark = "✗" if self.problem else "!" if self.warning else "✓"
        return f"{mark} {self.where}: {self.message}" + (f" (fix: {self.fix})" if self.fix else "")


def preflight(recipe: Recipe) -> list[Finding]:
    """Every finding for every stage in run order, then for the recipe's `eval:`."""
    slots = [(f"stages.{stage.name}", stage_slot(stage)) for stage in order_stages(recipe)]
    if recipe.eval is not None:
        slots.append(("eval", Slot(None, recipe.eval.data, ("prompt", "answer"), recipe.eval.max_new_tokens)))
    findings: list[Finding] = []
    for where, slot in slots:
        try:
            findings += check_slot(recipe, where, slot) if slot else []
        except PosttrainError as e:
            in_file = ":".join(str(p) for p in (e.file, e.line) if p is not None)
            message = f"{in_file}: {e.message}" if in_file else e.message
            findings.append(Finding(where, message, problem=True, fix=e.fix))
    return findings + packing_findings(recipe) + vllm_findings(recipe)


PACKING_ON_CPU = 7.0  # padding's tokens/s over packing's on 2 CPU cores, bench/sft_bench.py: 6.0 and 7.4


def packing_findings(recipe: Recipe) -> list[Finding]:
    """`packing: true` without an accelerator: trl packs padding-free, one flattened row per batch,
    which flash-attention's varlen kernels keep apart per sequence; a CPU has no such kernel, so
    sdpa attends across the whole flattened row under a block-diagonal mask, quadratic in the
    batch's tokens (bench/README.md, "Why packing is slow on a CPU")."""
    import torch

    if torch.accelerator.is_available():
        return []
    return [
        Finding(
            f"stages.{stage.name}",
            f"`{block}.packing: true` on a CPU trains about {PACKING_ON_CPU:.0f}x slower than padding "
            "(no varlen attention kernel: each batch's rows are attended as one)",
            warning=True,
            fix=f"set {block}.packing: false, or pack on a GPU with flash-attention",
        )
        for stage in order_stages(recipe)
        for block in stage.trainer_blocks()
        if (getattr(stage, block, None) or {}).get("packing")
    ]


VLLM_FIX = "install posttrain[vllm] on a GPU machine, or set use_vllm: false"
HEALTH_TIMEOUT = 5.0  # seconds preflight waits for the server's answer (trl itself retries for minutes)


def vllm_findings(recipe: Recipe) -> list[Finding]:
    """trl's vLLM generation (`use_vllm: true` in a trainer block, e.g. GRPO's): a CUDA GPU is
    visible and vllm imports, and in server mode the server answers trl's `/health` endpoint at
    `vllm_server_base_url` (else `http://vllm_server_host:vllm_server_port`), as trl reaches it."""
    found = []
    for stage in order_stages(recipe):
        for block, config in stage.trainer_blocks().items():
            train = {**trainer_defaults(config), **(getattr(stage, block, None) or {})}
            if not train.get("use_vllm"):
                continue
            where = f"stages.{stage.name}.{block}.use_vllm"
            missing = vllm_problem()
            if missing:
                found.append(
                    Finding(where, f"trl's vLLM generation needs {missing}", problem=True, fix=VLLM_FIX)
                )
            if train.get("vllm_mode") == "server":
                url = vllm_server_url(train)
                down = server_problem(url)
                found.append(
                    Finding(where, down, problem=True, fix=SERVER_FIX)
                    if down
                    else Finding(where, f"the vLLM server at {url} answers")
                )
            elif not missing:
                found.append(
                    Finding(where, f"vLLM colocated ({train['vllm_gpu_memory_utilization']} of each GPU)")
                )
    return found


def require_vllm(recipe: Recipe) -> None:
    """`posttrain run` before any weights load: the first of `vllm_findings`' problems, as one line."""
    for finding in vllm_findings(recipe):
        if finding.problem:
            raise PosttrainError(finding.message, key=finding.where, fix=finding.fix)


def vllm_problem() -> str | None:
    """What this machine lacks for vLLM ('a CUDA GPU, and vllm installed'), or None."""
    import torch

    gpu = torch.cuda.is_available()
    if not gpu:
        installed = find_spec("vllm") is not None
        return "a CUDA GPU (none is visible)" + ("" if installed else " and vllm installed (it is not)")
    try:
        import vllm  # noqa: F401  (a broken install fails here, not after the policy has loaded)
    except Exception as e:  # ImportError, or vllm's own error on a mismatched torch/CUDA
        return f"vllm to import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


SERVER_FIX = (
    "start it (`trl vllm-serve --model MODEL`), or point vllm_server_base_url "
    "(or vllm_server_host and vllm_server_port) at it"
)


def vllm_server_url(train: dict[str, Any]) -> str:
    """The server trl's VLLMClient talks to: `vllm_server_base_url`, else host and port."""
    base = train.get("vllm_server_base_url")
    return base.rstrip("/") if base else f"http://{train['vllm_server_host']}:{train['vllm_server_port']}"


def server_problem(url: str, timeout: float = HEALTH_TIMEOUT) -> str | None:
    """Why `url`'s `/health` (trl's readiness check) does not answer 200, or None when it does."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return f"no vLLM server answers at {url}/health ({reason})"
    return None if status == 200 else f"the vLLM server at {url}/health answers HTTP {status}, not 200"


def stage_slot(stage: StageBase) -> Slot | None:
    """What the stage reads and generates, from its kind's module (None: it reads no data)."""
    return stage_module(stage).slot(stage)


def check_slot(recipe: Recipe, where: str, slot: Slot) -> list[Finding]:
    """Load the slot's data (unless a stage still has to write it), then check its columns and
    lengths and run its rewards on a few rows."""
    data = slot.data
    if (
        isinstance(data, str)
        and data in recipe.stage_names()
        and completed_manifest(recipe.run_dir / data) is None
    ):
        return [Finding(where, f"data comes from stage '{data}' (checked when it has run)")]
    stage_dirs = {name: recipe.run_dir / name for name in recipe.stage_names()}
    try:
        rows = load_rows(data, seed=recipe.seed, stage_dirs=stage_dirs)
    except HubUnreachable as e:  # offline: the recipe may be right; say what was not checked
        return [Finding(where, f"columns, lengths and rewards not checked: {e.message}")]
    if slot.row_format is not None:
        slot.row_format(rows)
    else:
        require_columns(rows, slot.columns, where.removeprefix("stages."), f"{where}.data")
    found = [Finding(where, f"{len(rows)} rows; columns {', '.join(rows.column_names)}")]
    found += row_findings(recipe, where, slot, rows)
    found += repeat_findings(where, data)
    found += length_findings(
        recipe, where, slot.model, rows, slot.new_tokens, slot.max_length, describe(data)
    )
    return found + run_rewards(where, list(slot.rewards), rows, slot.reward_kind)


def row_findings(recipe: Recipe, where: str, slot: Slot, rows: Any) -> list[Finding]:
    """The slot's own check of a sample of rows through the model's tokenizer (SFT: every
    conversation renders, and which loss-masking path it takes)."""
    if slot.row_check is None:
        return []
    try:
        tokenizer = tokenizer_for(recipe, slot.model)
    except Exception:  # the length checks say why no tokenizer loads here
        return []
    sample = rows.select(range(min(len(rows), SAMPLE_ROWS)))
    return [Finding(where, fact) for fact in slot.row_check(tokenizer, sample, describe(slot.data))]


def repeat_findings(where: str, data: Any) -> list[Finding]:
    """A synthetic task asked for more rows than its split holds distinct problems (they repeat)."""
    if not isinstance(data, SyntheticData):
        return []
    size = split_size(data.split, data.digits, data.min_digits, data.ops)
    if size is None or data.n <= size:
        return []
    return [
        Finding(
            where,
            f"n {data.n} exceeds the {size} distinct problems of the {data.digits}-digit {data.split} "
            "split: rows repeat (an evaluation counts each problem once)",
            fix=f"lower n to {size}, or raise digits",
        )
    ]


def require_working_rewards(recipe: Recipe) -> None:
    """Preflight's reward smoke test, which `posttrain run` runs before any weights load: every
    stage's rewards (and verifiers) on a few real rows. The first one that raises, or returns
    the wrong number of scores, stops the run with one line. Data that an earlier stage writes,
    or that lacks a column, is left to the stage (its own check names the reward that needs it)."""
    stage_dirs = {name: recipe.run_dir / name for name in recipe.stage_names()}
    for stage in order_stages(recipe):
        slot = stage_slot(stage)
        if slot is None or not slot.rewards or (isinstance(slot.data, str) and slot.data in stage_dirs):
            continue
        rows = load_rows(slot.data, seed=recipe.seed, stage_dirs=stage_dirs)
        if any(c not in rows.column_names for c in slot.columns or ()):
            continue
        where = f"stages.{stage.name}"
        for finding in run_rewards(where, list(slot.rewards), rows, slot.reward_kind):
            if finding.problem:
                raise PosttrainError(finding.message, key=where, fix=finding.fix)


def length_findings(
    recipe: Recipe,
    where: str,
    model: Any,
    rows: Any,
    new_tokens: int | None,
    max_length: int | None,
    label: str = "data",
) -> list[Finding]:
    """Token lengths of a sample of rows against the model's positions and the trainer's max_length."""
    try:
        tokenizer = tokenizer_for(recipe, model)
    except PosttrainError:  # a model that cannot be found or fetched: the run would fail on it too
        raise
    except Exception as e:  # e.g. a config-only folder
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return [Finding(where, f"length checks skipped: no tokenizer can be loaded here ({reason})")]
    positions = model_max_positions(recipe, model)
    skipped = [] if positions is not None else [Finding(where, SKIPPED_POSITIONS)]
    sample = rows.select(range(min(len(rows), SAMPLE_ROWS)))
    lengths = [len(ids) for ids in token_ids(tokenizer, sample, new_tokens is not None, label)]
    if not lengths:
        return [Finding(where, "no rows", problem=True, fix="check the data's path, split and filters")]
    longest = max(lengths)
    budget = new_tokens or 0
    of = f"of {len(lengths)}" + (" sampled" if len(rows) > len(lengths) else "")
    found = [
        Finding(
            where,
            f"tokens per row: max {longest}, mean {sum(lengths) / len(lengths):.0f}"
            + (f" + {budget} generated" if budget else "")
            + (f" (max_length {max_length})" if max_length else ""),
        )
    ]
    if max_length is not None:
        cut = sum(n > max_length for n in lengths)
        if cut:
            found.append(
                Finding(
                    where,
                    f"{cut} {of} rows exceed max_length {max_length} and would be truncated",
                    problem=True,
                    fix=f"raise train.max_length to {longest} or filter the rows",
                )
            )
    if positions is not None:
        kept = [min(n, max_length or n) for n in lengths]  # what truncation leaves of each row
        over = sum(n + budget > positions for n in kept)
        if over:
            plus = f" plus {budget} new tokens" if budget else ""
            found.append(
                Finding(
                    where,
                    f"{over} {of} rows{plus} exceed the model's max_position_embeddings {positions}",
                    problem=True,
                    fix="shorten the prompts or generate fewer tokens" if budget else "set train.max_length",
                )
            )
    return found + skipped


def token_ids(tokenizer: Any, rows: Any, prompt_only: bool, label: str = "data") -> list[list[int]]:
    """Each row as the model sees it: the rendered prompt where the model generates the rest,
    else the chat template over messages, or prompt + completion."""
    columns = rows.column_names
    if prompt_only and "prompt" in columns:
        texts = render_prompts(tokenizer, list(rows["prompt"]), label)
    elif "messages" in columns:
        texts = [render_chat(tokenizer, m, label, row) for row, m in enumerate(rows["messages"], 1)]
    elif "prompt" in columns:
        texts = render_prompts(tokenizer, list(rows["prompt"]), label)
        for extra in ("completion", "chosen"):
            if extra in columns:
                texts = [t + completion_text(c) for t, c in zip(texts, rows[extra], strict=True)]
                break
    elif "text" in columns:
        texts = list(rows["text"])
    else:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenizer_for(recipe: Recipe, ref: Any) -> Any:
    """The tokenizer a model slot will use, without loading weights (see `model_source`)."""
    source = model_source(recipe, ref)
    if isinstance(source, PresetModel):  # every preset uses the tokenizer that ships with the package
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    return load_tokenizer(source)


def run_rewards(where: str, specs: list[Any], rows: Any, what: str = "reward") -> list[Finding]:
    """Run each reward on a few real rows, with the reference answer (when the data has one) as
    the completion: a reward that raises, or returns the wrong number of scores, fails here."""
    if not specs:
        return []
    batch = rows.select(range(min(len(rows), REWARD_ROWS)))
    prompts = list(batch["prompt"])
    answers = batch["answer"] if "answer" in batch.column_names else [""] * len(batch)
    completions = [_reference_completion(p, a) for p, a in zip(prompts, answers, strict=True)]
    found, scored = [], []
    for spec in specs:
        try:
            reward = build_reward(spec)
        except ValueError:  # needs a model: a stage's weights, checked when the stage starts
            found.append(Finding(where, f"{what} '{spec.name}' reads a model; checked when the stage starts"))
            continue
        columns = {c: list(batch[c]) for c in reward.columns}
        try:
            scores = reward.fn(
                prompts=prompts, completions=completions, log_metric=lambda k, v: None, **columns
            )
            scores = [None if s is None else float(s) for s in scores]
            if len(scores) != len(completions):
                raise ValueError(f"returned {len(scores)} scores for {len(completions)} completions")
        except Exception as e:  # the reward's own bug: show it now, not hours into training
            found.append(
                Finding(
                    where,
                    f"{what} '{reward.name}' failed on {len(batch)} real rows: {type(e).__name__}: {e}",
                    problem=True,
                    fix="try it with `posttrain rewards score`",
                )
            )
            continue
        valid = [s for s in scores if s is not None]
        scored.append(f"{reward.name} {sum(valid) / len(valid):.2f}" if valid else f"{reward.name} None")
    if scored:
        found.append(
            Finding(
                where, f"{what}s on {len(batch)} rows, reference answer as completion: " + ", ".join(scored)
            )
        )
    return found


def _reference_completion(prompt: Any, answer: Any) -> Any:
    """What a perfect R1-style completion of the row looks like (a message list for chat prompts)."""
    text = f"<think>\nThe answer is {answer}.\n</think>\n<answer>{answer}</answer>"
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def memory_findings(recipe: Recipe) -> list[Finding]:
    """The memory plan for the GPUs of this machine; on a CPU-only machine, how to ask for one."""
    import torch

    if not torch.cuda.is_available():
        return [Finding("memory", "no GPU here; `posttrain plan RECIPE --gpu-memory 80GB` plans for GPUs")]
    gpus = torch.cuda.device_count()
    total = torch.cuda.get_device_properties(0).total_memory
    memory = memory_plan(recipe, Cluster(gpus, 1, total))
    best = memory.get("recommended") or {}
    if not best:
        return [
            Finding(
                "memory",
                f"no shipped DeepSpeed setting fits every stage on {gpus} GPU(s)",
                problem=True,
                fix="run `posttrain plan --gpu-memory` for the per-stage table",
            )
        ]
    return [Finding("memory", f"every stage fits {gpus} GPU(s) with {best.get('accelerate_config')}")]


NO_WORKLOAD = "no trainer: inference only"  # what the plan shows for a kind without a `workload`


def memory_plan(recipe: Recipe, cluster: Cluster) -> dict[str, Any]:
    """The memory plan of every stage of a recipe (see `memory.plan_stage`, and `memory.plan_phases`
    for a stage that runs phases one after another) and the recommended setting; each stage's
    Workload (or phases) comes from its kind's module."""
    shapes: dict[int, ModelShape] = {}
    stages = []
    for stage in order_stages(recipe):
        row: dict[str, Any] = {"name": stage.name, "kind": stage.kind}
        estimate = stage_module(stage).workload
        work = estimate(stage, recipe, shapes) if estimate is not None else NO_WORKLOAD
        if isinstance(work, str):
            row["skipped"] = work
        elif isinstance(work, list):
            row.update(plan_phases(work, cluster))
        else:
            row["params"] = params(work)
            row.update(plan_stage(work, cluster))
        stages.append(row)
    return {
        "gpus_per_node": cluster.gpus_per_node,
        "nodes": cluster.nodes,
        "gpu_memory": cluster.gpu_memory,
        "stages": stages,
        "recommended": recommend(stages),
    }
