"""`swarmx submit`, `status`, `result`, `cancel` and `traces export`."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from swarmx.cli.common import (
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    AskFailed,
    ConfigOpt,
    JsonOpt,
    SchedulerOpt,
    ask,
    err_console,
    fail,
    load,
    print_json,
    try_ask,
)
from swarmx.cli.render import workflow_table, workflows_table
from swarmx.protocol import (
    Ack,
    CancelWorkflow,
    ExportTraces,
    Message,
    QueryWorkflows,
    Submit,
    Submitted,
    TracesReply,
    WorkflowsReply,
    WorkflowView,
)
from swarmx.schema import encode
from swarmx.workflow.spec import WorkflowError, load_workflow, parse_overrides

traces_app = typer.Typer(help="The trace store: every finished call.", no_args_is_help=True)

WAIT_POLL_S = 0.2
EXIT_WORKFLOW_FAILED = 1
MAX_KEY_CHARS = 256
"""The wire's limit on an idempotency key (a `Name`)."""
SUBMIT_TRIES = 6
SUBMIT_BACKOFF_S = 0.5
SUBMIT_BACKOFF_MAX_S = 8.0


def _expect(reply: Message, cls: type) -> None:
    if not isinstance(reply, cls):
        fail(f"unexpected reply {reply.TYPE!r} from the scheduler", EXIT_UNAVAILABLE)


def _view(config: Path | None, scheduler: str | None, wf_id: str) -> WorkflowView:
    reply = ask(config, scheduler, QueryWorkflows(wf_id))
    _expect(reply, WorkflowsReply)
    assert isinstance(reply, WorkflowsReply)
    return reply.workflows[0]


def _show(view: WorkflowView, json: bool) -> None:
    if json:
        print_json(encode(view))
    else:
        Console().print(workflow_table(view))


def submit(
    file: Annotated[Path, typer.Argument(help="workflow.toml", show_default=False)],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override an input: --set key=value (repeatable)."),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Block until it ends; print it.")] = False,
    retry: Annotated[
        bool,
        typer.Option(
            "--retry",
            help=f"If the scheduler does not answer or is full, try again (up to "
            f"{SUBMIT_TRIES} times, backing off) with the same idempotency key.",
        ),
    ] = False,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            help="Submit under this key: a scheduler that has a workflow from you with it "
            "returns that one instead of starting another [default: a new random key].",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    scheduler: SchedulerOpt = None,
    json: JsonOpt = False,
) -> None:
    """Submit a workflow; prints its id (or, with --wait, how it ended). Exit 3: the scheduler
    is full (nothing was accepted)."""
    try:
        overrides = parse_overrides(set_ or [])
        load_workflow(file, overrides)  # fail fast, naming file and line, before any network
    except WorkflowError as exc:
        fail(str(exc), EXIT_USAGE)
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_KEY_CHARS:
        fail(f"--idempotency-key: 1 to {MAX_KEY_CHARS} characters, got {len(idempotency_key)}")
    key = idempotency_key or uuid.uuid4().hex
    msg = Submit(str(file), file.read_text(encoding="utf-8"), overrides, key)
    reply = _submit(config, scheduler, msg, SUBMIT_TRIES if retry else 1)
    wf_id = reply.workflow_id
    if not wait:
        if json:
            _show(_view(config, scheduler, wf_id), json=True)
        else:
            typer.echo(wf_id)
        return
    while (view := _view(config, scheduler, wf_id)).state == "running":
        time.sleep(WAIT_POLL_S)
    _show(view, json)
    if view.state != "succeeded":
        raise typer.Exit(EXIT_WORKFLOW_FAILED)


def _submit(config: Path | None, scheduler: str | None, msg: Submit, tries: int) -> Submitted:
    """Send ``msg`` until answered, at most ``tries`` times with exponential backoff. Each try
    carries the same idempotency key, so a try the scheduler did take (its answer lost or
    late) comes back as that workflow, not a second one."""
    delay_s = SUBMIT_BACKOFF_S
    for attempt in range(1, tries + 1):
        try:
            reply = try_ask(config, scheduler, msg)
            break
        except AskFailed as exc:
            if not exc.retryable or attempt == tries:
                hint = (
                    f" (it may still have been accepted: submit again with --idempotency-key"
                    f" {msg.idempotency_key} to get that one, not a second)"
                    if exc.code == EXIT_UNAVAILABLE
                    else ""
                )
                fail(f"{exc}{hint}", exc.code)
            err_console.print(f"{exc}; retrying in {delay_s:g}s ({attempt}/{tries})")
            time.sleep(delay_s)
            delay_s = min(2 * delay_s, SUBMIT_BACKOFF_MAX_S)
    _expect(reply, Submitted)
    assert isinstance(reply, Submitted)
    if reply.existing:
        err_console.print(f"already submitted as {reply.workflow_id} (same idempotency key)")
    return reply


def status(
    workflow_id: Annotated[str | None, typer.Argument(help="Workflow id.")] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=1000, help="How many recent workflows to list.")
    ] = 20,
    config: ConfigOpt = None,
    scheduler: SchedulerOpt = None,
    json: JsonOpt = False,
) -> None:
    """One workflow's steps, or the most recent workflows."""
    if workflow_id:
        _show(_view(config, scheduler, workflow_id), json)
        return
    reply = ask(config, scheduler, QueryWorkflows("", limit))
    _expect(reply, WorkflowsReply)
    assert isinstance(reply, WorkflowsReply)
    if json:
        print_json({"workflows": encode(reply.workflows)})
    else:
        Console().print(workflows_table(reply.workflows))


def result(
    workflow_id: Annotated[str, typer.Argument(help="Workflow id.")],
    config: ConfigOpt = None,
    scheduler: SchedulerOpt = None,
    json: JsonOpt = False,
) -> None:
    """Print a finished workflow's result: the outputs of its final steps."""
    view = _view(config, scheduler, workflow_id)
    if view.state != "succeeded":
        fail(
            f"workflow {workflow_id} is {view.state}" + (f": {view.reason}" if view.reason else ""),
            EXIT_WORKFLOW_FAILED,
        )
    if json:
        print_json({"id": view.id, "outputs": view.outputs})
    elif len(view.outputs) == 1:
        typer.echo(next(iter(view.outputs.values())))
    else:
        for step, output in view.outputs.items():
            typer.echo(f"== {step} ==\n{output}")


def cancel(
    workflow_id: Annotated[str, typer.Argument(help="Workflow id.")],
    config: ConfigOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Cancel a running workflow and the calls it has in flight."""
    reply = ask(config, scheduler, CancelWorkflow(workflow_id))
    _expect(reply, Ack)
    typer.echo(f"{workflow_id} cancelled")


@traces_app.command("export")
def export(
    out: Annotated[Path, typer.Option("--out", help="JSONL file to write ('-' for stdout).")],
    config: ConfigOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Write every recorded call as JSONL, one call a line (the predictors' input format)."""
    after, count = 0, 0
    sink = sys.stdout if str(out) == "-" else out.open("w", encoding="utf-8")
    try:
        while True:
            reply = ask(config, scheduler, ExportTraces(after, 1000))
            _expect(reply, TracesReply)
            assert isinstance(reply, TracesReply)
            if not reply.rows:
                break
            sink.writelines(row + "\n" for row in reply.rows)
            count += len(reply.rows)
            after = reply.last_id
    finally:
        if sink is not sys.stdout:
            sink.close()
    if sink is not sys.stdout:
        typer.echo(f"{count} calls written to {out}", err=True)


@traces_app.command("import")
def import_(
    path: Annotated[
        Path,
        typer.Argument(help="A public trace file, e.g. requests.csv.", exists=True, dir_okay=False),
    ],
    out: Annotated[Path, typer.Option("--out", help="JSONL file to write.")],
    format_: Annotated[str, typer.Option("--format", help="claude-code (requests.csv).")] = (
        "claude-code"
    ),
    config: ConfigOpt = None,
) -> None:
    """Convert a public trace into the trace format (claude-code: latency from api_time_s)."""
    from swarmx.tracefmt import import_claude_code
    from swarmx.traces import TraceError, write_traces

    load(config)
    if format_ != "claude-code":
        fail(f"--format: unknown format {format_!r} (known: claude-code)", EXIT_USAGE)
    try:
        records = import_claude_code(path)
    except (OSError, TraceError) as exc:
        fail(str(exc), EXIT_USAGE)
    n = write_traces(out, records)
    typer.echo(
        f"{n} calls from {len({r.workflow for r in records})} traces written to {out}", err=True
    )


@traces_app.command("split")
def split(
    path: Annotated[Path, typer.Argument(help="Trace JSONL.", exists=True, dir_okay=False)],
    train_out: Annotated[Path, typer.Option("--train", help="JSONL for the training part.")],
    test_out: Annotated[Path, typer.Option("--test", help="JSONL for the test part.")],
    test_frac: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.2,
    seed: Annotated[int, typer.Option()] = 0,
    config: ConfigOpt = None,
) -> None:
    """Split by workflow (agent session with its sub-agents), never by row, so no session's
    calls are on both sides."""
    from swarmx.tracefmt import split_by_session
    from swarmx.traces import TraceError, read_traces, write_traces

    load(config)
    try:
        records = read_traces([path])
    except (OSError, TraceError) as exc:
        fail(str(exc), EXIT_USAGE)
    train, test = split_by_session(records, test_frac, seed)
    write_traces(train_out, train)
    write_traces(test_out, test)
    typer.echo(f"{len(train)} calls to {train_out}, {len(test)} to {test_out}", err=True)
