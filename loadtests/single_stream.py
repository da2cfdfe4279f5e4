"""Time to first token and tokens per second of streamed answers through a running gateway.

    uv run python -m loadtests.single_stream --url http://127.0.0.1:8080/v1 --runs 5

Prints one row per run and the median; uses the official openai client, as a user would.
"""

from __future__ import annotations

import argparse
import statistics
import time

from openai import OpenAI

PROMPT = "Write a short paragraph about maintaining centrifugal pumps in a factory."


def one(client: OpenAI, model: str, max_tokens: int) -> tuple[float, int, float]:
    """TTFT (s), completion tokens, tokens/s after the first token."""
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and not first:
            first = time.perf_counter()
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    ended = time.perf_counter()
    return first - started, tokens, (tokens - 1) / (ended - first) if tokens > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()
    client = OpenAI(base_url=args.url, api_key="unused")
    one(client, args.model, 8)  # warm-up
    rows = [one(client, args.model, args.max_tokens) for _ in range(args.runs)]
    print("| run | TTFT ms | tokens | tokens/s |\n|---|---|---|---|")
    for i, (ttft, n, rate) in enumerate(rows, 1):
        print(f"| {i} | {ttft * 1000:.0f} | {n} | {rate:.1f} |")
    print(f"| median | {statistics.median(r[0] for r in rows) * 1000:.0f} | "
          f"{statistics.median(r[1] for r in rows):.0f} | {statistics.median(r[2] for r in rows):.1f} |")


if __name__ == "__main__":
    main()
