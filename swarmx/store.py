"""The scheduler's journal in SQLite: workflows, their calls, and the trace of every finished call.

WAL mode with ``synchronous=NORMAL``: a commit is durable across a crash of the scheduler process
(power loss may drop the last transactions) and costs tens of microseconds, less than handing it to
a thread, so the daemon writes inline. A workflow is committed before its id is returned to the
client, and each call outcome before the engine acts on it, so a restarted scheduler replays every
unfinished workflow to exactly where it was. The journal holds every prompt and output, so its
files are the scheduler user's alone (0600).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmx.protocol import Result
from swarmx.workflow.engine import CallDone, CallSpec

SCHEMA = """
CREATE TABLE IF NOT EXISTS workflows (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    source TEXT NOT NULL,
    spec_text TEXT NOT NULL,
    overrides TEXT NOT NULL,
    slo_s REAL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    submitted_ts REAL NOT NULL,
    finished_ts REAL,
    client TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS workflows_state ON workflows(state);
CREATE TABLE IF NOT EXISTS calls (
    call_id TEXT PRIMARY KEY,
    workflow_id TEXT NOT NULL REFERENCES workflows(id),
    step_id TEXT NOT NULL,
    idx INTEGER,
    attempt INTEGER NOT NULL,
    state TEXT NOT NULL,
    node TEXT NOT NULL DEFAULT '',
    replica TEXT NOT NULL DEFAULT '',
    dispatched_ts REAL,
    queue_s REAL,
    latency_s REAL,
    ttft_s REAL,
    output_tokens INTEGER,
    output TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    infra INTEGER NOT NULL DEFAULT 0,
    done_seq INTEGER
);
CREATE INDEX IF NOT EXISTS calls_workflow ON calls(workflow_id);
CREATE TABLE IF NOT EXISTS traces (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    call_id TEXT NOT NULL,
    row TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class WorkflowRow:
    id: str
    name: str
    source: str
    spec_text: str
    overrides: dict[str, str]
    slo_s: float | None
    state: str
    reason: str
    submitted_ts: float
    finished_ts: float | None
    client: str = ""
    """The key name of the client that submitted it (empty without CURVE keys)."""


@dataclass(frozen=True)
class CallRow:
    call_id: str
    workflow_id: str
    step_id: str
    idx: int | None
    attempt: int
    state: str
    node: str
    replica: str
    dispatched_ts: float | None
    queue_s: float | None
    latency_s: float | None
    ttft_s: float | None
    output_tokens: int | None
    output: str
    error: str


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # SQLite's -wal and -shm copy it
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        _make_private(path)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(workflows)")}
        if "client" not in columns:  # a journal from before per-client quotas
            self._db.execute("ALTER TABLE workflows ADD COLUMN client TEXT NOT NULL DEFAULT ''")
        self._done_seq = self._scalar("SELECT COALESCE(MAX(done_seq), 0) FROM calls")

    def close(self) -> None:
        self._db.close()

    def _scalar(self, sql: str, *args: Any) -> int:
        return int(self._db.execute(sql, args).fetchone()[0])

    # --- workflows --------------------------------------------------------------------------

    def add_workflow(self, row: WorkflowRow) -> None:
        self._db.execute(
            "INSERT INTO workflows (id, name, source, spec_text, overrides, slo_s, state, reason,"
            " submitted_ts, finished_ts, client) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                row.id,
                row.name,
                row.source,
                row.spec_text,
                json.dumps(row.overrides),
                row.slo_s,
                row.state,
                row.reason,
                row.submitted_ts,
                row.finished_ts,
                row.client,
            ),
        )

    def finish_workflow(self, workflow_id: str, state: str, reason: str, ts: float) -> None:
        self._db.execute(
            "UPDATE workflows SET state=?, reason=?, finished_ts=? WHERE id=?",
            (state, reason, ts, workflow_id),
        )

    def workflow(self, workflow_id: str) -> WorkflowRow | None:
        cur = self._db.execute("SELECT * FROM workflows WHERE id=?", (workflow_id,))
        rows = list(_workflow_rows(cur))
        return rows[0] if rows else None

    def workflows(
        self, *, state: str | None = None, client: str | None = None, limit: int = 50
    ) -> list[WorkflowRow]:
        """The most recent ``limit`` (oldest first with a ``state``), of one ``client`` if
        given."""
        if state is None:
            sql, args = "SELECT * FROM workflows", []
            order = "submitted_ts DESC"
        else:
            sql, args = "SELECT * FROM workflows WHERE state=?", [state]
            order = "submitted_ts"
        if client is not None:
            sql += (" AND" if args else " WHERE") + " client=?"
            args.append(client)
        rows = self._db.execute(f"{sql} ORDER BY {order} LIMIT ?", (*args, limit))
        return list(_workflow_rows(rows))

    # --- calls ------------------------------------------------------------------------------

    def call_dispatched(self, call: CallSpec, node: str, replica: str, ts: float) -> None:
        self._db.execute(
            "INSERT INTO calls (call_id, workflow_id, step_id, idx, attempt, state, node, replica,"
            " dispatched_ts) VALUES (?,?,?,?,?,'running',?,?,?) ON CONFLICT(call_id) DO UPDATE"
            " SET node=excluded.node, replica=excluded.replica,"
            " dispatched_ts=excluded.dispatched_ts, state='running'",
            (
                call.call_id,
                call.workflow_id,
                call.step_id,
                call.index,
                call.attempt,
                node,
                replica,
                ts,
            ),
        )

    def call_done(
        self, done: CallDone, result: Result | None, trace_row: dict[str, Any] | None
    ) -> None:
        """Record an outcome (in the order the engine sees it), its timings (``result``; None
        for a call lost with its node) and its trace row, atomically."""
        self._done_seq += 1
        timing = (
            (result.queue_s, result.latency_s, result.ttft_s, result.output_tokens)
            if result is not None
            else (None, None, None, None)
        )
        with self._tx():
            self._db.execute(
                "UPDATE calls SET state=?, output=?, error=?, infra=?, queue_s=?, latency_s=?,"
                " ttft_s=?, output_tokens=?, done_seq=? WHERE call_id=?",
                (
                    "succeeded" if done.ok else "failed",
                    done.output,
                    done.error,
                    int(done.infra),
                    *timing,
                    self._done_seq,
                    done.call_id,
                ),
            )
            if trace_row is not None:
                self._db.execute(
                    "INSERT INTO traces (call_id, row) VALUES (?, ?)",
                    (done.call_id, json.dumps(trace_row)),
                )

    def calls_cancelled(self, call_ids: list[str]) -> None:
        self._db.executemany(
            "UPDATE calls SET state='cancelled' WHERE call_id=? AND state='running'",
            [(c,) for c in call_ids],
        )

    def calls(self, workflow_id: str) -> list[CallRow]:
        cur = self._db.execute(
            "SELECT call_id, workflow_id, step_id, idx, attempt, state, node, replica,"
            " dispatched_ts, queue_s, latency_s, ttft_s, output_tokens, output, error"
            " FROM calls WHERE workflow_id=? ORDER BY step_id, idx, attempt",
            (workflow_id,),
        )
        return [CallRow(*r) for r in cur]

    def outcomes(self, workflow_id: str) -> list[CallDone]:
        """Every recorded outcome of a workflow in the order it happened, for replay."""
        cur = self._db.execute(
            "SELECT call_id, state, output, error, replica, infra FROM calls"
            " WHERE workflow_id=? AND done_seq IS NOT NULL ORDER BY done_seq",
            (workflow_id,),
        )
        return [CallDone(c, s == "succeeded", o, e, r, bool(i)) for c, s, o, e, r, i in cur]

    # --- traces -----------------------------------------------------------------------------

    def traces(self, after_id: int, limit: int) -> list[tuple[int, str]]:
        cur = self._db.execute(
            "SELECT id, row FROM traces WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
        )
        return [(int(i), str(r)) for i, r in cur]

    def _tx(self) -> _Tx:
        return _Tx(self._db)


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def _workflow_rows(cur: sqlite3.Cursor) -> Iterator[WorkflowRow]:
    for r in cur:
        yield WorkflowRow(
            r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], r[7], r[8], r[9], r[10]
        )


def _make_private(path: Path) -> None:
    """Tighten the journal's files to 0600 where an older version (or a umask) left them
    readable by others."""
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if file.stat().st_mode & 0o077:
                file.chmod(0o600)
        except FileNotFoundError:
            continue
