"""Property tests of the workflow parser: whatever text a client submits, `parse_workflow` returns a
spec or raises `WorkflowError` (one line naming the place), never anything else; the scheduler
parses every submit, so a stray exception here would be a way to hurt it.

CI runs the short profile; for a long run by hand::

    SWARMX_FUZZ_EXAMPLES=100000 .venv/bin/pytest tests/unit/workflow/test_spec_fuzz.py --timeout 0
"""

from __future__ import annotations

import json
from pathlib import Path

import tomli
from hypothesis import given
from hypothesis import strategies as st

from swarmx.schema import SchemaError
from swarmx.workflow import spec as spec_module
from swarmx.workflow.spec import WorkflowError, WorkflowSpec, parse_workflow
from tests.support.fuzz import PROFILE, outcome

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE_TEXTS = [p.read_text() for p in sorted((ROOT / "examples").glob("*.toml"))]


def _parses_or_refuses(text: str) -> None:
    try:
        result: WorkflowSpec | str = parse_workflow(text, "fuzz.toml")
    except WorkflowError as exc:
        result = str(exc)
    if isinstance(result, str):
        assert result.startswith("fuzz.toml") and "\n" not in result.strip(), result
        outcome("refused: invalid TOML" if "invalid TOML" in result else "refused: checks")
    else:
        assert result.steps
        outcome("parsed")


def _toml(value: object) -> str:
    """A TOML value (strings through JSON, which TOML's basic strings accept)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # TOML spells inf and nan as Python does
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value), ensure_ascii=False)


KEYS = ["id", "kind", "model", "prompt", "command", "after", "fan_out", "max_tokens", "retries",
        "timeout_s", "inputs", "images", "split", "max", "bogus"]  # fmt: skip
ids = st.sampled_from(["a", "b", "c", "plan", "a b", "", "x" * 300])
refs = st.sampled_from(
    [
        "{inputs.topic}",
        "{steps.a.output}",
        "{steps.b.output}",
        "{index}",
        "{item}",
        "{steps.",
        "{{",
        "}",
        "-{inputs.topic}",
        "--",
        "{steps.zz.output}",
    ]
)
texts = st.lists(st.text(max_size=12) | refs, max_size=4).map("".join)
scalars = (
    st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | texts
    | ids
    | st.sampled_from(["llm", "model", "tool", "lm", "*"])
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=12,
)
steps = st.lists(st.dictionaries(st.sampled_from(KEYS), values, max_size=8), max_size=6)


@PROFILE
@given(st.text(max_size=600))
def test_any_text(text):
    _parses_or_refuses(text)


@PROFILE
@given(
    name=texts,
    slo=values,
    inputs=st.dictionaries(st.sampled_from(["topic", "n", "-x", ""]), values, max_size=3),
    raw_steps=steps,
)
def test_workflow_shaped_documents(name, slo, inputs, raw_steps):
    lines = [f"name = {_toml(name)}", f"slo_s = {_toml(slo)}", "[inputs]"]
    lines += [f"{json.dumps(k)} = {_toml(v)}" for k, v in inputs.items()]
    for step in raw_steps:
        lines.append("[[steps]]")
        lines += [f"{k} = {_toml(v)}" for k, v in step.items()]
    _parses_or_refuses("\n".join(lines) + "\n")


@PROFILE
@given(st.data())
def test_mutated_examples(data):
    text = data.draw(st.sampled_from(EXAMPLE_TEXTS))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 40))
        text = text[:at] + data.draw(st.text(max_size=20) | refs) + text[at + cut :]
    _parses_or_refuses(text)


def test_the_examples_parse():
    for text in EXAMPLE_TEXTS:
        _parses_or_refuses(text)


def _typed(data: dict) -> object:
    try:
        return spec_module.decode(spec_module._RawWorkflow, data)
    except SchemaError as exc:
        return exc.path


@PROFILE
@given(name=texts, slo=values, raw_steps=steps)
def test_the_fast_path_types_documents_as_the_reflective_decoder_does(name, slo, raw_steps):
    """msgspec types well-formed documents; the reflective decoder is the reference."""
    data = {"name": name, "slo_s": slo, "steps": raw_steps}
    try:
        fast: object = spec_module._raw_workflow(data)
    except SchemaError as exc:
        fast = exc.path
    assert fast == _typed(data)


def test_the_fast_path_agrees_on_the_examples():
    for text in EXAMPLE_TEXTS:
        data = tomli.loads(text)
        assert spec_module._raw_workflow(data) == _typed(data)
