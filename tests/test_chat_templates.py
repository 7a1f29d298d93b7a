"""Any chat template: SFT trains on every assistant turn and nothing else; refused turns are one line.

The templates are the families' real ones (tests/data/chat_templates), on the shipped byte-level
tokenizer with each family's special tokens (tests/families.py). Where trl ships a marker
(`_training`) variant of a template, the mask posttrain derives from the original is checked
against trl's marker mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from families import FAMILIES, build_family, family_tokenizer

from posttrain.data_tools.chat_mask import (
    DERIVED,
    MARKERS,
    derived_mask,
    marker_mask,
    masking_path,
    row_mask,
    trained_text,
)
from posttrain.data_tools.chat_template import read_chat_template
from posttrain.errors import PosttrainError

CONVERSATION = [
    {"role": "user", "content": "QUESTION ONE"},
    {"role": "assistant", "content": "ANSWER ONE"},
    {"role": "user", "content": "QUESTION TWO"},
    {"role": "assistant", "content": "ANSWER TWO"},
]
TEMPLATES = sorted({family["template"]: name for name, family in FAMILIES.items()}.items())


def shipped_tokenizer():
    from transformers import AutoTokenizer

    from posttrain.models import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def squeeze(text: str) -> str:
    """Text without whitespace: the console wraps long error lines."""
    return "".join(text.split())


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- the mask


@pytest.mark.parametrize(("template", "family"), TEMPLATES)
def test_every_assistant_turn_and_its_end_of_turn_train_and_nothing_else(template, family):
    tokenizer = family_tokenizer(family)
    assert masking_path(tokenizer) == DERIVED  # no hub template here has generation markers
    ids, mask = derived_mask(tokenizer, CONVERSATION, "chats.jsonl", 1)
    trained = trained_text(tokenizer, ids, mask)
    eos = tokenizer.eos_token
    squeezed = trained.replace(" ", "").replace("\n", "").replace("<think></think>", "")  # Qwen3's last turn
    assert squeezed == f"ANSWERONE{eos}ANSWERTWO{eos}", trained
    assert "QUESTION" not in trained


def test_the_preset_template_takes_trls_path_and_the_derived_mask_agrees():
    tokenizer = shipped_tokenizer()
    assert masking_path(tokenizer) == MARKERS  # the demo's path is unchanged: trl's mask
    conversation = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    assert derived_mask(tokenizer, conversation, "x", 1) == marker_mask(tokenizer, conversation, "x", 1)


# trl's training variants put a few more tokens inside the markers than the derived mask: the
# newline after the end-of-turn token (generation stops before it) and, for DeepSeek-V3, the
# `<｜Assistant｜>` header (the prompt the model is given ends with it).
MARKER_EXTRAS = {"llama3": set(), "qwen2_5": {"\n"}, "gemma": {"\n"}, "deepseekv3": {"<｜Assistant｜>"}}


@pytest.mark.parametrize("template", sorted(MARKER_EXTRAS))
def test_derived_mask_against_trls_marker_mask(template):
    family = next(name for name, f in FAMILIES.items() if f["template"] == template)
    tokenizer = family_tokenizer(family)
    conversation = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
    if template == "gemma":
        conversation = CONVERSATION  # Gemma has no system turn
    ids, derived = derived_mask(tokenizer, conversation, "x", 1)
    tokenizer.chat_template = read_chat_template(f"{template}_training")
    marker_ids, markers = marker_mask(tokenizer, conversation, "x", 1)
    assert ids == marker_ids  # the training variant renders the same text
    assert all(m for d, m in zip(derived, markers, strict=True) if d), "derived must be inside the markers"
    extra = {tokenizer.decode([t]) for t, d, m in zip(ids, derived, markers, strict=True) if m and not d}
    assert extra == MARKER_EXTRAS[template]
    agree = sum(d == m for d, m in zip(derived, markers, strict=True))
    print(f"{template}: derived == markers on {agree}/{len(ids)} tokens ({sum(markers)} marked)")


def test_qwen3_reasoning_of_earlier_turns_is_dropped_and_not_trained():
    """Qwen3 renders an earlier turn without its reasoning once a later user turn follows (the
    template is not prefix-preserving): the mask follows what the template really renders."""
    tokenizer = family_tokenizer("qwen3")
    conversation = [dict(turn) for turn in CONVERSATION]
    conversation[1]["content"] = "<think>\nPONDER\n</think>\n\nANSWER ONE"
    ids, mask = derived_mask(tokenizer, conversation, "x", 1)
    text, trained = tokenizer.decode(ids), trained_text(tokenizer, ids, mask)
    assert "PONDER" not in text
    assert trained == "ANSWER ONE<|im_end|><think>\n\n</think>\n\nANSWER TWO<|im_end|>"


def test_prompt_completion_and_text_rows():
    tokenizer = family_tokenizer("llama")
    row = {"prompt": CONVERSATION[:1], "completion": CONVERSATION[1:2]}
    ids, mask = row_mask(tokenizer, row, "x", 1)
    assert trained_text(tokenizer, ids, mask) == "ANSWER ONE<|eot_id|>"
    ids, mask = row_mask(tokenizer, {"text": "all of it"}, "x", 1)
    assert all(mask) and tokenizer.decode(ids) == "all of it"


# --------------------------------------------------------------------------- turns a template refuses


@pytest.mark.parametrize(
    ("family", "messages", "message"),
    [
        ("gemma2", [{"role": "system", "content": "s"}, *CONVERSATION], "System role not supported"),
        ("mixtral", [CONVERSATION[0], CONVERSATION[0], CONVERSATION[1]], "roles must alternate"),
        ("llama", [{"role": "bot", "content": "hi"}], "turn 1 has role 'bot', not one of"),
        ("llama", json.dumps(CONVERSATION), "`messages` is a str, not a list of turns"),
        ("llama", [{"role": "user", "content": "q"}], "no assistant turn carries loss"),
        (None, [{"role": "user", "content": "q"}], "no assistant turn carries loss"),  # the preset: markers
    ],
)
def test_a_refused_conversation_is_one_line_naming_the_row(family, messages, message):
    from datasets import Dataset

    from posttrain.stages.sft import prepare_conversations

    tokenizer = family_tokenizer(family) if family else shipped_tokenizer()
    rows = Dataset.from_list([{"messages": messages}])
    with pytest.raises(PosttrainError, match=message) as info:
        prepare_conversations(rows, tokenizer, masking_path(tokenizer), "chats.jsonl")
    assert str(info.value).startswith("chats.jsonl:1: ")


def test_chat_template_names_a_file_or_a_builtin(tmp_path):
    assert "<|start_header_id|>" in read_chat_template("llama3")
    path = tmp_path / "mine.jinja"
    path.write_text("{{ messages }}")
    assert read_chat_template(str(path)) == "{{ messages }}"
    with pytest.raises(PosttrainError, match="did you mean 'llama3'"):
        read_chat_template("llama-3")


# --------------------------------------------------------------------------- through the stages


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    """A tiny Mixtral with Mixtral-Instruct's template: no markers, and none trl could patch in."""
    return build_family("mixtral", tmp_path_factory.mktemp("models") / "mixtral")


SFT_RECIPE = """
name: chat
base_model: {{path: {model}}}
stages:
  - name: sft
    kind: sft
    data: {{path: {data}}}
    {extra}
    train: {{max_steps: 2, per_device_train_batch_size: 4, logging_steps: 1, save_strategy: "no",
             gradient_checkpointing: false}}
"""


def test_sft_on_a_template_without_markers_trains_assistant_turns(write_recipe, cli, tmp_path, mixtral):
    data = write_rows(tmp_path / "chats.jsonl", [{"messages": CONVERSATION}] * 8)
    recipe = write_recipe(SFT_RECIPE.format(model=mixtral, data=data, extra=""))
    code, out, err = cli("plan", recipe)
    assert code == 0, out + err
    assert "✓ stages.sft: loss on assistant turns via spans posttrain derives from the template" in out + err
    code, out, err = cli("run", recipe)
    assert code == 0, err
    metrics = json.loads((tmp_path / "runs" / "sft" / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2 and metrics["train"]["loss_first"] > 0
    saved = json.loads((tmp_path / "runs" / "sft" / "model" / "tokenizer_config.json").read_text())
    assert saved["eos_token"] == "</s>"


def test_preflight_and_the_stage_name_the_refused_row_before_training(write_recipe, cli, tmp_path, mixtral):
    rows = [{"messages": CONVERSATION}] * 3 + [{"messages": [CONVERSATION[0], CONVERSATION[0]]}]
    data = write_rows(tmp_path / "chats.jsonl", rows)
    recipe = write_recipe(SFT_RECIPE.format(model=mixtral, data=data, extra=""))
    code, out, err = cli("plan", recipe)
    assert code == 2
    assert (
        f"✗ stages.sft: {data}:4: the chat template rejects this conversation: Conversation roles"
        in out + err
    )
    code, _, err = cli("run", recipe)
    assert code == 2 and squeeze(f"{data}:4: stages.sft: the chat template rejects") in squeeze(err)
    assert "Traceback" not in err and not (tmp_path / "runs" / "sft" / "checkpoints").exists()


def test_a_recipe_chat_template_trains_and_ships_with_the_model(write_recipe, cli, tmp_path, mixtral):
    data = write_rows(tmp_path / "chats.jsonl", [{"messages": CONVERSATION}] * 8)
    recipe = write_recipe(SFT_RECIPE.format(model=mixtral, data=data, extra="chat_template: llama3_training"))
    code, out, err = cli("plan", recipe)
    assert code == 0 and "via the template's {% generation %} markers (trl's mask)" in out + err
    code, _, err = cli("run", recipe)
    assert code == 0, err
    saved = (tmp_path / "runs" / "sft" / "model" / "chat_template.jinja").read_text()
    assert saved == read_chat_template("llama3_training")
    code, _, err = cli(
        "validate", write_recipe(SFT_RECIPE.format(model=mixtral, data=data, extra="chat_template: lama3"))
    )
    assert code == 2 and "chat_template" in err and "did you mean 'llama3'" in err


def test_a_system_prompt_gemma_refuses_is_caught_before_grpo_and_eval(write_recipe, cli, tmp_path):
    gemma = build_family("gemma2", tmp_path / "gemma")
    recipe = write_recipe(
        f"""
        name: sys
        base_model: {{path: {gemma}}}
        stages:
          - name: grpo
            kind: grpo
            data: {{synthetic: arithmetic, n: 8}}
            system_prompt: Think first.
            rewards: [{{name: accuracy}}]
            train: {{num_generations: 2, per_device_train_batch_size: 2, max_completion_length: 8, max_steps: 1}}
        eval: {{data: {{synthetic: arithmetic, split: test, n: 4, system_prompt: Think first.}}}}
        """
    )
    code, out, err = cli("plan", recipe)
    lines = (out + err).splitlines()
    refused = "the chat template rejects this conversation: System role not supported"
    assert code == 2
    assert any(x.startswith(f"✗ stages.grpo: synthetic:arithmetic:train:1: {refused}") for x in lines), lines
    assert any(x.startswith(f"✗ eval: synthetic:arithmetic:test:1: {refused}") for x in lines), lines
    code, _, err = cli("run", recipe)
    assert code == 2 and squeeze(refused) in squeeze(err) and "Traceback" not in err
    assert not (tmp_path / "runs" / "grpo" / "checkpoints").exists()


def test_data_inspect_shows_the_loss_mask(cli, tmp_path, mixtral):
    data = write_rows(tmp_path / "chats.jsonl", [{"messages": CONVERSATION}])
    code, out, err = cli(
        "data", "inspect", data, "--model", mixtral, "--loss-mask", "--json", "--out", tmp_path
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["examples"][0]["trained_text"] == "ANSWER ONE</s>ANSWER TWO</s>"
    assert "derives from the template" in summary["masking"]
    code, out, err = cli("data", "inspect", data, "--model", mixtral, "--loss-mask", "--out", tmp_path)
    assert code == 0 and "⟦ANSWER ONE</s>⟧" in out + err and "[INST] QUESTION ONE [/INST]" in out + err
