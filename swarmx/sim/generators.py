"""Built-in generators of the three agentic workload classes ``swarmx sim --workload`` runs.

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

import math
import random
from collections.abc import Callable, Sequence
from typing import Literal, get_args

from swarmx.sim.arrivals import arrival_times
from swarmx.sim.simworkflow import LLM_MODEL, VISION_MODEL, CallTruth, SimWorkflow, Truth
from swarmx.workflow.spec import FanOut, StepSpec, WorkflowSpec

Workload = Literal["codegen", "research", "multimodal", "mixed"]
"""What ``--workload`` accepts: ``mixed`` is equal thirds of the three classes, interleaved."""
KINDS: tuple[Workload, ...] = get_args(Workload)
CLASSES: tuple[str, ...] = KINDS[:-1]
"""The three classes, in the order ``mixed`` deals them out before shuffling."""

SLO_S: dict[str, float] = {"codegen": 160.0, "research": 60.0, "multimodal": 30.0}
"""End-to-end SLO per class when none is given: about 4x the class's median critical path
alone on an A100 (`critical_path_s`; checked by the tests to stay within 3-5x)."""

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
    classes: list[str]
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
