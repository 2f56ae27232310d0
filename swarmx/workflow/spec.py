"""Workflow files: a TOML DAG of ``llm``, ``model`` and ``tool`` steps, as frozen dataclasses.

Everything that can be checked without a cluster is checked here, so a typo fails at submit time
with ``file:line`` instead of minutes into a run: strict keys, per-kind fields, the graph (unknown
steps, cycles) and every template reference. What the engine renders later can fail only on
values known then: an output that would be a tool option, or a call too large to send.
Every size is bounded (`WorkflowLimits`) and checking takes about linear time, so a hostile file
costs the scheduler little. The format is documented for operators in docs/workflows.md.

Over 600 lines, on purpose: the whole file format and every check on it, in the order
docs/workflows.md describes them.
"""

from __future__ import annotations

import dataclasses
import functools
import graphlib
import heapq
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import msgspec
import tomli

from swarmx.schema import SchemaError, decode
from swarmx.tomlpos import Positions

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""Step ids and input names: what a template reference may name."""
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
"""The rule ``[[node.replicas]] model`` names follow, so every served name is writable here."""
MAX_NESTING = 32
"""Deepest nesting of arrays and inline tables: a workflow needs 2, and tomli recurses per
level (thousands of levels overflow the stack)."""
FRAME_MARGIN_BYTES = 64 * 1024
"""Room a dispatch frame needs besides a call's text: ids, names, keys, msgpack headers."""

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_REF = re.compile(
    r"inputs\.(?P<inputs>[A-Za-z0-9_-]{1,64})|steps\.(?P<steps>[A-Za-z0-9_-]{1,64})\.output"
    r"|(?P<item>item)|(?P<index>index)"
)
_PLACEHOLDERS = "{inputs.NAME}, {steps.ID.output}, {item} or {index}; {{ and }} for braces"
_FENCE = re.compile(r"```[A-Za-z0-9_-]*\n(.*?)\n?```", re.DOTALL)

_ONLY_FOR: dict[str, tuple[str, ...]] = {
    "model": ("llm", "model"),
    "prompt": ("llm", "model"),
    "max_tokens": ("llm",),
    "inputs": ("model",),
    "command": ("tool",),
    "timeout_s": ("tool",),
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "llm": ("model", "prompt"),
    "model": ("model",),
    "tool": ("command",),
}


class WorkflowError(ValueError):
    """A bad workflow file or ``--set``; ``str()`` is one line naming the place."""


@dataclass(frozen=True)
class WorkflowLimits:
    """Bounds on what one workflow may cost the scheduler; `of` reads them from a
    ``SchedulerConfig`` (which documents each), and the defaults are its defaults."""

    max_workflow_bytes: int = 1 << 20
    max_steps: int = 10_000
    max_fan_out: int = 1024
    max_prompt_bytes: int = 1 << 20
    """A rendered prompt, with a model step's inputs, or a tool's argument list."""
    max_queued_workflows_per_client: int = 1000
    workflow_timeout_s: float = 86_400.0
    max_frame_bytes: int = 4 << 20
    """The wire's frame limit: a call must fit one dispatch frame."""

    @classmethod
    def of(cls, cfg: object) -> WorkflowLimits:
        """The limits set by ``cfg``, which has an attribute of each name (``SchedulerConfig``)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    def call_too_big(self, size: int) -> str | None:
        """Why a call carrying ``size`` bytes (`payload_bytes`) cannot be sent, or None."""
        room = self.max_frame_bytes - FRAME_MARGIN_BYTES
        if size > self.max_prompt_bytes and self.max_prompt_bytes <= room:
            limit = f"{_size(self.max_prompt_bytes)} limit (max_prompt_bytes)"
        elif size > room:
            limit = f"{_size(self.max_frame_bytes)} frame limit (max_frame_bytes)"
        else:
            return None
        return f"inputs of {_size(size)} exceed the {limit}"


DEFAULT_LIMITS = WorkflowLimits()


@dataclass(frozen=True)
class FanOut:
    count: int | None = None
    """Fixed fan-out: ``fan_out = N`` runs N instances (``{index}`` 0..N-1)."""
    source: str | None = None
    """Dynamic fan-out: one instance per item of this step's output."""
    split: Literal["lines", "json"] = "lines"
    max: int = 16
    """At most this many instances for a dynamic fan-out; further items are dropped."""


@dataclass(frozen=True)
class StepSpec:
    id: str
    kind: Literal["llm", "model", "tool"]
    after: list[str]
    model: str = ""
    prompt: str = ""
    max_tokens: int = 256
    inputs: dict[str, str] = field(default_factory=dict)
    """model steps: passed to the model server; values are templates."""
    command: list[str] = field(default_factory=list)
    """tool steps: argv, each element a template."""
    timeout_s: float | None = None
    """tool steps; None lets the runner apply its default."""
    retries: int = 0
    fan_out: FanOut | None = None
    line: int = 0
    """Line of the step's ``[[steps]]`` header, for messages."""


@dataclass(frozen=True)
class WorkflowSpec:
    name: str
    slo_s: float | None
    inputs: dict[str, str]
    """Declared defaults with ``--set`` overrides applied."""
    steps: list[StepSpec]
    """A topological order: file order wherever the dependencies allow it."""
    source: str

    @functools.cached_property
    def _by_id(self) -> dict[str, StepSpec]:
        return {step.id: step for step in self.steps}

    @functools.cached_property
    def dependents(self) -> dict[str, tuple[str, ...]]:
        """Per step, the steps that wait for it (a spec never changes: worked out once, as the
        scheduler asks at every call)."""
        out: dict[str, list[str]] = {step.id: [] for step in self.steps}
        for step in self.steps:
            for dep in step.after:
                out[dep].append(step.id)
        return {k: tuple(v) for k, v in out.items()}

    def step(self, step_id: str) -> StepSpec:
        return self._by_id[step_id]

    def models(self) -> set[str]:
        """Models some replica must serve for this workflow to run."""
        return {s.model for s in self.steps if s.kind != "tool"}

    def deps(self, step_id: str) -> list[str]:
        return list(self.step(step_id).after)


@dataclass(frozen=True)
class _RawStep:
    """A ``[[steps]]`` table as written; None marks a key left out (some are per-kind)."""

    id: str
    kind: Literal["llm", "model", "tool"]
    after: list[str] = field(default_factory=list)
    model: str | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    inputs: dict[str, Any] | None = None
    command: list[str] | None = None
    timeout_s: float | None = None
    retries: int = 0
    fan_out: Any = None


@dataclass(frozen=True)
class _RawWorkflow:
    name: str
    steps: list[_RawStep]
    slo_s: float | None = None
    inputs: dict[str, Any] = field(default_factory=dict)


_WORKFLOW_KEYS = frozenset(f.name for f in dataclasses.fields(_RawWorkflow))
_STEP_KEYS = frozenset(f.name for f in dataclasses.fields(_RawStep))


def _raw_workflow(data: dict[str, Any]) -> _RawWorkflow:
    """The document as typed tables: msgspec's compiled conversion when it is well formed (the
    common case, many times faster), the reflective decoder when it is not, for its error naming the
    field (`SchemaError`). Both accept exactly the same documents; msgspec alone would let
    unknown keys through, so those are looked for first."""
    steps = data.get("steps")
    tables = steps if isinstance(steps, list) and data.keys() <= _WORKFLOW_KEYS else None
    if tables is not None and all(isinstance(s, dict) and s.keys() <= _STEP_KEYS for s in tables):
        try:
            return msgspec.convert(data, _RawWorkflow)
        except msgspec.ValidationError:
            pass
    return decode(_RawWorkflow, data)


@dataclass(frozen=True)
class _Ref:
    """A placeholder: ``kind`` is inputs, steps, item or index; ``name`` the input or step."""

    kind: str
    name: str
    text: str


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``--set NAME=VALUE`` options to a dict (the last of a repeated name wins)."""
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise WorkflowError(f"--set {pair!r}: expected NAME=VALUE")
        result[key.strip()] = value
    return result


def load_workflow(
    path: Path, overrides: dict[str, str] | None = None, limits: WorkflowLimits = DEFAULT_LIMITS
) -> WorkflowSpec:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkflowError(f"{path}: cannot read workflow: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise WorkflowError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse_workflow(text, str(path), overrides, limits)


def parse_workflow(
    text: str,
    source: str = "<workflow>",
    overrides: dict[str, str] | None = None,
    limits: WorkflowLimits = DEFAULT_LIMITS,
) -> WorkflowSpec:
    """Parse and fully check a workflow file, in time linear in its size; the first problem
    raises `WorkflowError`."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_workflow_bytes:
        raise WorkflowError(
            f"{source}: {_size(size)} exceeds the {_size(limits.max_workflow_bytes)} limit"
            " (max_workflow_bytes)"
        )
    lines = _Lines(text)
    try:
        data = tomli.loads(text)
    except tomli.TOMLDecodeError as exc:
        raise WorkflowError(f"{source}: invalid TOML: {exc}") from None
    except RecursionError:  # thousands of levels: the parser recurses per level
        data = None
    if data is None or _depth(data) > MAX_NESTING:
        where = lines.deepest()
        if data is None and where is None:
            raise WorkflowError(f"{source}: invalid TOML: nested too deeply")
        raise WorkflowError(
            f"{source}:{where or '?'}: arrays or tables nested more than {MAX_NESTING} deep"
        )
    return _Parser(lines, source, data, limits).parse(overrides or {})


_STEP_HEADER = re.compile(r"^[ \t]*\[\[[ \t]*steps[ \t]*\]\]", re.MULTILINE)


class _Lines:
    """Where things are in the text, at the least cost: each step's ``[[steps]]`` header from one
    regular-expression pass (asked for every step), the full statement scan (`Positions`) only
    when an error needs another path's line."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._full: Positions | None = None
        self._headers: list[int] = []
        self.steps_known = False
        """Set once the parser has seen exactly as many ``[[steps]]`` headers as steps."""
        line, at = 1, 0
        for m in _STEP_HEADER.finditer(text):
            line += text.count("\n", at, m.start())
            at = m.start()
            self._headers.append(line)

    def _positions(self) -> Positions:
        if self._full is None:
            self._full = Positions(self._text)
        return self._full

    def line(self, path: str) -> int | None:
        m = _STEP_PATH.fullmatch(path)
        # Trusted only when the headers are exactly the steps (none inside a string, no inline
        # ``steps = [...]``), which `count_steps` checked against the parsed data.
        if m is not None and self.steps_known:
            return self._headers[int(m.group(1))]
        return self._positions().line(path)

    def count_steps(self, n: int) -> None:
        self.steps_known = n == len(self._headers)

    def deepest(self) -> int | None:
        """The line of the deepest nesting of arrays and inline tables, if the scan finds it."""
        positions = self._positions()
        return positions.depth_line if positions.depth > MAX_NESTING else None


_STEP_PATH = re.compile(r"steps\[(\d+)\]")


def _depth(value: Any) -> int:
    """How deeply arrays and tables nest in parsed TOML: one level at a time, containers only,
    no recursion (scalars, most of a document, are never visited on their own)."""
    depth, level = 0, [value]
    while True:
        inner = [
            v
            for item in level
            for v in (item.values() if isinstance(item, dict) else item)
            if isinstance(v, (dict, list))
        ]
        if not inner:
            return depth
        depth, level = depth + 1, inner


def render(
    template: str,
    inputs: dict[str, str],
    outputs: dict[str, str],
    item: str | None = None,
    index: int | None = None,
) -> str:
    """Fill a template's placeholders; values are inserted as they are, never re-rendered.

    For templates `parse_workflow` accepted, this fails (`WorkflowError`) only if the caller
    passes no value a reference needs: an output not produced yet, no item or index.
    """
    parts = _parse_template(template)
    if len(parts) == 1 and isinstance(parts[0], str):  # no placeholder (most tool arguments)
        return parts[0]
    out: list[str] = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
            continue
        value = _value(part, inputs, outputs, item, index)
        if value is None:
            raise WorkflowError(f"{part.text}: no value to fill in")
        out.append(value)
    return "".join(out)


def render_command(
    command: list[str],
    inputs: dict[str, str],
    outputs: dict[str, str],
    item: str | None = None,
    index: int | None = None,
) -> list[str]:
    """A tool step's argv, each element rendered (`render`). A substituted value may not begin
    an argument with ``-`` unless a literal ``--`` argument comes before it: otherwise
    ``--set file=-oOWNED`` turns ``["sort", "{inputs.file}"]`` into ``sort -oOWNED``. Literal
    options in the template (``-n``) are the author's and pass."""
    argv: list[str] = []
    operands = False
    for n, template in enumerate(command):
        if not operands and (why := _option_like(template, inputs, outputs, item, index)):
            raise WorkflowError(f"command[{n}]: {why}")
        argv.append(render(template, inputs, outputs, item, index))
        operands = operands or template == "--"
    return argv


def payload_bytes(prompt: str, inputs: Mapping[str, str], command: list[str]) -> int:
    """What a call carries, as counted against `WorkflowLimits.call_too_big`: its text in UTF-8
    plus a few bytes per string for the frame's headers."""
    texts = [prompt, *inputs.keys(), *inputs.values(), *command]
    return sum(len(t.encode("utf-8", "surrogatepass")) + 5 for t in texts)


def _value(
    ref: _Ref,
    inputs: Mapping[str, str],
    outputs: Mapping[str, str],
    item: str | None,
    index: int | None,
) -> str | None:
    """What fills ``ref``; None if it is not known (yet)."""
    if ref.kind == "inputs":
        return inputs.get(ref.name)
    if ref.kind == "steps":
        return outputs.get(ref.name)
    if ref.kind == "item":
        return item
    return None if index is None else str(index)


def _option_like(
    template: str,
    inputs: Mapping[str, str],
    outputs: Mapping[str, str],
    item: str | None,
    index: int | None,
) -> str | None:
    """Why this argument would start with an option that came from a substituted value, or
    None: it starts with literal text, a value not starting with ``-``, or one not known yet."""
    for part in _parse_template(template):
        if isinstance(part, str):
            if part:
                return None
            continue
        value = _value(part, inputs, outputs, item, index)
        if value is None or (value and not value.startswith("-")):
            return None
        if value:
            return (
                f"{part.text} is {_clip(value)}, which the program would read as an option"
                " (a substituted argument may not start with '-'; put a '--' argument before"
                " it if the program takes operands after '--')"
            )
    return None


def _clip(value: str, n: int = 32) -> str:
    return repr(value if len(value) <= n else value[:n] + "...")


def _size(n: int) -> str:
    """A byte count for messages: ``512 bytes``, ``64 KiB``, ``6.0 MiB``."""
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            whole = n % (1 << shift) == 0
            return f"{n >> shift} {unit}" if whole else f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


def split_items(output: str, fan_out: FanOut) -> list[str]:
    """The items of a dynamic fan-out, at most ``fan_out.max``.

    ``lines``: the non-empty lines, stripped. ``json``: a JSON list (one markdown code fence around
    it is ignored); strings are items as they are, other values their JSON text. Output that is
    not a JSON list falls back to ``lines``: models stray from format instructions, and a usable
    split beats failing the whole workflow.
    """
    if fan_out.source is None:
        raise ValueError("split_items needs a dynamic fan-out (fan_out.source)")
    items = _json_items(output) if fan_out.split == "json" else None
    if items is None:
        items = [stripped for line in output.splitlines() if (stripped := line.strip())]
    return items[: fan_out.max]


def _json_items(output: str) -> list[str] | None:
    text = output.strip()
    fenced = _FENCE.fullmatch(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return None
    if not isinstance(value, list):
        return None
    return [v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in value]


@functools.lru_cache(maxsize=1024)
def _parse_template(template: str) -> tuple[str | _Ref, ...]:
    """Literal text and references in order; a syntax error raises `WorkflowError`. Cached:
    every call of a step renders the same template."""
    parts: list[str | _Ref] = []
    pos = 0
    for m in _TOKEN.finditer(template):
        parts.append(template[pos : m.start()])
        pos = m.end()
        token = m.group()
        if token in ("{{", "}}"):
            parts.append(token[0])
        elif token in ("{", "}"):
            raise WorkflowError(
                f"unbalanced '{token}' at {template[m.start() : m.start() + 24]!r} "
                f"(write '{token}{token}' for a literal brace)"
            )
        else:
            ref = _REF.fullmatch(m.group(1))
            if ref is None:
                raise WorkflowError(f"{token}: unknown placeholder (use {_PLACEHOLDERS})")
            parts.extend(_Ref(k, v, token) for k, v in ref.groupdict().items() if v is not None)
    parts.append(template[pos:])
    return tuple(parts)


def _scalar(value: object) -> str | None:
    """A TOML scalar as template text, spelled as in TOML (``true``, not ``True``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    return None


def _hint(inputs: Mapping[str, str]) -> str:
    return f"inputs: {', '.join(sorted(inputs))}" if inputs else "no inputs declared"


class _Parser:
    def __init__(
        self, positions: _Lines, source: str, data: dict[str, Any], limits: WorkflowLimits
    ) -> None:
        self.positions = positions
        self.source = source
        self.limits = limits
        steps = data.get("steps")
        self.ids = [
            s.get("id") if isinstance(s, dict) else None
            for s in (steps if isinstance(steps, list) else [])
        ]
        positions.count_steps(len(self.ids))
        self.data = data
        self.index: dict[str, int] = {}
        """Step id -> position in the file."""

    def fail(self, path: str, message: str) -> NoReturn:
        line = self.positions.line(path)
        where = f"{self.source}:{line}" if line else self.source
        m = re.match(r"steps\[(\d+)\]", path)
        if m and int(m.group(1)) < len(self.ids):
            step_id = self.ids[int(m.group(1))]
            if isinstance(step_id, str) and _NAME.fullmatch(step_id):
                path = f"{m.group()} (id {step_id!r}){path[m.end() :]}"
        raise WorkflowError(f"{where}: {path}: {message}")

    def parse(self, overrides: dict[str, str]) -> WorkflowSpec:
        if len(self.ids) > self.limits.max_steps:
            self.fail(
                "steps",
                f"{len(self.ids)} steps exceed the limit of {self.limits.max_steps} (max_steps)",
            )
        try:
            raw = _raw_workflow(self.data)
        except SchemaError as exc:
            self.fail(exc.path, exc.message)
        if not raw.name.strip() or len(raw.name) > 128 or not raw.name.isprintable():
            self.fail("name", "must be 1-128 printable characters")
        if raw.slo_s is not None:
            self._check_positive("slo_s", raw.slo_s)
        inputs = self._scalars("inputs", raw.inputs)
        for name in inputs:
            if not _NAME.fullmatch(name):
                self.fail(f"inputs.{name}", "names must be 1-64 of A-Z a-z 0-9 _ -")
        for name in overrides:
            if name not in inputs:
                raise WorkflowError(f"--set {name}: unknown input ({_hint(inputs)})")
        inputs.update(overrides)
        if not raw.steps:
            self.fail("steps", "must list at least one step ([[steps]])")
        steps = [self._step(i, r) for i, r in enumerate(raw.steps)]
        self._check_after(steps)
        order = self._order(steps)
        ancestors = [0] * len(steps)
        """Per step, a bit set of the positions of the steps it runs after (directly or not):
        linear in the file where sets of ids would be quadratic on a long chain."""
        for i in order:
            for dep in steps[i].after:
                d = self.index[dep]
                ancestors[i] |= ancestors[d] | 1 << d
        for i, step in enumerate(steps):
            self._check_refs(i, step, inputs, ancestors[i])
        return WorkflowSpec(
            name=raw.name,
            slo_s=raw.slo_s,
            inputs=inputs,
            steps=[steps[i] for i in order],
            source=self.source,
        )

    def _check_positive(self, path: str, value: float) -> None:
        if not value > 0:  # also rejects NaN
            self.fail(path, "must be > 0")
        if math.isinf(value):
            self.fail(path, "must be finite")

    def _scalars(self, path: str, table: dict[str, Any]) -> dict[str, str]:
        result: dict[str, str] = {}
        for key, value in table.items():
            text = _scalar(value)
            if text is None:
                self.fail(
                    f"{path}.{key}",
                    f"expected a string, number or boolean, got {type(value).__name__}",
                )
            result[key] = text
        return result

    def _step(self, i: int, raw: _RawStep) -> StepSpec:
        """One step's own fields; references to other steps are checked once all are known."""
        p = f"steps[{i}]"
        if not _NAME.fullmatch(raw.id):
            self.fail(f"{p}.id", f"must be 1-64 of A-Z a-z 0-9 _ -, got {raw.id!r}")
        if raw.id in self.index:
            self.fail(f"{p}.id", f"duplicate of steps[{self.index[raw.id]}]")
        self.index[raw.id] = i
        for key, kinds in _ONLY_FOR.items():
            if getattr(raw, key) is not None and raw.kind not in kinds:
                only = " and ".join(kinds)
                self.fail(f"{p}.{key}", f"not allowed on {raw.kind} steps (only {only} steps)")
        for key in _REQUIRED[raw.kind]:
            value = getattr(raw, key)
            if value is None:
                self.fail(f"{p}.{key}", f"required for {raw.kind} steps")
            if not value or (isinstance(value, str) and not value.strip()):
                self.fail(f"{p}.{key}", "must not be empty")
        if raw.model is not None and not _MODEL.fullmatch(raw.model):
            self.fail(f"{p}.model", f"must be 1-128 of A-Z a-z 0-9 . _ : / -, got {raw.model!r}")
        if raw.max_tokens is not None and not 1 <= raw.max_tokens <= 32768:
            self.fail(f"{p}.max_tokens", f"must be 1..32768, got {raw.max_tokens}")
        if raw.timeout_s is not None:
            self._check_positive(f"{p}.timeout_s", raw.timeout_s)
        if not 0 <= raw.retries <= 10:
            self.fail(f"{p}.retries", f"must be 0..10, got {raw.retries}")
        return StepSpec(
            id=raw.id,
            kind=raw.kind,
            after=list(raw.after),
            model=raw.model or "",
            prompt=raw.prompt or "",
            max_tokens=256 if raw.max_tokens is None else raw.max_tokens,
            inputs=self._scalars(f"{p}.inputs", raw.inputs or {}),
            command=list(raw.command or []),
            timeout_s=raw.timeout_s,
            retries=raw.retries,
            fan_out=self._fan_out(f"{p}.fan_out", raw.fan_out),
            line=self.positions.line(p) or 0,
        )

    def _fan_out(self, path: str, value: Any) -> FanOut | None:
        if value is None:
            return None
        most = self.limits.max_fan_out
        if isinstance(value, int) and not isinstance(value, bool):
            if not 1 <= value <= most:
                self.fail(path, f"must be 1..{most} (max_fan_out), got {value}")
            return FanOut(count=value)
        if not isinstance(value, dict):
            self.fail(
                path,
                "expected an integer (fixed fan-out) or a table like"
                f' {{ from = "STEP" }} (dynamic fan-out), got {type(value).__name__}',
            )
        for key in value:
            if key not in ("from", "split", "max"):
                self.fail(f"{path}.{key}", "unknown key (known: from, max, split)")
        source = value.get("from")
        if source is None:
            self.fail(f"{path}.from", "missing (the step whose output lists the items)")
        if not isinstance(source, str):
            self.fail(f"{path}.from", f"expected a step id, got {type(source).__name__}")
        split = value.get("split", "lines")
        if split not in ("lines", "json"):
            self.fail(f"{path}.split", f"must be one of 'lines', 'json', got {split!r}")
        cap = value.get("max", min(16, most))
        if not isinstance(cap, int) or isinstance(cap, bool) or not 1 <= cap <= most:
            self.fail(f"{path}.max", f"must be an integer 1..{most} (max_fan_out), got {cap!r}")
        return FanOut(source=source, split=split, max=cap)

    def _check_after(self, steps: list[StepSpec]) -> None:
        for i, step in enumerate(steps):
            seen: set[str] = set()
            for dep in step.after:
                if dep == step.id:
                    self.fail(f"steps[{i}].after", "a step cannot run after itself")
                if dep not in self.index:
                    self.fail(f"steps[{i}].after", f"unknown step {dep!r}")
                if dep in seen:
                    self.fail(f"steps[{i}].after", f"{dep!r} listed twice")
                seen.add(dep)

    def _order(self, steps: list[StepSpec]) -> list[int]:
        """Step positions in a topological order, the earliest in the file first when free."""
        graph = graphlib.TopologicalSorter(
            {i: {self.index[d] for d in s.after} for i, s in enumerate(steps)}
        )
        try:
            graph.prepare()
        except graphlib.CycleError as exc:
            self._cycle(steps, set(exc.args[1]))
        ready: list[int] = []
        order: list[int] = []
        while graph.is_active():
            for i in graph.get_ready():
                heapq.heappush(ready, i)
            i = heapq.heappop(ready)
            order.append(i)
            graph.done(i)
        return order

    def _cycle(self, steps: list[StepSpec], stuck: set[int]) -> NoReturn:
        """Report one cycle among the steps that never became ready, in run order
        (``a -> b``: b runs after a), starting at its earliest step in the file."""
        walk = [min(stuck)]
        at = {walk[0]: 0}  # position in walk, so a long cycle is found in linear time
        while True:  # every stuck step waits for another stuck one, so this closes a loop
            nxt = next(self.index[d] for d in steps[walk[-1]].after if self.index[d] in stuck)
            if nxt in at:
                break
            at[nxt] = len(walk)
            walk.append(nxt)
        loop = walk[at[nxt] :][::-1]
        start = loop.index(min(loop))
        loop = loop[start:] + loop[:start]
        path = " -> ".join(steps[i].id for i in [*loop, loop[0]])
        self.fail(f"steps[{loop[0]}].after", f"cycle: {path}")

    def _check_refs(self, i: int, step: StepSpec, inputs: dict[str, str], ancestors: int) -> None:
        """``fan_out.from`` and every template reference must name something available;
        ``ancestors`` holds the positions of the steps this one runs after, as bits."""
        p = f"steps[{i}]"

        def runs_before(step_id: str) -> bool:
            return bool(ancestors >> self.index[step_id] & 1)

        fan = step.fan_out
        if fan is not None and fan.source is not None:
            if fan.source not in self.index:
                self.fail(f"{p}.fan_out.from", f"unknown step {fan.source!r}")
            if not runs_before(fan.source):
                self.fail(f"{p}.fan_out.from", _not_dependency(fan.source))
        templates = [
            (f"{p}.prompt", step.prompt),
            *((f"{p}.command[{n}]", arg) for n, arg in enumerate(step.command)),
            *((f"{p}.inputs.{key}", value) for key, value in step.inputs.items()),
        ]
        for path, template in templates:
            try:
                parts = _parse_template(template)
            except WorkflowError as exc:
                self.fail(path, str(exc))
            for ref in parts:
                if isinstance(ref, str):
                    continue
                if ref.kind == "inputs" and ref.name not in inputs:
                    self.fail(path, f"{ref.text}: unknown input ({_hint(inputs)})")
                if ref.kind == "steps" and ref.name not in self.index:
                    self.fail(path, f"{ref.text}: unknown step {ref.name!r}")
                if ref.kind == "steps" and not runs_before(ref.name):
                    self.fail(path, f"{ref.text}: {_not_dependency(ref.name)}")
                if ref.kind == "item" and (fan is None or fan.source is None):
                    self.fail(path, "{item}: only in steps with a dynamic fan_out (from = STEP)")
                if ref.kind == "index" and fan is None:
                    self.fail(path, "{index}: only in steps with a fan_out")
        for n, arg in enumerate(step.command):  # options known already, from the inputs
            if why := _option_like(arg, inputs, {}, None, None):
                self.fail(f"{p}.command[{n}]", why)
            if arg == "--":
                break
        payload = payload_bytes(step.prompt, step.inputs, step.command)
        if too_big := self.limits.call_too_big(payload):  # the templates alone
            self.fail(f"{p}.{'command' if step.kind == 'tool' else 'prompt'}", too_big)


def _not_dependency(step_id: str) -> str:
    return f"step {step_id!r} is not a dependency (list it in after, or a step that runs after it)"
