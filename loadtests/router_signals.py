"""How long the router's per-request work takes: prompt signals, masking and the decision.

    uv run python -m loadtests.router_signals

Prints p50/p99 microseconds per prompt size. The goal for the complexity score is well under 1 ms.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from schemas.chat import ChatCompletionRequest
from services.router.decide import Conditions, Facts, plan
from services.router.masking import Masker
from services.router.policy import Masking, parse
from services.router.signals import signals

POLICY = parse("""
local_model: small
aliases: {assistant: {variants: [{name: a, target: small, weight: 1}, {name: b, target: openai/x, weight: 1}]}}
rules:
  - {name: onsite, when: {residency: onsite}, route: [local]}
  - {name: long, when: {model: auto, prompt_tokens: {gt: 1500}}, route: [openai/gpt-4o, local]}
  - {name: hard, when: {model: auto, complexity: {gte: 0.5}}, route: [openai/gpt-4o-mini, local]}
  - {name: default, route: [requested, local]}
""")
PROMPTS = {
    "question (8 words)": "Why did line 3 stop on the 3rd of November?",
    "email (200 words)": ("Hello team, the press on line 3 stopped at 14:35. Call me at +49 30 1234567 or write to "
                          "jane.doe@plant.example. " * 12),
    "manual (2,000 words)": "Check the hydraulic pressure before restarting the press. " * 250,
    "code (8,000 words)": "```python\n" + "def f(x):\n    return x * 2  # why? explain\n" * 1000 + "```",
}


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    samples = []
    for _ in range(runs):
        t = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t) / 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def main() -> None:
    masker = Masker.from_policy(Masking())
    conditions = Conditions(local_models=frozenset({"small"}))
    print("| prompt | signals p50 µs | signals p99 µs | masking p50 µs | decision p50 µs |\n|---|---|---|---|---|")
    for name, text in PROMPTS.items():
        request = ChatCompletionRequest.model_validate(
            {"model": "auto", "messages": [{"role": "user", "content": text}]})
        runs = 2000 if len(text) < 20_000 else 200
        s50, s99 = timed(lambda t=text: signals(t), runs)
        m50, _ = timed(lambda r=request: masker.mask_request(r), runs)
        sig = signals(text)
        d50, _ = timed(lambda s=sig: plan(POLICY, Facts("auto", "acme", "u1", False, s), conditions), runs)
        print(f"| {name} | {s50:.0f} | {s99:.0f} | {m50:.0f} | {d50:.0f} |")


if __name__ == "__main__":
    main()
