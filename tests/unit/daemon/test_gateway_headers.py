"""What the gateway reads from a request besides its body (the X-SwarmX-* headers, the peer's
address) and how a failed call's ending becomes an OpenAI error."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest

from swarmx.clock import ManualClock
from swarmx.config import GatewayConfig
from swarmx.daemon.gateway import (
    MAX_NAME,
    PRIORITY_HEADER,
    SESSION_HEADER,
    SLO_HEADER,
    GatewayDaemon,
    _ended_error,
    _error,
    _loopback,
    _Pending,
    _priority,
    _session,
    _slo,
)
from swarmx.gateway.http import Request
from swarmx.gateway.openai_api import ApiError, ParsedCall, parse_request
from swarmx.protocol import CallEnded, NodesReply, SchedulerInfo


def request(headers: Mapping[str, str] | None = None) -> Request:
    """A chat request as the HTTP server hands it over (header names lower-cased)."""
    return Request("POST", "/v1/chat/completions", "", headers or {}, b"", "127.0.0.1")


def parsed(user: str | None = None) -> ParsedCall:
    fields = {"model": "lm", "messages": [{"role": "user", "content": "hi"}]}
    if user is not None:
        fields["user"] = user
    return parse_request("chat", json.dumps(fields).encode())


def refused(exc: pytest.ExceptionInfo[ApiError]) -> tuple[int, str | None, str]:
    return exc.value.status, exc.value.param, exc.value.type


# --- X-SwarmX-Session -------------------------------------------------------------------------


def test_the_session_header_wins_over_the_requests_user() -> None:
    assert _session(request({SESSION_HEADER: "agent-1"}), parsed(user="u")) == "agent-1"
    assert _session(request({SESSION_HEADER: "  agent-1 "}), parsed()) == "agent-1"
    assert _session(request({SESSION_HEADER: "  "}), parsed(user="u")) == "u"
    assert _session(request(), parsed(user="u")) == "u"
    assert _session(request(), parsed()) == ""


def test_a_session_name_longer_than_the_wire_allows_is_a_400_naming_the_header() -> None:
    assert _session(request({SESSION_HEADER: "s" * MAX_NAME}), parsed()) == "s" * MAX_NAME
    with pytest.raises(ApiError) as exc:
        _session(request({SESSION_HEADER: "s" * (MAX_NAME + 1)}), parsed())
    assert refused(exc) == (400, SESSION_HEADER, "invalid_request_error")
    assert "X-SwarmX-Session" in exc.value.message


def test_a_user_field_too_long_for_a_session_name_is_a_400_naming_user() -> None:
    with pytest.raises(ApiError) as exc:
        _session(request(), parsed(user="u" * (MAX_NAME + 1)))
    assert refused(exc) == (400, "user", "invalid_request_error")


# --- X-SwarmX-SLO-S and X-SwarmX-Priority -----------------------------------------------------


def test_an_slo_is_seconds_above_zero() -> None:
    assert _slo(request()) is None
    assert _slo(request({SLO_HEADER: "30"})) == 30.0
    assert _slo(request({SLO_HEADER: "0.25"})) == 0.25
    assert _slo(request({SLO_HEADER: "1e7"})) == 1e7


@pytest.mark.parametrize("text", ["0", "-1", "-0.0", "nan", "NaN", "inf", "1e8", "abc", "", "1s"])
def test_a_bad_slo_is_a_400_naming_its_header(text: str) -> None:
    with pytest.raises(ApiError) as exc:
        _slo(request({SLO_HEADER: text}))
    assert refused(exc) == (400, SLO_HEADER, "invalid_request_error")
    assert repr(text) in exc.value.message


def test_a_priority_is_an_integer_within_a_thousand() -> None:
    assert _priority(request()) == 0
    for text, value in (("7", 7), ("-1000", -1000), ("1000", 1000), (" 3 ", 3)):
        assert _priority(request({PRIORITY_HEADER: text})) == value


@pytest.mark.parametrize("text", ["1001", "-1001", "1.5", "1e3", "high", "", "99999999999999"])
def test_a_bad_priority_is_a_400_naming_its_header(text: str) -> None:
    with pytest.raises(ApiError) as exc:
        _priority(request({PRIORITY_HEADER: text}))
    assert refused(exc) == (400, PRIORITY_HEADER, "invalid_request_error")
    assert repr(text) in exc.value.message


# --- who is on this host ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("::1%lo", True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("192.168.1.5", False),
        ("fe80::1%eth0", False),
        ("0.0.0.0", False),
        ("localhost", False),  # the socket gives addresses; a name is not trusted
        ("garbage", False),
        ("", False),
    ],
)
def test_only_loopback_addresses_are_this_host(host: str, local: bool) -> None:
    assert _loopback(host) is local


# --- a call's ending as an OpenAI error -------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "type_", "code"),
    [
        (404, "invalid_request_error", "model_not_found"),
        (429, "rate_limit_exceeded", "rate_limit_exceeded"),
        (504, "timeout", None),
        (502, "server_error", None),
        (503, "server_error", None),
    ],
)
def test_an_ended_call_becomes_the_error_clients_expect(
    status: int, type_: str, code: str | None
) -> None:
    err = _ended_error(CallEnded("1", False, status, "what went wrong"))
    assert (err.status, err.type, err.code, err.message) == (status, type_, code, "what went wrong")
    body = json.loads(err.body())["error"]
    assert body == {"message": "what went wrong", "type": type_, "param": None, "code": code}


def test_an_ended_call_with_no_message_still_says_it_failed() -> None:
    assert _ended_error(CallEnded("1", False, 503)).message == "the call failed"


def test_a_429_or_503_tells_the_client_when_to_retry() -> None:
    assert _error(ApiError(429, "full", type="rate_limit_exceeded")).headers == (
        ("Retry-After", "1"),
    )
    assert _error(ApiError(503, "down", type="server_error")).headers == (("Retry-After", "1"),)
    assert _error(ApiError(400, "bad")).headers == ()


def test_calls_open_when_the_scheduler_restarts_end_with_503_not_at_the_timeout() -> None:
    """The scheduler does not journal gateway calls: a crash right after one was sent loses it,
    so the gateway ends what it waits on once the scheduler's uptime says it started again."""

    def reply(uptime_s: float) -> NodesReply:
        return NodesReply(SchedulerInfo("tcp://127.0.0.1:7700", "0", uptime_s, {}), [])

    clock = ManualClock()
    gw = GatewayDaemon(GatewayConfig(), clock)
    pending = gw._pending["7"] = _Pending()
    gw._check_restart(reply(100.0))
    clock.now += 5.0
    gw._check_restart(reply(105.0))  # the same scheduler, 5 s on
    clock.now += 0.5
    gw._check_restart(reply(104.9))  # jitter of its clock against ours: not a restart
    assert pending.events.empty()
    clock.now += 5.0
    gw._check_restart(reply(1.0))  # started again a second ago
    ended = pending.events.get_nowait()
    assert isinstance(ended, CallEnded)
    assert (ended.call_id, ended.ok, ended.status) == ("7", False, 503)
    assert "restarted" in ended.error
