"""Soak: hundreds of concurrent clients with mixed requests against a real server for --duration seconds, loopback only.

Every request must end in a well-formed response or a documented error (429 while the waiting queue is full); every
temperature-0 or seeded request must equal the same request run alone before the load; at the end nothing runs or
waits, the KV cache is empty and the server's RSS is back near its warm level. Prints one JSON report line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx
import openai

MODEL = "SmolLM2-135M-Instruct"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
IDLE_GAUGES = ("sirocco_requests_running", "sirocco_requests_waiting", "sirocco_kv_cache_usage_ratio")
PROMPTS = (
    "The capital of France is",
    "Write a haiku about the sea.",
    "def quicksort(items):",
    "List three primary colors:",
    "Once upon a time, in a small village,",
    "Explain what a CPU cache is in one sentence.",
    "1, 2, 3, 4,",
    "The opposite of hot is",
    "Translate to French: good morning",
    "A recipe for pancakes needs",
    "import numpy as np\n",
    "Q: What is 12 * 12?\nA:",
)
REQUEST_TIMEOUT_S = 300.0


# --- the request mix -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One request shape; `is_checked` ones (greedy or seeded) must give the same choices under load as alone."""

    path: str
    body: dict[str, Any]
    can_stream: bool

    @property
    def is_checked(self) -> bool:
        return self.body.get("temperature") == 0 or self.body.get("seed") is not None

    @property
    def num_choices(self) -> int:
        prompt = self.body.get("prompt")
        num_prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
        return int(self.body.get("n", 1)) * num_prompts


def make_specs(rng: random.Random, count: int) -> list[Spec]:
    specs = []
    for index in range(count):
        is_chat = index % 2 == 1
        body: dict[str, Any] = {"model": MODEL, "max_tokens": rng.randint(4, 16)}
        kind = rng.random()
        if kind < 0.5:
            body["temperature"] = 0
        elif kind < 0.8:
            body.update(temperature=rng.choice([0.7, 1.0]), seed=rng.randrange(10**6), top_p=rng.choice([1.0, 0.9]))
        else:
            body.update(temperature=1.0, top_k=rng.choice([0, 20]))  # unseeded: only checked for form
        if rng.random() < 0.25:
            body["n"] = rng.randint(2, 3)
        if rng.random() < 0.2:
            body["stop"] = [rng.choice([".", "\n", " the", ","])]
        if rng.random() < 0.2:
            body["ignore_eos"] = True
        can_stream = True
        if is_chat:
            body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
            if rng.random() < 0.2:
                body.update(logprobs=True, top_logprobs=rng.randint(0, 3))
        else:
            shape = rng.random()
            if shape < 0.15:
                body["prompt"] = [rng.randrange(1000, 40000) for _ in range(rng.randint(8, 64))]  # token ids
            elif shape < 0.3:
                body["prompt"] = rng.sample(PROMPTS, 2)  # a batch of two prompts
            else:
                body["prompt"] = rng.choice(PROMPTS)
            if rng.random() < 0.2:
                body["logprobs"] = rng.randint(0, 3)
            elif rng.random() < 0.1:
                body["echo"] = True
                can_stream = False
        specs.append(Spec("/v1/chat/completions" if is_chat else "/v1/completions", body, can_stream))
    return specs


# --- validation ------------------------------------------------------------------------------------------------


class Malformed(Exception):
    """The response broke the protocol (a bug, unlike a documented error)."""


@dataclass
class Result:
    texts: list[str]
    finish_reasons: list[str]
    completion_tokens: int
    ttft_s: float | None = None


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise Malformed(what)


def check_whole(spec: Spec, body: dict[str, Any]) -> Result:
    is_chat = spec.path.endswith("chat/completions")
    _expect(body.get("object") == ("chat.completion" if is_chat else "text_completion"), f"object {body.get('object')}")
    choices = sorted(body["choices"], key=lambda c: c["index"])
    _expect([c["index"] for c in choices] == list(range(spec.num_choices)), "choice indexes")
    _expect(all(c["finish_reason"] in ("stop", "length") for c in choices), "finish_reason")
    texts = [c["message"]["content"] if is_chat else c["text"] for c in choices]
    _expect(all(isinstance(text, str) for text in texts), "text")
    usage = body["usage"]
    _expect(usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], "usage adds up")
    wants_logprobs = body_wants_logprobs(spec)
    for choice in choices:
        _expect((choice["logprobs"] is not None) == wants_logprobs, "logprobs present iff asked")
    return Result(texts, [c["finish_reason"] for c in choices], usage["completion_tokens"])


def body_wants_logprobs(spec: Spec) -> bool:
    return bool(spec.body.get("logprobs")) or spec.body.get("logprobs") == 0


def check_stream(spec: Spec, chunks: list[dict[str, Any]], ttft_s: float | None) -> Result:
    """Chunks of one stream, [DONE] already seen: one finish_reason per choice, on its last chunk; usage last."""
    is_chat = spec.path.endswith("chat/completions")
    texts = [""] * spec.num_choices
    finish: list[str | None] = [None] * spec.num_choices
    usage = None
    for chunk in chunks:
        _expect(chunk.get("object") == ("chat.completion.chunk" if is_chat else "text_completion"), "chunk object")
        _expect(usage is None, "a chunk after the usage chunk")
        if chunk.get("usage") is not None:
            _expect(chunk["choices"] == [], "usage chunk has no choices")
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            index = choice["index"]
            _expect(0 <= index < spec.num_choices and finish[index] is None, f"chunk for finished or unknown choice {index}")
            texts[index] += (choice["delta"].get("content") or "") if is_chat else choice["text"]
            finish[index] = choice.get("finish_reason")
    _expect(all(reason in ("stop", "length") for reason in finish), f"finish reasons {finish}")
    _expect(usage is not None, "usage chunk (include_usage)")
    assert usage is not None
    _expect(usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], "usage adds up")
    return Result(texts, [str(reason) for reason in finish], usage["completion_tokens"], ttft_s)


# --- clients ---------------------------------------------------------------------------------------------------


class DocumentedError(Exception):
    def __init__(self, kind: str, retry_after_s: float = 0.0) -> None:
        super().__init__(kind)
        self.kind = kind
        self.retry_after_s = retry_after_s


def _http_error(status: int, retry_after: str | None) -> Exception:
    if status == 429:
        return DocumentedError("http_429", float(retry_after or 1))
    return Malformed(f"http_{status}")


async def run_raw(client: httpx.AsyncClient, spec: Spec, is_stream: bool) -> Result:
    body = {**spec.body, "stream": is_stream}
    if is_stream:
        body["stream_options"] = {"include_usage": True}
    start_s = time.perf_counter()
    if not is_stream:
        response = await client.post(spec.path, json=body)
        if response.status_code != 200:
            raise _http_error(response.status_code, response.headers.get("retry-after"))
        return check_whole(spec, response.json())
    chunks: list[dict[str, Any]] = []
    ttft_s = None
    async with client.stream("POST", spec.path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise _http_error(response.status_code, response.headers.get("retry-after"))
        is_done = False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            _expect(not is_done, "data after [DONE]")
            if data == "[DONE]":
                is_done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise Malformed(f"stream error event: {chunk['error'].get('code')}")
            ttft_s = ttft_s or time.perf_counter() - start_s
            chunks.append(chunk)
    _expect(is_done, "stream ended without [DONE]")
    return check_stream(spec, chunks, ttft_s)


SDK_FIELDS = {"model", "prompt", "messages"}


async def run_sdk(client: openai.AsyncOpenAI, spec: Spec, is_stream: bool) -> Result:
    extra = {key: value for key, value in spec.body.items() if key not in SDK_FIELDS}
    endpoint: Any = client.chat.completions if spec.path.endswith("chat/completions") else client.completions
    inputs = {"messages": spec.body["messages"]} if "messages" in spec.body else {"prompt": spec.body["prompt"]}
    options: dict[str, Any] = {"stream_options": {"include_usage": True}} if is_stream else {}
    start_s = time.perf_counter()
    try:
        answer = await endpoint.create(model=MODEL, stream=is_stream, extra_body=extra, **inputs, **options)
        if not is_stream:
            return check_whole(spec, answer.model_dump())
        chunks, ttft_s = [], None
        async for chunk in answer:
            ttft_s = ttft_s or time.perf_counter() - start_s
            chunks.append(chunk.model_dump())
        return check_stream(spec, chunks, ttft_s)
    except openai.APIStatusError as exc:
        raise _http_error(exc.status_code, exc.response.headers.get("retry-after")) from exc
    except openai.APIConnectionError:
        raise
    except openai.APIError as exc:  # an error event inside the stream
        raise Malformed(f"stream error event: {exc.code}") from exc


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    ttfts_s: list[float] = field(default_factory=list)
    num_checked: int = 0
    num_completion_tokens: int = 0
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)


async def client_loop(
    worker: int,
    deadline_s: float,
    specs: list[Spec],
    references: dict[int, Result],
    raw: httpx.AsyncClient,
    sdk: openai.AsyncOpenAI,
    tally: Tally,
    seed: int,
) -> None:
    rng = random.Random(seed * 100_003 + worker)
    while time.monotonic() < deadline_s:
        index = rng.randrange(len(specs))
        spec = specs[index]
        is_stream = spec.can_stream and rng.random() < 0.5
        use_sdk = rng.random() < 0.5
        start_s = time.perf_counter()
        try:
            result = await (run_sdk(sdk, spec, is_stream) if use_sdk else run_raw(raw, spec, is_stream))
        except DocumentedError as exc:
            tally.outcomes[exc.kind] += 1
            await asyncio.sleep(min(exc.retry_after_s, 5.0) * rng.uniform(1.0, 1.5))  # honour Retry-After, with jitter
            continue
        except Malformed as exc:
            tally.outcomes["http_5xx" if str(exc).startswith("http_5") else "malformed"] += 1
            tally.malformed.append(f"{spec.path} {exc}")
            continue
        except (httpx.TransportError, openai.APIConnectionError) as exc:
            tally.outcomes[f"transport_{type(exc).__name__}"] += 1
            continue
        tally.latencies_s.append(time.perf_counter() - start_s)
        if result.ttft_s is not None:
            tally.ttfts_s.append(result.ttft_s)
        tally.num_completion_tokens += result.completion_tokens
        tally.outcomes["ok"] += 1
        reference = references.get(index)
        if reference is not None:
            tally.num_checked += 1
            if (result.texts, result.finish_reasons) != (reference.texts, reference.finish_reasons):
                tally.outcomes["mismatch"] += 1
                example = {"spec": index, "stream": is_stream, "got": result.texts, "alone": reference.texts}
                tally.mismatches.append(example)


# --- the server ------------------------------------------------------------------------------------------------


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str, pathlib.Path]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "SIROCCO_CACHE_DIR": os.environ.get("SIROCCO_CACHE_DIR", str(REPO_ROOT / ".cache" / "sirocco")),
        "SIROCCO_KV_CACHE_GIB": str(args.kv_cache_gib),
        "SIROCCO_MAX_MODEL_LEN": "1024",
        "SIROCCO_MAX_WAITING_REQUESTS": str(args.max_waiting),
        "SIROCCO_MAX_NUM_SEQS": str(args.max_num_seqs),
        "SIROCCO_LOG_LEVEL": "warning",
    }
    log_path = pathlib.Path(tempfile.mkdtemp(prefix="sirocco-soak-")) / "server.log"
    command = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return process, base_url, log_path
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the server did not become ready:\n{log_path.read_text(errors='replace')[-3000:]}")


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", pathlib.Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match.group(1)) / 1024 if match else None


async def read_metrics(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(sirocco_\w+) (\S+)$", text, re.M)}


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None


# --- the run ---------------------------------------------------------------------------------------------------


async def soak(args: argparse.Namespace, base_url: str, pid: int | None) -> dict[str, Any]:
    rng = random.Random(args.seed)
    specs = make_specs(rng, args.specs)
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as raw,
        openai.AsyncOpenAI(
            base_url=f"{base_url}/v1",
            api_key=args.api_key,
            max_retries=0,
            timeout=REQUEST_TIMEOUT_S,
            http_client=httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S),
        ) as sdk,
    ):
        if args.api_key != "none":
            raw.headers["Authorization"] = f"Bearer {args.api_key}"
        references: dict[int, Result] = {}
        for index, spec in enumerate(specs):  # alone, one at a time: also the warm-up
            if spec.is_checked:
                references[index] = await run_raw(raw, spec, is_stream=False)
        rss_alone = rss_mib(pid)
        tally = Tally()
        samples: list[dict[str, float]] = []
        start_s = time.monotonic()
        deadline_s = start_s + args.duration
        workers = [
            asyncio.ensure_future(client_loop(w, deadline_s, specs, references, raw, sdk, tally, args.seed))
            for w in range(args.clients)
        ]
        rss_warm = None
        while not all(worker.done() for worker in workers):
            await asyncio.sleep(5)
            metrics = await read_metrics(raw)
            samples.append({"t_s": round(time.monotonic() - start_s), "rss_mib": rss_mib(pid) or 0.0, **metrics})
            if rss_warm is None and time.monotonic() - start_s >= args.warmup:
                rss_warm = rss_mib(pid)  # after the batch sizes and allocator pools have reached their working size
        await asyncio.gather(*workers)
        elapsed_s = time.monotonic() - start_s
        idle_deadline = time.monotonic() + 60
        end = await read_metrics(raw)
        while any(end[name] != 0 for name in IDLE_GAUGES) and time.monotonic() < idle_deadline:
            await asyncio.sleep(0.5)
            end = await read_metrics(raw)
        await asyncio.sleep(2)
        rss_end = rss_mib(pid)
        health = (await raw.get("/health")).status_code
    num_requests = sum(count for kind, count in tally.outcomes.items() if kind != "mismatch")
    errors = {kind: count for kind, count in tally.outcomes.items() if kind not in ("ok", "mismatch")}
    rss_growth = None if rss_end is None or rss_warm is None else round(rss_end - rss_warm, 1)
    return {
        "bench": "soak",
        "base_url": base_url,
        "clients": args.clients,
        "duration_s": args.duration,
        "elapsed_s": round(elapsed_s, 1),
        "request_specs": len(specs),
        "checked_specs": len(references),
        "requests": num_requests,
        "served": tally.outcomes["ok"],
        "errors_by_kind": errors,
        "http_5xx": tally.outcomes["http_5xx"],
        "malformed": tally.outcomes["malformed"],
        "checked_against_alone": tally.num_checked,
        "mismatches": tally.outcomes["mismatch"],
        "mismatch_examples": tally.mismatches[:3],
        "malformed_examples": tally.malformed[:5],
        "latency_p50_s": percentile(tally.latencies_s, 0.5),
        "latency_p99_s": percentile(tally.latencies_s, 0.99),
        "ttft_p50_s": percentile(tally.ttfts_s, 0.5),
        "ttft_p99_s": percentile(tally.ttfts_s, 0.99),
        "completion_tokens": tally.num_completion_tokens,
        "completion_tokens_per_s": round(tally.num_completion_tokens / elapsed_s, 1),
        "max_running": max((s.get("sirocco_requests_running", 0) for s in samples), default=None),
        "max_waiting": max((s.get("sirocco_requests_waiting", 0) for s in samples), default=None),
        "max_kv_cache_usage": max((s.get("sirocco_kv_cache_usage_ratio", 0) for s in samples), default=None),
        "preemptions": end.get("sirocco_preemptions_total", end.get("sirocco_preemptions")),
        "end_running": end["sirocco_requests_running"],
        "end_waiting": end["sirocco_requests_waiting"],
        "end_kv_cache_usage": end["sirocco_kv_cache_usage_ratio"],
        "end_health": health,
        "rss_mib_after_references": rss_alone,
        "rss_mib_warm": rss_warm,
        "rss_mib_peak": max((s["rss_mib"] for s in samples), default=None),
        "rss_mib_end": rss_end,
        "rss_growth_mib": rss_growth,
        "rss_returned": None if rss_growth is None or rss_warm is None else rss_growth <= max(64.0, 0.1 * rss_warm),
        "rss_mib_trace": [round(s["rss_mib"]) for s in samples],
    }


def _is_loopback(base_url: str) -> bool:
    return (urlparse(base_url).hostname or "") in LOOPBACK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", help="a running server on loopback; unset: start one on a free 127.0.0.1 port")
    parser.add_argument("--pid", type=int, help="with --base-url: the server's pid, to read its RSS")
    parser.add_argument("--api-key", default="none", help="Bearer key for a server with SIROCCO_API_KEYS")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds into the load at which the warm RSS is read")
    parser.add_argument("--clients", type=int, default=128, help="concurrent clients")
    parser.add_argument("--specs", type=int, default=48, help="distinct request shapes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-waiting", type=int, default=32, help="started server: waiting-queue bound (429 beyond)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="started server: most running sequences")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5, help="started server: KV-cache size")
    parser.add_argument("--out", help="append the report line to this file")
    args = parser.parse_args()
    if not 1 <= args.clients <= 1000 or not 0 < args.duration <= 3600:
        parser.error("--clients must be in 1..1000 and --duration in (0, 3600]")
    process = None
    pid = args.pid
    if args.base_url:
        if not _is_loopback(args.base_url):
            parser.error("--base-url must be a loopback address")
        base_url = args.base_url.rstrip("/")
    else:
        process, base_url, log_path = start_server(args)
        pid = process.pid
    try:
        report = asyncio.run(soak(args, base_url, pid))
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    if process is not None:
        log = log_path.read_text(errors="replace")
        report["server_log_tracebacks"] = log.count("Traceback")
        report["server_exit_code"] = process.returncode
    line = json.dumps(report)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
