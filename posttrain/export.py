"""A stage's model as a standalone folder to share, and pushes to the Hugging Face Hub.

    posttrain export runs/demo --stage grpo --to exported/grpo
    posttrain export runs/demo --stage distill/base --to exported/base --push-to-hub me/demo-base

The folder holds the weights (a LoRA adapter merged into its base unless `--no-merge`), the
tokenizer with its chat template, and a model card (posttrain/cards.py): it loads with plain
`transformers` and needs neither posttrain nor the run directory. A recipe's
`train: {push_to_hub: true, hub_model_id: ...}` pushes the stage's finished `model/` the same
way (never the Trainer's checkpoints).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from posttrain import artifacts, cards
from posttrain.errors import PosttrainError, did_you_mean, one_of

HUB_KEYS = ("push_to_hub", "hub_model_id", "hub_private_repo", "hub_revision", "hub_token")


def model_folders(run_dir: Path) -> dict[str, Path]:
    """Every finished model of the run by its name: `sft`, `distill/base`, ..."""
    found = {}
    for stage_dir in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        if artifacts.completed_manifest(stage_dir) is None:
            continue
        for folder in cards.model_dirs(stage_dir):
            found[folder.parent.relative_to(run_dir).as_posix()] = folder
    return found


def find_model(run_dir: Path, stage: str | None) -> Path:
    """The model folder of `stage` (`grpo`, `distill/base`); without one, the run's only model
    or the last stage's."""
    if not run_dir.is_dir():
        raise PosttrainError(f"{run_dir}: no such run directory", fix="pass runs/<name>")
    found = model_folders(run_dir)
    if not found:
        raise PosttrainError(f"{run_dir} has no finished stage with a model", fix="run the recipe first")
    if stage is None:
        order = [s["name"] for s in cards.read_recipe(run_dir).get("stages", [])]
        last = max(
            found, key=lambda name: order.index(name.split("/")[0]) if name.split("/")[0] in order else -1
        )
        siblings = [name for name in found if name.split("/")[0] == last.split("/")[0]]
        if len(siblings) > 1:
            raise PosttrainError(
                f"stage '{last.split('/')[0]}' has {len(siblings)} models",
                fix=f"pass --stage, {one_of(siblings)}",
            )
        return found[last]
    if stage not in found:
        hint = did_you_mean(stage, found) or one_of(found)
        raise PosttrainError(f"{run_dir} has no finished model '{stage}'", fix=hint)
    return found[stage]


def export_model(
    run_dir: Path, stage: str | None, dest: Path, *, merge: bool = True, license: str | None = None
) -> Path:
    """Write a standalone copy of a stage's model, with its card, to `dest` (atomically)."""
    from posttrain.models import load_tokenizer
    from posttrain.recipe import PathModel
    from posttrain.training import merge_adapter

    source = find_model(run_dir, stage)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise PosttrainError(f"{dest} already exists and is not empty", fix="export to a new folder (--to)")
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, ignore=shutil.ignore_patterns(cards.CARD))
    if merge and (partial / "adapter_config.json").exists():
        merge_adapter(partial, load_tokenizer(PathModel(path=str(source))))
    stage_dir = run_dir / source.relative_to(run_dir).parts[0]
    metrics = artifacts.read_json(stage_dir / artifacts.METRICS) or {}
    fingerprint = (artifacts.completed_manifest(stage_dir) or {}).get("fingerprint")
    text = cards.card(run_dir, source, metrics, files=partial, license=license, fingerprint=fingerprint)
    artifacts.write_atomic(partial / cards.CARD, text)
    if dest.exists():
        dest.rmdir()  # empty, checked above
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(dest)
    return dest


def push(folder: Path, repo_id: str, *, private: bool | None = None, revision: str | None = None,
         token: str | None = None) -> str:  # fmt: skip
    """Upload `folder` to the Hub model repo `repo_id` (created when missing); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), revision=revision,
            commit_message=f"Upload {folder.name} with posttrain",
        )  # fmt: skip
    except Exception as e:  # offline, no token, no rights: huggingface_hub raises many kinds
        raise PosttrainError(
            f"pushing {folder} to the Hub repo '{repo_id}' failed: {type(e).__name__}: {str(e).splitlines()[0]}",
            fix="log in with `hf auth login` (or set HF_TOKEN), then `posttrain export RUN --stage S --push-to-hub REPO`",
        ) from None
    return str(url)


def hub_settings(stage: Any) -> dict[str, Any] | None:
    """The Hub keys of a stage's trl config blocks (`train:` ...) when one sets push_to_hub."""
    for block in stage.trainer_blocks():
        train = getattr(stage, block) or {}
        if train.get("push_to_hub"):
            return {key: train.get(key) for key in HUB_KEYS}
    return None


def push_stage(run_dir: Path, stage: str, settings: dict[str, Any], recipe_name: str) -> list[str]:
    """Push every model folder of a finished stage: to `hub_model_id` (default `<recipe>-<stage>`),
    with `-<student>` after it for each student of a distillation."""
    folders = cards.model_dirs(run_dir / stage)
    repo = settings.get("hub_model_id") or f"{recipe_name}-{stage}"
    urls = []
    for folder in folders:
        suffix = f"-{folder.parent.name}" if len(folders) > 1 or folder.parent.name != stage else ""
        urls.append(
            push(
                folder,
                repo + suffix,
                private=settings.get("hub_private_repo"),
                revision=settings.get("hub_revision"),
                token=settings.get("hub_token"),
            )  # fmt: skip
        )
    return urls
