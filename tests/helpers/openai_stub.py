"""A local OpenAI-compatible server for tests and benchmarks: ``POST /v1/chat/completions`` with injectable faults.

It binds 127.0.0.1 only, serves each connection on its own thread (at most ``max_connections`` at once, so a runaway
client cannot exhaust the machine) and counts what the tests need to check: every request body, the requests in
flight and their peak.

Faults are requested *by the request itself*, so that they stay deterministic under any concurrency: put a marker
``[[stub:KIND*N]]`` anywhere in a message (e.g. in the prompt of one row) and the first ``N`` times the stub sees that
exact request body it answers with the fault, then answers normally. ``N`` defaults to 1; ``*inf`` repeats forever.

========================  ====================================================================================
``KIND``                  answer
========================  ====================================================================================
``429``, ``500``, ...     that HTTP status with an OpenAI-style error body (429 and 503 carry ``Retry-After: 0``)
``slow=SECONDS``          a normal answer after sleeping ``SECONDS`` (to trigger client timeouts)
``malformed``             HTTP 200 with a body that is not JSON
``nochoices``             HTTP 200 with JSON lacking ``choices``
``empty``                 HTTP 200, a normal completion whose content is empty
``length``                HTTP 200, content cut off with ``finish_reason: "length"``
``untagged``              HTTP 200, content without the ``<improved_answer>`` tag
========================  ====================================================================================

Judging: a request holding ``[Start of answer A]`` ... ``[End of answer B]`` (the pairwise prompt of
:class:`~trl_sgpo.evaluation.judges.OpenAIPairwiseJudge`) is judged by a deterministic rule instead of answered:
``judge_rule="longer"`` prefers the answer with more characters, ``"marker"`` the one containing ``[[good]]`` (equal:
a tie). The preferred letter gets probability ``judge_strength`` (0.5 each on a tie), plus ``judge_bias`` for ``A``
(a position bias, to check that both orders cancel it); the reply is that letter, and when the request asks for
``logprobs`` (and ``logprobs=True``, the default) the first token's ``top_logprobs`` carry both probabilities.

Server-wide settings: ``latency`` (seconds added to every request), ``api_key`` (requests with another bearer token
get 401), and ``reply`` (a function from the request body to the answer text). ``GET /stats`` returns the counters
as JSON, and ``python -m trl_sgpo.testing --latency 0.05`` serves in its own process (printing its base
URL), so that a benchmark's client does not share an interpreter with the server.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


MARKER = re.compile(r"\[\[stub:([\w.=]+)(?:\*(\d+|inf))?\]\]")
JUDGE_ANSWERS = re.compile(
    r"\[Start of answer A\]\n(.*?)\n\[End of answer A\].*?\[Start of answer B\]\n(.*?)\n\[End of answer B\]", re.DOTALL
)
GOOD_MARKER = "[[good]]"
MAX_BODY_BYTES = 8 * 1024 * 1024


def default_reply(body: dict[str, Any]) -> str:
    """A deterministic, tagged answer: the current answer (if found in the request) with one sentence added."""
    text = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
    match = re.search(r"## Current answer\n(.*?)\n\n## ", text, re.DOTALL)
    current = match.group(1).strip() if match else "An answer."
    return f"<improved_answer>{current} It is also worth adding one clarifying detail.</improved_answer>"


def judge_probability(body: dict[str, Any], rule: str, strength: float, bias: float) -> float | None:
    """P(the judge answers ``A``) for a pairwise judging request, or ``None`` when ``body`` is not one."""
    text = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
    match = JUDGE_ANSWERS.search(text)
    if match is None:
        return None
    a, b = match.group(1), match.group(2)
    if rule == "longer":
        sign = (len(a) > len(b)) - (len(a) < len(b))
    elif rule == "marker":
        sign = (GOOD_MARKER in a) - (GOOD_MARKER in b)
    else:
        raise ValueError(f"unknown judge_rule {rule!r}")
    p = 0.5 if sign == 0 else (strength if sign > 0 else 1 - strength)
    return min(1.0, max(0.0, p + bias))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog: the default 5 resets connections when many clients connect at once

    def __init__(self, stub: OpenAIStub, max_connections: int):
        self.stub = stub
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request, client_address):
        self._slots.acquire()  # blocks the accept loop when full: bounded threads
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def handle_error(self, request, client_address):
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):  # a client closed its keep-alive connection
            return
        super().handle_error(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do (the openai client pools connections)
    server: _Server

    def log_message(self, format, *args):  # quiet: tests read counters, not logs
        pass

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None, raw: bytes | None = None):
        data = raw if raw is not None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.rstrip("/") != "/stats":
            return self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
        self._send_json(200, self.server.stub.stats())

    def do_POST(self):
        stub = self.server.stub
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            return self._send_json(413, {"error": {"message": "request too large", "type": "invalid_request_error"}})
        raw = self.rfile.read(length)
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
        stub._enter()
        try:
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                return self._send_json(
                    400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}}
                )
            stub._record(body)
            if stub.api_key is not None and self.headers.get("Authorization") != f"Bearer {stub.api_key}":
                # Like api.openai.com, echo the key that was sent: clients must not log error texts verbatim.
                sent = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                return self._send_json(
                    401,
                    {
                        "error": {
                            "message": f"Incorrect API key provided: {sent}.",
                            "type": "invalid_request_error",
                            "code": "invalid_api_key",
                        }
                    },
                )
            if stub.latency:
                stub._sleep(stub.latency)
            fault = stub._fault_for(raw, body)
            self._answer(stub, body, fault)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): nothing to answer
            self.close_connection = True
        finally:
            stub._leave()

    def _answer(self, stub: OpenAIStub, body: dict[str, Any], fault: str | None):
        if fault is not None and fault.isdigit():
            status = int(fault)
            headers = {"Retry-After": "0"} if status in (429, 503) else None
            return self._send_json(
                status, {"error": {"message": f"stub fault {status}", "type": "stub_error", "code": None}}, headers
            )
        if fault is not None and fault.startswith("slow="):
            stub._sleep(float(fault.split("=", 1)[1]))
        if fault == "malformed":
            return self._send_json(200, None, raw=b'{"id": "chatcmpl-stub", "choices": [ this is not json')
        if fault == "nochoices":
            return self._send_json(200, {"id": "chatcmpl-stub", "object": "chat.completion", "created": 0})
        logprobs = None
        p_a = judge_probability(body, stub.judge_rule, stub.judge_strength, stub.judge_bias)
        if p_a is not None:
            content = "A" if p_a >= 0.5 else "B"
            if body.get("logprobs") and stub.logprobs:
                top = [
                    {"token": t, "logprob": math.log(max(p, 1e-12)), "bytes": list(t.encode())}
                    for t, p in (("A", p_a), ("B", 1 - p_a))
                ]
                top.sort(key=lambda x: -x["logprob"])
                logprobs = {"content": [{**top[0], "top_logprobs": top}]}
        else:
            content = stub.reply(body)
        finish = "stop"
        if fault == "empty":
            content = ""
        elif fault == "length":
            content, finish = content[: max(1, len(content) // 2)], "length"
        elif fault == "untagged":
            content = re.sub(r"</?improved_answer>", "", content)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        completion_tokens = len(content.split())
        self._send_json(
            200,
            {
                "id": "chatcmpl-stub",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "stub"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": finish,
                        "logprobs": logprobs,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )


class OpenAIStub:
    """An OpenAI-compatible chat-completions server on 127.0.0.1, run in a background thread.

    Use as a context manager; ``base_url`` (``http://127.0.0.1:PORT/v1``) is what the ``openai`` client takes.

    Args:
        latency: Seconds every request waits before its answer (makes concurrency observable).
        api_key: When set, requests whose ``Authorization`` is not ``Bearer <api_key>`` get HTTP 401.
        reply: Function from the request body to the answer content (default: :func:`default_reply`).
        max_connections: Most connections served at once; further ones wait in the listen queue.
        judge_rule, judge_strength, judge_bias, logprobs: How judging requests are answered (see the module doc).

    Attributes:
        requests: Every parsed request body, in arrival order.
        in_flight / peak_in_flight: Requests being answered now / at most at once.
    """

    def __init__(
        self,
        latency: float = 0.0,
        api_key: str | None = None,
        reply: Callable[[dict[str, Any]], str] = default_reply,
        max_connections: int = 256,
        judge_rule: str = "longer",
        judge_strength: float = 0.8,
        judge_bias: float = 0.0,
        logprobs: bool = True,
    ):
        self.latency = latency
        self.judge_rule = judge_rule
        self.judge_strength = judge_strength
        self.judge_bias = judge_bias
        self.logprobs = logprobs
        self.api_key = api_key
        self.reply = reply
        self.max_connections = max_connections
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("The stub is not running; use it as a context manager or call start().")
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> OpenAIStub:
        self._stop.clear()
        self._server = _Server(self, self.max_connections)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wakes sleeping handlers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> OpenAIStub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset_counters(self) -> None:
        """Forget the recorded requests and the peak (fault counts are kept)."""
        with self._lock:
            self.requests.clear()
            self.peak_in_flight = self.in_flight

    def stats(self) -> dict[str, int]:
        """The counters, also served as JSON at ``GET /stats`` (for a stub running in another process)."""
        with self._lock:
            return {"requests": len(self.requests), "in_flight": self.in_flight, "peak_in_flight": self.peak_in_flight}

    def count(self, substring: str) -> int:
        """How many recorded requests contain ``substring`` in a message."""
        with self._lock:
            bodies = list(self.requests)
        return sum(any(substring in str(m.get("content", "")) for m in body.get("messages", [])) for body in bodies)

    # ---- used by the handler threads
    def _enter(self):
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _leave(self):
        with self._lock:
            self.in_flight -= 1

    def _record(self, body):
        with self._lock:
            self.requests.append(body)

    def _sleep(self, seconds: float):
        self._stop.wait(seconds)

    def _fault_for(self, raw: bytes, body: dict[str, Any]) -> str | None:
        text = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
        match = MARKER.search(text)
        if match is None:
            return None
        kind, times = match.group(1), match.group(2) or "1"
        key = hashlib.sha256(raw).hexdigest()
        with self._lock:
            self._seen[key] += 1
            seen = self._seen[key]
        return kind if times == "inf" or seen <= int(times) else None


def main(argv: list[str] | None = None) -> None:
    """Serve until interrupted: ``python -m trl_sgpo.testing --latency 0.05``."""
    import argparse

    parser = argparse.ArgumentParser(description="Local OpenAI-compatible stub server (127.0.0.1 only).")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--max-connections", type=int, default=256)
    args = parser.parse_args(argv)
    with OpenAIStub(latency=args.latency, api_key=args.api_key, max_connections=args.max_connections) as stub:
        print(stub.base_url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
