"""The scheduler's SQLite journal: workflows, call outcomes in order, traces; durable reopen."""

import gzip
import json
import sqlite3
from datetime import datetime, timezone

import pytest

import swarmx.store
from swarmx.protocol import Result
from swarmx.store import (
    MIGRATIONS,
    SCHEMA,
    SCHEMA_VERSION,
    PruneResult,
    Store,
    StoreError,
    WorkflowRow,
)
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


def user_version(db) -> int:
    raw = sqlite3.connect(db)
    try:
        return int(raw.execute("PRAGMA user_version").fetchone()[0])
    finally:
        raw.close()


def other_connection_sees(db, wf_id) -> bool:
    raw = sqlite3.connect(db)
    try:
        return raw.execute("SELECT 1 FROM workflows WHERE id=?", (wf_id,)).fetchone() is not None
    finally:
        raw.close()


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
    done = CallDone("c1", True, "out", replica="node-a/lm#0")
    store.call_done(done, result("c1"), json.dumps(trace))
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
    with pytest.raises(sqlite3.ProgrammingError):  # the trace row cannot be written: nothing is
        store.call_done(CallDone("c1", True, "out"), result("c1"), object())  # type: ignore[arg-type]
    [c] = store.calls("wf1")
    assert c.state == "running"
    assert c.latency_s is None
    assert store.outcomes("wf1") == []
    assert store.traces(0, 10) == []
    # and the store is still usable
    store.call_done(CallDone("c1", True, "out"), result("c1"), '{"ok": 1}')
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
    first.call_done(CallDone("b", True, "B"), result("b"), json.dumps({"n": 1}))
    first.call_done(CallDone("a", True, "A"), result("a"), json.dumps({"n": 2}))
    first.close()

    second = Store(db)
    try:
        assert [o.call_id for o in second.outcomes("wf1")] == ["b", "a"]
        second.call_done(CallDone("c", False, "", "late"), result("c"), json.dumps({"n": 3}))
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
        store.call_done(CallDone(cid, True, ""), result(cid), json.dumps({"i": i}))
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


def test_a_pre_versioning_journal_is_tightened_and_migrated(tmp_path):
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
        assert (s.workflow("wf0").client, s.workflow("wf0").idem_key) == ("", "")
        s.add_workflow(workflow("wf1", client="alice", idem_key="k"))
        assert s.workflow("wf1").client == "alice"
        assert s.workflow_by_key("alice", "k").id == "wf1"
    finally:
        s.close()
    assert user_version(db) == SCHEMA_VERSION


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


# --- grouped writes -------------------------------------------------------------------------


def test_writes_join_one_transaction_until_commit(store, db):
    assert store.uncommitted == 0
    store.add_workflow(workflow())
    store.call_dispatched(call("c1"), "n", "n/lm#0", 1.0)
    store.call_done(CallDone("c1", True, "out"), result("c1"), json.dumps({"n": 1}))
    assert store.uncommitted == 4  # the call_done is an update and a trace insert
    assert store.workflow("wf1") == workflow()  # the writer reads its own writes
    assert store.calls("wf1")[0].state == "succeeded"
    assert not other_connection_sees(db, "wf1")
    store.commit()
    assert store.uncommitted == 0
    assert other_connection_sees(db, "wf1")
    store.finish_workflow("wf1", "succeeded", "", 2.0)  # a new group begins
    assert store.uncommitted == 1
    store.commit()


def test_commit_without_writes_is_a_noop(store):
    store.commit()
    store.add_workflow(workflow())
    store.commit()
    store.commit()
    assert store.uncommitted == 0


def test_close_commits_pending_writes_and_is_idempotent(db):
    s = Store(db)
    s.add_workflow(workflow())
    s.close()
    s.close()
    assert other_connection_sees(db, "wf1")


def test_a_refused_write_leaves_the_rest_of_its_group(store, db):
    store.add_workflow(workflow())
    with pytest.raises(sqlite3.IntegrityError):
        store.add_workflow(workflow())
    store.add_workflow(workflow("wf2"))
    assert store.uncommitted == 2
    store.commit()
    assert other_connection_sees(db, "wf1")
    assert other_connection_sees(db, "wf2")


def test_call_done_failing_midway_undoes_only_itself(store, db):
    store._db.execute(  # the trace insert fails after the call's update succeeded
        "CREATE TRIGGER no_traces BEFORE INSERT ON traces BEGIN SELECT RAISE(ABORT, 'no'); END"
    )
    store.add_workflow(workflow())
    store.call_dispatched(call("c1"), "n", "n/lm#0", 1.0)
    with pytest.raises(sqlite3.IntegrityError):
        store.call_done(CallDone("c1", True, "out"), result("c1"), json.dumps({"n": 1}))
    assert store.uncommitted == 2
    [c] = store.calls("wf1")
    assert (c.state, c.latency_s) == ("running", None)
    assert store.outcomes("wf1") == []
    store.commit()
    assert other_connection_sees(db, "wf1")  # the group's earlier writes were kept


def test_a_group_rolled_back_by_sqlite_fails_the_commit(store):
    store.add_workflow(workflow())
    store._db.execute("ROLLBACK")  # what SQLite may do after a disk-full or I/O error
    with pytest.raises(StoreError, match=r"1 journal writes were rolled back"):
        store.commit()
    assert store.uncommitted == 0
    store.commit()  # reported once; the store goes on
    store.add_workflow(workflow())
    store.commit()


# --- schema versions ------------------------------------------------------------------------


def test_a_new_journal_is_at_the_current_schema_version(store, db):
    assert SCHEMA_VERSION == len(MIGRATIONS) == 2
    assert user_version(db) == SCHEMA_VERSION


def test_a_version_1_journal_gains_the_idempotency_key(db):
    raw = sqlite3.connect(db, isolation_level=None)
    MIGRATIONS[0](raw)
    raw.execute("PRAGMA user_version = 1")
    raw.execute(
        "INSERT INTO workflows VALUES ('wf0', 'old', 's', 't', '{}', NULL, 'done', '', 1.0,"
        " NULL, 'alice')"
    )
    raw.close()
    s = Store(db)
    try:
        assert s.workflow("wf0").idem_key == ""
        assert user_version(db) == 2
    finally:
        s.close()


def test_a_journal_newer_than_the_code_is_refused_untouched(db):
    raw = sqlite3.connect(db)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StoreError) as e:
        Store(db)
    assert str(e.value) == (
        f"{db}: journal schema version 3 is newer than this SwarmX understands (2);"
        " upgrade SwarmX or use another state directory"
    )
    assert user_version(db) == SCHEMA_VERSION + 1


def test_a_failed_migration_leaves_the_journal_at_its_version(db, monkeypatch):
    Store(db).close()

    def broken(conn):
        conn.execute("ALTER TABLE workflows ADD COLUMN half TEXT")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(swarmx.store, "MIGRATIONS", (*MIGRATIONS, broken))
    monkeypatch.setattr(swarmx.store, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(RuntimeError, match="migration bug"):
        Store(db)
    assert user_version(db) == SCHEMA_VERSION
    raw = sqlite3.connect(db)
    assert "half" not in {r[1] for r in raw.execute("PRAGMA table_info(workflows)")}
    raw.close()


def test_idempotency_keys_are_unique_per_client(store):
    store.add_workflow(workflow("a", client="alice", idem_key="k1"))
    store.add_workflow(workflow("b", client="bob", idem_key="k1"))  # another client's key
    store.add_workflow(workflow("c", client="alice"))  # no key: never a duplicate
    store.add_workflow(workflow("d", client="alice"))
    with pytest.raises(sqlite3.IntegrityError):
        store.add_workflow(workflow("e", client="alice", idem_key="k1"))
    assert store.workflow_by_key("alice", "k1") == workflow("a", client="alice", idem_key="k1")
    assert store.workflow_by_key("bob", "k1").id == "b"
    assert store.workflow_by_key("alice", "k2") is None
    assert store.workflow_by_key("alice", "") is None


# --- integrity ------------------------------------------------------------------------------


def test_a_file_that_is_not_a_journal_is_refused_naming_it(db):
    db.write_bytes(b"this is not SQLite\n" * 300)
    with pytest.raises(StoreError) as e:
        Store(db)
    assert str(e.value).startswith(f"{db}: the journal is damaged (file is not a database)")
    assert "move it aside" in str(e.value)


def test_a_damaged_journal_is_refused_at_start(db):
    s = Store(db)
    for i in range(100):
        s.add_workflow(workflow(f"wf{i}", spec_text="x" * 200))
    s.close()  # the last connection checkpoints: everything is in the main file
    raw = sqlite3.connect(db)
    [root] = raw.execute(
        "SELECT rootpage FROM sqlite_schema WHERE name='sqlite_autoindex_workflows_1'"
    ).fetchone()
    raw.close()
    with db.open("r+b") as f:  # overwrite an index page: the table itself still reads
        f.seek((root - 1) * 4096)
        f.write(bytes(range(256)) * 16)
    with pytest.raises(StoreError) as e:
        Store(db)
    message = str(e.value)
    assert message.startswith(f"{db}: the journal is damaged (Page {root}: ")
    assert message.endswith(
        "; move it aside (the scheduler then starts empty) or restore it from a backup"
    )
    assert "\n" not in message


# --- retention ------------------------------------------------------------------------------


def finished(store, n, ts=100.0):
    """``n`` finished workflows (finished at ``ts + i``), each with two calls and traces."""
    for i in range(n):
        wf_id = f"old{i}"
        store.add_workflow(workflow(wf_id, ts=ts + i))
        for k in range(2):
            cid = f"{wf_id}/{k}"
            store.call_dispatched(call(cid, wf_id), "n", "n/lm#0", ts)
            store.call_done(CallDone(cid, True, "out"), result(cid), json.dumps({"call": cid}))
        store.finish_workflow(wf_id, "succeeded", "", ts + i)


def test_prune_keeps_the_newest_traces_and_archives_the_rest(store, tmp_path):
    store.add_workflow(workflow())
    for i in range(10):
        store.call_dispatched(call(f"c{i}"), "n", "n/lm#0", 1.0)
        store.call_done(CallDone(f"c{i}", True, ""), result(f"c{i}"), json.dumps({"i": i}))
    rows = store.traces(0, 100)
    now = datetime(2026, 12, 6, 23, 59, tzinfo=timezone.utc).timestamp()
    archive = tmp_path / "archive"
    prune = dict(keep_traces=4, keep_finished_s=0, archive_dir=archive, batch=4)
    assert store.prune(now, **prune) == PruneResult(4, 0, more=True)
    assert store.uncommitted == 0  # prune commits
    assert store.prune(now, **prune) == PruneResult(2, 0, more=False)
    assert store.prune(now, **prune) == PruneResult(0, 0, more=False)
    assert store.traces(0, 100) == rows[6:]
    assert store.traces(rows[2][0], 2) == rows[6:8]  # paging from a pruned id goes on
    [file] = archive.iterdir()
    assert file.name == "traces-20261206.jsonl.gz"
    assert file.stat().st_mode & 0o777 == 0o600
    with gzip.open(file, "rt") as f:  # two gzip members, read as one stream
        assert f.read().splitlines() == [r for _, r in rows[:6]]
    assert store.counts()["traces"] == 4


def test_trace_ids_keep_increasing_after_pruning(db):
    s = Store(db)
    s.add_workflow(workflow())
    for i in range(3):
        s.call_dispatched(call(f"c{i}"), "n", "n/lm#0", 1.0)
        s.call_done(CallDone(f"c{i}", True, ""), result(f"c{i}"), json.dumps({"i": i}))
    last = s.traces(0, 10)[-1][0]
    assert s.prune(0.0, keep_traces=1, keep_finished_s=0) == PruneResult(2, 0, more=False)
    s.close()
    s = Store(db)
    try:
        s.call_dispatched(call("c9"), "n", "n/lm#0", 1.0)
        s.call_done(CallDone("c9", True, ""), result("c9"), json.dumps({"i": 9}))
        assert [i for i, _ in s.traces(0, 10)] == [last, last + 1]
    finally:
        s.close()


def test_prune_deletes_old_finished_workflows_with_their_calls(store, db):
    finished(store, 5, ts=100.0)  # finished at 100..104
    store.add_workflow(workflow("live", ts=50.0))  # running: kept however old
    store.call_dispatched(call("live/0", "live"), "n", "n/lm#0", 50.0)
    assert store.counts() == {"workflows": 6, "calls": 11, "traces": 10}
    prune = dict(keep_traces=0, keep_finished_s=100.0, batch=2)
    assert store.prune(203.5, **prune) == PruneResult(0, 2, more=True)  # before 103.5
    assert store.prune(203.5, **prune) == PruneResult(0, 2, more=False)
    assert store.prune(203.5, **prune) == PruneResult(0, 0, more=False)
    assert {w.id for w in store.workflows()} == {"old4", "live"}
    assert store.calls("old0") == []
    assert [c.call_id for c in store.calls("old4")] == ["old4/0", "old4/1"]
    assert store.counts() == {"workflows": 2, "calls": 3, "traces": 10}  # traces: own limit
    assert not other_connection_sees(db, "old0")
    assert other_connection_sees(db, "live")  # committed with the prune


def test_prune_with_zero_keeps_everything(store, tmp_path):
    finished(store, 3)
    pruned = store.prune(1e9, keep_traces=0, keep_finished_s=0, archive_dir=tmp_path / "a")
    assert pruned == PruneResult(0, 0, more=False)
    assert store.counts() == {"workflows": 3, "calls": 6, "traces": 6}
    assert not (tmp_path / "a").exists()


def test_a_failed_archive_deletes_nothing(store, tmp_path):
    finished(store, 3)
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(FileExistsError):
        store.prune(1.0, keep_traces=1, keep_finished_s=0, archive_dir=blocked)
    assert store.counts()["traces"] == 6


def test_counts_of_an_empty_journal(store):
    assert store.counts() == {"workflows": 0, "calls": 0, "traces": 0}
