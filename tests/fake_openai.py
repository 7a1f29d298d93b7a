"""A fake OpenAI-compatible chat server on 127.0.0.1 for the `openai` judge's tests and bench:
it plays a script of replies, errors and hangs, and records what it was sent."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def send_json(handler: BaseHTTPRequestHandler, reply: dict) -> None:
    """Answer a request with a 200 and `reply` as JSON."""
    data = json.dumps(reply).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class ScriptedServer:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 that plays a script: each request
    takes the next step (`("status", code)`, `("hang", seconds)`, `("reply", body)`); once the
    script runs out it repeats its last step. Records requests and peak concurrency."""

    def __init__(self, script: list[tuple]) -> None:
        self.script = list(script)
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = 0
        self.peak = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as vLLM and hosted APIs speak
            disable_nagle_algorithm = True  # as real servers do: no 40 ms wait between headers and body

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.connections.add(self.client_address)
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    step = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                    server.in_flight += 1
                    server.peak = max(server.peak, server.in_flight)
                try:
                    self.play(step, body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def play(self, step: tuple, body: dict) -> None:
                kind, value = step
                if kind == "hang":
                    time.sleep(value)
                    return
                if kind == "status":
                    self.send_response(value)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"no")
                    return
                send_json(self, value(body) if callable(value) else value)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.connections: set[tuple] = set()
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def chat_reply(text: str, logprobs: list[tuple[str, float, dict[str, float]]] | None = None) -> dict:
    choice: dict = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {
            "content": [
                {
                    "token": t,
                    "logprob": lp,
                    "top_logprobs": [{"token": k, "logprob": v} for k, v in top.items()],
                }
                for t, lp, top in logprobs
            ]
        }
    return {"id": "x", "object": "chat.completion", "choices": [choice]}


VERDICT_A = chat_reply(
    "Verdict: A",
    [("Verdict", -0.01, {}), (":", -0.01, {}), (" A", math.log(0.6), {" A": math.log(0.6), " B": math.log(0.15), "B": math.log(0.05)})],
)  # fmt: skip


class CompletionServer:
    """An OpenAI-compatible /v1/chat/completions and /v1/completions on 127.0.0.1 whose replies
    `reply(prompt_text, body) -> (status, text)` computes; records every request body."""

    def __init__(self, reply) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({**body, "path": self.path})
                chat = self.path.endswith("/chat/completions")
                text_in = body["messages"][-1]["content"] if chat else body["prompt"]
                status, text = reply(text_in, body)
                if status != 200:
                    data = json.dumps({"error": text}).encode()
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                usage = {"completion_tokens": len(text.split())}
                send_json(
                    self, {"choices": [{"index": 0, **choice, "finish_reason": "stop"}], "usage": usage}
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
