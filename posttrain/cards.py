"""Model cards: the README.md in every `model/` a stage writes and in every exported model.

A card is Hub metadata (YAML between `---` lines, read by huggingface_hub's ModelCard) and a
body that says how the model was made, from the run directory alone:

    base_model: Qwen/Qwen2.5-1.5B     # only a Hub id, never a local path; absent for a preset
    base_model_relation: finetune     # or adapter (an unmerged LoRA)
    license: other                    # the base model's card's, when one is on disk; else --license
    tags: [posttrain, trl, sft, grpo]
    datasets: [openai/gsm8k]          # Hub datasets the stage chain trained on

then the chain of stages from the base model to this one (kind, data, rewards, fingerprints),
the recipe's hash, the package versions, and the stage's metrics.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache

from posttrain import artifacts

CARD = "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
LOCAL_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow", ".yaml"}
KIND_TAGS = {"sft": "sft", "grpo": "grpo", "reward_model": "reward-model", "distill": "distillation"}
UPSTREAM = ("model", "teacher")  # the slots that name the stage a model was trained from


def hub_id(value: Any) -> str | None:
    """`value` when it reads as a Hub id (`org/name` or `name`) and names no local file or folder."""
    if not isinstance(value, str) or not HUB_ID.match(value):
        return None
    path = Path(value).expanduser()
    return None if path.exists() or path.suffix in LOCAL_SUFFIXES else value


def read_recipe(run_dir: Path) -> dict[str, Any]:
    import yaml

    path = run_dir / "recipe.resolved.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else {}


def lineage(recipe: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The stages whose models led to stage `name`, the first one first, `name` last."""
    stages = {s["name"]: s for s in recipe.get("stages", [])}
    chain = [stages[name]]
    while True:
        refs = [chain[0].get(k) for k in UPSTREAM]  # a stage's name, else a {path: ...} / {preset: ...} slot
        up = next((ref for ref in refs if isinstance(ref, str) and ref in stages), None)
        if up is None or stages[up] in chain:
            return chain
        chain.insert(0, stages[up])


def base_model(recipe: dict[str, Any], chain: list[dict[str, Any]], student: dict | None) -> Any:
    """The model slot the chain started from: a student's own init, else the first stage's model."""
    if student is not None:
        return {"path": student["path"]} if student.get("path") else None
    first = next((chain[0].get(k) for k in UPSTREAM if chain[0].get(k) is not None), None)
    return first if isinstance(first, dict) else recipe.get("base_model")


def data_line(spec: Any) -> str:
    """A data slot in words: `synthetic arithmetic (n=5000, digits=2)`, a file, a Hub id, a mix."""
    if spec is None:
        return ""
    if isinstance(spec, str):
        return f"the data of stage `{spec}`" if not hub_id(spec) else f"`{spec}`"
    if "synthetic" in spec:
        return (
            f"synthetic {spec['synthetic']} (n={spec['n']}, digits={spec['digits']}, split {spec['split']})"
        )
    if "mix" in spec:
        return "a mix of " + "; ".join(data_line(source["data"]) for source in spec["mix"])
    split = f", split {spec['split']}" if spec.get("split") else ""
    return f"`{spec['path']}`{split}" + (f" (first {spec['n']} rows)" if spec.get("n") else "")


def hub_datasets(spec: Any) -> list[str]:
    if isinstance(spec, dict) and "mix" in spec:
        return [d for source in spec["mix"] for d in hub_datasets(source["data"])]
    found = hub_id(spec.get("path")) if isinstance(spec, dict) else None
    return [found] if found else []


def metric_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The numbers that say what the model can do, as (what, value) rows."""
    rows: list[tuple[str, str]] = []
    evaluation = metrics.get("eval") or {}
    for key, label in (("accuracy", "held-out accuracy (greedy)"), ("pass_at_1", "pass@1"),
                       ("pass_at_k", "pass@k"), ("maj_at_k", "maj@k"), ("format_rate", "format rate")):  # fmt: skip
        if isinstance(evaluation.get(key), int | float):
            rows.append((label, f"{evaluation[key]:.3f} (n={evaluation.get('n')})"))
    held_out = metrics.get("held_out") or {}
    if isinstance(held_out.get("accuracy"), int | float):
        rows.append(("held-out pairwise accuracy", f"{held_out['accuracy']:.3f} (n={held_out['n']})"))
    right = held_out.get("right_vs_wrong") or {}
    if isinstance(right.get("accuracy"), int | float):
        rows.append(("right-vs-wrong pairs", f"{right['accuracy']:.3f} (n={right['n']})"))
    if isinstance(metrics.get("accuracy_vs_teacher"), int | float):
        rows.append(("accuracy vs the teacher", f"{metrics['accuracy_vs_teacher']:.0%}"))
    reward = (metrics.get("rl") or {}).get("reward")
    if reward:
        rows.append(("training reward", f"{reward['first']:.3f} → {reward['last']:.3f}"))
    train = metrics.get("train") or {}
    train = train.get("sft") or train.get("logits") or train  # a student's phases
    if train.get("loss_first") is not None and not reward:
        rows.append(("training loss", f"{train['loss_first']:.3f} → {train['loss_last']:.3f}"))
    if train.get("steps"):
        rows.append(("training steps", str(train["steps"])))
    return rows


def card(
    run_dir: Path,
    model_dir: Path,
    metrics: dict[str, Any],
    *,
    files: Path | None = None,
    license: str | None = None,
    fingerprint: str | None = None,
) -> str:
    """The README.md text for `model_dir` (`<stage>/model` or `<stage>/<student>/model` of `run_dir`),
    describing the weights in `files` (default `model_dir`; an export's merged copy)."""
    files = files or model_dir
    stage, *student_part = model_dir.relative_to(run_dir).parts[:-1]
    student_name = student_part[0] if student_part else None
    recipe = read_recipe(run_dir)
    chain = lineage(recipe, stage)
    student = next((s for s in chain[-1].get("students", []) if s["name"] == student_name), None)
    own = (metrics.get("students") or {}).get(student_name, {}) if student_name else metrics
    adapter = artifacts.read_json(files / "adapter_config.json")
    base = base_model(recipe, chain, student)
    if adapter is not None:  # an adapter applies to the model it was trained on, not to the chain's root
        base = {"path": adapter.get("base_model_name_or_path")}
    base_id = hub_id(base.get("path")) if isinstance(base, dict) else None
    config = artifacts.read_json(files / "config.json") or {}
    classifier = any(a.endswith("ForSequenceClassification") for a in config.get("architectures", []))
    tags = ["posttrain", "trl", *dict.fromkeys(KIND_TAGS[s["kind"]] for s in chain if s["kind"] in KIND_TAGS)]
    tags += ["moe"] if config.get("n_routed_experts") or config.get("num_local_experts") else []
    tags += ["lora", "peft"] if adapter is not None else []
    data = ModelCardData(
        base_model=base_id,
        base_model_relation=("adapter" if adapter is not None else "finetune") if base_id else None,
        license=license or base_license(base_id, base) or "other",
        library_name="peft" if adapter is not None else "transformers",
        pipeline_tag="text-classification" if classifier else "text-generation",
        tags=tags,
        datasets=list(dict.fromkeys(d for s in chain for d in hub_datasets(s.get("data")))) or None,
    )
    body = _body(recipe, chain, student_name, base, own, fingerprint, run_dir)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _body(
    recipe: dict, chain: list[dict], student: str | None, base: Any, metrics: dict,
    fingerprint: str | None, run_dir: Path,
) -> str:  # fmt: skip
    stage = chain[-1]["name"]
    title = f"{stage}/{student}" if student else stage
    start = _start(base, chain[-1], student)
    lines = [f"# {recipe.get('name', run_dir.name)}: {title}", "",
             f"Trained with posttrain from the recipe `{recipe.get('name')}` "
             f"(resolved-recipe hash `{artifacts.canonical_hash(recipe)}`).", "",
             "## How it was made", "", f"Started from {start}, then:", ""]  # fmt: skip
    for s in chain:
        manifest = artifacts.read_json(run_dir / s["name"] / artifacts.MANIFEST) or {}
        fp = fingerprint if s["name"] == stage else manifest.get("fingerprint")
        parts = [f"{s['kind']}", data_line(s.get("data"))]
        parts += [f"rewards {_weights(s['rewards'])}"] if s.get("rewards") else []
        parts += [f"verifiers {', '.join(v['name'] for v in s['verifiers'])}"] if s.get("verifiers") else []
        parts += ["LoRA"] if s.get("lora") else []
        parts += [f"fingerprint `{fp}`"] if fp else []
        lines.append(f"1. **{s['name']}**: " + "; ".join(p for p in parts if p))
    if student:
        lines.append(
            f"1. **{student}**: a dense student trained on the verified traces of `{chain[-1].get('teacher')}`"
        )
    versions = artifacts.package_versions()
    lines += ["", "Packages: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    rows = metric_rows(metrics)
    if rows:
        lines += [
            "## Metrics",
            "",
            "| metric | value |",
            "|---|---|",
            *(f"| {a} | {b} |" for a, b in rows),
            "",
        ]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'path = "path/to/this/folder"  # or its Hub repo id',
              "tokenizer = AutoTokenizer.from_pretrained(path)",
              "model = AutoModelForCausalLM.from_pretrained(path)", "```", "",
              "Or talk to it: `posttrain chat path/to/this/folder`."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _start(base: Any, stage: dict, student: str | None) -> str:
    if isinstance(base, dict) and base.get("path"):
        return f"`{base['path']}`"
    if isinstance(base, dict) and base.get("preset"):
        return f"the preset `{base['preset']}` (random-initialised)"
    spec = next((s for s in stage.get("students", []) if s["name"] == student), {})
    if spec.get("preset"):
        return f"the preset `{spec['preset']}` (random-initialised)"
    return f"a dense config derived from `{spec.get('dense_from')}` (random-initialised)"


def _weights(rewards: list[dict]) -> str:
    return ", ".join(f"{r['name']} ×{r.get('weight', 1.0):g}" for r in rewards)


def base_license(base_id: str | None, base: Any) -> str | None:
    """The license in the base model's own card, when it is on disk (a local folder, the Hub cache)."""
    path: Any = None
    if base_id is not None:
        path = try_to_load_from_cache(base_id, CARD)
    elif isinstance(base, dict) and base.get("path"):
        path = Path(base["path"]).expanduser() / CARD
    if not isinstance(path, str | Path) or not Path(path).is_file():
        return None
    try:
        return ModelCard.load(path).data.license
    except Exception:  # a README without metadata, or with broken YAML, tells no license
        return None


def model_dirs(stage_dir: Path) -> list[Path]:
    """Every model folder a stage wrote: `model/`, and `<student>/model/` of a distillation."""
    found = [stage_dir / "model", *sorted(stage_dir.glob("*/model"))]
    return [d for d in found if (d / "config.json").exists() or (d / "adapter_config.json").exists()]


def write_cards(run_dir: Path, stage: str, metrics: dict[str, Any], fingerprint: str | None) -> list[Path]:
    """A README.md card in every model folder of the stage (over peft's blank template)."""
    written = []
    for folder in model_dirs(run_dir / stage):
        artifacts.write_atomic(folder / CARD, card(run_dir, folder, metrics, fingerprint=fingerprint))
        written.append(folder / CARD)
    return written
