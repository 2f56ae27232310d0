"""Parse time of large workflow files: `parse_workflow` against the TOML parser alone (tomli,
compiled, which it uses) and the standard library's tomllib, on the same text.

A chain of N llm steps, each templated on the previous step's output (the shape that made the
old parser quadratic: every step has a dependency and a reference to check). The TOML parser's own
time is the floor any TOML workflow parser pays; the ratio is what SwarmX adds on top. CPU time of
this process, best of ``--repeat`` runs.

    .venv/bin/python bench/workflow_parse.py [--steps 1000 10000] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import tomli
import tomllib

from swarmx.workflow.spec import WorkflowLimits, parse_workflow


def chain(n: int) -> str:
    lines = ['name = "chain"', "slo_s = 600"]
    for i in range(n):
        prev = f"s{i - 1}"
        lines += [
            "[[steps]]",
            f'id = "s{i}"',
            'kind = "llm"',
            'model = "m"',
            f'after = ["{prev}"]' if i else "after = []",
            f'prompt = "continue from {{steps.{prev}.output}}"' if i else 'prompt = "start"',
        ]
    return "\n".join(lines) + "\n"


def cpu_s(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[1000, 10_000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for n in args.steps:
        text = chain(n)
        limits = WorkflowLimits(max_workflow_bytes=len(text.encode()), max_steps=n)
        assert len(parse_workflow(text, "chain.toml", limits=limits).steps) == n
        stdlib = cpu_s(lambda t=text: tomllib.loads(t), args.repeat)
        toml = cpu_s(lambda t=text: tomli.loads(t), args.repeat)
        full = cpu_s(
            lambda t=text, lim=limits: parse_workflow(t, "chain.toml", limits=lim), args.repeat
        )
        rows.append(
            {"steps": n, "bytes": len(text), "tomllib_s": stdlib, "tomli_s": toml, "parse_s": full}
        )
    if args.json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    print(
        "| steps | file | stdlib tomllib alone | tomli (compiled) alone | "
        "parse_workflow (tomli + all checks) | vs tomli alone |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['steps']:,} | {r['bytes'] / 1024:,.0f} KiB | {r['tomllib_s']:.3f} s | "
            f"{r['tomli_s']:.3f} s | {r['parse_s']:.3f} s | {r['parse_s'] / r['tomli_s']:.1f}x |"
        )


if __name__ == "__main__":
    main()
