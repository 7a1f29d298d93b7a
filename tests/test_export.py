"""Shipping a model: model cards in every model/, `posttrain export`, pushes to the Hub (mocked:
there is no network), and `posttrain chat` through main() with stdin piped in."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from posttrain.cli import main

RECIPE = """\
name: ship
base_model: {preset: tiny-dense}
stages:
  - name: sft
    kind: sft
    data: {synthetic: arithmetic, n: 32}
    lora: {r: 4, target_modules: [q_proj, v_proj], merge: false}
    train: {max_steps: 2, per_device_train_batch_size: 8, learning_rate: 1.0e-2, logging_steps: 1,
            save_strategy: 'no', push_to_hub: true, hub_model_id: me/ship-sft}
eval: {data: {synthetic: arithmetic, split: test, n: 2}, max_new_tokens: 4}
"""


class FakeHub:
    """huggingface_hub.HfApi's create_repo / upload_folder, recording what would have been sent."""

    def __init__(self) -> None:
        self.repos: list[str] = []
        self.uploads: list[dict] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import huggingface_hub

        hub = self

        def create_repo(self, repo_id, **kwargs):
            hub.repos.append(repo_id)
            return f"https://hub.example/{repo_id}"

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            hub.uploads.append({"repo_id": repo_id, "folder": Path(folder_path),
                                "files": sorted(p.name for p in Path(folder_path).iterdir())})  # fmt: skip

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)


def run_cli(*args: str) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    return 0


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory):
    """A finished one-stage run (LoRA, unmerged) whose recipe pushes to the (fake) Hub."""
    root = tmp_path_factory.mktemp("ship")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE + f"output_dir: {root / 'runs'}\n")
    hub = FakeHub()
    with pytest.MonkeyPatch.context() as patch:
        hub.install(patch)
        assert run_cli("run", recipe) == 0
    return root / "runs", hub


def test_every_stage_model_has_a_card_and_the_recipe_pushes_the_finished_model(shipped) -> None:
    run, hub = shipped
    model = run / "sft" / "model"
    card = ModelCard.load(model / "README.md")
    assert (model / "adapter_config.json").exists()  # merge: false keeps the adapter ...
    assert card.data.library_name == "peft" and {"posttrain", "sft", "lora"} <= set(card.data.tags)
    assert card.data.base_model is None  # ... whose base is a local folder: never a local path here
    assert "Template for" not in card.text and "## How it was made" in card.text  # not peft's blank one
    assert "held-out accuracy (greedy)" in card.text and "fingerprint `" in card.text
    # Pushed once, the stage's model/ with its card, never the Trainer's checkpoints.
    assert hub.repos == ["me/ship-sft"]
    assert [u["folder"] for u in hub.uploads] == [model] and "README.md" in hub.uploads[0]["files"]
    manifest = json.loads((run / "sft" / "manifest.json").read_text())
    assert "model/README.md" in {f["path"] for f in manifest["files"]}  # written before COMPLETE


def test_export_merges_the_lora_and_loads_with_plain_transformers(
    shipped, tmp_path: Path, monkeypatch
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models import load_causal_lm
    from posttrain.recipe import PathModel

    run, _ = shipped
    hub = FakeHub()
    hub.install(monkeypatch)
    dest = tmp_path / "exported"
    assert run_cli("export", run, "--stage", "sft", "--to", dest, "--push-to-hub", "me/ship",
                   "--license", "mit") == 0  # fmt: skip
    assert not (dest / "adapter_config.json").exists() and (dest / "config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(dest)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "12+30="}], return_tensors="pt",
                                        add_generation_prompt=True, return_dict=True)["input_ids"]  # fmt: skip
    reference = load_causal_lm(PathModel(path=str(run / "sft" / "model")))  # the adapter, merged on load
    base = AutoModelForCausalLM.from_pretrained(run / "presets" / "tiny-dense-seed0")
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.allclose(logits, reference(ids).logits, atol=1e-3)  # the trained adapter, merged
        base_logits = base(ids).logits
        assert (logits[..., : base_logits.shape[-1]] - base_logits).abs().max() > 1e-2
    card = ModelCard.load(dest / "README.md")
    assert card.data.license == "mit" and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation" and card.data.base_model is None
    assert "resolved-recipe hash `" in card.text and "synthetic arithmetic (n=32" in card.text
    assert [u["folder"] for u in hub.uploads] == [dest] and hub.repos == ["me/ship"]

    # --no-merge keeps the adapter; an existing folder is never overwritten.
    adapter = tmp_path / "adapter"
    assert run_cli("export", run, "--to", adapter, "--no-merge") == 0
    assert (adapter / "adapter_config.json").exists()
    data = ModelCard.load(adapter / "README.md").data.to_dict()
    assert data["library_name"] == "peft" and "base_model" not in data and "base_model_relation" not in data
    assert run_cli("export", run, "--to", adapter) == 2
    assert run_cli("export", run, "--stage", "sfft", "--to", tmp_path / "x") == 2


def test_a_card_names_a_hub_base_model_and_hub_datasets_never_local_paths(tmp_path: Path) -> None:
    import yaml

    from posttrain import cards

    run = tmp_path / "run"
    stages = [
        {"name": "sft", "kind": "sft", "model": None, "data": {"path": "openai/gsm8k", "split": "train"}},
        {"name": "grpo", "kind": "grpo", "model": "sft", "data": {"path": str(tmp_path / "rows.jsonl")},
         "rewards": [{"name": "accuracy", "weight": 1.0}]},
    ]  # fmt: skip
    resolved = {"name": "r", "base_model": {"path": "Qwen/Qwen2.5-0.5B"}, "stages": stages}
    (run / "grpo" / "model").mkdir(parents=True)
    (run / "recipe.resolved.yaml").write_text(yaml.safe_dump(resolved))
    (run / "grpo" / "model" / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    metrics = {"eval": {"accuracy": 0.5, "n": 10}, "rl": {"reward": {"first": 0.2, "last": 0.6}}}
    card = ModelCard(cards.card(run, run / "grpo" / "model", metrics))
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B" and card.data.base_model_relation == "finetune"
    assert card.data.datasets == ["openai/gsm8k"] and {"sft", "grpo"} <= set(card.data.tags)
    assert "1. **sft**" in card.text and "1. **grpo**" in card.text and "rewards accuracy ×1" in card.text
    assert "training reward | 0.200 → 0.600" in card.text and "loss" not in card.text.split("## Metrics")[1]
    local = dict(resolved, base_model={"path": str(tmp_path)})
    (run / "recipe.resolved.yaml").write_text(yaml.safe_dump(local))
    assert ModelCard(cards.card(run, run / "grpo" / "model", metrics)).data.base_model is None


def test_chat_answers_each_line_of_stdin_through_the_chat_template(shipped, monkeypatch, capsys) -> None:
    from posttrain.generation import generate, render_prompts
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.recipe import PathModel

    run, _ = shipped
    monkeypatch.setattr(sys, "stdin", io.StringIO("12+30=\n7-5=\n/reset\n7-5=\n"))
    assert run_cli("chat", run, "--stage", "sft", "--max-new-tokens", "6") == 0
    replies = capsys.readouterr().out.splitlines()
    assert len(replies) == 3

    source = PathModel(path=str(run / "sft" / "model"))
    tokenizer, model = load_tokenizer(source), load_causal_lm(source).eval()

    def reply(messages):
        [[text]], _ = generate(model, tokenizer, render_prompts(tokenizer, [messages]), max_new_tokens=6)
        return text.strip()

    first = reply([{"role": "user", "content": "12+30="}])
    second = reply([{"role": "user", "content": "12+30="}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "7-5="}])  # fmt: skip
    assert replies == [first, second, reply([{"role": "user", "content": "7-5="}])]  # /reset forgot


def test_chat_refuses_a_reward_model(tmp_path: Path, cli) -> None:
    folder = tmp_path / "rm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    code, _, err = cli("chat", folder)
    assert code == 2 and "is a reward model" in err
