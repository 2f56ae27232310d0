"""Prefix-cache affinity (issue 21): the routers on the Mooncake and claude-code replays.

Every run is `swarmx sim --json` (the same policies the scheduler runs, on emulated A100s with
prefix caches; fixed pools, FIFO queues, no scaler), two at a time. Arms, each a router with
what it is given:

- ``least_outstanding``: load only, the cache-blind baseline;
- ``prefix_affinity``, ``kv_cost``: SGLang's/vLLM's and Dynamo's cache-aware routers, on the
  dispatcher's prefix index;
- ``tail`` with the oracle's forecasts (exact service times, the replica's cache included)
  and the capacity price (``--capacity-price``: each candidate charged the pool capacity its
  prefill burns): the SwarmX policy the targets are checked on; the same with the session
  value (``--session-value``: each candidate also charged the prefill of the prefixes still
  wanted that the call would evict there); the same without either: tail with affinity;
  ``tail`` + ``oracle:nocache``: the same forecasts blind to the cache; ``tail`` +
  ``noisy:0.5``: the oracle's medians off by a lognormal error of sigma 0.5, stated as the
  forecast's spread (a predictor that is often wrong by 1.6x, and says so);
- ablations, without and with the price, and with the session value: ``tail`` + ``shuffled``
  (another call's lengths, this call's cache) and ``tail`` + ``constant`` (one distribution
  for every call and replica): what the win needs of the forecast.

Mooncake (its `hash_ids`, 512-token blocks) at four offered loads on 16 replicas and at 85% on
64; claude-code sessions (blocks shared with each agent's previous call as recorded; agents in
closed loop) at six concurrencies on 16 replicas, up to saturation, and the most sessions each
router sustains at the SLO (``SLO_TTFT_P95_S``). The two points whose verdicts are closest are
replayed again with their arrival clock scaled a hair either way (``CLOCKS``): a p99 of a
replay this busy moves by a few percent with any small change, so a verdict within that is
judged on the mean. Writes its section of bench/RESULTS.md between its markers, or prints it
with ``--print``.

    .venv/bin/python bench/prefix_bench.py              # ~30 min on 2 cores
    .venv/bin/python bench/prefix_bench.py --quick --print
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from results import RESULTS, write_section

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- prefix_bench.py: begin -->", "<!-- prefix_bench.py: end -->"
DATA = ROOT.parent / "shared" / "data"
MOONCAKE = DATA / "mooncake" / "conversation_trace.jsonl"
CLAUDE_CODE = DATA / "claude-code" / "requests.csv"

ARMS: list[tuple[str, str, str | None]] = [
    ("least_outstanding", "least_outstanding", None),
    ("prefix_affinity", "prefix_affinity", None),
    ("kv_cost", "kv_cost", None),
    ("tail, affinity, priced", "tail+price", "oracle"),
    ("tail, priced, sessions", "tail+price+sessions", "oracle"),
    ("tail, affinity", "tail", "oracle"),
    ("tail, no affinity", "tail", "oracle:nocache"),
    ("tail, noisy 0.5", "tail", "noisy:0.5"),
    ("tail, shuffled", "tail", "shuffled"),
    ("tail, constant", "tail", "constant"),
    ("tail, priced, shuffled", "tail+price", "shuffled"),
    ("tail, priced, constant", "tail+price", "constant"),
    ("tail, priced, sessions, shuffled", "tail+price+sessions", "shuffled"),
    ("tail, priced, sessions, constant", "tail+price+sessions", "constant"),
]
"""(label, router, forecaster)."""
CC_SESSIONS = 240
"""claude-code sessions replayed: more than the most run at once, so the pool saturates."""
SLO_TTFT_P95_S = 10.0
"""Sessions sustained at the SLO: the most run at once with the calls' TTFT p95 at most this.
p95, not p99: the p99 is set by prompts longer than a replica's KV cache, prefilled in part on
any replica (the floor's)."""


CLOCKS = ("0.98", "0.99", "1.01", "1.02")
"""``--rate-scale`` of the replays again at the closest points (``CLOSE``), beside the 1 of
the tables: arrivals (Mooncake) or think times and starts (claude-code) 1-2% faster or
slower."""
MC_85 = ("mooncake, 16 replicas", "0.85")
"""The point of the target against ``least_outstanding``."""
CLOSE: dict[tuple[str, str], tuple[str, ...]] = {
    MC_85: (
        "least_outstanding",
        "prefix_affinity",
        "kv_cost",
        "tail, affinity, priced",
    ),
    ("claude-code, 16 replicas", "16"): ("prefix_affinity", "kv_cost", "tail, affinity, priced"),
}
"""The points replayed again, with the arms their verdicts compare."""


@dataclass(frozen=True)
class Run:
    trace: str
    point: str
    """The load or the sessions, as the table shows it."""
    args: tuple[str, ...]
    arm: str
    router: str
    predictor: str | None
    clock: str = "1"
    """``--rate-scale``: 1 in the tables, one of ``CLOCKS`` in the spread."""


def _runs(quick: bool) -> list[Run]:
    rows = 3000 if quick else 12031
    sessions = ["8", "64"] if quick else ["8", "16", "32", "64", "96", "128"]
    loads = ["0.7", "1.0"] if quick else ["0.5", "0.7", "0.85", "1.0"]
    out = []
    for label, router, predictor in ARMS:
        for load in loads:
            args = ("--trace", str(MOONCAKE), "--limit", str(rows), "--load", load)
            out.append(Run("mooncake, 16 replicas", load, args, label, router, predictor))
        if not quick:
            args = ("--trace", str(MOONCAKE), "--load", "0.85", "--replicas", "64")
            out.append(Run("mooncake, 64 replicas", "0.85", args, label, router, predictor))
        for n in sessions:
            args = ("--trace", str(CLAUDE_CODE), "--limit", str(CC_SESSIONS), "--sessions", n)
            out.append(Run("claude-code, 16 replicas", n, args, label, router, predictor))
    again = [
        dataclasses.replace(r, args=(*r.args, "--rate-scale", clock), clock=clock)
        for r in out
        if r.arm in CLOSE.get((r.trace, r.point), ())
        for clock in CLOCKS
    ]
    return out + again


def _simulate(run: Run) -> dict[str, Any]:
    router, *terms = run.router.split("+")
    argv = [sys.executable, "-m", "swarmx", "sim", *run.args, "--router", router]
    if "price" in terms:
        argv.append("--capacity-price")
    if "sessions" in terms:
        argv.append("--session-value")
    argv += ["--queue", "fifo", "--scaler", "none", "--gpu", "A100", "--json"]
    if run.predictor is not None:
        argv += ["--predictor", run.predictor]
    t0 = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()[-500:]}")
    data: dict[str, Any] = json.loads(done.stdout)
    data["wall_s"] = time.monotonic() - t0
    return data


def _s(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _table(trace: str, runs: list[tuple[Run, dict[str, Any]]]) -> list[str]:
    points = list(dict.fromkeys(r.point for r, _ in runs))
    what = "sessions at once" if trace.startswith("claude") else "offered load"
    lines = [
        f"#### {trace}",
        "",
        f"| {what} | router | TTFT p50 / p99 (s) | call latency p50 / p99 (s) | prefix hit rate"
        " | completed | run |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for point in points:
        here = [(run, d) for run, d in runs if run.point == point]
        floor_ttft, floor_lat = here[0][1]["ttft_floor_s"], here[0][1]["call_latency_floor_s"]
        lines.append(
            f"| {point} | *floor* | {_s(floor_ttft['p50'])} / {_s(floor_ttft['p99'])} | "
            f"{_s(floor_lat['p50'])} / {_s(floor_lat['p99'])} | - | - | - |"
        )
        for run, d in here:
            ttft, lat = d["ttft_s"], d["call_latency_s"]
            hit = d.get("prefix_hit_rate")
            lines.append(
                f"| {point} | {run.arm} | {_s(ttft['p50'])} / {_s(ttft['p99'])} | "
                f"{_s(lat['p50'])} / {_s(lat['p99'])} | "
                f"{'-' if hit is None else f'{hit:.3f}'} | {d['sessions_completed']} | "
                f"{d['wall_s']:.0f} s |"
            )
    return [*lines, ""]


def _verdicts(results: list[tuple[Run, dict[str, Any]]]) -> list[str]:
    """The issue's targets, each as met or not, with the figures."""
    by: dict[tuple[str, str, str], dict[str, Any]] = {
        (r.trace, r.point, r.arm): d for r, d in results
    }
    out = []
    for trace, point in dict.fromkeys((r.trace, r.point) for r, _ in results):
        tail = by.get((trace, point, "tail, affinity, priced"))
        rivals = [by.get((trace, point, a)) for a in ("prefix_affinity", "kv_cost")]
        if tail is None or None in rivals:
            continue
        best_lat = min(d["call_latency_s"]["p99"] for d in rivals if d is not None)
        best_ttft = min(d["ttft_s"]["p99"] for d in rivals if d is not None)
        lat, ttft = tail["call_latency_s"]["p99"], tail["ttft_s"]["p99"]
        ok_lat, ok_ttft = lat <= best_lat, ttft <= 0.8 * best_ttft
        floor = tail["ttft_floor_s"]["p99"]
        reach = (
            f"; out of any router's reach: under the floor's {_s(floor)} s"
            if 0.8 * best_ttft < floor
            else ""
        )
        out.append(
            f"- {trace}, {point}: latency p99 {_s(lat)} s against the better baseline's "
            f"{_s(best_lat)} s ({'met' if ok_lat else 'not met'}); TTFT p99 {_s(ttft)} s, "
            f"{(1 - ttft / best_ttft) * 100:.0f}% below its {_s(best_ttft)} s "
            f"({'met' if ok_ttft else 'not met'}: 20% below{reach})"
        )
    here = {a: d["call_latency_s"]["p99"] for (t, p, a), d in by.items() if (t, p) == MC_85}
    return out + _against_least(here, 0)


def _against_least(p99: dict[str, float], digits: int) -> list[str]:
    """The target against ``least_outstanding`` on Mooncake at 85% load, from each arm's
    latency p99 there."""
    lo, tail = p99.get("least_outstanding"), p99.get("tail, affinity, priced")
    if lo is None or tail is None:
        return []
    cut = 1 - tail / lo
    return [
        f"- mooncake at 85% load: latency p99 {cut * 100:.{digits}f}% below "
        f"least_outstanding's ({'met' if cut >= 0.4 else 'not met'}: 40%)"
    ]


def _spread(results: list[tuple[Run, dict[str, Any]]]) -> list[str]:
    """The latency p99 of the closest points' arms at each clock, their mean, and the verdicts
    on the means."""
    lines: list[str] = []
    means: dict[tuple[str, str, str], float] = {}
    for (trace, point), arms in CLOSE.items():
        clocks = sorted(
            {r.clock for r, _ in results if (r.trace, r.point) == (trace, point)}, key=float
        )
        if len(clocks) < 2:
            continue
        lines += [
            f"#### {trace}, {point}: latency p99 (s) with the arrival clock scaled",
            "",
            f"| router | {' | '.join(f'x{c}' for c in clocks)} | mean | spread |",
            "|---|" + "---:|" * (len(clocks) + 2),
        ]
        for arm in arms:
            p99 = {
                r.clock: d["call_latency_s"]["p99"]
                for r, d in results
                if (r.trace, r.point, r.arm) == (trace, point, arm)
            }
            xs = [p99[c] for c in clocks if c in p99]
            if not xs:
                continue
            mean = means[trace, point, arm] = sum(xs) / len(xs)
            lines.append(
                f"| {arm} | {' | '.join(_s(p99[c]) if c in p99 else '-' for c in clocks)} | "
                f"{_s(mean)} | {(max(xs) - min(xs)) / mean * 100:.1f}% |"
            )
        lines.append("")
    if not means:
        return []
    lines += ["On the means:", ""]
    for trace, point in CLOSE:
        tail = means.get((trace, point, "tail, affinity, priced"))
        rivals = [means.get((trace, point, a)) for a in ("prefix_affinity", "kv_cost")]
        if tail is None or None in rivals:
            continue
        best = min(x for x in rivals if x is not None)
        lines.append(
            f"- {trace}, {point}: latency p99 {_s(tail)} s against the better baseline's "
            f"{_s(best)} s ({(tail / best - 1) * 100:+.1f}%; "
            f"{'met' if tail <= best else 'not met'})"
        )
    here = {a: m for (t, p, a), m in means.items() if (t, p) == MC_85}
    return [*lines, *_against_least(here, 1), ""]


def _sustained(results: list[tuple[Run, dict[str, Any]]]) -> list[str]:
    """Per router, the most claude-code sessions run at once with the calls' TTFT p95 within
    the SLO (every smaller concurrency run within it too), and the target's verdict."""
    runs = [(r, d) for r, d in results if r.trace.startswith("claude")]
    if not runs:
        return []
    points = sorted({int(r.point) for r, _ in runs})
    most: dict[str, int] = {}
    for arm in dict.fromkeys(r.arm for r, _ in runs):
        p95 = {int(r.point): d["ttft_s"]["p95"] for r, d in runs if r.arm == arm}
        held = 0
        for n in points:
            if p95.get(n, math.inf) > SLO_TTFT_P95_S:
                break
            held = n
        most[arm] = held
    lines = [
        f"Sessions sustained at the SLO (claude-code, 16 replicas): the most sessions at once, of "
        f"{', '.join(map(str, points))}, with the calls' TTFT p95 at most {SLO_TTFT_P95_S:.0f} s "
        "(p95: the p99 is the floor's, set by prompts longer than a replica's KV cache).",
        "",
        "| router | sessions at once |",
        "|---|---:|",
        *(f"| {arm} | {n} |" for arm, n in most.items()),
        "",
    ]
    best = max(most.get("prefix_affinity", 0), most.get("kv_cost", 0))
    for arm in ("tail, affinity, priced", "tail, priced, sessions"):
        if arm in most:
            ok = "met" if most[arm] >= best else "not met"
            lines.append(
                f"- `{arm}`: {most[arm]} sessions against the better baseline's {best} ({ok}: "
                "no fewer)"
            )
    return [*lines, ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="fewer rows, loads and sessions")
    ap.add_argument("--print", action="store_true", help="print the section, do not write it")
    ap.add_argument("--jobs", type=int, default=2, help="simulations at once")
    args = ap.parse_args()
    for path in (MOONCAKE, CLAUDE_CODE):
        if not path.exists():
            sys.exit(f"prefix_bench: {path} is missing (../shared/data holds the public traces)")
    runs = _runs(args.quick)
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        results = list(zip(runs, pool.map(_simulate, runs), strict=True))
    spread = _spread(results)
    results = [(r, d) for r, d in results if r.clock == "1"]
    traces = list(dict.fromkeys(r.trace for r in runs))
    lines = [
        BEGIN,
        "## Prefix-cache affinity (issue 21)",
        "",
        "Regenerated by `.venv/bin/python bench/prefix_bench.py` "
        f"({time.monotonic() - t0:.0f} s, {args.jobs} simulations at a time). Every run is "
        "`swarmx sim --json`: the scheduler's own policies on emulated A100s with prefix caches "
        "(8B model, 427k KV tokens each), fixed pools, FIFO queues, no scaler. Arms: "
        "`least_outstanding` (load only); `prefix_affinity` and `kv_cost` (SGLang's/vLLM's and "
        "Dynamo's cache-aware routers on the scheduler's prefix index); `tail, affinity, "
        "priced` (the oracle's forecasts, each replica's cache included, and the capacity "
        "price: each candidate charged the seconds of prompt it would prefill times the pool's "
        "mean calls per replica, or the calls that prefill would stall on it where more, "
        "each weighted by what the stall adds to its squared latency; `[router] "
        "capacity_price`, "
        "`swarmx sim --capacity-price`); "
        "`tail, priced, sessions` (the same, and the session value: each candidate also "
        "charged the prefill of the prefixes still wanted, used within the reuse horizon, that "
        "the call would evict there; `[router] session_value`, `swarmx sim --session-value`); "
        "`tail, affinity` (the same without either); `tail, no affinity` (the same, "
        "blind to the cache); `tail, noisy 0.5` (the oracle's medians off by a lognormal error "
        "of sigma 0.5, stated as the forecast's spread); ablations, without and with the price, "
        "`tail, shuffled` (another call's lengths, this call's cache) and `tail, constant` (one "
        "distribution for every call and replica), and both with the session value. The "
        "targets are checked on `tail, affinity, priced`.",
        "",
        "Mooncake: "
        + ("the first 3,000 rows" if args.quick else "all 12,031 rows")
        + ", arrivals stretched to the offered load (a fraction of the pool's GPU capacity; "
        f"past 1.0 queues grow). claude-code: the first {CC_SESSIONS} sessions of "
        "`requests.csv`, that many at once at most, each agent's next call its recorded think "
        "time after the last; "
        "every call on the emulated 8B model. TTFT counts from the call's release (its queue "
        "at the scheduler included); hit rate = prompt tokens served from a cache / prompt "
        "tokens. *floor*: each call's TTFT and latency alone on an idle replica whose cache "
        "holds every block any earlier call sent, as many as its KV memory takes: no router "
        "gives a call less, so no router's quantile is below the floor's, and a target under "
        "it is out of reach.",
        "",
    ]
    for trace in traces:
        lines += _table(trace, [(r, d) for r, d in results if r.trace == trace])
    lines += [*_sustained(results), "Against the issue's targets:", "", *_verdicts(results), ""]
    if spread:
        lines += [
            "How far a p99 moves: the closest verdicts' points replayed with their arrival "
            f"clock scaled by {', '.join(CLOCKS)} (`swarmx sim --rate-scale`) beside the tables' "
            "1. The system is chaotic: one routing decision changed moves every later one, so "
            "the same policy's p99 moves by a few percent with the clock, and a verdict within "
            "that is judged on the mean.",
            "",
            *spread,
        ]
    lines += [END]
    section = "\n".join(lines) + "\n"
    if args.print:
        print(section)
        return
    write_section(section, BEGIN, END)
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
