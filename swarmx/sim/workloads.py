"""What ``swarmx sim`` runs: built-in generators of the three agentic workload classes, and
readers for recorded traces (SwarmX trace JSONL, the Azure LLM 2023 CSVs, Mooncake JSONL).

Every workflow is a real `WorkflowSpec` that the scheduler's workflow engine executes as it would
on a cluster, plus the truth the engine cannot know in advance (`CallTruth`: how many tokens each
call really generates, how long each tool really runs, what each step outputs, so a dynamic
fan-out expands to as many instances as the agent "decided"). Policies see what a live scheduler
sees: the rendered prompt, ``prompt_tokens``, ``max_tokens``; never ``output_tokens`` or
``work_s``.

The prompt text of a generated call is a short stand-in: its instructions are real words (they
shift the output length, which is what a text-aware predictor can learn), but the context it
refers to ("Relevant files follow") is not spelled out; its size is ``CallTruth.prompt_tokens``.

Pure Python and deterministic given the seed. Documented for users in docs/simulator.md
("Workloads"); the numbers there come from `describe` and `critical_path_s`.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TextIO

from swarmx.backends.emulated import GPUS, ModelProfile, decode_step_s, prefill_s, vision_s
from swarmx.sim.workload import CallTruth, SimWorkflow
from swarmx.workflow.spec import FanOut, StepSpec, WorkflowSpec

LLM_MODEL = "llama-3-8b"
"""The emulated 8B profile (`swarmx.backends.emulated`)."""
VISION_MODEL = "vit-l"
"""The emulated vision model (``vision_s``): OCR passes and diffusion-like renders."""

CLASSES = ("codegen", "research", "multimodal")
KINDS = (*CLASSES, "mixed")
"""What ``--workload`` accepts: ``mixed`` is equal thirds of the three classes, interleaved."""

SLO_S: dict[str, float] = {"codegen": 160.0, "research": 60.0, "multimodal": 30.0}
"""End-to-end SLO per class when none is given: about 4x the class's median critical path
alone on an A100 (`critical_path_s`; checked by the tests to stay within 3-5x)."""

# --- arrivals: a two-state Markov-modulated Poisson process -----------------------------------

BURST_RATE_X = 2.5
"""Arrival rate during a burst, as a multiple of the mean rate."""
CALM_RATE_X = 0.625
"""Arrival rate between bursts: with bursts 20% of the time the mean is exactly 1x."""
BURST_GAPS = 8.0
"""Mean burst length, in mean inter-arrival gaps (``1 / rate``): about 20 arrivals per burst."""
CALM_GAPS = 32.0
"""Mean calm period, in mean inter-arrival gaps: about 20 arrivals, so bursts cover 20% of
the time and a calm-burst cycle brings about 40 workflows."""


def arrival_times(n: int, rate_per_s: float, rng: random.Random) -> list[float]:
    """``n`` arrival times (s, from 0) of a two-state Markov-modulated Poisson process whose
    long-run rate is ``rate_per_s``: exponential calm and burst periods (means `CALM_GAPS` and
    `BURST_GAPS` mean gaps), Poisson arrivals at `CALM_RATE_X` or `BURST_RATE_X` times the rate
    within them. Durations scale with ``1 / rate`` so a burst's shape (arrivals per burst, peak
    to mean) is the same at every load."""
    if not rate_per_s > 0 or math.isinf(rate_per_s):
        raise ValueError(f"rate_per_s must be a positive finite number, got {rate_per_s}")
    gap = 1.0 / rate_per_s
    burst_share = BURST_GAPS / (BURST_GAPS + CALM_GAPS)
    burst = rng.random() < burst_share
    rates = (rate_per_s * CALM_RATE_X, rate_per_s * BURST_RATE_X)
    means = (CALM_GAPS * gap, BURST_GAPS * gap)
    t = 0.0
    end = rng.expovariate(1.0 / means[burst])
    out: list[float] = []
    while len(out) < n:
        nxt = t + rng.expovariate(rates[burst])
        if nxt >= end:  # memoryless: restarting the clock at the switch is exact
            t, burst = end, not burst
            end = t + rng.expovariate(1.0 / means[burst])
            continue
        t = nxt
        out.append(t)
    return out


# --- helpers ----------------------------------------------------------------------------------


def _lognormal(rng: random.Random, median: float, sigma: float, lo: float, hi: float) -> float:
    # gauss (Box-Muller) is several times faster than normalvariate, and as deterministic
    return min(hi, max(lo, median * math.exp(sigma * rng.gauss(0.0, 1.0))))


def _randint(rng: random.Random, lo: int, hi: int) -> int:
    """Like ``rng.randint`` (a hot path here), uniform on lo..hi."""
    return lo + int(rng.random() * (hi - lo + 1))


def _tokens(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return round(_lognormal(rng, median, sigma, lo, hi))


Weighted = tuple[str, float, float]
"""(wording, weight, effect): a row drawn with probability weight / total; its effect
multiplies an output length's median (or, in the scope tables, picks a fan-out size range)."""


def _pick(rng: random.Random, table: Sequence[Weighted]) -> tuple[str, float]:
    x = rng.random() * sum(w for _, w, _ in table)
    for words, weight, effect in table:
        x -= weight
        if x < 0:
            return words, effect
    return table[-1][0], table[-1][2]


def _llm(
    step_id: str,
    after: list[str],
    prompt: str,
    max_tokens: int,
    *,
    fan_out: FanOut | None = None,
    retries: int = 0,
) -> StepSpec:
    return StepSpec(
        id=step_id,
        kind="llm",
        after=after,
        model=LLM_MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        fan_out=fan_out,
        retries=retries,
    )


def _tool(
    step_id: str, after: list[str], command: list[str], fan_out: FanOut | None = None
) -> StepSpec:
    return StepSpec(id=step_id, kind="tool", after=after, command=command, fan_out=fan_out)


def _vision(
    step_id: str,
    after: list[str],
    prompt: str,
    *,
    image_px: int,
    steps: int,
    fan_out: FanOut | None = None,
) -> StepSpec:
    return StepSpec(
        id=step_id,
        kind="model",
        after=after,
        model=VISION_MODEL,
        prompt=prompt,
        inputs={"image_px": str(image_px), "steps": str(steps)},
        fan_out=fan_out,
    )


def _out(rng: random.Random, median: float, sigma: float, max_tokens: int) -> int:
    """A true output length: lognormal around ``median`` (heavy right tail), 1..max_tokens."""
    return _tokens(rng, max(1.0, median), sigma, 1, max_tokens)


Truth = dict[tuple[str, int | None], CallTruth]
Built = tuple[str, dict[str, str], list[StepSpec], Truth]
"""(class name, inputs, steps in topological order, truth) of one generated workflow."""

# --- codegen ----------------------------------------------------------------------------------

_CG_TASKS = (
    "add retry with exponential backoff to the HTTP client",
    "fix the race between cache eviction and refresh",
    "support pagination in the orders API",
    "migrate the settings loader to typed dataclasses",
    "add rate limiting to the login endpoint",
    "make the CSV importer stream instead of loading the file",
    "replace the hand-rolled JSON parser with the standard library",
    "add a dry-run flag to the deploy command",
    "fix the off-by-one in the log rotation",
    "add metrics for queue depth and wait time",
    "split the monolithic user service into read and write paths",
    "port the image resizer to async IO",
    "add optimistic locking to the inventory table",
    "make the scheduler survive a database restart",
    "add end-to-end encryption to file uploads",
    "remove the deprecated v1 endpoints",
)
_CG_SCOPE: tuple[Weighted, ...] = (
    # wording, weight, row of _CG_PARTS (how many parts the plan lists)
    ("This is a small fix: keep the plan to one or two parts.", 0.35, 0.0),
    ("This is a feature: split it into a few parts.", 0.45, 1.0),
    ("This is a large refactor across the codebase: be thorough, one part per module.", 0.2, 2.0),
)
_CG_PARTS = ((1, 2), (3, 5), (6, 10))
_CG_PART_WORDS: tuple[Weighted, ...] = (
    ("stub out", 0.15, 0.3),
    ("rename and tidy", 0.15, 0.4),
    ("implement", 0.4, 1.0),
    ("rewrite", 0.15, 1.6),
    ("implement with exhaustive tests for every edge case of", 0.15, 2.6),
)
_CG_COMPONENTS = (
    "the config loader",
    "the retry policy",
    "the cache layer",
    "the request handler",
    "the database schema",
    "the CLI flags",
    "the metrics exporter",
    "the error types",
    "the serializer",
    "the connection pool",
    "the background worker",
    "the auth middleware",
    "the test fixtures",
    "the API client",
    "the migration script",
    "the logging setup",
)
_CG_CODE_STYLE: tuple[Weighted, ...] = (
    ("Minimal diff, no comments.", 0.3, 0.6),
    ("Follow the existing style.", 0.45, 1.0),
    ("Write it in full detail, with docstrings and tests.", 0.25, 1.8),
)
_CG_REVIEW_STYLE: tuple[Weighted, ...] = (
    ("Approve or reject in one sentence.", 0.2, 0.08),
    ("Review briefly.", 0.3, 0.3),
    ("Review the change.", 0.3, 1.0),
    ("Write a detailed report: every issue, line by line.", 0.2, 2.5),
)
_CG_SHARDS: tuple[Weighted, ...] = (("2", 0.3, 2), ("4", 0.5, 4), ("8", 0.2, 8))
_CG_CODE_MAX = 12
"""The code step's dynamic fan-out cap (plans never list more than 10 parts)."""


def _codegen(rng: random.Random) -> Built:
    """plan -> code[k] (dynamic, from the plan's lines) -> lint, test[shards] (fixed) -> fix ->
    review. Contexts grow along the chain from ~1.6k to ~8k tokens."""
    task = rng.choice(_CG_TASKS)
    scope, row = _pick(rng, _CG_SCOPE)
    lo, hi = _CG_PARTS[int(row)]
    k = _randint(rng, lo, hi)
    style, style_x = _pick(rng, _CG_CODE_STYLE)
    review_style, review_x = _pick(rng, _CG_REVIEW_STYLE)
    shards_text, _ = _pick(rng, _CG_SHARDS)
    shards = int(shards_text)
    truth: Truth = {}

    ctx = _tokens(rng, 1600, 0.35, 800, 3000)
    parts: list[tuple[str, float]] = []
    for component in rng.sample(_CG_COMPONENTS, k):
        verb, size_x = _pick(rng, _CG_PART_WORDS)
        parts.append((f"{verb} {component}", size_x))
    plan_out = "\n".join(p for p, _ in parts)
    plan_tokens = min(512, 12 + sum(_randint(rng, 8, 16) for _ in parts))
    truth["plan", None] = CallTruth(ctx, plan_tokens, output=plan_out)

    code_ctx = ctx + plan_tokens + _tokens(rng, 1200, 0.4, 400, 3000)
    for i, (_, size_x) in enumerate(parts):
        n = _out(rng, 380 * size_x * style_x, 0.6, 4096)
        prompt_tokens = code_ctx + _randint(rng, -150, 150)
        truth["code", i] = CallTruth(prompt_tokens, n, output=f"patch {i}: {n // 10 + 1} lines")

    truth["lint", None] = CallTruth(
        0, work_s=_lognormal(rng, 0.8, 0.5, 0.1, 30), output=f"lint: {_randint(rng, 0, 6)} problems"
    )
    failures = 0
    test_x = 1.0 + 0.25 * (k - 1)
    for i in range(shards):
        failed = _randint(rng, 1, 4) if rng.random() < 0.3 else 0
        failures += failed
        passed = _randint(rng, 20, 90)
        work = _lognormal(rng, 4.0 * test_x * 4 / shards, 0.9, 0.2, 300)
        result = f"{passed} passed, {failed} failed" if failed else f"{passed} passed"
        truth["test", i] = CallTruth(0, work_s=work, output=f"shard {i}: {result}")

    fix_ctx = min(7000, code_ctx + _tokens(rng, 1500, 0.4, 600, 3500))
    fix_median = 25.0 if failures == 0 else (150 + 90 * failures) * style_x
    truth["fix", None] = CallTruth(fix_ctx, _out(rng, fix_median, 0.6, 2048), output="fix applied")
    review_ctx = min(8192, fix_ctx + _tokens(rng, 1200, 0.4, 500, 3000))
    review_n = _out(rng, 400 * review_x * (0.6 + 0.1 * k), 0.6, 2048)
    verdict = "approved" if rng.random() < 0.7 else "changes requested"
    truth["review", None] = CallTruth(review_ctx, review_n, output=verdict)

    steps = [
        _llm(
            "plan",
            [],
            "You are a senior engineer planning a change to a large repository. "
            + scope
            + " List the parts, one per line.\nTask: {inputs.task}\nRepository map follows.\n",
            512,
        ),
        _llm(
            "code",
            ["plan"],
            "You are editing a large repository. "
            + style
            + "\nTask: {inputs.task}\nPlan:\n{steps.plan.output}\n"
            "Write part {index}: {item}\nRelevant files follow.\n",
            4096,
            fan_out=FanOut(source="plan", split="lines", max=_CG_CODE_MAX),
            retries=1,
        ),
        _tool("lint", ["code"], ["ruff", "check", "--output-format", "concise", "."]),
        _tool(
            "test",
            ["code"],
            ["pytest", "-q", "--shard-id", "{index}", "--num-shards", shards_text],
            FanOut(count=shards),
        ),
        _llm(
            "fix",
            ["test", "lint"],
            "Fix what the checks report; change nothing else. "
            + style
            + "\nTask: {inputs.task}\nTest results:\n{steps.test.output}\n"
            "Lint:\n{steps.lint.output}\nThe patches and failing tests follow.\n",
            2048,
        ),
        _llm(
            "review",
            ["fix"],
            "You are reviewing a change. "
            + review_style
            + "\nTask: {inputs.task}\nPatches:\n{steps.code.output}\n"
            "Test results:\n{steps.test.output}\nThe diff follows.\n",
            2048,
        ),
    ]
    return "codegen", {"task": task}, steps, truth


# --- research ---------------------------------------------------------------------------------

_RS_QUESTIONS = (
    "why do tail latencies grow with utilisation",
    "how do vector databases trade recall for speed",
    "what limits battery energy density",
    "how do central banks set interest rates",
    "why did the 2008 housing market collapse",
    "how effective are four-day work weeks",
    "what causes antibiotic resistance",
    "how do large language models memorise data",
    "which heat pump designs work in cold climates",
    "how do consensus protocols tolerate partitions",
    "what drives coral reef bleaching",
    "how do cities reduce traffic deaths",
)
_RS_SCOPE: tuple[Weighted, ...] = (
    # wording, weight, row of _RS_QUERIES (how many queries the plan lists)
    ("List a few search queries for the question, one per line.", 0.4, 0.0),
    ("List several search queries for the question, one per line.", 0.35, 1.0),
    (
        "Be thorough: list every search query worth running, one per line, leave no angle "
        "uncovered.",
        0.25,
        2.0,
    ),
)
_RS_QUERIES = ((2, 3), (4, 6), (12, 16))
_RS_FAN_MAX = 16
_RS_ASPECTS = (
    "definitions",
    "history",
    "recent benchmarks",
    "failure cases",
    "cost",
    "alternatives",
    "expert opinion",
    "open problems",
    "regulation",
    "case studies",
    "measurement methods",
    "criticism",
    "statistics",
    "mechanisms",
    "trends",
    "practical advice",
    "common misconceptions",
    "key papers",
)
_RS_QUERY_FORMS: tuple[Weighted, ...] = (
    ("quick fact:", 0.3, 0.3),
    ("overview of", 0.45, 1.0),
    ("compare in depth:", 0.25, 2.4),
)
_RS_NOTE_STYLE: tuple[Weighted, ...] = (
    ("in one sentence", 0.2, 0.15),
    ("briefly", 0.3, 0.4),
    ("as bullet points", 0.3, 1.0),
    ("in detail, quoting the sources", 0.2, 2.0),
)
_RS_REPORT_STYLE: tuple[Weighted, ...] = (
    ("Answer in one sentence.", 0.15, 0.1),
    ("Answer briefly.", 0.25, 0.3),
    ("Write a short report.", 0.25, 1.0),
    ("Write a detailed report with citations.", 0.25, 2.5),
    ("Write exhaustively, covering every edge case and counter-argument.", 0.1, 4.0),
)


def _research(rng: random.Random) -> Built:
    """plan -> search[k] (tool) -> read[k] (both dynamic, from the plan's lines) -> report."""
    question = rng.choice(_RS_QUESTIONS)
    scope, row = _pick(rng, _RS_SCOPE)
    lo, hi = _RS_QUERIES[int(row)]
    k = _randint(rng, lo, hi)
    note_style, note_x = _pick(rng, _RS_NOTE_STYLE)
    report_style, report_x = _pick(rng, _RS_REPORT_STYLE)
    truth: Truth = {}

    queries: list[tuple[str, float]] = []
    for aspect in rng.sample(_RS_ASPECTS, k):
        form, size_x = _pick(rng, _RS_QUERY_FORMS)
        queries.append((f"{form} {aspect}", size_x))
    plan_tokens = 8 + sum(_randint(rng, 10, 18) for _ in queries)
    truth["plan", None] = CallTruth(
        _tokens(rng, 450, 0.4, 150, 1500), plan_tokens, output="\n".join(q for q, _ in queries)
    )
    notes = 0
    for i, (query, size_x) in enumerate(queries):
        work = _lognormal(rng, 0.7, 0.8, 0.05, 60)
        hits = _randint(rng, 3, 10)
        truth["search", i] = CallTruth(0, work_s=work, output=f"{hits} results for {query}")
        n = _out(rng, 200 * size_x * note_x, 0.6, 1024)
        notes += n
        pages = _tokens(rng, 3000, 0.5, 400, 12000)
        truth["read", i] = CallTruth(pages, n, output=f"notes on {query}")
    report_ctx = min(16000, 300 + notes + _randint(rng, 0, 200))
    report_n = _out(rng, 450 * report_x, 0.6, 4096)
    truth["report", None] = CallTruth(report_ctx, report_n, output="report")

    fan = FanOut(source="plan", split="lines", max=_RS_FAN_MAX)
    steps = [
        _llm(
            "plan",
            [],
            "You are a research agent. " + scope + "\nQuestion: {inputs.question}\n",
            512,
        ),
        _tool("search", ["plan"], ["web-search", "--top", "10", "{item}"], fan),
        _llm(
            "read",
            ["search"],
            "Read the retrieved pages and take notes "
            + note_style
            + " on: {item}\nQuestion: {inputs.question}\nPages follow.\n",
            1024,
            fan_out=fan,
        ),
        _llm(
            "report",
            ["read"],
            report_style + "\nQuestion: {inputs.question}\nNotes:\n{steps.read.output}\n",
            4096,
        ),
    ]
    return "research", {"question": question}, steps, truth


# --- multimodal -------------------------------------------------------------------------------

_MM_DOCS: tuple[tuple[str, float, int, int], ...] = (
    # document, field-count factor, pages lo..hi
    ("receipt", 0.4, 1, 1),
    ("invoice", 0.7, 1, 3),
    ("shipping manifest", 1.0, 2, 6),
    ("tax form", 1.1, 2, 4),
    ("lab report", 1.2, 2, 8),
    ("insurance claim", 1.3, 3, 10),
    ("contract", 1.6, 4, 12),
)
_MM_QUESTIONS = (
    "What is the total amount due?",
    "Which items are missing from the order?",
    "When does the agreement expire?",
    "Are any values outside their reference range?",
    "Who are the parties and what are their obligations?",
    "Does the claim match the policy coverage?",
)
_MM_EXTRACT_STYLE: tuple[Weighted, ...] = (
    ("only the totals", 0.3, 0.25),
    ("the main fields", 0.45, 1.0),
    ("every field, including each line item", 0.25, 2.0),
)
_MM_ANSWER_STYLE: tuple[Weighted, ...] = (
    ("Reply with the value only.", 0.2, 0.04),
    ("Answer briefly.", 0.3, 0.3),
    ("Explain your answer.", 0.3, 1.0),
    ("Write a detailed report on the document.", 0.2, 2.5),
)


def _multimodal(rng: random.Random) -> Built:
    """ocr[pages] (vision, fixed fan-out) -> extract[pages] (fixed) -> lookup (tool) -> answer,
    with an optional diffusion-like figure render (vision, 20-50 passes) feeding the answer."""
    doc, fields_x, lo, hi = rng.choice(_MM_DOCS)
    pages = _randint(rng, lo, hi)
    question = rng.choice(_MM_QUESTIONS)
    extract_style, extract_x = _pick(rng, _MM_EXTRACT_STYLE)
    answer_style, answer_x = _pick(rng, _MM_ANSWER_STYLE)
    px = rng.choice((1024, 1536, 2048))
    figure = rng.random() < 0.4
    truth: Truth = {}

    extracted = 0
    for i in range(pages):
        words = _tokens(rng, 700 * fields_x, 0.4, 60, 3000)
        truth["ocr", i] = CallTruth(8, 8 + px // 128, output=f"page {i} text, {words} words")
        n = _out(rng, 150 * fields_x * extract_x, 0.6, 1024)
        extracted += n
        truth["extract", i] = CallTruth(words + 250, n, output=f"page {i}: {n // 8 + 1} fields")
    truth["lookup", None] = CallTruth(
        0, work_s=_lognormal(rng, 0.4, 0.7, 0.02, 30), output=f"{_randint(rng, 0, 5)} records"
    )
    after = ["extract", "lookup"]
    steps = [
        _vision(
            "ocr",
            [],
            "scanned " + doc + " page {index}",
            image_px=px,
            steps=1,
            fan_out=FanOut(count=pages),
        ),
        _llm(
            "extract",
            ["ocr"],
            "Extract "
            + extract_style
            + " of this "
            + doc
            + " page as key: value lines.\nPage {index} text follows.\n",
            1024,
            fan_out=FanOut(count=pages),
        ),
        _tool("lookup", ["extract"], ["erp-lookup", "--doc-type", doc, "--fields", "extracted"]),
    ]
    if figure:
        fig_px = rng.choice((512, 768))
        passes = _randint(rng, 20, 50)
        truth["figure", None] = CallTruth(10, 8 + fig_px // 128, output="chart rendered")
        steps.insert(
            1,
            _vision("figure", [], "chart of the " + doc + " totals", image_px=fig_px, steps=passes),
        )
        after.append("figure")
    answer_ctx = min(16000, 200 + extracted + _randint(rng, 0, 100))
    truth["answer", None] = CallTruth(
        answer_ctx, _out(rng, 300 * answer_x, 0.6, 2048), output="answer"
    )
    steps.append(
        _llm(
            "answer",
            after,
            "You are a document assistant. "
            + answer_style
            + "\nQuestion: {inputs.question}\nLookup: {steps.lookup.output}\n"
            "Extracted fields follow.\n",
            2048,
        )
    )
    return "multimodal", {"question": question, "document": doc}, steps, truth


_BUILDERS: dict[str, Callable[[random.Random], Built]] = {
    "codegen": _codegen,
    "research": _research,
    "multimodal": _multimodal,
}


def generate(
    kind: str, *, workflows: int, rate_per_s: float, seed: int, slo_s: float | None = None
) -> list[SimWorkflow]:
    """``workflows`` workflows of a built-in class (`KINDS`), arriving at ``rate_per_s`` on
    average in bursts (`arrival_times`), deterministic given ``seed``. ``slo_s`` overrides the
    per-class defaults (`SLO_S`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown workload {kind!r} (known: {', '.join(KINDS)})")
    if workflows < 0:
        raise ValueError(f"workflows must be >= 0, got {workflows}")
    if slo_s is not None and (not slo_s > 0 or math.isinf(slo_s)):
        raise ValueError(f"slo_s must be a positive finite number, got {slo_s}")
    rng = random.Random(seed)
    arrivals = arrival_times(workflows, rate_per_s, rng)
    if kind == "mixed":
        classes = [CLASSES[i % len(CLASSES)] for i in range(workflows)]
        rng.shuffle(classes)
    else:
        classes = [kind] * workflows
    out: list[SimWorkflow] = []
    for n, (arrival, cls) in enumerate(zip(arrivals, classes, strict=True)):
        name, inputs, steps, truth = _BUILDERS[cls](rng)
        spec = WorkflowSpec(
            name=name,
            slo_s=SLO_S[name] if slo_s is None else slo_s,
            inputs=inputs,
            steps=steps,
            source=f"<generated {name} #{n}>",
        )
        out.append(SimWorkflow(arrival, spec, truth, name=name))
    return out


# --- unloaded critical path -------------------------------------------------------------------


def call_s(step: StepSpec, truth: CallTruth, gpu: str = "A100") -> float:
    """Service time of one call alone on an idle replica of the emulated model (tools: on an
    idle core): prefill, then one decode step per output token at the growing context."""
    if step.kind == "tool":
        return truth.work_s
    profile = GPUS[gpu]
    if step.kind == "model":
        return vision_s(
            profile, int(step.inputs.get("image_px", "224")), int(step.inputs.get("steps", "1"))
        )
    model = ModelProfile()
    out = max(1, truth.output_tokens)
    # a lone sequence is bandwidth-bound, so a step's time is linear in its context: the mean
    # step is the step at the mean context
    mean_ctx = truth.prompt_tokens + (out - 1) / 2
    return prefill_s(profile, model, truth.prompt_tokens) + out * decode_step_s(
        profile, model, [round(mean_ctx)]
    )


def critical_path_s(wf: SimWorkflow, gpu: str = "A100") -> float:
    """The workflow's makespan with every call alone on its own idle replica: the least it
    can take on any cluster of that GPU (release times of replayed traces included)."""
    finish: dict[str, float] = {}
    by_step: dict[str, list[CallTruth]] = {}
    for (step_id, _), t in wf.truth.items():
        by_step.setdefault(step_id, []).append(t)
    for step in wf.spec.steps:  # topological order
        start = max([wf.release_s.get(step.id, 0.0), *(finish[d] for d in step.after)])
        truths = by_step.get(step.id, [])
        finish[step.id] = start + max((call_s(step, t, gpu) for t in truths), default=0.0)
    return max(finish.values(), default=0.0)


# --- traces -----------------------------------------------------------------------------------

TraceFormat = Literal["swarmx", "azure", "mooncake"]

AZURE_MAX_TOKENS = 2048
"""``max_tokens`` of a replayed Azure or Mooncake call (or its output, if longer): the traces
record no limit, and a constant one tells policies nothing the trace does not."""


def _neutral(name: str) -> str:
    return f"{name} request"


def detect_format(path: Path) -> TraceFormat:
    """From the first non-empty line: a ``TIMESTAMP,...`` CSV header (Azure), or a JSON object
    with ``ts`` and ``workflow`` (SwarmX) or ``timestamp`` and ``input_length`` (Mooncake)."""
    for lineno, line in _lines(path):
        text = line.strip()
        if not text:
            continue
        if text.startswith("TIMESTAMP"):
            return "azure"
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            if "ts" in obj and "workflow" in obj:
                return "swarmx"
            if "timestamp" in obj and "input_length" in obj:
                return "mooncake"
        raise ValueError(
            f"{path}:{lineno}: unknown trace format (expected a SwarmX trace JSONL line with ts and"
            " workflow, an Azure CSV header TIMESTAMP,ContextTokens,GeneratedTokens, or a"
            " Mooncake JSONL line with timestamp and input_length)"
        )
    raise ValueError(f"{path}: empty trace file")


def _open(path: Path) -> TextIO:
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read trace: {exc.strerror or exc}") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with _open(path) as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                yield lineno, line
        except UnicodeDecodeError:
            raise ValueError(f"{path}:{lineno + 1}: not UTF-8 text") from None


def load_trace(
    path: Path, *, limit: int | None = None, slo_s: float | None = None, model: str = LLM_MODEL
) -> list[SimWorkflow]:
    """Workflows replayed from a trace file, in arrival order, arrivals relative to the earliest
    record; the format is detected (`detect_format`). ``limit`` keeps the first workflows;
    ``slo_s`` applies where the trace records none; ``model`` names the model of calls that
    record none (all of Azure and Mooncake). A malformed line raises ValueError naming
    ``file:line``."""
    path = Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    fmt = detect_format(path)
    if fmt == "swarmx":
        return _load_swarmx(path, limit, slo_s, model)
    if fmt == "azure":
        return _load_azure(path, limit, slo_s, model)
    return _load_mooncake(path, limit, slo_s, model)


def _one_call(
    name: str, prompt_tokens: int, output_tokens: int, *, slo_s: float | None, model: str
) -> SimWorkflow:
    """A one-call workflow (arrival filled in by `_relative`)."""
    out = max(1, output_tokens)
    step = StepSpec(
        id="call",
        kind="llm",
        after=[],
        model=model,
        prompt=_neutral(name),
        max_tokens=max(out, AZURE_MAX_TOKENS),
    )
    spec = WorkflowSpec(name=name, slo_s=slo_s, inputs={}, steps=[step], source=name)
    truth: Truth = {("call", None): CallTruth(max(1, prompt_tokens), out)}
    return SimWorkflow(0.0, spec, truth, name=name)


def _relative(rows: list[tuple[float, SimWorkflow]]) -> list[SimWorkflow]:
    if not rows:
        return []
    t0 = min(ts for ts, _ in rows)
    out = [SimWorkflow(ts - t0, wf.spec, wf.truth, wf.release_s, wf.name) for ts, wf in rows]
    out.sort(key=lambda wf: wf.arrival_s)  # stable: ties keep file order
    return out


def _azure_ts(text: str) -> float:
    """``2023-11-16 18:17:03.9799600`` (UTC, any number of fractional digits) to Unix s."""
    whole, _, frac = text.strip().partition(".")
    base = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    if frac and not frac.isdigit():
        raise ValueError(f"bad fractional seconds {frac!r}")
    return base.timestamp() + (float("0." + frac) if frac else 0.0)


def _azure_name(path: Path) -> str:
    stem = path.name.lower()
    for tag in ("conv", "code"):
        if tag in stem:
            return f"azure-{tag}"
    return "azure"


def _load_azure(
    path: Path, limit: int | None, slo_s: float | None, model: str
) -> list[SimWorkflow]:
    name = _azure_name(path)
    rows: list[tuple[float, SimWorkflow]] = []
    with _open(path) as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        need = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
        missing = [h for h in need if h not in header]
        if missing:
            raise ValueError(f"{path}:1: Azure CSV header lacks {', '.join(missing)}")
        cols = [header.index(h) for h in need]
        for row in reader:
            if limit is not None and len(rows) >= limit:
                break
            if not row or not any(c.strip() for c in row):
                continue
            try:
                if len(row) < len(header):
                    raise ValueError(f"expected {len(header)} columns, got {len(row)}")
                ts = _azure_ts(row[cols[0]])
                ctx, gen = int(row[cols[1]]), int(row[cols[2]])
                if ctx < 0 or gen < 0:
                    raise ValueError("token counts must be >= 0")
            except ValueError as exc:
                raise ValueError(f"{path}:{reader.line_num}: {exc}") from None
            rows.append((ts, _one_call(name, ctx, gen, slo_s=slo_s, model=model)))
    return _relative(rows)


def _int_field(obj: dict[str, Any], key: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if value is None:
        raise ValueError(f"missing field {key!r}")
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise ValueError(f"field {key!r}: expected an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"field {key!r}: must be >= 0, got {value!r}")
    return int(value)


def _float_field(obj: dict[str, Any], key: str, default: float | None = None) -> float:
    value = obj.get(key, default)
    if value is None:
        raise ValueError(f"missing field {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"field {key!r}: expected a finite number, got {value!r}")
    return float(value)


def _json_lines(path: Path, limit: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
    n = 0
    for lineno, line in _lines(path):
        if limit is not None and n >= limit:
            return
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        n += 1
        yield lineno, obj


def _load_mooncake(
    path: Path, limit: int | None, slo_s: float | None, model: str
) -> list[SimWorkflow]:
    rows: list[tuple[float, SimWorkflow]] = []
    for lineno, obj in _json_lines(path, limit):
        try:
            ts = _float_field(obj, "timestamp") / 1000.0
            wf = _one_call(
                "mooncake",
                _int_field(obj, "input_length"),
                _int_field(obj, "output_length"),
                slo_s=slo_s,
                model=model,
            )
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: {exc}") from None
        rows.append((ts, wf))
    return _relative(rows)


@dataclass
class _Rec:
    """One call of a SwarmX trace, as far as the replay needs it."""

    lineno: int
    ts: float
    step: str
    index: int | None
    deps: list[str]
    kind: Literal["llm", "model", "tool"]
    model: str
    prompt: str
    prompt_tokens: int
    max_tokens: int
    output_tokens: int
    latency_s: float
    ok: bool
    attempt: int
    slo_s: float | None
    workflow_name: str
    inputs: dict[str, str] = field(default_factory=dict)


def _swarmx_rec(lineno: int, obj: dict[str, Any]) -> tuple[str, _Rec]:
    workflow, step = obj.get("workflow"), obj.get("step")
    if not isinstance(workflow, str) or not workflow:
        raise ValueError(f"field 'workflow': expected a non-empty string, got {workflow!r}")
    if not isinstance(step, str) or not step:
        raise ValueError(f"field 'step': expected a non-empty string, got {step!r}")
    kind = obj.get("kind", "llm")
    if kind not in ("llm", "model", "tool"):
        raise ValueError(f"field 'kind': expected llm, model or tool, got {kind!r}")
    deps = obj.get("deps", [])
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise ValueError(f"field 'deps': expected a list of step ids, got {deps!r}")
    index = obj.get("index")
    if index is not None:
        index = _int_field(obj, "index")
    strings = {}
    for key in ("model", "prompt", "workflow_name"):
        value = obj.get(key) or ""
        if not isinstance(value, str):
            raise ValueError(f"field {key!r}: expected a string, got {value!r}")
        strings[key] = value
    slo = obj.get("slo_s")
    if slo is not None:
        slo = _float_field(obj, "slo_s")
        if slo <= 0:
            raise ValueError(f"field 'slo_s': must be > 0, got {slo!r}")
    raw_inputs = obj.get("inputs") or {}
    if not isinstance(raw_inputs, dict):
        raise ValueError(f"field 'inputs': expected an object, got {raw_inputs!r}")
    ok = obj.get("ok", True)
    if not isinstance(ok, bool):
        raise ValueError(f"field 'ok': expected true or false, got {ok!r}")
    rec = _Rec(
        lineno=lineno,
        ts=_float_field(obj, "ts"),
        step=step,
        index=index,
        deps=list(deps),
        kind=kind,
        model=strings["model"],
        prompt=strings["prompt"],
        prompt_tokens=_int_field(obj, "prompt_tokens", 0),
        max_tokens=_int_field(obj, "max_tokens", 0),
        output_tokens=_int_field(obj, "output_tokens", 1),
        latency_s=max(0.0, _float_field(obj, "latency_s", 0.0)),
        ok=ok,
        attempt=_int_field(obj, "attempt", 1),
        slo_s=slo,
        workflow_name=strings["workflow_name"],
        inputs={str(k): _literal(str(v)) for k, v in raw_inputs.items()},
    )
    return workflow, rec


def _literal(text: str) -> str:
    """Text as a template that renders to itself (recorded prompts may hold braces)."""
    return text.replace("{", "{{").replace("}", "}}")


def _load_swarmx(
    path: Path, limit: int | None, slo_s: float | None, model: str
) -> list[SimWorkflow]:
    groups: dict[str, list[_Rec]] = {}
    for lineno, obj in _json_lines(path, None):
        try:
            wf_id, rec = _swarmx_rec(lineno, obj)
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: {exc}") from None
        groups.setdefault(wf_id, []).append(rec)
    if not groups:
        return []
    t0 = min(r.ts for recs in groups.values() for r in recs)
    built = [
        _replay(path, wf_id, recs, t0, slo_s=slo_s, model=model) for wf_id, recs in groups.items()
    ]
    built.sort(key=lambda wf: wf.arrival_s)
    return built if limit is None else built[:limit]


def _step_id(name: str, index: int | None) -> str:
    return name if index is None else f"{name}[{index}]"


def _replay(
    path: Path, wf_id: str, recs: list[_Rec], t0: float, *, slo_s: float | None, model: str
) -> SimWorkflow:
    """One recorded workflow as a flat DAG: each (step, index) its own step, after every
    instance of the steps its record names in ``deps``; retries collapse into one call."""
    first_ts: dict[str, float] = {}
    chosen: dict[str, _Rec] = {}
    instances: dict[str, list[str]] = {}
    for rec in recs:
        sid = _step_id(rec.step, rec.index)
        first_ts[sid] = min(rec.ts, first_ts.get(sid, rec.ts))
        best = chosen.get(sid)
        if best is None:
            instances.setdefault(rec.step, []).append(sid)
        if best is None or (rec.ok, rec.attempt) >= (best.ok, best.attempt):
            chosen[sid] = rec
    arrival = min(first_ts.values())
    after = {
        sid: [
            d
            for name in dict.fromkeys(rec.deps)
            if name != rec.step
            for d in instances.get(name, [])
        ]
        for sid, rec in chosen.items()
    }
    order = _topo(path, wf_id, chosen, after, first_ts)
    steps: list[StepSpec] = []
    truth: Truth = {}
    for sid in order:
        rec = chosen[sid]
        if rec.kind == "tool":  # the trace's prompt is the command line, space-joined
            command = [_literal(a) for a in rec.prompt.split()] or [rec.step]
            steps.append(StepSpec(id=sid, kind="tool", after=after[sid], command=command))
            truth[sid, None] = CallTruth(0, max(1, rec.output_tokens), work_s=rec.latency_s)
            continue
        out = max(1, rec.output_tokens)
        steps.append(
            StepSpec(
                id=sid,
                kind=rec.kind,
                after=after[sid],
                model=rec.model or (model if rec.kind == "llm" else VISION_MODEL),
                prompt=_literal(rec.prompt),
                max_tokens=max(out, rec.max_tokens) if rec.kind == "llm" else 256,
                inputs=rec.inputs if rec.kind == "model" else {},
            )
        )
        truth[sid, None] = CallTruth(rec.prompt_tokens, out)
    slo = next((r.slo_s for r in recs if r.slo_s is not None), slo_s)
    name = next((r.workflow_name for r in recs if r.workflow_name), "") or "trace"
    spec = WorkflowSpec(name=name, slo_s=slo, inputs={}, steps=steps, source=f"{path} {wf_id}")
    release = {sid: first_ts[sid] - arrival for sid in order}
    return SimWorkflow(arrival - t0, spec, truth, release, name)


def _topo(
    path: Path,
    wf_id: str,
    chosen: dict[str, _Rec],
    after: dict[str, list[str]],
    first_ts: dict[str, float],
) -> list[str]:
    """Kahn's order, the earliest recorded arrival first when free; a cycle is an error."""
    waiting = {sid: len(deps) for sid, deps in after.items()}
    dependents: dict[str, list[str]] = {sid: [] for sid in after}
    for sid, deps in after.items():
        for d in deps:
            dependents[d].append(sid)
    key = {sid: (first_ts[sid], chosen[sid].lineno) for sid in after}
    ready = sorted((sid for sid, n in waiting.items() if n == 0), key=key.__getitem__)
    order: list[str] = []
    while ready:
        sid = ready.pop(0)
        order.append(sid)
        for nxt in dependents[sid]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                ready.append(nxt)
                ready.sort(key=key.__getitem__)
    if len(order) < len(after):
        done = set(order)
        stuck = sorted((s for s in after if s not in done), key=key.__getitem__)
        raise ValueError(
            f"{path}:{chosen[stuck[0]].lineno}: workflow {wf_id!r}: steps depend on each other "
            f"in a cycle ({', '.join(stuck[:6])})"
        )
    return order


# --- summary ----------------------------------------------------------------------------------


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def q(p: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))]

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": s[-1], "mean": sum(s) / len(s)}


def describe(workflows: Sequence[SimWorkflow]) -> dict[str, Any]:
    """A small JSON-able summary: counts by class, kind and model, fan-out, token and tool-time
    percentiles (``p50``, ``p90``, ``p99``, ``max``, ``mean``), arrival span and rate."""
    kinds: Counter[str] = Counter()
    models: Counter[str] = Counter()
    classes: Counter[str] = Counter()
    prompt: list[float] = []
    output: list[float] = []
    work: list[float] = []
    fanned: list[int] = []
    for wf in workflows:
        classes[wf.name or wf.spec.name] += 1
        steps = {s.id: s for s in wf.spec.steps}
        per_step: Counter[str] = Counter()
        for (sid, _), t in wf.truth.items():
            step = steps[sid]
            per_step[sid] += 1
            kinds[step.kind] += 1
            models[step.model or "(tool)"] += 1
            if step.kind == "llm":
                prompt.append(t.prompt_tokens)
                output.append(t.output_tokens)
            elif step.kind == "tool":
                work.append(t.work_s)
        fanned.extend(per_step[s.id] for s in wf.spec.steps if s.fan_out is not None)
    arrivals = [wf.arrival_s for wf in workflows]
    span = max(arrivals) - min(arrivals) if arrivals else 0.0
    calls = sum(kinds.values())
    return {
        "workflows": len(workflows),
        "classes": dict(sorted(classes.items())),
        "calls": calls,
        "calls_per_workflow": calls / len(workflows) if workflows else 0.0,
        "calls_by_kind": dict(sorted(kinds.items())),
        "calls_by_model": dict(sorted(models.items())),
        "mean_fan_out": sum(fanned) / len(fanned) if fanned else None,
        "arrival_span_s": span,
        "rate_per_s": (len(arrivals) - 1) / span if span > 0 else None,
        "prompt_tokens": _percentiles(prompt),
        "output_tokens": _percentiles(output),
        "tool_work_s": _percentiles(work),
    }
