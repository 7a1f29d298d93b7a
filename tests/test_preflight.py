"""Preflight (`run --dry-run`, `plan`): data, columns, lengths and rewards checked before any weights load."""

import json
from pathlib import Path

PIPELINE = """
name: pf
base_model: {preset: tiny-deepseek-v3}
stages:
  - {name: sft, kind: sft, data: {synthetic: arithmetic, n: 50}}
  - name: grpo
    kind: grpo
    model: sft
    data: {synthetic: arithmetic, n: 40, seed: 1}
    rewards: [{name: accuracy}, {name: format, weight: 0.25}]
    train: {max_completion_length: 32}
eval: {data: {synthetic: arithmetic, split: test, n: 20}, max_new_tokens: 32}
"""


def test_a_sound_recipe_passes_with_one_line_per_fact(write_recipe, cli, tmp_path):
    code, out, err = cli("run", write_recipe(PIPELINE), "--dry-run")
    text = out + err
    assert code == 0, text
    assert "preflight: ok" in text
    assert "✓ stages.sft: 50 rows; columns" in text
    assert "✓ stages.grpo: tokens per row: max 8" in text and "+ 32 generated" in text
    assert "rewards on 4 rows, reference answer as completion: accuracy 1.00, format 1.00" in text
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


def test_a_reward_that_raises_fails_in_seconds(write_recipe, cli, tmp_path, monkeypatch):
    (tmp_path / "preflight_user_rewards.py").write_text(
        "def strict(completions, answer, **kwargs):\n"
        "    return [float(int(a) == int(c)) for a, c in zip(answer, completions)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = write_recipe(PIPELINE.replace("{name: accuracy}", "{name: 'preflight_user_rewards:strict'}"))
    code, out, err = cli("plan", recipe)
    text = out + err
    assert code == 2, text
    line = next(x for x in text.splitlines() if "strict" in x)
    assert line.startswith("✗ stages.grpo: reward 'strict' failed on 4 real rows: TypeError: int() argument")
    assert "posttrain rewards score" in line and "preflight: 1 problem(s)" in text


def test_rows_cut_by_max_length_and_positions_are_counted(write_recipe, cli, tmp_path):
    rows = [{"prompt": "1+1=", "completion": "2"}] * 3 + [{"prompt": "x" * 700, "completion": "y"}]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(
        f"""
        name: pf
        base_model: {{preset: tiny-deepseek-v3}}
        stages:
          - {{name: sft, kind: sft, data: {{path: {data}}}, train: {{max_length: 64}}}}
          - {{name: label, kind: rlaif_label, policy: sft, data: {{path: {data}}},
              judge: {{backend: likelihood, model: sft}}}}
        """
    )
    code, out, err = cli("plan", recipe, "--json")
    assert code == 2
    problems = [f for f in json.loads(out)["preflight"] if f["problem"]]
    assert [(f["where"], f["message"].split(" and ")[0]) for f in problems] == [
        ("stages.sft", "1 of 4 rows exceed max_length 64"),
        ("stages.label", "1 of 4 rows plus 128 new tokens exceed the model's max_position_embeddings 512"),
    ]
    assert problems[0]["fix"] == "raise train.max_length to 703 or filter the rows"


def test_missing_columns_and_data_of_unfinished_stages(write_recipe, cli, tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    recipe = write_recipe(
        f"""
        name: pf
        base_model: {{preset: tiny-deepseek-v3}}
        stages:
          - {{name: label, kind: rlaif_label, data: {{synthetic: arithmetic, n: 8}},
              judge: {{backend: reward, reward: {{name: accuracy}}}}}}
          - {{name: rm, kind: reward_model, data: label}}
          - {{name: rm2, kind: reward_model, data: {{path: {data}}}}}
        """
    )
    code, out, err = cli("plan", recipe)
    lines = (out + err).splitlines()
    assert code == 2
    assert "✓ stages.rm: data comes from stage 'label' (checked when it has run)" in lines
    assert any(
        x.startswith("✗ stages.rm2: ") and "needs column 'rejected', but the data has: prompt, chosen" in x
        for x in lines
    ), lines


def test_shipped_demo_passes_preflight(cli, tmp_path):
    demo = Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml"
    code, out, err = cli("plan", demo, "--set", f"output_dir={tmp_path}")
    assert code == 0 and "preflight: ok" in out + err, out + err


def test_packing_on_a_cpu_is_warned_with_the_measured_slowdown(write_recipe, cli, monkeypatch):
    import torch

    from posttrain.preflight import PACKING_ON_CPU

    recipe = write_recipe(PIPELINE.replace("n: 50}}", "n: 50}, train: {packing: true}}"))
    code, out, err = cli("run", recipe, "--dry-run")
    text = out + err
    assert code == 0, text  # a warning, not a problem: the run would work, slowly
    line = next(x for x in text.splitlines() if "packing: true" in x)
    assert line.startswith(f"! stages.sft: `train.packing: true` on a CPU trains about {PACKING_ON_CPU:.0f}x")
    assert "fix: set train.packing: false" in line and PACKING_ON_CPU > 2
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    code, out, err = cli("run", recipe, "--dry-run")
    assert "packing: true" not in out + err  # with an accelerator (and flash-attention) packing may pay


VLLM_GRPO = """
name: vl
base_model: {preset: tiny-deepseek-v3}
stages:
  - name: grpo
    kind: grpo
    data: {synthetic: arithmetic, n: 8}
    rewards: [{name: accuracy}]
    train: {max_completion_length: 32, use_vllm: true}
"""


def test_use_vllm_without_a_gpu_fails_before_any_weights_load(write_recipe, cli, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine's case, on any machine
    recipe = write_recipe(VLLM_GRPO)
    code, out, err = cli("run", recipe)
    assert code == 2, out + err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "stages.grpo.train.use_vllm" in lines[0] and "a CUDA GPU (none is visible)" in lines[0]
    assert "install posttrain[vllm] on a GPU machine, or set use_vllm: false" in lines[0]
    assert not (tmp_path / "runs" / "grpo").exists()  # nothing started
    code, out, err = cli("plan", recipe)
    assert code == 2 and "✗ stages.grpo.train.use_vllm: trl's vLLM generation needs a CUDA GPU" in out + err
    code, out, err = cli("validate", recipe)  # the recipe itself is fine: it validates anywhere
    assert code == 0, err


def test_vllm_server_mode_checks_trls_health_endpoint(write_recipe, monkeypatch):
    import http.server
    import socket
    import threading

    from posttrain import preflight
    from posttrain.loading import load

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    up = f"http://127.0.0.1:{server.server_port}"
    try:
        assert preflight.server_problem(up) is None
        assert "answers HTTP 404" in preflight.server_problem(f"{up}/v1")
        assert "no vLLM server answers at" in preflight.server_problem(f"http://127.0.0.1:{closed}")
        monkeypatch.setattr(preflight, "vllm_problem", lambda: None)  # as on a GPU machine with vllm
        server_mode = VLLM_GRPO.replace("use_vllm: true", "use_vllm: true, vllm_mode: server, WHERE")
        for where, ok in (
            (f"vllm_server_base_url: '{up}/'", True),
            (f"vllm_server_host: 127.0.0.1, vllm_server_port: {server.server_port}", True),
            (f"vllm_server_host: 127.0.0.1, vllm_server_port: {closed}", False),
        ):
            recipe = load(write_recipe(server_mode.replace("WHERE", where)))
            [finding] = preflight.vllm_findings(recipe)
            assert finding.where == "stages.grpo.train.use_vllm" and finding.problem is not ok, finding
            assert ("answers" if ok else "trl vllm-serve") in finding.line()
    finally:
        server.shutdown()
