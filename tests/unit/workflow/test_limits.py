"""Bounded, linear workflow files: sizes, counts and nesting are limited with one-line errors,
parsing takes time linear in the file, and substituted values never become tool options."""

import re
import time

import pytest

from swarmx.config import SchedulerConfig
from swarmx.protocol import MAX_FRAME_BYTES
from swarmx.workflow import spec as spec_module
from swarmx.workflow.spec import (
    DEFAULT_LIMITS,
    WorkflowError,
    WorkflowLimits,
    parse_workflow,
    payload_bytes,
    render_command,
)


def chain(n: int) -> str:
    """A workflow of n tool steps, each running after the one before and reading its output."""
    parts = ['name = "long"\n']
    for i in range(n):
        after = f'after = ["s{i - 1}"]\n' if i else ""
        arg = f"{{steps.s{i - 1}.output}}" if i else "go"
        parts.append(f'[[steps]]\nid = "s{i}"\nkind = "tool"\n{after}command = ["echo", "{arg}"]\n')
    return "".join(parts)


def error(text, overrides=None, limits=DEFAULT_LIMITS):
    with pytest.raises(WorkflowError) as exc:
        parse_workflow(text, "wf.toml", overrides, limits)
    message = str(exc.value)
    assert "\n" not in message
    return message


TOOL = 'name = "w"\n[inputs]\nfile = "data.txt"\n[[steps]]\nid = "t"\nkind = "tool"\n'


def _cpu_s(text: str) -> float:
    start = time.process_time()  # CPU time: other processes on a loaded machine do not count
    parse_workflow(text, "long.toml")
    return time.process_time() - start


def test_ten_thousand_steps_parse_in_linear_time():
    """Ten times the steps, about ten times the work (quadratic parsing took hours at 10,000);
    a ratio of the same process's CPU time, so neither the machine's speed nor its load count."""
    text = chain(10_000)
    spec = parse_workflow(text, "long.toml")
    assert len(spec.steps) == 10_000
    assert spec.step("s9999").line == len(text.splitlines()) - 4
    small = min(_cpu_s(chain(1_000)) for _ in range(3))
    assert min(_cpu_s(text) for _ in range(2)) < 30 * small


def test_deep_nesting_is_a_one_line_error_with_its_line():
    text = 'name = "w"\n\nx = ' + "[" * 3000 + "]" * 3000 + "\n"
    assert error(text) == "wf.toml:3: arrays or tables nested more than 32 deep"


def test_nesting_tomllib_cannot_handle_is_an_error_even_if_the_scanner_misses_it(monkeypatch):
    monkeypatch.setattr(spec_module, "MAX_NESTING", 10**6)
    text = 'name = "w"\nx = ' + "{a=" * 3000 + "1" + "}" * 3000 + "\n"
    assert error(text) == "wf.toml: invalid TOML: nested too deeply"


def test_limits_default_to_the_scheduler_configs():
    assert WorkflowLimits.of(SchedulerConfig()) == WorkflowLimits()
    assert WorkflowLimits().max_frame_bytes == MAX_FRAME_BYTES
    assert WorkflowLimits.of(SchedulerConfig(max_steps=3)).max_steps == 3


def test_file_size_limit():
    limits = WorkflowLimits(max_workflow_bytes=100)
    assert error(chain(3), limits=limits) == (
        "wf.toml: 251 bytes exceeds the 100 bytes limit (max_workflow_bytes)"
    )


def test_step_count_limit():
    assert error(chain(4), limits=WorkflowLimits(max_steps=3)) == (
        "wf.toml:2: steps: 4 steps exceed the limit of 3 (max_steps)"
    )


@pytest.mark.parametrize(
    ("fan_out", "message"),
    [
        ("5", "fan_out: must be 1..4 (max_fan_out), got 5"),
        ('{ from = "s0", max = 5 }', "fan_out.max: must be an integer 1..4 (max_fan_out), got 5"),
    ],
)
def test_fan_out_limit(fan_out, message):
    text = chain(2) + f"fan_out = {fan_out}\n"
    assert error(text, limits=WorkflowLimits(max_fan_out=4)) == (
        f"wf.toml:11: steps[1] (id 's1').{message}"
    )


def test_a_dynamic_fan_out_defaults_to_at_most_the_limit():
    text = chain(2) + 'fan_out = { from = "s0" }\n'
    fan = parse_workflow(text, limits=WorkflowLimits(max_fan_out=4)).step("s1").fan_out
    assert fan is not None and fan.max == 4


def test_templates_over_the_prompt_limit_fail_at_parse_time():
    text = TOOL + f'command = ["echo", "{"x" * 200}"]\n'
    assert error(text, limits=WorkflowLimits(max_prompt_bytes=100)) == (
        "wf.toml:7: steps[0] (id 't').command: inputs of 219 bytes exceed the 100 bytes limit"
        " (max_prompt_bytes)"
    )


def test_the_frame_limit_applies_when_it_is_the_tighter():
    limits = WorkflowLimits(max_prompt_bytes=8 << 20)
    assert (
        limits.call_too_big(4 << 20)
        == "inputs of 4 MiB exceed the 4 MiB frame limit (max_frame_bytes)"
    )
    assert limits.call_too_big(1 << 20) is None
    assert WorkflowLimits().call_too_big(6 << 20) == (
        "inputs of 6 MiB exceed the 1 MiB limit (max_prompt_bytes)"
    )


def test_payload_counts_every_string_the_call_carries():
    assert payload_bytes("é", {"k": "v"}, ["ab"]) == 2 + 1 + 1 + 2 + 4 * 5


def test_an_input_that_would_be_an_option_is_refused_at_parse_time():
    text = TOOL + 'command = ["sort", "{inputs.file}"]\n'
    assert parse_workflow(text).step("t").command == ["sort", "{inputs.file}"]
    assert error(text, {"file": "-oOWNED"}) == (
        "wf.toml:7: steps[0] (id 't').command[1]: {inputs.file} is '-oOWNED', which the program"
        " would read as an option (a substituted argument may not start with '-'; put a '--'"
        " argument before it if the program takes operands after '--')"
    )


def test_after_a_literal_double_dash_substituted_values_may_start_with_a_dash():
    text = TOOL + 'command = ["sort", "-n", "--", "{inputs.file}"]\n'
    assert parse_workflow(text, overrides={"file": "-oOWNED"}).step("t").command[3] == (
        "{inputs.file}"
    )
    assert render_command(["sort", "-n", "--", "{inputs.f}"], {"f": "-x"}, {}) == [
        "sort",
        "-n",
        "--",
        "-x",
    ]


@pytest.mark.parametrize(
    ("command", "values", "argv"),
    [
        (["ls", "-l", "{inputs.f}"], {"f": "a"}, ["ls", "-l", "a"]),  # literal options are fine
        (["grep", "-e{inputs.f}"], {"f": "-x"}, ["grep", "-e-x"]),  # the literal comes first
        (["cat", "./{inputs.f}"], {"f": "-x"}, ["cat", "./-x"]),
        (["cat", "{inputs.e}-x"], {"e": "", "f": ""}, ["cat", "-x"]),  # the dash is literal
        (["cat", "{inputs.e}{inputs.f}"], {"e": "", "f": "a-"}, ["cat", "a-"]),
    ],
)
def test_only_substituted_leading_dashes_are_refused(command, values, argv):
    assert render_command(command, values, {}) == argv


@pytest.mark.parametrize(
    ("command", "where"),
    [
        (["sort", "{steps.a.output}"], "command[1]: {steps.a.output} is '--output=x'"),
        (["sort", "{inputs.e}{steps.a.output}"], "command[1]: {steps.a.output} is '--output=x'"),
        (["{steps.a.output}"], "command[0]: {steps.a.output} is '--output=x'"),
        (["sort", "{item}", "--"], "command[1]: {item} is '-r'"),
    ],
)
def test_substituted_outputs_and_items_that_would_be_options_are_refused(command, where):
    with pytest.raises(WorkflowError, match="^" + re.escape(where)):
        render_command(command, {"e": ""}, {"a": "--output=x"}, item="-r")
