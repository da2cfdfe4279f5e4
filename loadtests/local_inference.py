"""Local inference benchmark: served against raw, single stream, concurrency, embeddings. Prints tables.

    uv run python -m loadtests.local_inference                     # the full table (~4 minutes)
    uv run python -m loadtests.local_inference --windows 0,5,20,50 # also sweep the batching window
    uv run python -m loadtests.local_inference --quick             # shorter runs, for a smoke check

It starts what it measures itself, on free ports, from the real models (`just models`): a nats-server,
a local-inference worker on `deploy/models.yaml` (SmolLM2-135M-Instruct int4, all-MiniLM-L6-v2), a
batcher, a router and a gateway; every process is stopped by its PID at the end. Clients stream through
the gateway over HTTP (server-sent events), as an OpenAI client would. The raw baselines run
onnxruntime-genai and onnxruntime in this process, on the same prompt and the same inputs, in the same
run, while the served stack is idle.

Numbers depend on the machine and on what else runs on it: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import yaml

from tests.support import REAL_MODELS, ROOT, Service, running, start_single

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
PROMPT = ("Explain, step by step, how to replace the mechanical seal of a centrifugal pump, and what to check "
          "before restarting it.")
WORDS = ["pump", "seal", "bearing", "motor", "conveyor", "press", "hydraulic", "pressure", "valve", "line",
         "shift", "operator", "check", "restart", "leak", "oil", "temperature", "vibration", "alarm", "sensor",
         "maintenance", "schedule", "filter", "coolant", "belt", "gearbox"]


# -- the served stack ---------------------------------------------------------------------------------

def registry(path: Path, window_ms: float | None, max_batch: int | None) -> Path:
    """deploy/models.yaml with the chat model's batching options overridden (when given)."""
    models = yaml.safe_load((ROOT / "deploy" / "models.yaml").read_text())
    for model in models["models"]:
        if model["name"] == CHAT:
            batching = dict(model.get("batching") or {})
            if window_ms is not None:
                batching["max_wait_ms"] = window_ms
            if max_batch is not None:
                batching["max_batch"] = max_batch
            model["batching"] = batching
    path.write_text(yaml.safe_dump(models))
    return path


THREADS = "1"  # onnxruntime intra-op threads of the served decoder (--threads)


@contextmanager
def stack(tmp: Path, window_ms: float | None = None, max_batch: int | None = None,
          batcher: bool = True) -> Iterator[str]:
    """Start nats-server, worker, batcher (unless told not to), router and gateway; yield the API URL."""
    folder = tmp / f"nats-{time.monotonic_ns()}"
    folder.mkdir(parents=True)
    nats = start_single(folder)
    env = {"LW_NATS_URL": nats.url, "LW_SITE": "bench", "LW_LOG_LEVEL": "warning",
           "LW_MODELS_DIR": os.fspath(REAL_MODELS)}
    worker = Service("local_inference", {**env, "LW_INFERENCE_THREADS": THREADS, "LW_MODELS_FILE": os.fspath(
        registry(tmp / "models.yaml", window_ms, max_batch))})
    services = [worker, *([Service("batcher", env)] if batcher else []), Service("router", env)]
    gateway = Service("gateway", env)
    try:
        with running(*services, gateway, timeout=120):
            yield f"{gateway.base}/v1"
    finally:
        nats.stop()


# -- clients ------------------------------------------------------------------------------------------

@dataclass
class Stream:
    """What one streamed answer looked like from the client."""

    started: float
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.started

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]

    @property
    def rate(self) -> float:
        """Tokens per second after the first token."""
        span = self.chunk_times[-1] - self.chunk_times[0]
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0


async def stream_once(client: httpx.AsyncClient, url: str, max_tokens: int, prompt: str = PROMPT) -> Stream:
    """One streamed chat answer; records when each piece of text arrived and the token count."""
    body = {"model": CHAT, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    result = Stream(time.perf_counter())
    async with client.stream("POST", f"{url}/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                result.tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                result.chunk_times.append(time.perf_counter())
    return result


@dataclass
class Load:
    """Closed-loop clients for a while."""

    clients: int
    wall: float
    streams: list[Stream]

    @property
    def throughput(self) -> float:
        return sum(s.tokens for s in self.streams) / self.wall

    def ttft(self, q: float) -> float:
        return quantile([s.ttft for s in self.streams], q)

    def gap(self, q: float) -> float:
        return quantile([g for s in self.streams for g in s.gaps], q)


def quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.array(values), q)) if values else float("nan")


async def load(url: str, clients: int, seconds: float, max_tokens: int | tuple[int, int]) -> Load:
    """``clients`` clients each asking again as soon as an answer ends, for ``seconds``; only answers
    that started inside the window count, and the window closes when the last of them ends."""
    rng = np.random.default_rng(1)
    streams: list[Stream] = []
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await stream_once(client, url, 4)  # warm-up
        started = time.perf_counter()

        async def one_client() -> None:
            while time.perf_counter() - started < seconds:
                n = max_tokens if isinstance(max_tokens, int) else int(rng.integers(*max_tokens))
                streams.append(await stream_once(client, url, n))

        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - started
    return Load(clients, wall, streams)


# -- raw baselines ------------------------------------------------------------------------------------

def raw_chat(batch: int, max_tokens: int, threads: int = 1) -> tuple[float, float, float]:
    """onnxruntime-genai alone, greedy, the served prompt ``batch`` times: (TTFT s, aggregate tokens/s
    after the first token, aggregate tokens/s from the start, prefill included)."""
    import onnxruntime_genai as og

    config = og.Config(os.fspath(REAL_MODELS / CHAT))
    if threads > 0:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    prompt = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": PROMPT}]),
                                           add_generation_prompt=True)
    params = og.GeneratorParams(model)
    params.set_search_options(batch_size=batch, do_sample=False, max_length=len(tokenizer.encode(prompt)) + max_tokens)
    started = time.perf_counter()
    generator = og.Generator(model, params)
    generator.append_tokens(tokenizer.encode_batch([prompt] * batch))
    generator.generate_next_token()
    first = time.perf_counter()
    steps = 1
    while not generator.is_done() and steps < max_tokens:
        generator.generate_next_token()
        steps += 1
    ended = time.perf_counter()
    return first - started, batch * (steps - 1) / (ended - first), batch * steps / (ended - started)


def texts(n: int) -> list[str]:
    """``n`` sentences of 4 to 60 words (deterministic)."""
    rng = np.random.default_rng(7)
    return [" ".join(rng.choice(WORDS, int(rng.integers(4, 60)))).capitalize() + "." for _ in range(n)]


def raw_embeddings(inputs: list[str], file: str, batch: int = 32) -> float:
    """Plain onnxruntime + tokenizers, padded to the longest of each batch, mean pooling, L2: inputs/s."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(os.fspath(REAL_MODELS / EMBED / file), options,
                                   providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(os.fspath(REAL_MODELS / EMBED / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.enable_padding()
    started = time.perf_counter()
    for at in range(0, len(inputs), batch):
        enc = tokenizer.encode_batch(inputs[at:at + batch])
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        hidden = session.run(None, {"input_ids": ids, "attention_mask": mask,
                                    "token_type_ids": np.zeros_like(ids)})[0]
        pooled = (hidden * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    return len(inputs) / (time.perf_counter() - started)


async def served_embeddings(url: str, inputs: list[str], per_request: int, clients: int) -> float:
    """Inputs per second through the gateway: ``clients`` concurrent callers, ``per_request`` inputs each."""
    chunks = [inputs[i:i + per_request] for i in range(0, len(inputs), per_request)]
    async with httpx.AsyncClient(timeout=120) as client:
        (await client.post(f"{url}/embeddings", json={"model": EMBED, "input": inputs[:2]})).raise_for_status()
        started = time.perf_counter()

        async def caller(mine: list[list[str]]) -> None:
            for chunk in mine:
                r = await client.post(f"{url}/embeddings", json={"model": EMBED, "input": chunk,
                                                                  "encoding_format": "base64"})
                r.raise_for_status()

        await asyncio.gather(*(caller(chunks[i::clients]) for i in range(clients)))
        return len(inputs) / (time.perf_counter() - started)


# -- the report ---------------------------------------------------------------------------------------

def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def say(line: str = "") -> None:
    print(line, flush=True)


def single_stream(url: str, runs: int, max_tokens: int) -> list[Stream]:
    async def go() -> list[Stream]:
        async with httpx.AsyncClient(timeout=300) as client:
            await stream_once(client, url, 4)
            return [await stream_once(client, url, max_tokens) for _ in range(runs)]

    return asyncio.run(go())


def chat_table(url: str, args: argparse.Namespace) -> None:
    served = single_stream(url, args.runs, args.max_tokens)
    raw = [raw_chat(1, args.max_tokens, args.threads) for _ in range(args.runs)]
    raw_rate = statistics.median(r[1] for r in raw)
    served_rate = statistics.median(s.rate for s in served)
    say(f"\n### Single stream (max_tokens {args.max_tokens}, greedy, median of {args.runs}; load {load_average()})\n")
    say("| path | TTFT ms | tokens/s | vs raw |\n|---|---|---|---|")
    say(f"| raw onnxruntime-genai loop | {statistics.median(r[0] for r in raw) * 1000:.0f} | {raw_rate:.1f} | 100% |")
    path = "gateway → router → worker" if args.no_batcher else "gateway → router → batcher → worker"
    say(f"| served: {path}, SSE | "
        f"{statistics.median(s.ttft for s in served) * 1000:.0f} | {served_rate:.1f} | "
        f"{served_rate / raw_rate:.0%} |")
    say(f"\n### Concurrent clients (closed loop, {args.seconds:g} s each, max_tokens {args.max_tokens})\n")
    say("| clients | answers | aggregate tokens/s | vs 1 client | TTFT p50 ms | TTFT p99 ms | inter-token p99 ms "
        "| load |\n|---|---|---|---|---|---|---|---|")
    base = 0.0
    for clients in args.clients:
        result = asyncio.run(load(url, clients, args.seconds, args.max_tokens))
        base = base or result.throughput
        say(f"| {clients} | {len(result.streams)} | {result.throughput:.1f} | {result.throughput / base:.2f}x | "
            f"{result.ttft(0.5) * 1000:.0f} | {result.ttft(0.99) * 1000:.0f} | {result.gap(0.99) * 1000:.0f} "
            f"| {load_average()} |")
    for batch in sorted({1, 8} | {c for c in args.clients if c <= 16}):
        ttft, rate, whole = raw_chat(batch, args.max_tokens, args.threads)
        say(f"| raw batch of {batch} (reference) | - | {whole:.1f} (decoding alone {rate:.1f}) | | "
            f"{ttft * 1000:.0f} | | | |")


def embeddings_table(url: str, args: argparse.Namespace) -> None:
    inputs = texts(args.embed_inputs)
    say(f"\n### Embeddings ({len(inputs)} sentences of 4-60 words; load {load_average()})\n")
    say("| path | inputs/s |\n|---|---|")
    for file in ("model.onnx", "model.int8.onnx"):
        say(f"| raw onnxruntime, {file}, batches of 32 | {raw_embeddings(inputs, file):.0f} |")
    for per_request, clients in ((1, 8), (16, 4), (64, 2)):
        rate = asyncio.run(served_embeddings(url, inputs, per_request, clients))
        say(f"| served (fp32), {clients} clients x {per_request} inputs per request | {rate:.0f} |")


async def bursts(url: str, size: int, spread_s: float, repeats: int, max_tokens: int) -> list[tuple[Stream, float]]:
    """``repeats`` bursts of ``size`` requests arriving spread evenly over ``spread_s`` on an idle stack
    (users asking at nearly the same moment); each answer with the time its burst took to finish."""
    out: list[tuple[Stream, float]] = []
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=size + 4)) as client:
        await stream_once(client, url, 4)
        for _ in range(repeats):
            started = time.perf_counter()

            async def late(i: int) -> Stream:
                await asyncio.sleep(spread_s * i / max(size - 1, 1))
                return await stream_once(client, url, max_tokens)

            streams = await asyncio.gather(*(late(i) for i in range(size)))
            out += [(s, time.perf_counter() - started) for s in streams]
    return out


def window_sweep(tmp: Path, args: argparse.Namespace) -> None:
    say(f"\n### Batching window (max_wait_ms) sweep, max_tokens {args.max_tokens}\n")
    say("Lone requests pay the window in TTFT; a burst of 8 requests arriving over 40 ms (users asking at "
        "nearly the same moment) shares one batch only if the window covers the spread.\n")
    say("| max_wait_ms | 1 client: TTFT p50 ms | tokens/s | burst of 8: TTFT p50 ms | TTFT p99 ms | "
        "burst done in s | load |\n|---|---|---|---|---|---|---|")
    for window in args.windows:
        with stack(tmp, window_ms=window) as url:
            lone = single_stream(url, args.runs, args.max_tokens)
            burst = asyncio.run(bursts(url, 8, 0.04, max(2, args.runs), args.max_tokens))
            ttfts = [s.ttft for s, _ in burst]
            say(f"| {window:g} | {statistics.median(s.ttft for s in lone) * 1000:.0f} | "
                f"{statistics.median(s.rate for s in lone):.1f} | {quantile(ttfts, 0.5) * 1000:.0f} | "
                f"{quantile(ttfts, 0.99) * 1000:.0f} | {statistics.median(d for _, d in burst):.2f} | "
                f"{load_average()} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="single-stream runs (median reported)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each concurrency run")
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16])
    parser.add_argument("--embed-inputs", type=int, default=1024)
    parser.add_argument("--windows", type=lambda s: [float(x) for x in s.split(",")], default=[],
                        help="also sweep these batching windows (ms), restarting the worker for each")
    parser.add_argument("--skip", choices=["chat", "embeddings"], action="append", default=[])
    parser.add_argument("--quick", action="store_true", help="3 runs, 8 s per concurrency run")
    parser.add_argument("--threads", type=int, default=1,
                        help="onnxruntime intra-op threads, served (LW_INFERENCE_THREADS) and raw alike")
    parser.add_argument("--no-batcher", action="store_true", help="route straight to the worker (for comparison)")
    args = parser.parse_args()
    global THREADS
    THREADS = str(args.threads)
    if args.quick:
        args.runs, args.seconds, args.embed_inputs = 3, 8.0, 256
    if not (REAL_MODELS / CHAT / ".complete").exists():
        raise SystemExit(f"the real models are not built in {REAL_MODELS}: run `uv run just models`")
    say(f"# leafwire local inference benchmark\n\n{os.cpu_count()} CPUs; load average at start {load_average()}; "
        f"intra-op threads {args.threads}; {'no batcher' if args.no_batcher else 'batcher in the path'}")
    with tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp, stack(Path(tmp), batcher=not args.no_batcher) as url:
        if "chat" not in args.skip:
            chat_table(url, args)
        if "embeddings" not in args.skip:
            embeddings_table(url, args)
    if args.windows:
        with tempfile.TemporaryDirectory(prefix="lw-bench-") as tmp:
            window_sweep(Path(tmp), args)


if __name__ == "__main__":
    main()
