"""Throughput of the OpenAI target writer against the local stub server (helpers.openai_stub.OpenAIStub).

Measures what the writer itself costs: requests per second and the peak number of requests in flight (seen by the
server and by the client), with a fixed server latency standing in for the LLM. With latency L and concurrency C the
ceiling is C / L requests per second; the gap to it is client overhead (the openai client, JSON, two fsynced JSONL
appends per row). The stub runs in its own process (``--in-process`` to share this one, as the tests do). A second
pass over the same rows is answered from the cache with no request at all.

    python benchmarks/targets.py                     # 2000 rows, 32 in flight, 50 ms latency
    python benchmarks/targets.py --concurrency 64 --latency 0.2 --fault-rate 0.05
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path


# Test helpers (tiny model, OpenAI stub) live under tests/, outside the runtime package.
TESTS_DIR = _Path(__file__).resolve().parents[1] / "tests"
_sys.path.insert(0, str(TESTS_DIR))

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset

from helpers.openai_stub import OpenAIStub
from trl_sgpo.data.target_writers import OpenAITargetWriter, write_targets


def make_rows(n: int, fault_rate: float) -> Dataset:
    every = round(1 / fault_rate) if fault_rate > 0 else 0
    prompts = [f"Question {i}: explain topic number {i} briefly." for i in range(n)]
    if every:
        prompts = [p + (" [[stub:429*1]]" if i % every == 0 else "") for i, p in enumerate(prompts)]
    return Dataset.from_dict(
        {
            "prompt": prompts,
            "response": [f"Topic {i} is about something. It has two sides. " * 3 for i in range(n)],
            "reference": [f"Topic {i} is well known. It has two sides and one history. " * 3 for i in range(n)],
        }
    )


class StubProcess:
    """The stub in a child process; ``stats()`` reads its counters over HTTP."""

    def __init__(self, latency: float, api_key: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "helpers.openai_stub", "--latency", str(latency), "--api-key", api_key],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])},
        )
        self.base_url = self.process.stdout.readline().strip()
        if not self.base_url.startswith("http://127.0.0.1:"):
            self.process.kill()
            raise RuntimeError(f"The stub did not start (it printed {self.base_url!r}).")

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.base_url.removesuffix("/v1") + "/stats") as response:
            return json.load(response)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@contextlib.contextmanager
def stub_server(latency: float, api_key: str, in_process: bool):
    if in_process:
        with OpenAIStub(api_key=api_key, latency=latency) as stub:
            yield stub
    else:
        stub = StubProcess(latency, api_key)
        try:
            yield stub
        finally:
            stub.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.05, help="Seconds the stub waits before each answer.")
    parser.add_argument("--fault-rate", type=float, default=0.0, help="Share of rows whose first answer is a 429.")
    parser.add_argument("--in-process", action="store_true", help="Run the stub in this process (shares the GIL).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ["SGPO_BENCH_KEY"] = "bench"
    rows = make_rows(args.rows, args.fault_rate)

    with tempfile.TemporaryDirectory() as tmp, stub_server(args.latency, "bench", args.in_process) as stub:
        out = Path(tmp) / "targets.jsonl"
        writer = OpenAITargetWriter(
            "stub-model",
            stub.base_url,
            api_key_env="SGPO_BENCH_KEY",
            max_concurrency=args.concurrency,
            backoff_base=0.01,
            backoff_max=0.05,
        )
        start = time.perf_counter()
        write_targets(writer, rows, out, show_progress=False)
        elapsed = time.perf_counter() - start
        stats, server = writer.stats, stub.stats()
        ceiling = args.concurrency / args.latency if args.latency else float("inf")
        print(
            f"rows={args.rows} concurrency={args.concurrency} latency={args.latency * 1000:.0f}ms "
            f"fault_rate={args.fault_rate} server={'in-process' if args.in_process else 'own process'}"
        )
        print(
            f"requests/s: {stats.requests / elapsed:.1f} ({stats.requests} requests, {stats.retries} retries, "
            f"{elapsed:.2f}s; ceiling {ceiling:.0f}/s)"
        )
        print(f"targets/s: {stats.written / elapsed:.1f}")
        print(
            f"peak in flight: server {server['peak_in_flight']}, client {stats.peak_in_flight} "
            f"(bound {args.concurrency})"
        )

        out.unlink()  # keep the cache: the rerun is answered without a request
        start = time.perf_counter()
        write_targets(writer, rows, out, show_progress=False)
        elapsed = time.perf_counter() - start
        print(
            f"cached rerun: {args.rows / elapsed:.0f} rows/s, {stub.stats()['requests'] - server['requests']} "
            f"requests sent, {writer.stats.cache_hits} cache hits"
        )


if __name__ == "__main__":
    main()
