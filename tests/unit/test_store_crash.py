"""The journal survives SIGKILL at any moment: every workflow reported committed is there."""

import random
import signal
import subprocess
import sys
import time

import pytest

from swarmx.store import Store

WRITER = """
import json
import sys
from pathlib import Path

from swarmx.protocol import Result
from swarmx.store import Store, WorkflowRow
from swarmx.workflow.engine import CallDone, CallSpec

store = Store(Path(sys.argv[1]))
n = store.counts()["workflows"]
while True:
    wf = f"wf-{n}"
    store.add_workflow(WorkflowRow(wf, "w", "w.toml", "x" * 500, {}, None, "running", "", n, None))
    for k in range(2):
        cid = f"{wf}/{k}"
        spec = CallSpec(cid, wf, "s", k, 0, "llm", "lm", "p", 16, {}, [], None, deps=[])
        store.call_dispatched(spec, "n", "n/lm#0", n)
        result = Result(cid, "n/lm#0", True, "out", "", 0.1, 1.0, 0.1, 3, 7)
        store.call_done(CallDone(cid, True, "out" * 100), result, json.dumps({"call": cid}))
    store.finish_workflow(wf, "succeeded", "", n)
    n += 1
    if n % 3 == 0:
        store.commit()
        print(n, flush=True)
"""


@pytest.mark.timeout(60)
def test_every_committed_workflow_survives_repeated_sigkill(tmp_path):
    db = tmp_path / "swarmx.db"
    rng = random.Random(18)
    committed = 0
    for kill in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            for _ in range(rng.randint(1, 40)):
                line = proc.stdout.readline()
                assert line, f"writer {kill} died: {proc.stderr.read()}"
                assert int(line) > committed  # it reopened with everything committed before
                committed = int(line)
            time.sleep(rng.uniform(0, 0.01))
            proc.send_signal(signal.SIGKILL)
            rest = proc.stdout.read().split()  # lines printed before the kill: committed too
            committed = max([committed, *map(int, rest)])
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL

    store = Store(db)  # passes the integrity check
    try:
        assert store.counts()["workflows"] >= committed
        for i in range(committed):
            wf = store.workflow(f"wf-{i}")
            assert wf is not None, f"wf-{i} was reported committed and is lost"
            assert wf.state == "succeeded"
            assert [o.call_id for o in store.outcomes(f"wf-{i}")] == [f"wf-{i}/0", f"wf-{i}/1"]
    finally:
        store.close()
