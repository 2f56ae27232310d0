"""A shift benchmark for the predictor: the same tasks asked in wordings it never saw (issue 23).

Twelve tasks, each with its own output length (how long the call runs), asked in eight styles
of wording: an order, a polite request, a bullet spec, a JSON object and a role prompt (the
styles the predictor trains on), and keywords, a story and a step-by-step prompt (styles it
never sees). Every style asks every task, with the task's own words and random details, so the
task (and the latency) can be told from the task's words in any style; what an unfamiliar style
changes is everything around them. Latency: a prefill per prompt token, then the output's
tokens at a steady pace, with noise.

The novelty floor (`QuantilePredictor.novelty_floor`) is what holds the tails there: the table
scores each model with it and without it.

    .venv/bin/python bench/style_shift.py      # the table, printed

`bench/predictor_eval.py` writes the table into RESULTS.md.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence

from swarmx.models.evaluate import evaluate
from swarmx.models.features import FeatureConfig
from swarmx.models.query import queries
from swarmx.models.train import train
from swarmx.traces import DeviceAtDispatch, RuntimeAtDispatch, TraceRecord

LEVELS = (0.5, 0.9, 0.95, 0.99)
TASKS: list[tuple[str, str, int]] = [
    ("summarise", "the quarterly sales report", 120),
    ("translate into German", "the user manual chapter", 400),
    ("write unit tests for", "the payment parser", 600),
    ("fix the bug in", "the login handler", 250),
    ("list", "three risks of the database migration", 60),
    ("classify by urgency", "this support ticket", 8),
    ("extract every date from", "the supplier contract", 30),
    ("draft an email about", "last night's outage", 180),
    ("explain", "how the caching layer works", 300),
    ("refactor", "the billing module", 700),
    ("answer yes or no:", "is the nightly build green", 2),
    ("write a short poem about", "the product launch", 90),
]
"""(what to do, to what, median output tokens)."""
DETAILS = (
    "customer Anna",
    "region north",
    "version 2.4",
    "ticket 8812",
    "the Berlin office",
    "team blue",
    "budget 40k",
    "deadline Friday",
    "file report_q3.pdf",
    "service checkout",
    "branch main",
    "the mobile app",
)

Style = Callable[[str, str, str], str]
STYLES: dict[str, Style] = {
    "order": lambda v, o, d: f"{v} {o}. Details: {d}.",
    "polite": lambda v, o, d: f"Could you please {v} {o}? Some context: {d}. Thank you kindly!",
    "spec": lambda v, o, d: f"TASK\n- action: {v}\n- target: {o}\n- notes: {d}",
    "json": lambda v, o, d: f'{{"instruction": "{v}", "input": "{o}", "extra": "{d}"}}',
    "role": lambda v, o, d: f"You are a senior engineer. Your job: {v} {o}. Keep in mind {d}.",
    "keywords": lambda v, o, d: f"{v} | {o} | {d} | asap pls",
    "story": lambda v, o, d: (
        f"Yesterday my manager asked me to {v} {o}, and honestly I am stuck; the background "
        f"is {d}, so what would you do in my shoes?"
    ),
    "steps": lambda v, o, d: (
        f"Let us reason step by step. Why might someone need to {v} {o}? Consider {d} "
        "carefully. Then go ahead and do it."
    ),
}
FAMILIAR = ("order", "polite", "spec", "json", "role")
UNFAMILIAR = ("keywords", "story", "steps")


def records(styles: Sequence[str], n: int, seed: int) -> list[TraceRecord]:
    """``n`` calls, each its own session, in the given styles, at random tasks and details."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        verb, obj, median = TASKS[rng.randrange(len(TASKS))]
        details = ", ".join(rng.sample(DETAILS, rng.randint(1, 3)))
        style = styles[rng.randrange(len(styles))]
        prompt = STYLES[style](verb, obj, details)
        prompt_tokens = max(1, len(prompt) // 4)
        output = max(1, round(median * math.exp(rng.gauss(0, 0.35))))
        latency = (0.05 + 0.0002 * prompt_tokens + 0.02 * output) * math.exp(rng.gauss(0, 0.1))
        out.append(
            TraceRecord(
                ts=float(i),
                workflow=f"{style}-{seed}-{i}",
                step="ask",
                deps=[],
                kind="llm",
                model="m",
                prompt=prompt,
                prompt_tokens=prompt_tokens,
                max_tokens=1024,
                output_tokens=output,
                latency_s=latency,
                queue_s=0.0,
                ttft_s=None,
                node="n",
                replica="n/m",
                device=DeviceAtDispatch("A100", 0.3, 0.5, 0.1),
                runtime=RuntimeAtDispatch(1, 0),
                workflow_name="styles",
            )
        )
    return out


def section(seed: int = 0, n_train: int = 6000, n_test: int = 2000, seeds: int = 3) -> list[str]:
    """The familiar-against-unfamiliar table for RESULTS.md: ``seeds`` trainings (seed, seed +
    1, ...), each scored with its novelty floor and without it (the same model, its marginal
    dropped), so what the floor buys and what it costs on familiar wording is seen per run."""
    rows, took = [], []
    for s in range(seed, seed + seeds):
        t0 = time.monotonic()
        model, _ = train(records(FAMILIAR, n_train, s), FeatureConfig(levels=LEVELS), seed=s)
        took.append(time.monotonic() - t0)
        marginal = model.marginal
        for label, styles in (("familiar", FAMILIAR), ("unfamiliar", UNFAMILIAR)):
            test = records(styles, n_test, s + 100)
            qs = queries(test)
            novelty = float(model.encoder.encode_calls(qs).novelty.mean())
            for floor in (True, False):
                model.marginal = marginal if floor else None
                result = evaluate(label, model.predict(qs), [r.latency_s for r in test], LEVELS)
                rows.append(
                    f"| {s} | {label} | {'floor' if floor else 'no floor'} | {result.n} | "
                    f"{novelty:.2f} | "
                    + " | ".join(f"{result.pinball[p]:.3f}" for p in LEVELS)
                    + " | "
                    + " | ".join(f"{result.coverage[p]:.3f}" for p in LEVELS)
                    + " |"
                )
        model.marginal = marginal
    return [
        f"{n_train:,} training calls in the familiar styles ({', '.join(FAMILIAR)}; "
        f"{min(took):.1f}-{max(took):.1f} s a training), {n_test:,} test calls per row, new "
        f"draws of the same twelve tasks; unfamiliar: {', '.join(UNFAMILIAR)}. Novelty: the "
        "share of a prompt's n-grams never seen in training. *floor*: the live forecast, whose "
        "upper quantiles are at least the model's latency marginal at (p - 1 + novelty) / "
        "novelty (`QuantilePredictor.novelty_floor`); *no floor*: the same model without it.",
        "",
        "| seed | styles | forecast | n | novelty | "
        + " | ".join(f"pinball p{p:g} (s)" for p in LEVELS)
        + " | "
        + " | ".join(f"coverage p{p:g}" for p in LEVELS)
        + " |",
        "|---|---|---|---|---|" + "---|" * (2 * len(LEVELS)),
        *rows,
    ]


if __name__ == "__main__":
    print("\n".join(section()))
