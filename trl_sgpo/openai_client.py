"""The one client for OpenAI-compatible chat endpoints: used by the target writer and by the OpenAI judge.

:class:`OpenAIEndpoint` holds an endpoint's settings (model, URL, key variable, concurrency, retries, timeout,
prices); :meth:`OpenAIEndpoint.run_requests` sends a list of jobs through one :class:`ChatRun`:

- ``openai.AsyncOpenAI`` with its own retries off (``max_retries=0``), so that every retry is ours, counted, bounded.
- Concurrency: at most ``max_concurrency`` requests in flight (an ``asyncio.Semaphore``). The first request goes alone
  until it is answered (a 429 also counts: the endpoint took the key): if the key is bad, one request fails, not
  ``max_concurrency``.
- Retries: HTTP 429, 408, 409 and 5xx, timeouts, connection errors and malformed bodies are retried up to
  ``max_retries`` times, waiting ``min(backoff_max, backoff_base * 2**attempt)`` seconds with jitter (or the server's
  ``Retry-After``). After that the job fails (:class:`RowFailure`).
- Fatal: 401/403 (key) and 404 (model or URL) stop the whole run at once (:class:`EndpointAbort`).
- Cache: each usable answer is appended (fsynced) to a JSONL file under the sha256 of the exact request JSON, before
  the job's result is handed on. A rerun, or an identical request in the same run, reuses it without sending anything.
  Only usable answers (those the caller's ``check`` accepts) are cached, so failures are asked again on rerun.
- Cost: prompt and completion tokens of every answer received are summed into :class:`ClientStats`, priced at the
  prices given, else at :data:`KNOWN_PRICES_PER_1M` for a known OpenAI model at api.openai.com; with neither the cost
  is unknown (:func:`cost_summary` says so), not $0.
- The key is read from the environment variable ``api_key_env`` when a run starts and written nowhere; error texts
  from the server are scrubbed of it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .io.jsonl import JsonlWriter, read_jsonl


logger = logging.getLogger(__name__)


@dataclass
class ClientStats:
    """Counters of one run (``writer.stats``, ``judge.stats``)."""

    rows: int = 0
    written: int = 0
    failed: int = 0
    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0  # billed tokens of the answers received in this run (cache hits are free)
    completion_tokens: int = 0
    cost_usd: float = 0.0
    peak_in_flight: int = 0
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        text = f"{self.written} written, {self.failed} failed of {self.rows} rows in {self.elapsed_s:.1f}s"
        if self.requests or self.cache_hits:
            text += (
                f"; {self.requests} requests ({self.retries} retries, peak {self.peak_in_flight} in flight), "
                f"{self.cache_hits} cache hits, {self.prompt_tokens}+{self.completion_tokens} tokens, "
                f"${self.cost_usd:.4f}"
            )
        return text


KNOWN_PRICES_PER_1M: dict[str, tuple[float, float]] = {
    # model: (USD per 1M prompt tokens, USD per 1M completion tokens). List prices of api.openai.com, standard tier
    # (not batch, no cached-input discount), as published in 2025; prices change: give them to be sure. A dated
    # snapshot (gpt-4o-2024-08-06, gpt-4-0613) is priced as its model. Used only when no base_url, or
    # api.openai.com, is set: another endpoint serving the same name has its own prices.
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "o3-mini": (1.10, 4.40),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4-1106-preview": (10.00, 30.00),  # AlpacaEval 2's and Arena-Hard v0.1's judge
    "gpt-4": (30.00, 60.00),
    "gpt-3.5-turbo": (0.50, 1.50),
}
"""Known list prices of some OpenAI models, the default when an endpoint is given none."""

_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")


def known_prices(model: str, base_url: str | None = None) -> tuple[float, float] | None:
    """``(input, output)`` USD per 1M tokens of ``model`` from :data:`KNOWN_PRICES_PER_1M`, or ``None`` (unknown
    model, or an endpoint other than api.openai.com)."""
    if base_url and "api.openai.com" not in base_url:
        return None
    return KNOWN_PRICES_PER_1M.get(model) or KNOWN_PRICES_PER_1M.get(_SNAPSHOT.sub("", model))


def cost_summary(endpoint: OpenAIEndpoint, stats: ClientStats) -> dict[str, Any]:
    """Tokens and cost of the requests sent in one run, for a report: ``usd`` is ``None`` when no price is known."""
    known = endpoint.price_input_per_1m is not None
    return {
        "model": endpoint.model,
        "requests": stats.requests,
        "cache_hits": stats.cache_hits,
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "price_input_per_1m": endpoint.price_input_per_1m,
        "price_output_per_1m": endpoint.price_output_per_1m,
        "price_source": endpoint.price_source,
        "usd": stats.cost_usd if known else None,
    }


class EndpointAbort(RuntimeError):
    """A failure that concerns every request (bad key, unknown model or URL, full disk): the run stops at once."""


class RowFailure(Exception):
    """A failure of this job only, not worth retrying now (the caller records it)."""


class _Retry(Exception):
    """A transient failure of one attempt; ``delay`` is the server's Retry-After, if any."""

    def __init__(self, reason: str, delay: float | None = None, key_accepted: bool = False):
        super().__init__(reason)
        self.delay = delay
        self.key_accepted = key_accepted  # only a rate limit shows the endpoint took the key


def run_coroutine(coro: Coroutine) -> Any:
    """``asyncio.run(coro)``, also from code that already runs an event loop (e.g. Jupyter): then in a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _prices(model, base_url, price_input, price_output) -> tuple[float | None, float | None, str]:
    """``(input, output, source)``: the prices given, else the known ones, else ``(None, None, why)``."""
    if (price_input is None) != (price_output is None):
        raise ValueError(
            "Give both `price_input_per_1m` and `price_output_per_1m` (USD per 1M prompt / completion tokens; "
            "--judge-price-in/--judge-price-out), or neither (known defaults for some OpenAI models)."
        )
    if price_input is not None:
        if price_input < 0 or price_output < 0:
            raise ValueError(f"Prices must be >= 0 USD per 1M tokens, got {price_input} and {price_output}.")
        return float(price_input), float(price_output), "prices given"
    known = known_prices(model, base_url)
    if known is None:
        return None, None, f"no price known for {model!r} at this endpoint; give the prices (USD per 1M tokens)"
    return *known, f"list price of {model} at api.openai.com (trl_sgpo.openai_client.KNOWN_PRICES_PER_1M)"


class OpenAIEndpoint:
    """Settings of an OpenAI-compatible ``/v1/chat/completions`` endpoint, and the runner that sends requests to it.

    Args:
        model: Model name at the endpoint.
        base_url: Endpoint, e.g. ``http://localhost:8000/v1``; ``None`` for api.openai.com (or ``$OPENAI_BASE_URL``).
        api_key_env: Name of the environment variable holding the key. For a server without authentication, set
            it to any value (``export OPENAI_API_KEY=EMPTY``).
        max_concurrency: Most requests in flight at once.
        max_retries: Retries per request after the first attempt.
        timeout: Seconds one attempt may take before it counts as a timeout.
        backoff_base, backoff_max: Backoff schedule, in seconds.
        price_input_per_1m, price_output_per_1m: USD per million prompt / completion tokens, for ``cost_usd``. Both
            or neither; neither: :func:`known_prices` of ``model``, else the cost is unknown (``price_input_per_1m``
            stays ``None`` and ``cost_usd`` counts nothing).
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 32,
        max_retries: int = 5,
        timeout: float = 120.0,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        price_input_per_1m: float | None = None,
        price_output_per_1m: float | None = None,
    ):
        if max_concurrency < 1:
            raise ValueError(f"`max_concurrency` must be >= 1, got {max_concurrency}.")
        if max_retries < 0 or timeout <= 0:
            raise ValueError(f"Need max_retries >= 0 and timeout > 0, got {max_retries} and {timeout}.")
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.price_input_per_1m, self.price_output_per_1m, self.price_source = _prices(
            model, base_url, price_input_per_1m, price_output_per_1m
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r}, "
            f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency}, "
            f"max_retries={self.max_retries}, timeout={self.timeout})"
        )

    def read_api_key(self) -> str:
        api_key = os.environ.get(self.api_key_env)
        if not api_key:
            raise ValueError(
                f"The environment variable {self.api_key_env} holding the API key is not set. Export it (for a local "
                f"server without authentication any value works: `export {self.api_key_env}=EMPTY`)."
            )
        return api_key

    def check_answer(self, content: str | None, finish_reason: str | None, request: dict[str, Any]) -> None:
        """Raise :class:`RowFailure` for an answer that is not usable (it is then neither cached nor retried)."""

    def run_requests(
        self,
        jobs: list[Any],
        process: Callable[[ChatRun, Any], Awaitable[Any]],
        on_result: Callable[[Any, Any], None],
        *,
        cache_path: str | os.PathLike | None,
        stats: ClientStats,
        cache: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Run ``process(run, job)`` for every job (it calls ``await run.answer(request)``), then ``on_result(job,
        value)`` as each finishes. ``cache_path`` ``None`` keeps answers in ``cache`` (memory) only."""
        api_key = self.read_api_key()
        run_coroutine(ChatRun(self, api_key, stats, cache_path, cache).run(jobs, process, on_result))


class ChatRun:
    """State of one :meth:`OpenAIEndpoint.run_requests`: client, cache, semaphore. Holds the key only for the run."""

    def __init__(
        self,
        endpoint: OpenAIEndpoint,
        api_key: str,
        stats: ClientStats,
        cache_path: str | os.PathLike | None,
        cache: dict[str, dict[str, Any]] | None = None,
    ):
        self.w = endpoint
        self.stats = stats
        self._api_key = api_key
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.cache = cache if cache is not None else {}
        if self.cache_path is not None:
            self.cache.update({e["key"]: e for e in read_jsonl(self.cache_path, missing_ok=True) if "key" in e})
        self.pending_answers: dict[str, asyncio.Future] = {}  # cache key -> answer of a request now in flight
        self.in_flight = 0
        self.probe_started = False
        self.aborted = False

    def __repr__(self) -> str:
        return f"ChatRun({self.w!r})"  # never the key

    def scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    async def run(self, jobs: list[Any], process, on_result) -> None:
        import openai

        self.client = openai.AsyncOpenAI(
            base_url=self.w.base_url, api_key=self._api_key, max_retries=0, timeout=self.w.timeout
        )
        self.semaphore = asyncio.Semaphore(self.w.max_concurrency)
        self.gate = asyncio.Event()  # opened once the first request has been answered (see send)
        window = 4 * self.w.max_concurrency  # tasks alive at once: bounds memory on huge datasets
        queue = iter(jobs)
        tasks: set[asyncio.Task] = set()
        self.cache_file = JsonlWriter(self.cache_path) if self.cache_path is not None else None
        if self.cache_file is not None:
            self.cache_file.__enter__()
        try:
            while True:
                while len(tasks) < window:
                    job = next(queue, None)
                    if job is None:
                        break
                    tasks.add(asyncio.create_task(self._one(job, process, on_result)))
                if not tasks:
                    break
                finished, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                errors = [t.exception() for t in finished if not t.cancelled() and t.exception() is not None]
                if errors:  # EndpointAbort (or a bug): stop at once, the abort first
                    raise next((e for e in errors if isinstance(e, EndpointAbort)), errors[0])
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.client.close()
            if self.cache_file is not None:
                self.cache_file.close()

    async def _one(self, job, process, on_result) -> None:
        value = await process(self, job)
        if self.aborted:  # another job hit a fatal error: this one was not really tried
            return
        try:
            on_result(job, value)
        except OSError as e:
            self.aborted = True
            where = f" the answers already received are in the cache {self.cache_path}." if self.cache_path else ""
            raise EndpointAbort(f"{e}. Stopped sending requests;{where}") from e

    async def answer(self, request: dict[str, Any], key: str) -> tuple[dict[str, Any], bool]:
        """The answer to ``request`` and whether it came from the cache (or from an identical request in flight).

        The answer is ``{key, request, content, finish_reason, usage, top_logprobs, time}``; ``top_logprobs`` is the
        first generated token's alternatives as ``{token: logprob}`` when the endpoint returned log-probabilities.
        Raises :class:`RowFailure` when the request failed for good.
        """
        entry = self.cache.get(key)
        if entry is not None:
            self.stats.cache_hits += 1
            return entry, True
        if key in self.pending_answers:  # a duplicate job: wait for the first one's answer instead of paying twice
            entry = await asyncio.shield(self.pending_answers[key])
            self.stats.cache_hits += 1
            return entry, True
        future = asyncio.get_running_loop().create_future()
        self.pending_answers[key] = future
        try:
            entry = await self.send(request, key)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as e:
            future.set_exception(e)
            future.exception()  # mark retrieved: no "exception never retrieved" warning when nobody waits
            raise
        finally:
            del self.pending_answers[key]
        future.set_result(entry)
        return entry, False

    def backoff(self, attempt: int, server_delay: float | None) -> float:
        if server_delay is not None:
            return min(self.w.backoff_max, max(0.0, server_delay))
        delay = min(self.w.backoff_max, self.w.backoff_base * 2**attempt)
        return delay * (0.5 + random.random() / 2)  # jitter spreads the retries of concurrent jobs

    async def send(self, request: dict[str, Any], key: str) -> dict[str, Any]:
        """Send ``request`` with retries; cache and return the answer or raise."""
        # The first request goes alone (a probe): a bad key or URL then costs one request, not max_concurrency.
        is_probe = not self.probe_started
        self.probe_started = True
        if not is_probe:
            await self.gate.wait()
        try:
            reason = "no attempt"
            for attempt in range(self.w.max_retries + 1):
                if self.aborted:
                    raise asyncio.CancelledError  # the run is stopping: send nothing more
                try:
                    async with self.semaphore:
                        if self.aborted:  # checked again: the run may have stopped while this job waited
                            raise asyncio.CancelledError
                        if attempt:  # counted here, when it is really sent: not when the run stopped first
                            self.stats.retries += 1
                        return await self.attempt(request, key)
                except _Retry as e:
                    reason = str(e)
                    logger.debug("Attempt %d failed (%s); retrying.", attempt + 1, reason)
                    if is_probe and e.key_accepted:
                        self.gate.set()  # the endpoint takes the key: let the others go
                    if attempt < self.w.max_retries:
                        await asyncio.sleep(self.backoff(attempt, e.delay))
            raise RowFailure(f"gave up after {self.w.max_retries + 1} attempts; last error: {reason}")
        finally:
            if is_probe:
                self.gate.set()  # after `aborted` is set on a fatal error, so the waiters stop at once

    async def attempt(self, request: dict[str, Any], key: str) -> dict[str, Any]:
        import openai

        self.stats.requests += 1
        self.in_flight += 1
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.in_flight)
        try:
            response = await asyncio.wait_for(self.client.chat.completions.create(**request), self.w.timeout)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            self.aborted = True
            raise EndpointAbort(
                f"The endpoint {self.w.base_url or 'api.openai.com'} rejected the API key from ${self.w.api_key_env} "
                f"(HTTP {e.status_code}: {self.scrub(_message(e))}). Check the key and rerun; nothing was retried."
            ) from None
        except openai.NotFoundError as e:
            self.aborted = True
            raise EndpointAbort(
                f"The endpoint {self.w.base_url or 'api.openai.com'} answered 404 for model {self.w.model!r} "
                f"({self.scrub(_message(e))}). Check --base-url (it usually ends in /v1) and the model name."
            ) from None
        except openai.APIStatusError as e:
            status = e.status_code
            if status in (408, 409, 429) or status >= 500:
                raise _Retry(f"HTTP {status}: {self.scrub(_message(e))}", _retry_after(e), status == 429) from None
            raise RowFailure(f"HTTP {status}: {self.scrub(_message(e))}") from None
        except (openai.APITimeoutError, asyncio.TimeoutError):
            raise _Retry(f"timed out after {self.w.timeout}s") from None
        except openai.APIConnectionError as e:
            raise _Retry(f"connection error: {self.scrub(str(e))}") from None
        except (ValueError, openai.APIResponseValidationError) as e:  # body is not JSON / not a completion
            raise _Retry(f"malformed answer from the endpoint: {self.scrub(str(e))[:200]}") from None
        finally:
            self.in_flight -= 1

        usage = getattr(response, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        if self.w.price_input_per_1m is not None:  # unknown prices: cost_summary reports the cost as unknown
            self.stats.cost_usd += (
                prompt_tokens * self.w.price_input_per_1m + completion_tokens * self.w.price_output_per_1m
            ) / 1e6

        choices = getattr(response, "choices", None)
        message = getattr(choices[0], "message", None) if choices else None
        if message is None:
            raise _Retry("malformed answer from the endpoint: no choices[0].message")
        content = getattr(message, "content", None)
        finish_reason = getattr(choices[0], "finish_reason", None)
        self.w.check_answer(content, finish_reason, request)  # RowFailure: not cached, asked again on a rerun
        entry = {
            "key": key,
            "request": request,
            "content": content,
            "finish_reason": finish_reason,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
            "top_logprobs": _first_token_logprobs(choices[0]),
            "time": time.time(),
        }
        if self.cache_file is not None:
            try:
                self.cache_file.write(entry)  # before the result: a crash between the two loses nothing paid for
            except OSError as e:
                self.aborted = True
                raise EndpointAbort(f"{e}. Stopped sending requests.") from e
        self.cache[key] = entry
        return entry


def _first_token_logprobs(choice) -> dict[str, float] | None:
    """``{token: logprob}`` of the first generated token and its top alternatives, or ``None`` if not returned."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    first = content[0]
    out = {str(alt.token): float(alt.logprob) for alt in (getattr(first, "top_logprobs", None) or [])}
    out.setdefault(str(first.token), float(first.logprob))
    return out


def _message(error) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(error, "message", error))


def _retry_after(error) -> float | None:
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: fall back to our own backoff
        return None
