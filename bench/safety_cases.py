"""Run every bad input and fault of issue 17 through the `posttrain` CLI and record what a user sees.

Each case gets a fresh folder, runs `python -m posttrain ...` there, and records the exit code,
the line that matters (the `error:` line, else a traceback's last line, else the first line),
how long it took, and what it did to the run directory. Run it before and after a change:

    python bench/safety_cases.py --out /tmp/cases-after.json            # all cases
    python bench/safety_cases.py --only lock --out /tmp/lock.json       # cases whose name has "lock"
    python bench/safety_cases.py --compare /tmp/cases-before.json /tmp/cases-after.json

Not a test (nothing here passes or fails); tests/test_safety.py holds the assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

PY = sys.executable
CASES: dict[str, Callable[[Path], dict]] = {}


def case(name: str) -> Callable:
    def register(fn: Callable) -> Callable:
        CASES[name] = fn
        return fn

    return register


def env(offline: bool = True) -> dict[str, str]:
    out = {**os.environ, "COLUMNS": "250", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if offline:
        out |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    else:
        out.pop("HF_HUB_OFFLINE", None)
        out.pop("HF_DATASETS_OFFLINE", None)
    return out


def posttrain(cwd: Path, *args: str, offline: bool = True, timeout: float = 600) -> dict:
    started = time.time()
    try:
        proc = subprocess.run(
            [PY, "-m", "posttrain", *args], cwd=cwd, env=env(offline), capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        code, out = proc.returncode, proc.stderr + proc.stdout
    except subprocess.TimeoutExpired as e:
        code, out = (
            "timeout",
            (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else "",
        )
    return {"rc": code, "line": key_line(out), "seconds": round(time.time() - started, 1), "_out": out}


def key_line(out: str) -> str:
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    for prefixes in (("error", "✗"), ("warning:",)):
        for line in lines:
            if line.startswith(prefixes):
                return line
    if any(line.startswith("Traceback") for line in lines):
        raised = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", line)]
        return "Traceback ... " + (raised[-1] if raised else lines[-1])
    return lines[0] if lines else ""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def recipe_file(folder: Path, stages: str, top: str = "", name: str = "case",
                base: str = "{preset: tiny-deepseek-v3}") -> Path:  # fmt: skip
    """folder/recipe.yaml: a name, a base model, `top` (more top-level keys) and the `stages` list."""
    head = f"name: {name}\nbase_model: {base}\n{textwrap.dedent(top)}stages:\n"
    return write(folder / "recipe.yaml", head + textwrap.indent(textwrap.dedent(stages), "  "))


SFT_TRAIN = "{max_steps: 2, per_device_train_batch_size: 8, logging_steps: 1, save_strategy: 'no'}"


def sft_recipe(folder: Path, data: str = "{synthetic: arithmetic, n: 32}", train: str = SFT_TRAIN,
               extra: str = "", name: str = "case") -> Path:  # fmt: skip
    stage = f"- name: sft\n  kind: sft\n  data: {data}\n  train: {train}\n"
    return recipe_file(folder, stage + (f"  {extra}\n" if extra else ""), name=name)


# --------------------------------------------------------------------------- 1: user files


@case("1a user folder read by the stage")
def user_folder_read(tmp: Path) -> dict:
    data = tmp / "runs" / "case" / "sft" / "mine.jsonl"
    write(
        data, "".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(16))
    )
    recipe = sft_recipe(tmp, data=f"{{path: {data}}}")
    result = posttrain(tmp, "run", str(recipe))
    result["observed"] = f"user file {'kept' if data.exists() else 'DELETED'}"
    return result


@case("1b user folder with a stray file")
def user_folder_stray(tmp: Path) -> dict:
    notes = write(tmp / "runs" / "case" / "sft" / "notes.txt", "my notes\n")
    recipe = sft_recipe(tmp)
    result = posttrain(tmp, "run", str(recipe))
    result["observed"] = f"notes.txt {'kept' if notes.exists() else 'DELETED'}"
    return result


# --------------------------------------------------------------------------- 2: damaged stages


def two_stage(tmp: Path, with_eval: bool = False) -> Path:
    evaluation = "eval: {data: {synthetic: arithmetic, split: test, n: 4}, max_new_tokens: 4}\n"
    sft2 = "{max_steps: 1, per_device_train_batch_size: 8, save_strategy: 'no'}"
    stages = f"""\
        - {{name: sft, kind: sft, data: {{synthetic: arithmetic, n: 32}}, train: {SFT_TRAIN}}}
        - {{name: sft2, kind: sft, model: sft, data: {{synthetic: arithmetic, n: 16, seed: 1}}, train: {sft2}}}
        """
    return recipe_file(tmp, stages, top=evaluation if with_eval else "")


_FINISHED: dict[bool, Path] = {}


def finished_run(tmp: Path, with_eval: bool = False) -> Path:
    """A recipe whose first stage is COMPLETE (built once per session, copied per case)."""
    if with_eval not in _FINISHED:
        base = Path(tempfile.mkdtemp(prefix="finished-"))
        recipe = two_stage(base, with_eval)
        done = posttrain(base, "run", str(recipe), "--only", "sft")
        assert done["rc"] == 0, done["_out"][-3000:]
        _FINISHED[with_eval] = base
    shutil.copytree(_FINISHED[with_eval], tmp, dirs_exist_ok=True)
    return tmp / "recipe.yaml"


def damaged(tmp: Path, damage: Callable[[Path], None], with_eval: bool = False, *args: str) -> dict:
    recipe = finished_run(tmp, with_eval)
    damage(tmp / "runs" / "case" / "sft")
    result = posttrain(tmp, "run", str(recipe), *args)
    verdict = "rebuilt" if "sft (sft): running" in result["_out"] else "reused as cached"
    result["observed"] = (
        f"sft {verdict}; sft2 {'COMPLETE' if (tmp / 'runs/case/sft2/COMPLETE').exists() else 'not complete'}"
    )
    return result


@case("2a model.safetensors deleted")
def weights_deleted(tmp: Path) -> dict:
    return damaged(tmp, lambda d: (d / "model" / "model.safetensors").unlink())


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


@case("2b model.safetensors corrupted (same size)")
def weights_corrupted(tmp: Path) -> dict:
    return damaged(tmp, lambda d: flip_byte(d / "model" / "model.safetensors"))


@case("2c metrics.json truncated")
def metrics_truncated(tmp: Path) -> dict:
    return damaged(tmp, lambda d: (d / "metrics.json").write_text((d / "metrics.json").read_text()[:20]))


@case("2d eval_samples.jsonl truncated")
def eval_samples_truncated(tmp: Path) -> dict:
    def cut(d: Path) -> None:
        path = d / "eval_samples.jsonl"
        path.write_text(path.read_text()[:30])

    return damaged(tmp, cut, True)


@case("2e tokenizer.json deleted")
def tokenizer_deleted(tmp: Path) -> dict:
    return damaged(tmp, lambda d: (d / "model" / "tokenizer.json").unlink())


@case("2f --only sft2 on a damaged sft")
def only_downstream(tmp: Path) -> dict:
    return damaged(tmp, lambda d: (d / "model" / "model.safetensors").unlink(), False, "--only", "sft2")


# --------------------------------------------------------------------------- 3: lock

LONG_TRAIN = "{max_steps: 400, per_device_train_batch_size: 8, logging_steps: 50, save_steps: 5}"


def start_long(tmp: Path) -> tuple[subprocess.Popen, Path]:
    recipe = sft_recipe(tmp, data="{synthetic: arithmetic, n: 64}", train=LONG_TRAIN)
    log = open(tmp / "first.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [PY, "-m", "posttrain", "run", str(recipe)], cwd=tmp, env=env(), stdout=log, stderr=log
    )
    deadline = time.time() + 180
    while not list((tmp / "runs/case/sft/checkpoints").glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, (tmp / "first.log").read_text()[-2000:]
        time.sleep(0.2)
    return proc, recipe


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return "killed" if proc.returncode == -9 else f"exited {proc.returncode}"


@case("3a second run, same recipe, while the first trains")
def second_run_same(tmp: Path) -> dict:
    first, recipe = start_long(tmp)
    try:
        result = posttrain(tmp, "run", str(recipe), timeout=60)
        result["observed"] = f"first run {'still running' if first.poll() is None else 'ended'}"
    finally:
        stop(first)
    return result


@case("3b second run, other --set, while the first trains")
def second_run_other(tmp: Path) -> dict:
    first, recipe = start_long(tmp)
    try:
        result = posttrain(
            tmp, "run", str(recipe), "--set", "stages.sft.train.learning_rate=1e-3", timeout=60
        )
        ckpts = list((tmp / "runs/case/sft/checkpoints").glob("checkpoint-*"))
        result["observed"] = f"first run's checkpoints: {len(ckpts)} left"
    finally:
        stop(first)
    return result


@case("3c run after the first was killed (stale lock)")
def stale_lock(tmp: Path) -> dict:
    first, recipe = start_long(tmp)
    stop(first)
    result = posttrain(tmp, "run", str(recipe), "--set", "stages.sft.train.max_steps=6", timeout=300)
    result["observed"] = "resumed/ran" if (tmp / "runs/case/sft/COMPLETE").exists() else "no COMPLETE"
    return result


@case("3d plan while a run trains")
def plan_while_running(tmp: Path) -> dict:
    first, recipe = start_long(tmp)
    try:
        result = posttrain(tmp, "plan", str(recipe), "--no-preflight", timeout=60)
        result["observed"] = "; ".join(
            line.strip() for line in result["_out"].splitlines() if "lock" in line.lower() or "live" in line
        )[:200]
    finally:
        stop(first)
    return result


# --------------------------------------------------------------------------- 4: rewards without signal

REWARDS = """\
def none_reward(completions, **kwargs):
    return [None] * len(completions)

def short_reward(completions, **kwargs):
    return [1.0]

def raising_reward(completions, **kwargs):
    raise RuntimeError("the grader is down")
"""


def grpo_recipe(tmp: Path, reward: str) -> Path:
    write(tmp / "my_rewards.py", REWARDS)
    train = "{max_steps: 6, per_device_train_batch_size: 4, num_generations: 4, max_completion_length: 8, " \
            "logging_steps: 1, save_strategy: 'no'}"  # fmt: skip
    return recipe_file(tmp, f"- {{name: grpo, kind: grpo, data: {{synthetic: arithmetic, n: 32}}, "
                            f"rewards: [{{name: {reward}}}], train: {train}}}\n")  # fmt: skip


def grpo_case(tmp: Path, reward: str) -> dict:
    result = posttrain(tmp, "run", str(grpo_recipe(tmp, reward)))
    result["observed"] = "COMPLETE" if (tmp / "runs/case/grpo/COMPLETE").exists() else "not complete"
    return result


@case("4a GRPO reward returns None always")
def reward_none(tmp: Path) -> dict:
    return grpo_case(tmp, "my_rewards:none_reward")


@case("4b GRPO reward returns the wrong number of scores")
def reward_short(tmp: Path) -> dict:
    return grpo_case(tmp, "my_rewards:short_reward")


@case("4c GRPO reward raises on every batch")
def reward_raises(tmp: Path) -> dict:
    return grpo_case(tmp, "my_rewards:raising_reward")


# --------------------------------------------------------------------------- 5: nothing trained


@case("5a num_train_epochs: -1")
def zero_steps(tmp: Path) -> dict:
    recipe = sft_recipe(
        tmp, train="{num_train_epochs: -1, per_device_train_batch_size: 8, save_strategy: 'no'}"
    )
    result = posttrain(tmp, "run", str(recipe))
    result["observed"] = "COMPLETE" if (tmp / "runs/case/sft/COMPLETE").exists() else "not complete"
    return result


@case("5b rows with empty prompt and completion")
def empty_text(tmp: Path) -> dict:
    data = write(
        tmp / "empty.jsonl", "".join(json.dumps({"prompt": "", "completion": ""}) + "\n" for _ in range(16))
    )
    result = posttrain(tmp, "run", str(sft_recipe(tmp, data=f"{{path: {data}}}")))
    result["observed"] = "COMPLETE" if (tmp / "runs/case/sft/COMPLETE").exists() else "not complete"
    return result


# --------------------------------------------------------------------------- 6: bad data and recipes


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def data_cases(
    name: str, make: Callable[[Path], Path], commands: tuple[str, ...] = ("run", "plan", "inspect")
) -> None:
    for command in commands:

        def run_one(tmp: Path, command: str = command) -> dict:
            data = make(tmp)
            if command == "inspect":
                return posttrain(tmp, "data", "inspect", str(data))
            return posttrain(tmp, command, str(sft_recipe(tmp, data=f"{{path: {data}}}")))

        CASES[f"{name} ({command})"] = run_one


data_cases("6a empty data file", lambda tmp: write(tmp / "empty.jsonl", ""))
data_cases(
    "6b non-UTF-8 byte",
    lambda tmp: write_bytes(
        tmp / "latin1.jsonl", b"".join(b'{"prompt": "caf\xe9 %d", "completion": "x"}\n' % i for i in range(8))
    ),
)
data_cases(
    "6c messages with unknown roles",
    lambda tmp: write(
        tmp / "roles.jsonl",
        "".join(
            json.dumps({"messages": [{"role": "human", "content": "1+1="}, {"role": "bot", "content": "2"}]})
            + "\n"
            for _ in range(8)
        ),
    ),  # fmt: skip
    ("run", "plan"),
)
data_cases(
    "6d messages stored as a string",
    lambda tmp: write(
        tmp / "string.jsonl",
        "".join(
            json.dumps({"messages": json.dumps([{"role": "user", "content": "1+1="}])}) + "\n"
            for _ in range(8)
        ),
    ),
    ("run", "plan"),
)


def parquet_int_prompt(tmp: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp / "ints.parquet"
    pq.write_table(pa.table({"prompt": list(range(8)), "completion": ["x"] * 8}), path)
    return path


data_cases("6e int prompt column in Parquet", parquet_int_prompt, ("run", "plan"))


@case("6f reward module raises on import (validate)")
def reward_import_raises(tmp: Path) -> dict:
    write(
        tmp / "broken_rewards.py",
        "x = 1 / 0\n\ndef reward(completions, **kw):\n    return [0.0] * len(completions)\n",
    )
    stage = "- {name: grpo, kind: grpo, data: {synthetic: arithmetic, n: 32}, rewards: [{name: broken_rewards:reward}]}\n"
    recipe = recipe_file(tmp, stage)
    return posttrain(tmp, "validate", str(recipe))


@case("6g LoRA target that matches no module (run)")
def lora_no_match(tmp: Path) -> dict:
    return posttrain(tmp, "run", str(sft_recipe(tmp, extra="lora: {target_modules: [no_such_proj]}")))


@case("6h max_length shorter than every row (run)")
def max_length_run(tmp: Path) -> dict:
    train = "{max_steps: 2, per_device_train_batch_size: 8, max_length: 4, save_strategy: 'no'}"
    result = posttrain(tmp, "run", str(sft_recipe(tmp, train=train)))
    result["observed"] = "COMPLETE" if (tmp / "runs/case/sft/COMPLETE").exists() else "not complete"
    return result


@case("6h max_length shorter than every row (plan)")
def max_length_plan(tmp: Path) -> dict:
    train = "{max_steps: 2, per_device_train_batch_size: 8, max_length: 4, save_strategy: 'no'}"
    return posttrain(tmp, "plan", str(sft_recipe(tmp, train=train)))


def hub_recipe(tmp: Path) -> Path:
    stage = f"- {{name: sft, kind: sft, data: {{synthetic: arithmetic, n: 32}}, train: {SFT_TRAIN}}}\n"
    return recipe_file(tmp, stage, base="{path: posttrain-nobody/no-such-model}")


@case("6i hub id, HF_HUB_OFFLINE=1, not cached (run)")
def hub_offline_run(tmp: Path) -> dict:
    return posttrain(tmp, "run", str(hub_recipe(tmp)))


@case("6i hub id, HF_HUB_OFFLINE=1, not cached (plan)")
def hub_offline_plan(tmp: Path) -> dict:
    return posttrain(tmp, "plan", str(hub_recipe(tmp)))


@case("6j hub id, no network (run)")
def hub_network_run(tmp: Path) -> dict:
    return posttrain(tmp, "run", str(hub_recipe(tmp)), offline=False, timeout=180)


@case("6j hub id, no network (plan)")
def hub_network_plan(tmp: Path) -> dict:
    return posttrain(tmp, "plan", str(hub_recipe(tmp)), offline=False, timeout=180)


# --------------------------------------------------------------------------- 7, 8: eval size, escape


@case("7 eval n: 5000 on the 1-digit test split")
def eval_size(tmp: Path) -> dict:
    data = "{synthetic: arithmetic, split: test, digits: 1, n: 5000}"
    recipe = recipe_file(
        tmp, f"- {{name: eval, kind: evaluate, data: {data}, max_new_tokens: 2, batch_size: 512}}\n"
    )
    result = posttrain(tmp, "run", str(recipe))
    metrics = (
        json.loads((tmp / "runs/case/eval/metrics.json").read_text())
        if (tmp / "runs/case/eval/metrics.json").exists()
        else {}
    )
    result["observed"] = f"reported n={metrics.get('eval', {}).get('n')}"
    return result


@case("8 name: ../../escape")
def escape(tmp: Path) -> dict:
    work = tmp / "a" / "b"
    work.mkdir(parents=True)
    recipe = sft_recipe(work, name="../../escape")
    result = posttrain(work, "run", str(recipe))
    outside = work.parent / "escape"  # runs/../../escape, seen from work/
    result["observed"] = f"{outside} {'WRITTEN' if outside.exists() else 'not written'}"
    return result


# --------------------------------------------------------------------------- 9: unclear messages


def malformed_jsonl(tmp: Path) -> Path:
    rows = [json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) for i in range(6)]
    rows[3] = '{"prompt": "3+1=", "completion": "4"'  # line 4 lacks its brace
    return write(tmp / "bad.jsonl", "\n".join(rows) + "\n")


data_cases("9a malformed JSONL line 4", malformed_jsonl)


@case("9b YAML tab (validate)")
def yaml_tab(tmp: Path) -> dict:
    recipe = tmp / "recipe.yaml"
    recipe.write_text("name: case\nbase_model: {preset: tiny-deepseek-v3}\nstages:\n\t- name: sft\n")
    return posttrain(tmp, "validate", str(recipe))


@case("9c synthetic n: -5 (validate)")
def synthetic_negative(tmp: Path) -> dict:
    return posttrain(tmp, "validate", str(sft_recipe(tmp, data="{synthetic: arithmetic, n: -5}")))


def score_file(tmp: Path, text: bytes, *rewards: str) -> dict:
    path = tmp / "rows.jsonl"
    path.write_bytes(text)
    write(tmp / "my_rewards.py", REWARDS)
    args = [a for r in rewards for a in ("--reward", r)]
    return posttrain(tmp, "rewards", "score", str(path), *args)


@case("9d rewards score, file with a BOM")
def score_bom(tmp: Path) -> dict:
    return score_file(tmp, b'\xef\xbb\xbf{"completion": "<answer>2</answer>", "answer": "2"}\n', "accuracy")


@case("9e rewards score, completion is a number")
def score_number(tmp: Path) -> dict:
    return score_file(
        tmp, b'{"completion": 2, "answer": "2"}\n{"completion": null, "answer": "2"}\n', "accuracy"
    )


@case("9f rewards score, reward returns the wrong number of scores")
def score_short(tmp: Path) -> dict:
    rows = b"".join(b'{"completion": "x%d"}\n' % i for i in range(4))
    result = score_file(tmp, rows, "my_rewards:short_reward")
    result["observed"] = next(
        (line.strip() for line in result["_out"].splitlines() if line.startswith("short_reward")), ""
    )
    return result


# --------------------------------------------------------------------------- 10: trl fixed choices


def grpo_train(tmp: Path, train: str) -> Path:
    train = f"{{per_device_train_batch_size: 4, num_generations: 4, max_completion_length: 8, {train}}}"
    stage = f"- {{name: grpo, kind: grpo, data: {{synthetic: arithmetic, n: 32}}, rewards: [{{name: accuracy}}], train: {train}}}\n"
    return recipe_file(tmp, stage)


for _key, _value in (("loss_type", "not_a_loss"), ("scale_rewards", "grop"), ("importance_sampling_level", "tokn"),
                     ("lr_scheduler_type", "cosin")):  # fmt: skip
    CASES[f"10 {_key}: {_value} (validate)"] = lambda tmp, k=_key, v=_value: posttrain(
        tmp, "validate", str(grpo_train(tmp, f"{k}: {v}"))
    )
CASES["10 loss_type: not_a_loss (run --dry-run)"] = lambda tmp: posttrain(
    tmp, "run", "--dry-run", str(grpo_train(tmp, "loss_type: not_a_loss"))
)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--merge", action="store_true", help="update --out with these cases, keep the others")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    results = {}
    for name, fn in CASES.items():
        if args.only and args.only not in name:
            continue
        tmp = Path(tempfile.mkdtemp(prefix="case-"))
        try:
            result = fn(tmp)
        except Exception as e:  # the harness's own failure: record it, go on
            result = {"rc": "harness", "line": f"{type(e).__name__}: {str(e)[:300]}", "seconds": 0}
        result["tail"] = result.pop("_out", "")[-2500:]
        results[name] = result
        print(f"{name:58s} rc={result['rc']!s:8s} {result['seconds']:6.1f}s  {result['line'][:160]}"
              + (f"  [{result['observed']}]" if result.get("observed") else ""), flush=True)  # fmt: skip
        shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        old = json.loads(args.out.read_text()) if args.merge and args.out.exists() else {}
        args.out.write_text(json.dumps({**old, **results}, indent=1, ensure_ascii=False))


def compare(before: Path, after: Path) -> None:
    """A markdown table: each case, before and after (exit code, line, what it did)."""
    old, new = json.loads(before.read_text()), json.loads(after.read_text())
    print("| case | before | after |\n|---|---|---|")
    for name in new:
        cells = []
        for result in (old.get(name), new[name]):
            if result is None:
                cells.append("-")
                continue
            observed = f" [{result['observed']}]" if result.get("observed") else ""
            line = result["line"].strip("─ ")  # a stage's title rule, as `run` prints it
            cells.append(
                f"{result['rc']}: `{line[:140]}`{observed} ({result['seconds']}s)".replace("|", "\\|")
            )
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
