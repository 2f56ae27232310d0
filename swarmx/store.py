"""The scheduler's journal in SQLite: workflows, their calls, and the trace of every finished call.

WAL mode with ``synchronous=NORMAL``: a commit is durable across a crash of the scheduler process
(power loss may drop the last transactions) and costs tens of microseconds, less than handing it to
a thread, so the daemon writes inline. Writes are grouped: each joins one open transaction and
`Store.commit` ends it, because a commit per write was most of the scheduler's time at saturation.
Grouping is safe because the daemon commits before any reply that promises durability (a workflow
id returned to its client) and after each batch of frames, so a crash loses only work it had not
acknowledged yet, and a restarted scheduler replays every committed workflow to where it was.

The schema is versioned by ``PRAGMA user_version`` and migrated forward on open; a journal that is
damaged or newer than this code stops the scheduler with one line naming the file. `Store.prune`
bounds its growth. The journal holds every prompt and output, so its files (and the trace archives)
are the scheduler user's alone (0600).
"""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
"""Schema version 1, as journals were before versioning (some without ``workflows.client``)."""


def _v1(db: sqlite3.Connection) -> None:
    """The original schema; a pre-versioning journal already has it, maybe without ``client``."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    columns = {r[1] for r in db.execute("PRAGMA table_info(workflows)")}
    if "client" not in columns:  # a journal from before per-client quotas
        db.execute("ALTER TABLE workflows ADD COLUMN client TEXT NOT NULL DEFAULT ''")


def _v2(db: sqlite3.Connection) -> None:
    """A client's submit idempotency key, unique per client; an index to find old workflows."""
    db.execute("ALTER TABLE workflows ADD COLUMN idem_key TEXT NOT NULL DEFAULT ''")
    db.execute(
        "CREATE UNIQUE INDEX workflows_idem ON workflows(client, idem_key) WHERE idem_key != ''"
    )
    db.execute("CREATE INDEX workflows_finished ON workflows(finished_ts)")


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_v1, _v2)
"""Migration ``i`` takes a journal from version ``i`` to ``i + 1``; append, never edit."""
SCHEMA_VERSION = len(MIGRATIONS)

_WORKFLOW_COLUMNS = (
    "id, name, source, spec_text, overrides, slo_s, state, reason, submitted_ts, finished_ts,"
    " client, idem_key"
)


class StoreError(RuntimeError):
    """The journal cannot be used as it is; the message is one line naming the file."""


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
    idem_key: str = ""
    """The client's idempotency key for the submit (empty: none); unique per client."""


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


@dataclass(frozen=True)
class PruneResult:
    traces_deleted: int
    workflows_deleted: int
    more: bool
    """Another call would delete more (the batch was full)."""


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # SQLite's -wal and -shm copy it
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._uncommitted = 0
        self._closed = False
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._check()
            self._migrate()
            self._done_seq = self._scalar("SELECT COALESCE(MAX(done_seq), 0) FROM calls")
        except sqlite3.OperationalError as e:  # locked, unreadable, disk full: not damage
            self._db.close()
            raise StoreError(f"{path}: cannot open the journal ({e})") from e
        except sqlite3.DatabaseError as e:  # "file is not a database", "malformed"
            self._db.close()
            raise StoreError(_damaged(path, str(e))) from e
        except BaseException:
            self._db.close()
            raise
        _make_private(path)

    def _check(self) -> None:
        """Refuse a damaged journal at start rather than fail on some later write."""
        problems = [str(r[0]) for r in self._db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise StoreError(_damaged(self.path, problems[0] if problems else "no answer"))

    def _migrate(self) -> None:
        version = self._scalar("PRAGMA user_version")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: journal schema version {version} is newer than this SwarmX"
                f" understands ({SCHEMA_VERSION}); upgrade SwarmX or use another state directory"
            )
        for target, migration in enumerate(MIGRATIONS[version:], start=version + 1):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                migration(self._db)
                self._db.execute(f"PRAGMA user_version = {target}")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def commit(self) -> None:
        """Make every write since the last commit durable; a no-op when there is none."""
        if not self._db.in_transaction:
            if self._uncommitted:  # SQLite rolled the group back after a failed write
                lost, self._uncommitted = self._uncommitted, 0
                raise StoreError(
                    f"{self.path}: {lost} journal writes were rolled back by SQLite after an"
                    " error (disk full or I/O error?); restart the scheduler to replay"
                )
            return
        self._db.execute("COMMIT")
        self._uncommitted = 0

    @property
    def uncommitted(self) -> int:
        """Write statements since the last commit."""
        return self._uncommitted

    def close(self) -> None:
        """Commit what is pending and close; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.commit()
        finally:
            self._db.close()

    def _scalar(self, sql: str, *args: Any) -> int:
        return int(self._db.execute(sql, args).fetchone()[0])

    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        """One write statement in the open group (begun here after a commit)."""
        if not self._db.in_transaction:
            self._db.execute("BEGIN")
        self._db.execute(sql, args)
        self._uncommitted += 1

    @contextmanager
    def _savepoint(self, name: str) -> Iterator[None]:
        """All of the block's writes or none, inside the open group."""
        if not self._db.in_transaction:
            self._db.execute("BEGIN")
        before = self._uncommitted
        self._db.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            if self._db.in_transaction:  # not when SQLite already rolled back the whole group
                self._db.execute(f"ROLLBACK TO {name}")
                self._db.execute(f"RELEASE {name}")
                self._uncommitted = before
            raise
        self._db.execute(f"RELEASE {name}")

    # --- workflows --------------------------------------------------------------------------

    def add_workflow(self, row: WorkflowRow) -> None:
        self._write(
            f"INSERT INTO workflows ({_WORKFLOW_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
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
                row.idem_key,
            ),
        )

    def finish_workflow(self, workflow_id: str, state: str, reason: str, ts: float) -> None:
        self._write(
            "UPDATE workflows SET state=?, reason=?, finished_ts=? WHERE id=?",
            (state, reason, ts, workflow_id),
        )

    def workflow(self, workflow_id: str) -> WorkflowRow | None:
        cur = self._db.execute(
            f"SELECT {_WORKFLOW_COLUMNS} FROM workflows WHERE id=?", (workflow_id,)
        )
        rows = list(_workflow_rows(cur))
        return rows[0] if rows else None

    def workflow_by_key(self, client: str, key: str) -> WorkflowRow | None:
        """The workflow ``client`` submitted with idempotency key ``key`` (none for "")."""
        cur = self._db.execute(
            f"SELECT {_WORKFLOW_COLUMNS} FROM workflows"
            " WHERE client=? AND idem_key=? AND idem_key != ''",  # the last term: use the index
            (client, key),
        )
        rows = list(_workflow_rows(cur))
        return rows[0] if rows else None

    def workflows(
        self, *, state: str | None = None, client: str | None = None, limit: int = 50
    ) -> list[WorkflowRow]:
        """The most recent ``limit`` (oldest first with a ``state``), of one ``client`` if
        given."""
        sql = f"SELECT {_WORKFLOW_COLUMNS} FROM workflows"
        if state is None:
            where: list[str] = []
            args: list[Any] = []
            order = "submitted_ts DESC"
        else:
            where, args = ["state=?"], [state]
            order = "submitted_ts"
        if client is not None:
            where.append("client=?")
            args.append(client)
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._db.execute(f"{sql} ORDER BY {order} LIMIT ?", (*args, limit))
        return list(_workflow_rows(rows))

    # --- calls ------------------------------------------------------------------------------

    def call_dispatched(self, call: CallSpec, node: str, replica: str, ts: float) -> None:
        self._write(
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

    def call_done(self, done: CallDone, result: Result | None, trace_json: str | None) -> None:
        """Record an outcome (in the order the engine sees it), its timings (``result``; None
        for a call lost with its node) and its trace row (JSON text), atomically."""
        self._done_seq += 1
        timing = (
            (result.queue_s, result.latency_s, result.ttft_s, result.output_tokens)
            if result is not None
            else (None, None, None, None)
        )
        with self._savepoint("call_done"):
            self._write(
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
            if trace_json is not None:
                self._write(
                    "INSERT INTO traces (call_id, row) VALUES (?, ?)", (done.call_id, trace_json)
                )

    def calls_cancelled(self, call_ids: list[str]) -> None:
        for call_id in call_ids:
            self._write(
                "UPDATE calls SET state='cancelled' WHERE call_id=? AND state='running'",
                (call_id,),
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

    # --- retention --------------------------------------------------------------------------

    def prune(
        self,
        now_ts: float,
        *,
        keep_traces: int,
        keep_finished_s: float,
        archive_dir: Path | None = None,
        batch: int = 5000,
    ) -> PruneResult:
        """Delete up to ``batch`` of the oldest traces beyond the newest ``keep_traces`` (archived
        first to ``archive_dir`` when given) and up to ``batch`` workflows finished before
        ``now_ts - keep_finished_s`` with their calls (0 keeps all), then commit.

        Bounded so that the daemon can call it on its event loop; ``more`` asks for another call.
        Trace ids are dense (only this deletes them, oldest first), so the newest ``keep_traces``
        are those above ``MAX(id) - keep_traces``, found without counting. A crash between the
        archive append and the commit archives those rows again on the next call.
        """
        traces_deleted, more_traces = 0, False
        if keep_traces > 0:
            cutoff = self._scalar("SELECT COALESCE(MAX(id), 0) FROM traces") - keep_traces
            rows = self._db.execute(
                "SELECT id, row FROM traces WHERE id <= ? ORDER BY id LIMIT ?", (cutoff, batch)
            ).fetchall()
            if rows:
                last = int(rows[-1][0])
                if archive_dir is not None:
                    _archive(archive_dir, now_ts, [str(r) for _, r in rows])
                self._write("DELETE FROM traces WHERE id <= ?", (last,))
                traces_deleted = len(rows)
                more_traces = self._exists(
                    "SELECT 1 FROM traces WHERE id > ? AND id <= ?", last, cutoff
                )
        workflows_deleted, more_workflows = 0, False
        if keep_finished_s > 0:
            old = "FROM workflows WHERE finished_ts < ? AND state != 'running'"
            before = now_ts - keep_finished_s
            ids = [
                (str(r[0]),)
                for r in self._db.execute(
                    f"SELECT id {old} ORDER BY finished_ts LIMIT ?", (before, batch)
                )
            ]
            if ids:
                if not self._db.in_transaction:
                    self._db.execute("BEGIN")
                self._db.executemany("DELETE FROM calls WHERE workflow_id=?", ids)
                self._db.executemany("DELETE FROM workflows WHERE id=?", ids)
                self._uncommitted += 2 * len(ids)
                workflows_deleted = len(ids)
                more_workflows = self._exists(f"SELECT 1 {old}", before)
        self.commit()
        return PruneResult(traces_deleted, workflows_deleted, more_traces or more_workflows)

    def _exists(self, sql: str, *args: Any) -> bool:
        return self._db.execute(f"{sql} LIMIT 1", args).fetchone() is not None

    def counts(self) -> dict[str, int]:
        """Rows in each table, for metrics; each count reads its table's smallest b-tree (about
        20 ms per 100k rows), so call it about as often as `prune`, not per request."""
        return {
            table: self._scalar(f"SELECT COUNT(*) FROM {table}")
            for table in ("workflows", "calls", "traces")
        }


def _workflow_rows(cur: sqlite3.Cursor) -> Iterator[WorkflowRow]:
    for r in cur:
        yield WorkflowRow(
            r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], r[7], r[8], r[9], r[10], r[11]
        )


def _damaged(path: Path, problem: str) -> str:
    # quick_check's first row starts with a "*** in database main ***" line
    problem = "; ".join(p for p in problem.splitlines() if p and not p.startswith("***"))
    return (
        f"{path}: the journal is damaged ({problem}); move it aside (the scheduler then starts"
        " empty) or restore it from a backup"
    )


def _archive(archive_dir: Path, now_ts: float, rows: list[str]) -> None:
    """Append trace rows as one gzip member to the day's archive, synced before they are
    deleted."""
    archive_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    day = time.strftime("%Y%m%d", time.gmtime(now_ts))
    file = archive_dir / f"traces-{day}.jsonl.gz"
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as raw:
        with gzip.GzipFile(filename="", mode="ab", fileobj=raw) as gz:
            gz.write("".join(f"{r}\n" for r in rows).encode())
        raw.flush()
        os.fsync(raw.fileno())


def _make_private(path: Path) -> None:
    """Tighten the journal's files to 0600 where an older version (or a umask) left them
    readable by others."""
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if file.stat().st_mode & 0o077:
                file.chmod(0o600)
        except FileNotFoundError:
            continue
