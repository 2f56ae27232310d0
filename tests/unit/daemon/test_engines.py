"""Engines the node launches: the template's schema, port and GPU assignment, backoff, and real
processes (tests/support/fake_engine.py) started, logged, health-checked, stopped with what
they forked, and swept up after an agent that died."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from swarmx.backends.base import CallRequest
from swarmx.clock import RealClock
from swarmx.config import NodeConfig, ReplicaConfig
from swarmx.daemon import engines
from swarmx.daemon.engines import (
    Backoff,
    Engine,
    EngineError,
    EngineLedger,
    EngineSpec,
    GpuAllocator,
    LaunchedEngine,
    NoGpu,
    free_port,
)
from swarmx.daemon.replicas import ReplicaSet
from swarmx.protocol import Dispatch, Result
from swarmx.schema import SchemaError

FAKE = str(Path(__file__).resolve().parents[2] / "support" / "fake_engine.py")


def launched(*extra: str, **kw: object) -> ReplicaConfig:
    fields: dict = {"concurrency": 2, **kw}
    return ReplicaConfig(
        "fake",
        "openai",
        launch=[sys.executable, FAKE, "--port", "{port}", "--model", "{served_model}", *extra],
        **fields,
    )


# --- the template -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "field", "says"),
    [
        ({"launch": ["vllm", "serve", "--port", "{prot}"]}, "launch", "unknown placeholder {prot}"),
        ({"launch": ["vllm", "serve"]}, "launch", "never names {port}"),
        ({"launch": ["e", "{port}", "{gpu}"]}, "gpus_per_replica", ">= 1 where the template"),
        ({"launch": ["e", "{port}"], "env": {"X": "{gpu:02}"}}, "env.X", "write placeholders"),
        ({"launch": ["e", "{port}"], "health_path": "v1/models"}, "health_path", "start with /"),
        ({"launch": ["e", "{port}"], "stop_timeout_s": 0}, "stop_timeout_s", "> 0"),
        ({"launch": ["", "{port}"]}, "launch", "empty"),
        ({"url": "http://h:1/v1", "env": {"A": "b"}}, "env", "only with `launch`"),
        ({"url": "http://h:1/v1", "count": 1, "max_count": 3}, "max_count", "without `launch`"),
    ],
)
def test_a_bad_template_names_its_field(kw, field, says):
    with pytest.raises(SchemaError) as err:
        ReplicaConfig("m", "openai", **kw)
    assert err.value.path == field and says in err.value.message


def test_a_launched_pool_may_grow_past_its_count():
    rc = ReplicaConfig("m", "openai", launch=["e", "--port", "{port}"], count=1)
    assert rc.scale_max == 4 and rc.url == ""
    assert ReplicaConfig("m", "openai", launch=["e", "{port}"], max_count=8).scale_max == 8
    literal = ReplicaConfig("m", "openai", launch=["e", "{port}", '{{"json": 1}}'])
    assert engines.render(literal.launch, {"port": "5"}) == ["e", "5", '{"json": 1}']


# --- ports, GPUs, backoff -----------------------------------------------------------------


def test_gpus_are_never_shared_unless_configured():
    gpus = GpuAllocator([0, 1, 2])
    assert gpus.take("a", 2) == [0, 1]
    assert gpus.take("b", 1) == [2]
    with pytest.raises(NoGpu, match=r"needs 1 GPU.*0 free of 3"):
        gpus.take("c", 1)
    gpus.release("a")
    assert gpus.take("c", 1) == [0]
    assert gpus.take("d", 0) == []
    shared = GpuAllocator([0, 1], per_gpu=2)
    assert [shared.take(o, 1) for o in "abcd"] == [[0], [1], [0], [1]]
    with pytest.raises(NoGpu):
        shared.take("e", 1)


def test_free_ports_are_free():
    port = free_port()
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", port))  # nothing holds it


def test_backoff_doubles_to_its_cap_and_starts_over_after_a_long_run():
    b = Backoff(first_s=1, max_s=8, reset_after_s=60)
    assert [b.next_s(0.5) for _ in range(5)] == [1, 2, 4, 8, 8]
    assert b.next_s(120) == 1  # it ran a while: a new failure, not the same one
    assert b.next_s(1) == 2


# --- real processes -----------------------------------------------------------------------


def spec(tmp_port: int, *extra: str, ready_s: float = 20, stop_s: float = 5) -> EngineSpec:
    argv = [sys.executable, FAKE, "--port", str(tmp_port), *extra]
    return EngineSpec(
        "node/fake#0", argv, {}, ("127.0.0.1", tmp_port, "/v1/models"), ready_s, stop_s
    )


def test_an_engine_is_ready_when_its_health_path_answers_and_stops_with_its_children(
    caplog, tmp_path
):
    caplog.set_level(logging.INFO, logger="swarmx.daemon.engines")
    port = free_port()
    ledger = EngineLedger(tmp_path / "engines.json")

    async def main() -> tuple[float, int, int]:
        engine = Engine(spec(port, "--ready-after", "0.5", "--child"), ledger)
        ready_s = await engine.start()
        assert await engine.healthy()
        assert engine.pid is not None and "node/fake#0" in ledger.path.read_text()
        await asyncio.sleep(0.1)
        child = next(
            int(r.getMessage().split()[-1]) for r in caplog.records if "child pid" in r.getMessage()
        )
        await engine.stop()
        await engine.stop()  # again: nothing left to do
        return ready_s, engine.pid, child

    ready_s, pid, child = asyncio.run(main())
    assert 0.5 <= ready_s < 15
    assert not psutil.pid_exists(pid) and not _alive(child)  # its group went with it
    assert "node/fake#0" not in ledger.path.read_text()
    logged = [r.getMessage() for r in caplog.records]
    assert any(m == f"[node/fake#0] listening on {port}" for m in logged)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_an_engine_that_exits_or_never_answers_fails_its_start_with_its_last_words():
    async def start(engine: Engine) -> str:
        with pytest.raises(EngineError) as err:
            await engine.start()
        assert engine.proc is not None and engine.proc.returncode is not None
        return str(err.value)

    bad = EngineSpec(
        "r",
        [sys.executable, "-c", "print('no GPU here'); raise SystemExit(7)"],
        {},
        ("127.0.0.1", free_port(), "/v1/models"),
        20,
        5,
    )
    said = asyncio.run(start(Engine(bad)))
    assert "exited with 7" in said and "no GPU here" in said
    slow = spec(free_port(), "--ready-after", "60", ready_s=1.0)
    said = asyncio.run(start(Engine(slow)))
    assert "not ready after 1 s (ready_timeout_s)" in said and "listening on" in said


def test_a_term_ignoring_engine_is_killed_after_stop_timeout():
    port = free_port()
    code = (
        "import signal, subprocess, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        f"subprocess.run([sys.executable, {FAKE!r}, '--port', '{port}'])"
    )
    stubborn = EngineSpec(
        "r", [sys.executable, "-c", code], {}, ("127.0.0.1", port, "/v1/models"), 20, 0.5
    )

    async def main() -> float:
        engine = Engine(stubborn)
        await engine.start()
        t0 = time.monotonic()
        await engine.stop()
        return time.monotonic() - t0

    assert 0.4 < asyncio.run(main()) < 5


def test_the_next_agent_stops_what_a_killed_one_left(tmp_path):
    """An engine whose agent died: its leader gone (PR_SET_PDEATHSIG), its worker still
    running in its group; and a recorded pid now someone else's, left alone."""
    ledger = EngineLedger(tmp_path / "engines.json")
    worker = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        ledger.add("n/lm#0", worker.pid)
        ledger.add("n/lm#1", bystander.pid)
        ledger._entries["n/lm#1"] = (bystander.pid, ledger._entries["n/lm#1"][1] - 100)
        ledger._write()  # recorded as started long before: not the engine it names
        stopped = EngineLedger(tmp_path / "engines.json").sweep(stop_timeout_s=5)
        assert stopped == ["n/lm#0"]
        worker.wait(5)  # (the sweep reaped it already: this test is its parent)
        assert not _alive(worker.pid)
        assert bystander.poll() is None
        assert EngineLedger(tmp_path / "engines.json").sweep() == []
    finally:
        for p in (worker, bystander):
            p.kill()
            p.wait()


def test_a_launched_replica_serves_on_its_port_and_reports_a_crash(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="swarmx.daemon.engines")
    monkeypatch.setattr(engines, "HEALTH_CHECK_S", 0.2)
    rc = launched("--exit-after", "1.5", env={"FAKE_ENGINE_R": "{replica} on {port}"})

    async def main() -> tuple[bool, str, str, float | None, int]:
        backend = LaunchedEngine(rc, "n/fake#0", GpuAllocator([]))
        await backend.start()
        assert backend.engine is not None
        port = backend.engine.spec.health_url[1]
        try:
            request = CallRequest("c", "llm", "fake", "hi", 8, timeout_s=10)
            outcome = await backend.run(request)
            reason = await asyncio.wait_for(backend.failure(), 10)
        finally:
            await backend.close()
        return outcome.ok, reason, outcome.output, backend.warmup_s, port

    ok, reason, output, warmup, port = asyncio.run(main())
    assert ok and output == "t0 t1 t2 "
    assert reason == "engine exited with status 3"
    assert warmup is not None and 0 < warmup < 10
    logged = [r.getMessage() for r in caplog.records]
    assert f"[n/fake#0] env FAKE_ENGINE_R=n/fake#0 on {port}" in logged


def test_a_hung_engine_fails_its_health_checks(monkeypatch):
    monkeypatch.setattr(engines, "HEALTH_CHECK_S", 0.1)
    monkeypatch.setattr(engines, "PROBE_TIMEOUT_S", 0.2)

    async def main() -> str:
        backend = LaunchedEngine(launched(), "n/fake#0", GpuAllocator([]))
        await backend.start()
        assert backend.engine is not None and backend.engine.pid is not None
        os.kill(backend.engine.pid, signal.SIGSTOP)
        try:
            return await asyncio.wait_for(backend.failure(), 10)
        finally:
            os.kill(backend.engine.pid, signal.SIGCONT)
            await backend.close()

    assert asyncio.run(main()) == "engine stopped answering /v1/models (3 probes)"


async def until(check, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_a_node_launches_restarts_scales_and_stops_its_engines(tmp_path, monkeypatch):
    """The node's replica set with a launched pool, on real processes: a SIGKILL mid-call fails
    that call at once and takes the replica out; it comes back after the backoff, its start-up
    measured; a scale-up launches a second engine on its own port, a scale-down stops it."""
    monkeypatch.setattr(engines, "HEALTH_CHECK_S", 0.2)
    rc = launched("--tokens", "100", "--token-s", "0.05", count=1, max_count=2)
    cfg = NodeConfig(name="n", replicas=[rc], tool_slots=0, gpus="off", state_dir=str(tmp_path))

    def engine_of(rs: ReplicaSet, name: str) -> Engine:
        backend = rs.replicas[name].backend
        assert isinstance(backend, LaunchedEngine) and backend.engine is not None
        return backend.engine

    async def main() -> None:
        changes: list[list[str]] = []
        results: dict[str, Result] = {}

        async def changed() -> None:
            changes.append([i.replica for i in rs.infos()])

        async def reply(result: Result) -> None:
            results[result.call_id] = result

        rs = ReplicaSet(cfg, RealClock(), on_change=changed)
        await rs.start()
        try:
            assert [i.replica for i in rs.infos()] == ["n/fake#0"]
            first = engine_of(rs, "n/fake#0")
            assert len(rs.pools()[0].warmup_s) == 1
            rs.submit(Dispatch("c1", "wf", "s", "n/fake#0", "llm", "fake", "hi", 64), reply)
            await asyncio.sleep(0.5)  # streaming
            assert first.pid is not None
            os.kill(first.pid, signal.SIGKILL)
            t0 = time.monotonic()
            await until(lambda: "c1" in results)
            assert not results["c1"].ok and time.monotonic() - t0 < 2  # failed, not timed out
            assert results["c1"].infra and "the engine died mid-call" in results["c1"].error
            await until(lambda: [] in changes)  # out of the list the scheduler routes to
            await until(lambda: changes[-1] == ["n/fake#0"])  # back after the backoff
            again = engine_of(rs, "n/fake#0")
            assert again.pid != first.pid
            pool = rs.pools()[0]
            assert (pool.restarts, len(pool.warmup_s), pool.target) == (1, 2, 1)

            assert rs.scale("fake", "openai", 2) == "starting n/fake#1"
            await until(lambda: len(rs.infos()) == 2)
            second = engine_of(rs, "n/fake#1")
            assert second.spec.health_url[1] != again.spec.health_url[1]
            assert "n/fake#1" in (tmp_path / "engines-n.json").read_text()
            rs.scale("fake", "openai", 1, remove=["n/fake#1"])
            await until(lambda: len(rs.infos()) == 1)
            assert second.proc is not None and second.proc.returncode is not None
            assert rs.pools()[0].restarts == 1  # a drain is no failure
        finally:
            await rs.close()
        assert again.proc is not None and again.proc.returncode is not None
        assert (tmp_path / "engines-n.json").read_text() == "{}"

    asyncio.run(main())


def test_each_engine_gets_gpus_of_its_own_and_reads_as_that_device(tmp_path, caplog):
    """Two engines on GPUs 3 and 5 (the node's engine_gpus): each sees its own in
    CUDA_VISIBLE_DEVICES and is listed as that device, so its GPU's telemetry is its load. A
    third finds no GPU free: it fails its start, and is tried again later, not run on a taken
    GPU."""
    caplog.set_level(logging.INFO)
    rc = launched(count=2, max_count=3, gpus_per_replica=1, env={"FAKE_ENGINE_CVD": "{gpu}"})
    cfg = NodeConfig(
        name="n",
        replicas=[rc],
        tool_slots=0,
        gpus="off",
        engine_gpus=[3, 5],
        state_dir=str(tmp_path),
    )

    async def main() -> tuple[dict[str, str], str]:
        rs = ReplicaSet(cfg, RealClock())
        await rs.start()
        try:
            devices = {i.replica: i.device for i in rs.infos()}
            rs.scale("fake", "openai", 3)
            await until(lambda: "n/fake#2 (openai) failed to start" in caplog.text)
            return devices, str(rs.pools()[0].target)
        finally:
            await rs.close()

    devices, target = asyncio.run(main())
    assert devices == {"n/fake#0": "cuda:3", "n/fake#1": "cuda:5"}
    logged = caplog.text
    assert (
        "[n/fake#0] env FAKE_ENGINE_CVD=3" in logged
        and "[n/fake#1] env FAKE_ENGINE_CVD=5" in logged
    )
    assert "[n/fake#0] env CUDA_DEVICE_ORDER=PCI_BUS_ID" in logged
    assert "needs 1 GPU(s), 0 free of 2" in logged
    assert target == "3"  # still asked for: it is started again when a GPU frees


def test_an_unwritable_ledger_costs_the_sweep_not_the_engine(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    ledger = EngineLedger(blocked / "engines.json")
    port = free_port()

    async def main() -> float:
        engine = Engine(spec(port), ledger)
        try:
            return await engine.start()
        finally:
            await engine.stop()

    assert asyncio.run(main()) > 0
    assert caplog.text.count("cannot record launched engines") == 1


def test_under_systemd_the_node_keeps_its_state_in_the_units_state_directory(monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/swarmx-node:/var/lib/other")
    assert NodeConfig().state_dir == "/var/lib/swarmx-node"
    monkeypatch.delenv("STATE_DIRECTORY")
    assert NodeConfig().state_dir.endswith("swarmx")


@pytest.mark.parametrize(
    "text",
    [
        "{not json",  # cut short: the agent died while writing? (it writes through a rename)
        "[1, 2]",  # not a table
        '{"n/lm#0": {"pid": "one", "created": 1.0}, "n/lm#1": [], "n/lm#2": {"pid": 1}}',
        '{"n/lm#0": {"pid": -5, "created": 0.0}}',  # no such group
        '{"n/lm#0": {"pid": 1, "created": 0.0}}',  # init's group: never
        f'{{"n/lm#0": {{"pid": {os.getpgrp()}, "created": 0.0}}}}',  # the agent's own group
    ],
)
def test_a_ledger_that_makes_no_sense_stops_nothing_and_does_not_stop_the_agent(
    tmp_path, caplog, text
):
    """The ledger is the agent's own file, but a disk, an editor or a bug can spoil it: the
    sweep then stops nothing (it never guesses at a pid) and the agent starts as usual."""
    path = tmp_path / "engines.json"
    path.write_text(text)
    assert EngineLedger(path).sweep(stop_timeout_s=1) == []
    if text.startswith("{not"):
        assert "unreadable" in caplog.text
