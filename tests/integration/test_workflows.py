"""Workflows end to end: real scheduler and node processes, real SQLite, real tool subprocesses,
emulated model replicas (the timing model; torch models run in test_examples.py)."""

from __future__ import annotations

import json
import signal
import textwrap

import psutil
import pytest

from swarmx.schema import decode
from swarmx.traces import TraceRecord
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(procs):
    _, endpoint = procs.scheduler()
    procs.node(endpoint, "alpha")
    procs.node(endpoint, "beta")
    wait_for(
        lambda: (
            {
                n
                for n, v in procs.nodes(endpoint).items()
                if v["state"] == "live" and v["hello"]["replicas"]
            }
            == {"alpha", "beta"}
        ),
        what="two nodes",
    )
    return endpoint


def write(procs, name, text):
    path = procs.tmp / name
    path.write_text(textwrap.dedent(text))
    return path


def submit(procs, endpoint, path, *args, check=True):
    out = procs.cli("submit", str(path), "--scheduler", endpoint, *args, check=False)
    if check:
        assert out.returncode == 0, out.stderr + out.stdout
    return out


FAN = """
name = "fan"
slo_s = 30
[inputs]
topic = "queues"

[[steps]]
id = "plan"
kind = "tool"
after = []
command = ["python3", "-c", "print('alpha\\\\nbeta\\\\ngamma')"]

[[steps]]
id = "write"
kind = "llm"
after = ["plan"]
model = "lm"
prompt = "Write about {item} in {inputs.topic}"
max_tokens = 48
fan_out = { from = "plan", split = "lines", max = 8 }

[[steps]]
id = "join"
kind = "tool"
after = ["write"]
command = ["python3", "-c", "import sys; print(len(sys.argv[1].splitlines()))",
           "{steps.write.output}"]
"""


def test_dynamic_fan_out_across_two_nodes_and_traces(procs, cluster):
    path = write(procs, "fan.toml", FAN)
    out = submit(procs, cluster, path, "--wait", "--json", "--set", "topic=caches")
    view = json.loads(out.stdout)
    assert view["state"] == "succeeded"
    assert view["slo_s"] == 30.0
    assert 0 < view["latency_s"] < 30
    writes = [s for s in view["steps"] if s["step"] == "write"]
    assert [s["id"] for s in writes] == ["write[0]", "write[1]", "write[2]"]
    assert {s["replica"].split("/")[0] for s in writes} == {"alpha", "beta"}
    for s in view["steps"]:
        assert s["state"] == "succeeded"
        assert s["latency_s"] > 0
        assert s["queue_s"] >= 0
        assert s["node"] in {"alpha", "beta"}
    assert all(0 < s["output_tokens"] <= 48 for s in writes)

    result = procs.cli("result", view["id"], "--scheduler", cluster).stdout.strip()
    assert int(result) >= 3  # the join step counted the fan-out's output lines

    trace_file = procs.tmp / "traces.jsonl"
    procs.cli("traces", "export", "--out", str(trace_file), "--scheduler", cluster)
    rows = [json.loads(line) for line in trace_file.read_text().splitlines()]
    assert len(rows) == 5
    records = [decode(TraceRecord, r) for r in rows]  # every contract field, typed
    llm = [r for r in records if r.kind == "llm"]
    assert {r.prompt for r in llm} == {
        f"Write about {x} in caches" for x in ("alpha", "beta", "gamma")
    }
    for r in llm:
        assert (r.workflow, r.step, r.deps, r.model, r.max_tokens) == (
            view["id"],
            "write",
            ["plan"],
            "lm",
            48,
        )
        assert r.prompt_tokens > 0
        assert r.ttft_s is not None
        assert 0 < r.ttft_s < r.latency_s
        assert r.device.gpu == "H100"
        assert 0 <= r.device.cpu_util <= 1
        assert r.runtime.inflight >= 0
    assert sorted(r.turn for r in records) == [0, 1, 2, 3, 4]
    assert {"ts", "queue_s", "node", "replica", "device", "runtime"} <= rows[0].keys()


FLAKY = """
name = "flaky"
[[steps]]
id = "once"
kind = "tool"
after = []
retries = 1
command = [
    "python3", "-c",
    "import os,sys; p=sys.argv[1]; ok=os.path.exists(p); open(p,'a').close(); sys.exit(3-3*ok)",
    "{marker}",
]
"""


def test_failed_step_is_retried_on_another_replica(procs, cluster):
    path = write(procs, "flaky.toml", FLAKY.replace("{marker}", str(procs.tmp / "ran-once")))
    view = json.loads(submit(procs, cluster, path, "--wait", "--json").stdout)
    assert view["state"] == "succeeded"
    (step,) = view["steps"]
    assert step["attempt"] == 2
    rows = [
        json.loads(x)
        for x in procs.cli(
            "traces", "export", "--out", "-", "--scheduler", cluster
        ).stdout.splitlines()
    ]
    first, second = sorted(rows, key=lambda r: r["attempt"])
    assert not first["ok"]
    assert first["error"].startswith("exit code 3")
    assert second["ok"]
    assert first["replica"] != second["replica"]  # the retry avoided the replica that failed


def test_a_step_out_of_retries_fails_the_workflow(procs, cluster):
    path = write(
        procs,
        "bad.toml",
        """
        name = "bad"
        [[steps]]
        id = "boom"
        kind = "tool"
        after = []
        command = ["python3", "-c", "import sys; sys.exit('broken on purpose')"]

        [[steps]]
        id = "after_boom"
        kind = "tool"
        after = ["boom"]
        command = ["true"]
    """,
    )
    out = submit(procs, cluster, path, "--wait", "--json", check=False)
    assert out.returncode == 1
    view = json.loads(out.stdout)
    assert view["state"] == "failed"
    assert view["reason"] == "step boom failed after 1 attempt: exit code 1: broken on purpose"
    assert [s["state"] for s in view["steps"]] == ["failed", "skipped"]
    res = procs.cli("result", view["id"], "--scheduler", cluster, check=False)
    assert res.returncode == 1
    assert "is failed: step boom failed" in res.stderr


def test_cancel_kills_running_calls(procs, cluster):
    path = write(
        procs,
        "slow.toml",
        """
        name = "slow"
        [[steps]]
        id = "nap"
        kind = "tool"
        after = []
        command = ["sleep", "37"]
        timeout_s = 120
    """,
    )
    wf_id = submit(procs, cluster, path).stdout.strip()
    assert wf_id.startswith("wf-")

    def sleepers():
        return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "37"]]

    wait_for(sleepers, what="the tool to start")
    assert procs.cli("cancel", wf_id, "--scheduler", cluster).stdout.strip() == f"{wf_id} cancelled"
    wait_for(lambda: not sleepers(), what="the tool process to be killed")
    view = json.loads(procs.cli("status", wf_id, "--json", "--scheduler", cluster).stdout)
    assert view["state"] == "cancelled"
    assert view["steps"][0]["state"] == "cancelled"
    again = procs.cli("cancel", wf_id, "--scheduler", cluster, check=False)
    assert again.returncode == 2
    assert "already finished" in again.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'name = "x"\n[[steps]]\nid = "a"\nkind = "llm"\nafter = []\nmodel = "gpt-9"\n'
            'prompt = "hi"\n',
            "bad.toml:2: steps (id 'a').model: unknown model 'gpt-9' (served: lm)",
        ),
        ('name = "x"\n[[steps]\n', "bad.toml: invalid TOML"),
        (
            'name = "x"\n[[steps]]\nid = "a"\nkind = "tool"\nafter = ["b"]\ncommand = ["true"]\n',
            "bad.toml:5: steps[0] (id 'a').after: unknown step 'b'",
        ),
        (
            'name = "x"\n[[steps]]\nid = "a"\nkind = "tool"\nafter = ["b"]\ncommand = ["true"]\n'
            '[[steps]]\nid = "b"\nkind = "tool"\nafter = ["a"]\ncommand = ["true"]\n',
            "cycle: ",
        ),
    ],
)
def test_invalid_workflows_fail_cleanly_and_submit_nothing(procs, cluster, text, message):
    path = write(procs, "bad.toml", text)
    out = submit(procs, cluster, path, check=False)
    assert out.returncode == 2
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    listed = json.loads(procs.cli("status", "--json", "--scheduler", cluster).stdout)
    assert listed["workflows"] == []


def test_a_scheduler_crash_loses_no_workflow(procs, cluster):
    path = write(
        procs,
        "two.toml",
        """
        name = "two"
        [[steps]]
        id = "first"
        kind = "tool"
        after = []
        command = ["sleep", "1.5"]

        [[steps]]
        id = "second"
        kind = "tool"
        after = ["first"]
        command = ["echo", "done"]
    """,
    )
    sched = procs.started[0]
    wf_id = submit(procs, cluster, path).stdout.strip()
    sched.send_signal(signal.SIGKILL)  # no chance to clean up
    sched.wait()
    procs.scheduler(listen=cluster)
    view = wait_for(
        lambda: (
            (
                v := json.loads(
                    procs.cli("status", wf_id, "--json", "--scheduler", cluster, check=False).stdout
                    or "{}"
                )
            )
            and v.get("state") == "succeeded"
            and v
        ),
        timeout_s=30,
        what="the workflow to finish",
    )
    assert [s["step"] for s in view["steps"]] == ["first", "second"]
    assert procs.cli("result", wf_id, "--scheduler", cluster).stdout.strip() == "done"
