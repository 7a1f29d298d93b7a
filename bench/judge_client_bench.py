"""The `openai` judge's HTTP client against a local fake OpenAI-compatible server (in its own
process, so the two do not share a GIL): judge calls per second through the judge as it is
against the judge at an older commit (the urllib client, a connection per request),
interleaved; TCP connections opened; and whether a 429's Retry-After is honoured.

    python bench/judge_client_bench.py [--before f25f7a2]   # a table; nothing leaves 127.0.0.1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fake_openai import VERDICT_A, send_json  # noqa: E402

from posttrain.judges import PairQuery  # noqa: E402
from posttrain.recipe import OpenAIJudgeSpec  # noqa: E402

REQUESTS, CONCURRENCY, REPEATS, LATENCY_S = 400, 8, 3, 0.002


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as vLLM and hosted APIs speak
    disable_nagle_algorithm = True  # as real servers do: no 40 ms wait between headers and body
    throttled: set = set()  # models that got their one 429

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("model") == "stats":  # the bench asks how many connections it saw
            return self.send({"connections": len(SEEN), "reset": SEEN.clear()})
        SEEN.add(self.client_address)
        time.sleep(LATENCY_S)
        if body["model"].startswith("throttle") and body["model"] not in Handler.throttled:
            Handler.throttled.add(body["model"])
            self.send_response(429)
            self.send_header("Retry-After", "0.3")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return self.send(VERDICT_A)

    def send(self, reply: dict) -> None:
        send_json(self, reply)


SEEN: set = set()


def serve(port: multiprocessing.Queue) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port.put(server.server_address[1])
    server.serve_forever()


def judge_module(commit: str | None):
    """posttrain.judges.openai as it is, or as it was at `commit`."""
    if commit is None:
        from posttrain.judges import openai

        return openai
    source = subprocess.run(["git", "show", f"{commit}:posttrain/judges/openai.py"], check=True,
                            capture_output=True, text=True, cwd=Path(__file__).parents[1]).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / f"openai_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"openai_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OpenAISDKJudge:
    """The same calls through the openai SDK (`pip install openai`), for comparison only."""

    @staticmethod
    def build(spec, ctx, judge_id):
        from concurrent.futures import ThreadPoolExecutor

        import openai

        from posttrain.judges import Judge
        from posttrain.judges.openai import read_verdict, request_body

        client = openai.OpenAI(base_url=spec.base_url, api_key="none", max_retries=spec.max_retries)
        pool = ThreadPoolExecutor(spec.max_concurrency)

        def one(query):
            body = request_body(spec, f"{query.prompt}\n{query.first}\n{query.second}")
            return read_verdict(client.chat.completions.create(**body).model_dump(), spec.labels)

        return Judge(
            id=judge_id, batch_size=32, compare=lambda qs: list(pool.map(one, qs)), close=client.close
        )


def make_judge(module, url: str, model: str = "judge"):
    spec = OpenAIJudgeSpec(backend="openai", base_url=url, model=model, api_key_env=None,
                           principles=["Be right."], max_concurrency=CONCURRENCY, backoff_s=0.05)  # fmt: skip
    return module.build(spec, None, "bench")


def _last_stats(url: str) -> int:
    import httpx2

    return httpx2.post(f"{url}/chat/completions", json={"model": "stats"}).json()["connections"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="f25f7a2", help="the commit whose judge client to compare")
    before = parser.parse_args().before
    port: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(port,), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port.get()}/v1"
    queries = [PairQuery("2+2=", "4", "5")] * REQUESTS
    modules = {f"urllib, a connection per request ({before})": judge_module(before),
               "httpx pool + tenacity (now)": judge_module(None)}  # fmt: skip
    if importlib.util.find_spec("openai") is not None:
        modules["openai SDK (not used)"] = OpenAISDKJudge
    rates: dict[str, list[float]] = {name: [] for name in modules}
    sockets: dict[str, int] = {}
    for _ in range(REPEATS):
        for name, module in modules.items():  # interleaved
            judge = make_judge(module, url)
            _last_stats(url)
            started = time.perf_counter()
            judge.compare(queries)
            rates[name].append(REQUESTS / (time.perf_counter() - started))
            sockets[name] = _last_stats(url) - 1  # less the stats call's own connection
            judge.close()
    base = statistics.median(rates[next(iter(modules))])
    print(
        f"{REQUESTS} judge calls, {CONCURRENCY} at once, {LATENCY_S * 1000:.0f} ms server latency, median of {REPEATS}"
    )
    print("| client | calls/s | vs before | TCP connections |\n|---|---|---|---|")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"| {name} | {rate:.0f} | {rate / base:.2f} | {sockets[name]} |")
    for i, (name, module) in enumerate(modules.items()):
        judge = make_judge(module, url, f"throttle-{i}")
        started = time.perf_counter()
        judge.compare([queries[0]])
        print(
            f"{name}: a 429 with Retry-After 0.3 s, then 200: answered after {time.perf_counter() - started:.2f} s"
        )
    server.terminate()


if __name__ == "__main__":
    main()
