"""`posttrain chat`: a quick conversation with a trained model in the terminal.

    posttrain chat runs/demo --stage grpo          # a stage's model/ (default: the last stage's)
    posttrain chat exported/grpo --temperature 0.7
    printf '12+30=\\n/reset\\n7-5=\\n' | posttrain chat runs/demo/sft/model     # replies on stdout

Each turn goes through the model's own chat template with the conversation so far, the way
the stages render prompts (greedy unless --temperature > 0). `/reset` forgets the
conversation; `/exit`, an empty stdin or Ctrl-D ends it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from posttrain.artifacts import read_json
from posttrain.console import console
from posttrain.errors import PosttrainError


def model_folder(path: Path, stage: str | None) -> str:
    """A model folder as given, a stage's model of a run directory, or else a Hub id."""
    from posttrain.export import find_model

    if (path / "config.json").exists() or (path / "adapter_config.json").exists():
        return str(path)
    if path.is_dir():
        return str(find_model(path, stage))
    return str(path)


def chat_loop(
    path: Path,
    stage: str | None,
    *,
    max_new_tokens: int,
    temperature: float,
    system: str | None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> None:
    """Read a user turn per line, answer each through the chat template, until /exit or EOF."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    source, tokenizer, model = _load(model_folder(path, stage))
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = stdin.isatty()
    console.print(f"[dim]chat with {source}: /reset forgets, /exit or Ctrl-D ends[/]", soft_wrap=True)
    while True:
        if interactive:
            console.print("[bold]you>[/] ", end="")
        line = stdin.readline()
        text = line.strip()
        if not line or text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = list(start)
            console.print("[dim](conversation forgotten)[/]")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        reply = answer(model, tokenizer, messages, max_new_tokens, temperature)
        messages.append({"role": "assistant", "content": reply})
        stdout.write(reply + "\n")
        stdout.flush()


def _load(source: str) -> tuple[str, Any, Any]:
    import torch

    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.recipe import PathModel

    model_path = PathModel(path=source)
    architectures = (read_json(Path(source) / "config.json") or {}).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        raise PosttrainError(f"{source} is a reward model: it scores answers, it does not write them",
                             fix="chat with a generative stage's model")  # fmt: skip
    tokenizer = load_tokenizer(model_path)
    if not getattr(tokenizer, "chat_template", None):
        raise PosttrainError(
            f"{source} has no chat template", fix="chat with a model whose tokenizer has one"
        )
    with console.status(f"loading {source}…"):
        model = load_causal_lm(model_path).eval()
    return source, tokenizer, model.to("cuda") if torch.cuda.is_available() else model


def answer(
    model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int, temperature: float
) -> str:
    """The model's next assistant turn after `messages`, rendered by its chat template."""
    from posttrain.generation import generate, render_prompts

    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
    [[reply]], _ = generate(model, tokenizer, render_prompts(tokenizer, [messages]), max_new_tokens=max_new_tokens,
                            batch_size=1, **sampling)  # fmt: skip
    return reply.strip()
