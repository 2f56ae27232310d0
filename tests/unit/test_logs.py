"""One logging setup for every daemon: text for people, JSON lines for log shippers."""

from __future__ import annotations

import io
import json
import logging
import warnings

import pytest
from typer.testing import CliRunner

from swarmx.cli.main import app
from swarmx.logs import setup_logging


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)


def test_json_lines_carry_ts_level_logger_msg_and_extras(restore_root):
    out = io.StringIO()
    setup_logging("info", "json", out)
    log = logging.getLogger("swarmx.test")
    log.debug("not shown at info")
    log.info("node %s: %s -> %s", "n1", "live", "stale", extra={"node": "n1", "missed": 3})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("handler failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "info"
    assert first["logger"] == "swarmx.test"
    assert first["msg"] == "node n1: live -> stale"
    assert (first["node"], first["missed"]) == ("n1", 3)
    assert first["ts"].endswith("Z") and first["ts"][10] == "T"
    assert second["level"] == "error"
    assert "ValueError: boom" in second["exc"]


def test_a_librarys_warning_is_a_json_line_too(restore_root):
    """torch warns on stderr at import when numpy is missing; a JSON log must stay JSON."""
    out = io.StringIO()
    setup_logging("info", "json", out)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("Failed to initialize NumPy", UserWarning, stacklevel=1)
    [line] = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "warning"
    assert "Failed to initialize NumPy" in record["msg"]


def test_text_is_the_default_and_a_second_setup_replaces_the_first(restore_root):
    first, second = io.StringIO(), io.StringIO()
    setup_logging("warning", "json", first)
    setup_logging("debug", "text", second)
    logging.getLogger("swarmx.test").debug("hello %d", 7)
    assert first.getvalue() == ""
    (line,) = second.getvalue().splitlines()
    assert line.endswith("DEBUG   swarmx.test: hello 7")


@pytest.mark.parametrize(
    ("level", "fmt", "message"),
    [
        ("loud", "text", "--log-level: must be debug, info, warning, error, got 'loud'"),
        ("info", "xml", "--log-format: must be text or json, got 'xml'"),
    ],
)
def test_bad_values_name_the_flag(level, fmt, message):
    with pytest.raises(ValueError, match=message):
        setup_logging(level, fmt)


@pytest.mark.parametrize("command", [["scheduler", "start"], ["node", "start"], ["up"]])
def test_daemons_refuse_a_bad_log_format_on_one_line(command):
    result = CliRunner().invoke(app, [*command, "--log-format", "xml"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: --log-format: must be text or json, got 'xml'"
    ]


def test_config_log_format_is_checked(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[log]\nformat = "yaml"\n')
    result = CliRunner().invoke(app, ["version", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "log.format: must be one of 'text', 'json', got 'yaml'" in result.stderr
