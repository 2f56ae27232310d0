"""The scheduler's SQLite journal: workflows, call outcomes in order, traces; durable reopen."""

import json
import sqlite3

import pytest

from swarmx.protocol import Result
from swarmx.store import SCHEMA, Store, WorkflowRow
from swarmx.workflow.engine import CallDone, CallSpec


@pytest.fixture
def db(tmp_path):
    return tmp_path / "swarmx.db"


@pytest.fixture
def store(db):
    s = Store(db)
    yield s
    s.close()


def workflow(wf_id="wf1", state="running", ts=1000.0, **kw) -> WorkflowRow:
    fields = {
        "id": wf_id,
        "name": "review",
        "source": "examples/review.toml",
        "spec_text": "[workflow]\nname = 'review'\n",
        "overrides": {"topic": "sqlite", "n": "3"},
        "slo_s": 30.0,
        "state": state,
        "reason": "",
        "submitted_ts": ts,
        "finished_ts": None,
    }
    fields.update(kw)
    return WorkflowRow(**fields)


def call(call_id, wf_id="wf1", step="plan", index=None, attempt=0) -> CallSpec:
    return CallSpec(
        call_id, wf_id, step, index, attempt, "llm", "lm", "p", 16, {}, [], None, deps=[]
    )


def result(call_id, queue_s=0.25, latency_s=1.5, ttft_s=0.1, tokens=7) -> Result:
    return Result(call_id, "n/lm#0", True, "out", "", queue_s, latency_s, ttft_s, 3, tokens)


def done_seqs(db) -> dict[str, int | None]:
    with sqlite3.connect(db) as raw:
        rows = raw.execute("SELECT call_id, done_seq FROM calls").fetchall()
    raw.close()
    return dict(rows)


def test_workflow_round_trip(store):
    row = workflow()
    store.add_workflow(row)
    assert store.workflow("wf1") == row
    assert store.workflow("missing") is None


def test_workflow_without_slo_round_trips(store):
    row = workflow(slo_s=None, overrides={})
    store.add_workflow(row)
    assert store.workflow("wf1") == row


def test_duplicate_workflow_id_is_refused(store):
    store.add_workflow(workflow())
    with pytest.raises(sqlite3.IntegrityError):
        store.add_workflow(workflow())


def test_finish_workflow(store):
    store.add_workflow(workflow())
    store.finish_workflow("wf1", "failed", "step plan failed", 1042.5)
    got = store.workflow("wf1")
    assert got is not None
    assert (got.state, got.reason, got.finished_ts) == ("failed", "step plan failed", 1042.5)


def test_workflows_filter_by_state(store):
    store.add_workflow(workflow("a", "running", ts=3.0))
    store.add_workflow(workflow("b", "succeeded", ts=1.0))
    store.add_workflow(workflow("c", "running", ts=2.0))
    store.add_workflow(workflow("d", "failed", ts=4.0))
    assert [w.id for w in store.workflows(state="running")] == ["c", "a"]  # oldest first
    assert [w.id for w in store.workflows(state="succeeded")] == ["b"]
    assert store.workflows(state="cancelled") == []
    assert [w.id for w in store.workflows()] == ["d", "a", "c", "b"]  # newest first
    assert [w.id for w in store.workflows(limit=2)] == ["d", "a"]
    assert [w.id for w in store.workflows(state="running", limit=1)] == ["c"]


def test_call_dispatched_then_done_records_timings_and_a_trace(store):
    store.add_workflow(workflow())
    store.call_dispatched(call("c1", index=2, attempt=1), "node-a", "node-a/lm#0", 1001.0)
    [running] = store.calls("wf1")
    assert (running.state, running.node, running.replica) == ("running", "node-a", "node-a/lm#0")
    assert (running.idx, running.attempt, running.dispatched_ts) == (2, 1, 1001.0)
    assert running.latency_s is None

    trace = {"call_id": "c1", "latency_s": 1.5, "model": "lm"}
    store.call_done(CallDone("c1", True, "out", replica="node-a/lm#0"), result("c1"), trace)
    [c] = store.calls("wf1")
    assert c.state == "succeeded"
    assert (c.queue_s, c.latency_s, c.ttft_s, c.output_tokens) == (0.25, 1.5, 0.1, 7)
    assert (c.output, c.error) == ("out", "")
    [(trace_id, row)] = store.traces(0, 10)
    assert json.loads(row) == trace
    assert trace_id > 0


def test_a_call_lost_with_its_node_has_no_timings(store):
    store.add_workflow(workflow())
    store.call_dispatched(call("c1"), "n", "n/lm#0", 1.0)
    store.call_done(CallDone("c1", False, "", "node lost", "n/lm#0", infra=True), None, None)
    [c] = store.calls("wf1")
    assert (c.state, c.error) == ("failed", "node lost")
    assert (c.queue_s, c.latency_s, c.ttft_s, c.output_tokens) == (None, None, None, None)
    assert store.traces(0, 10) == []
    [outcome] = store.outcomes("wf1")
    assert outcome.infra
    assert not outcome.ok


def test_call_done_is_atomic(store):
    store.add_workflow(workflow())
    store.call_dispatched(call("c1"), "n", "n/lm#0", 1.0)
    with pytest.raises(TypeError):  # the trace row cannot be written: nothing is
        store.call_done(CallDone("c1", True, "out"), result("c1"), {"bad": object()})
    [c] = store.calls("wf1")
    assert c.state == "running"
    assert c.latency_s is None
    assert store.outcomes("wf1") == []
    assert store.traces(0, 10) == []
    # and the store is still usable
    store.call_done(CallDone("c1", True, "out"), result("c1"), {"ok": 1})
    assert store.calls("wf1")[0].state == "succeeded"
    assert len(store.traces(0, 10)) == 1


def test_redispatch_updates_the_same_call(store):
    store.add_workflow(workflow())
    store.call_dispatched(call("c1"), "n1", "n1/lm#0", 1.0)
    store.call_dispatched(call("c1"), "n2", "n2/lm#1", 2.0)
    [c] = store.calls("wf1")
    assert (c.node, c.replica, c.dispatched_ts, c.state) == ("n2", "n2/lm#1", 2.0, "running")


def test_call_of_an_unknown_workflow_is_refused(store):
    with pytest.raises(sqlite3.IntegrityError):
        store.call_dispatched(call("c1", wf_id="nope"), "n", "n/lm#0", 1.0)


def test_outcomes_come_back_in_recorded_order(store):
    store.add_workflow(workflow())
    store.add_workflow(workflow("wf2"))
    for i, cid in enumerate(("a", "b", "c", "d")):
        store.call_dispatched(call(cid), "n", f"n/lm#{i}", 1.0)
    store.call_dispatched(call("x", wf_id="wf2"), "n", "n/lm#0", 1.0)
    # recorded out of dispatch and id order
    store.call_done(CallDone("c", True, "C", replica="n/lm#2"), result("c"), None)
    store.call_done(CallDone("x", True, "X", replica="n/lm#0"), result("x"), None)
    store.call_done(CallDone("a", False, "", "boom", "n/lm#0"), result("a"), None)
    store.call_done(CallDone("d", True, "D", replica="n/lm#3"), result("d"), None)
    assert store.outcomes("wf1") == [
        CallDone("c", True, "C", "", "n/lm#2", False),
        CallDone("a", False, "", "boom", "n/lm#0", False),
        CallDone("d", True, "D", "", "n/lm#3", False),
    ]  # "b" is still running: not an outcome; the replica is the one dispatched to
    assert [o.call_id for o in store.outcomes("wf2")] == ["x"]


def test_outcomes_survive_reopening_and_numbering_continues(db):
    first = Store(db)
    first.add_workflow(workflow())
    for cid in ("a", "b", "c"):
        first.call_dispatched(call(cid), "n", "n/lm#0", 1.0)
    first.call_done(CallDone("b", True, "B"), result("b"), {"n": 1})
    first.call_done(CallDone("a", True, "A"), result("a"), {"n": 2})
    first.close()

    second = Store(db)
    try:
        assert [o.call_id for o in second.outcomes("wf1")] == ["b", "a"]
        second.call_done(CallDone("c", False, "", "late"), result("c"), {"n": 3})
        assert [o.call_id for o in second.outcomes("wf1")] == ["b", "a", "c"]
        assert [json.loads(r)["n"] for _, r in second.traces(0, 10)] == [1, 2, 3]
        assert second.workflow("wf1") == workflow()
    finally:
        second.close()
    assert done_seqs(db) == {"b": 1, "a": 2, "c": 3}


def test_calls_cancelled_only_touches_running_calls(store):
    store.add_workflow(workflow())
    for cid in ("run1", "run2", "ok", "bad"):
        store.call_dispatched(call(cid), "n", "n/lm#0", 1.0)
    store.call_done(CallDone("ok", True, "out"), result("ok"), None)
    store.call_done(CallDone("bad", False, "", "err"), result("bad"), None)
    store.calls_cancelled(["run1", "ok", "bad", "never-dispatched"])
    states = {c.call_id: c.state for c in store.calls("wf1")}
    assert states == {"run1": "cancelled", "run2": "running", "ok": "succeeded", "bad": "failed"}
    assert [o.call_id for o in store.outcomes("wf1")] == ["ok", "bad"]


def test_traces_paging(store):
    store.add_workflow(workflow())
    for i in range(7):
        cid = f"c{i}"
        store.call_dispatched(call(cid), "n", "n/lm#0", 1.0)
        store.call_done(CallDone(cid, True, ""), result(cid), {"i": i})
    page1 = store.traces(0, 3)
    assert [json.loads(r)["i"] for _, r in page1] == [0, 1, 2]
    page2 = store.traces(page1[-1][0], 3)
    assert [json.loads(r)["i"] for _, r in page2] == [3, 4, 5]
    page3 = store.traces(page2[-1][0], 3)
    assert [json.loads(r)["i"] for _, r in page3] == [6]
    assert store.traces(page3[-1][0], 3) == []
    ids = [i for i, _ in page1 + page2 + page3]
    assert ids == sorted(ids)
    assert len(set(ids)) == 7


def test_wal_mode_is_on(store, db):
    mode = store._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode.lower() == "wal"
    raw = sqlite3.connect(db)  # persistent: a fresh connection sees it too
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    finally:
        raw.close()


def test_the_journal_is_private_to_the_schedulers_user(tmp_path):
    db = tmp_path / "new.db"
    s = Store(db)
    s.add_workflow(workflow())
    files = [p for p in tmp_path.iterdir() if p.name.startswith("new.db")]
    assert {p.name for p in files} >= {"new.db", "new.db-wal"}
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o600 for p in files}
    s.close()


def test_an_older_journal_is_tightened_and_gains_the_client_column(tmp_path):
    db = tmp_path / "old.db"
    raw = sqlite3.connect(db)
    raw.executescript(SCHEMA.replace(",\n    client TEXT NOT NULL DEFAULT ''", ""))
    raw.execute(
        "INSERT INTO workflows VALUES ('wf0', 'old', 's', 't', '{}', NULL, 'running', '', 1.0,"
        " NULL)"
    )
    raw.commit()
    raw.close()
    db.chmod(0o644)
    s = Store(db)
    try:
        assert db.stat().st_mode & 0o777 == 0o600
        assert s.workflow("wf0").client == ""
        s.add_workflow(workflow("wf1", client="alice"))
        assert s.workflow("wf1").client == "alice"
    finally:
        s.close()


def test_recent_workflows_of_one_client(tmp_path):
    store = Store(tmp_path / "swarmx.db")
    for i, client in enumerate(["alice", "bob", "alice", ""]):
        store.add_workflow(
            WorkflowRow(
                f"wf-{i}", "w", "w.toml", "", {}, None, "running", "", float(i), None, client
            )
        )
    assert [r.id for r in store.workflows(client="alice")] == ["wf-2", "wf-0"]
    assert [r.id for r in store.workflows(client="alice", limit=1)] == ["wf-2"]
    assert [r.id for r in store.workflows(state="running", client="")] == ["wf-3"]
    assert len(store.workflows()) == 4
    store.close()
