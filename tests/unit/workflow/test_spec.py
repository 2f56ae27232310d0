import pytest

from swarmx.workflow.spec import (
    FanOut,
    StepSpec,
    WorkflowError,
    WorkflowSpec,
    load_workflow,
    parse_overrides,
    parse_workflow,
    render,
    split_items,
)

FULL = '''\
name = "report"
slo_s = 90.5

[inputs]
topic = "solar power"
sections = 3
ratio = 0.5
draft = true

[[steps]]
id = "plan"
kind = "llm"
model = "llama-3-8b"
prompt = "List {inputs.sections} section titles about {inputs.topic} as a JSON list."
max_tokens = 128
retries = 2

[[steps]]
id = "draft"
kind = "llm"
model = "llama-3-8b"
after = ["plan"]
prompt = """
Write section {index} ("{item}") of a report on {inputs.topic}.
Keep {{braces}} as they are."""
fan_out = { from = "plan", split = "json", max = 8 }

[[steps]]
id = "cover"
kind = "model"
model = "sd-tiny"
after = ["plan"]
prompt = "A cover image for: {steps.plan.output}"
inputs = { image_px = 512, steps = 20, seed = "{index}", hdr = false }
fan_out = 2

[[steps]]
id = "check"
kind = "tool"
after = ["draft", "cover"]
command = ["wc", "-w", "{steps.draft.output}"]
timeout_s = 30
retries = 1

[[steps]]
id = "tag"
kind = "tool"
after = ["check"]
command = ["echo", "{item}", "{steps.plan.output}"]
fan_out = { from = "plan" }
'''


def test_complete_file_parses_to_the_dataclasses():
    spec = parse_workflow(FULL, "report.toml")
    assert spec == WorkflowSpec(
        name="report",
        slo_s=90.5,
        inputs={"topic": "solar power", "sections": "3", "ratio": "0.5", "draft": "true"},
        steps=[
            StepSpec(
                id="plan",
                kind="llm",
                after=[],
                model="llama-3-8b",
                prompt="List {inputs.sections} section titles about {inputs.topic} as a JSON list.",
                max_tokens=128,
                retries=2,
                line=10,
            ),
            StepSpec(
                id="draft",
                kind="llm",
                after=["plan"],
                model="llama-3-8b",
                prompt='Write section {index} ("{item}") of a report on {inputs.topic}.\n'
                "Keep {{braces}} as they are.",
                fan_out=FanOut(source="plan", split="json", max=8),
                line=18,
            ),
            StepSpec(
                id="cover",
                kind="model",
                after=["plan"],
                model="sd-tiny",
                prompt="A cover image for: {steps.plan.output}",
                inputs={"image_px": "512", "steps": "20", "seed": "{index}", "hdr": "false"},
                fan_out=FanOut(count=2),
                line=28,
            ),
            StepSpec(
                id="check",
                kind="tool",
                after=["draft", "cover"],
                command=["wc", "-w", "{steps.draft.output}"],
                timeout_s=30.0,
                retries=1,
                line=37,
            ),
            StepSpec(
                id="tag",
                kind="tool",
                after=["check"],
                command=["echo", "{item}", "{steps.plan.output}"],
                fan_out=FanOut(source="plan"),
                line=45,
            ),
        ],
        source="report.toml",
    )
    assert spec.step("cover").fan_out == FanOut(count=2)
    assert spec.models() == {"llama-3-8b", "sd-tiny"}
    assert spec.deps("check") == ["draft", "cover"]
    with pytest.raises(KeyError):
        spec.step("nope")


def test_minimal_file_gets_the_defaults():
    spec = parse_workflow(
        'name = "w"\n[[steps]]\nid = "a"\nkind = "llm"\nmodel = "m"\nprompt = "hi"'
    )
    assert spec.slo_s is None
    assert spec.inputs == {}
    assert spec.source == "<workflow>"
    assert spec.steps == [
        StepSpec(id="a", kind="llm", after=[], model="m", prompt="hi", max_tokens=256, line=2)
    ]


def test_steps_come_in_topological_order_keeping_file_order_where_free():
    text = """\
name = "w"
[[steps]]
id = "b"
kind = "tool"
after = ["a"]
command = ["x"]
[[steps]]
id = "a"
kind = "tool"
command = ["x"]
[[steps]]
id = "c"
kind = "tool"
command = ["x"]
[[steps]]
id = "d"
kind = "tool"
after = ["b", "c"]
command = ["x"]
"""
    spec = parse_workflow(text)
    assert [s.id for s in spec.steps] == ["a", "b", "c", "d"]
    assert [s.line for s in spec.steps] == [7, 2, 11, 15]
    assert spec.dependents == {"a": ("b",), "b": ("d",), "c": ("d",), "d": ()}
    assert spec.step("c") is spec.steps[2]
    with pytest.raises(KeyError):
        spec.step("e")


def tool(step_id, *extra):
    """A [[steps]] block of a tool step; extra lines are appended."""
    return "\n".join(["[[steps]]", f'id = "{step_id}"', 'kind = "tool"', 'command = ["x"]', *extra])


def wf(*blocks, head='name = "w"'):
    return "\n".join([head, *blocks]) + "\n"


def error(text, overrides=None):
    with pytest.raises(WorkflowError) as exc:
        parse_workflow(text, "wf.toml", overrides)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_invalid_toml_names_the_file_and_keeps_tomllibs_position():
    message = error('name = "w"\nx = = 1\n')
    assert message.startswith("wf.toml: invalid TOML: ")
    assert message.endswith("(at line 2, column 5)")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (wf(tool("a"), head=""), "wf.toml: name: missing"),
        (
            wf(tool("a"), head='name = "w"\nslo = 3'),
            "wf.toml:2: slo: unknown key (known: inputs, name, slo_s, steps)",
        ),
        (wf(tool("a"), head='name = "w"\nslo_s = 0'), "wf.toml:2: slo_s: must be > 0"),
        (wf(tool("a"), head='name = "w"\nslo_s = -1.5'), "wf.toml:2: slo_s: must be > 0"),
        (wf(tool("a"), head='name = "w"\nslo_s = inf'), "wf.toml:2: slo_s: must be finite"),
        (
            wf(tool("a"), head='name = "w"\nslo_s = "fast"'),
            "wf.toml:2: slo_s: expected a number, got str 'fast'",
        ),
        (wf(tool("a"), head='name = ""'), "wf.toml:1: name: must be 1-128 printable characters"),
        (wf(head='name = "w"'), "wf.toml: steps: missing"),
        (
            wf(head='name = "w"\nsteps = []'),
            "wf.toml:2: steps: must list at least one step ([[steps]])",
        ),
        (wf(head='name = "w"\n[steps]\nid = "a"'), "wf.toml:2: steps: expected a list, got dict"),
        (
            wf(tool("a"), head='name = "w"\n[inputs]\ntopic = "x"\nlist = [1]'),
            "wf.toml:4: inputs.list: expected a string, number or boolean, got list",
        ),
        (
            wf(tool("a"), head='name = "w"\n[inputs]\n"my topic" = "x"'),
            "wf.toml:3: inputs.my topic: names must be 1-64 of A-Z a-z 0-9 _ -",
        ),
    ],
)
def test_top_level_errors(text, message):
    assert error(text) == message


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        (
            [tool("a"), tool("b", 'promt = "hi"')],
            "wf.toml:10: steps[1] (id 'b').promt: unknown key (known: after, command, fan_out, id,"
            " inputs, kind, max_tokens, model, prompt, retries, timeout_s)",
        ),
        (['[[steps]]\nkind = "tool"'], "wf.toml:2: steps[0].id: missing"),
        ([tool("a b")], "wf.toml:3: steps[0].id: must be 1-64 of A-Z a-z 0-9 _ -, got 'a b'"),
        ([tool("a"), tool("a")], "wf.toml:7: steps[1] (id 'a').id: duplicate of steps[0]"),
        (
            ['[[steps]]\nid = "a"\nkind = "llms"'],
            "wf.toml:4: steps[0] (id 'a').kind: must be one of 'llm', 'model', 'tool', got 'llms'",
        ),
        (
            ['[[steps]]\nid = "a"\nkind = "llm"\nmodel = "m"\nprompt = "p"\ncommand = ["ls"]'],
            "wf.toml:7: steps[0] (id 'a').command: not allowed on llm steps (only tool steps)",
        ),
        (
            [tool("a", 'model = "m"')],
            "wf.toml:6: steps[0] (id 'a').model: not allowed on tool steps"
            " (only llm and model steps)",
        ),
        (
            [tool("a", "max_tokens = 5")],
            "wf.toml:6: steps[0] (id 'a').max_tokens: not allowed on tool steps (only llm steps)",
        ),
        (
            ['[[steps]]\nid = "a"\nkind = "llm"\nmodel = "m"\nprompt = "p"\ninputs = { x = 1 }'],
            "wf.toml:7: steps[0] (id 'a').inputs: not allowed on llm steps (only model steps)",
        ),
        (
            ['[[steps]]\nid = "a"\nkind = "model"\nmodel = "m"\ntimeout_s = 3'],
            "wf.toml:6: steps[0] (id 'a').timeout_s: not allowed on model steps (only tool steps)",
        ),
        (
            ['[[steps]]\nid = "a"\nkind = "llm"\nmodel = "m"'],
            "wf.toml:2: steps[0] (id 'a').prompt: required for llm steps",
        ),
        (
            ['[[steps]]\nid = "a"\nkind = "model"'],
            "wf.toml:2: steps[0] (id 'a').model: required for model steps",
        ),
        (
            ['[[steps]]\nid = "a"\nkind = "tool"'],
            "wf.toml:2: steps[0] (id 'a').command: required for tool steps",
        ),
        (
            ['[[steps]]\nid = "a"\nkind = "tool"\ncommand = []'],
            "wf.toml:5: steps[0] (id 'a').command: must not be empty",
        ),
        (
            ['[[steps]]\nid = "a"\nkind = "llm"\nmodel = "m"\nprompt = "  "'],
            "wf.toml:6: steps[0] (id 'a').prompt: must not be empty",
        ),
        (
            ['[[steps]]\nid = "a"\nkind = "llm"\nmodel = "my model"\nprompt = "p"'],
            "wf.toml:5: steps[0] (id 'a').model: must be 1-128 of A-Z a-z 0-9 . _ : / -,"
            " got 'my model'",
        ),
        (
            ['[[steps]]\nid = "a"\nkind = "llm"\nmodel = "m"\nprompt = "p"\nmax_tokens = 0'],
            "wf.toml:7: steps[0] (id 'a').max_tokens: must be 1..32768, got 0",
        ),
        (
            [tool("a", "retries = 11")],
            "wf.toml:6: steps[0] (id 'a').retries: must be 0..10, got 11",
        ),
        ([tool("a", "timeout_s = 0")], "wf.toml:6: steps[0] (id 'a').timeout_s: must be > 0"),
        (
            [tool("a", 'after = ["b", 3]')],
            "wf.toml:6: steps[0] (id 'a').after[1]: expected a string, got int 3",
        ),
    ],
)
def test_step_field_errors(blocks, message):
    assert error(wf(*blocks)) == message


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        (
            [
                tool("code"),
                tool("test", 'after = ["code"]'),
                tool("review", 'after = ["test", "cod"]'),
            ],
            "wf.toml:15: steps[2] (id 'review').after: unknown step 'cod'",
        ),
        (
            [tool("a", 'after = ["a"]')],
            "wf.toml:6: steps[0] (id 'a').after: a step cannot run after itself",
        ),
        (
            [tool("a"), tool("b", 'after = ["a", "a"]')],
            "wf.toml:10: steps[1] (id 'b').after: 'a' listed twice",
        ),
        (
            [tool("a", 'after = ["b"]'), tool("b", 'after = ["a"]')],
            "wf.toml:6: steps[0] (id 'a').after: cycle: a -> b -> a",
        ),
        (
            # x only waits on the cycle; the report starts at the cycle's first step in the file
            [
                tool("x", 'after = ["c"]'),
                tool("a", 'after = ["c"]'),
                tool("b", 'after = ["a"]'),
                tool("c", 'after = ["b"]'),
            ],
            "wf.toml:11: steps[1] (id 'a').after: cycle: a -> b -> c -> a",
        ),
    ],
)
def test_graph_errors(blocks, message):
    assert error(wf(*blocks)) == message


@pytest.mark.parametrize(
    ("fan_out", "message"),
    [
        ("0", "fan_out: must be 1..1024 (max_fan_out), got 0"),
        ("1025", "fan_out: must be 1..1024 (max_fan_out), got 1025"),
        (
            '"plan"',
            'fan_out: expected an integer (fixed fan-out) or a table like { from = "STEP" }'
            " (dynamic fan-out), got str",
        ),
        ('{ from = "plan", mx = 3 }', "fan_out.mx: unknown key (known: from, max, split)"),
        ("{ max = 3 }", "fan_out.from: missing (the step whose output lists the items)"),
        ("{ from = 3 }", "fan_out.from: expected a step id, got int"),
        (
            '{ from = "plan", split = "csv" }',
            "fan_out.split: must be one of 'lines', 'json', got 'csv'",
        ),
        (
            '{ from = "plan", max = 0 }',
            "fan_out.max: must be an integer 1..1024 (max_fan_out), got 0",
        ),
        (
            '{ from = "plan", max = true }',
            "fan_out.max: must be an integer 1..1024 (max_fan_out), got True",
        ),
        ('{ from = "plna" }', "fan_out.from: unknown step 'plna'"),
        (
            '{ from = "side" }',
            "fan_out.from: step 'side' is not a dependency (list it in after, or a step that runs"
            " after it)",
        ),
    ],
)
def test_fan_out_errors(fan_out, message):
    text = wf(tool("plan"), tool("side"), tool("fan", 'after = ["plan"]', f"fan_out = {fan_out}"))
    assert error(text) == f"wf.toml:15: steps[2] (id 'fan').{message}"


def test_fan_out_from_may_be_an_indirect_dependency():
    text = wf(
        tool("plan"),
        tool("mid", 'after = ["plan"]'),
        tool("fan", 'after = ["mid"]', 'fan_out = { from = "plan" }'),
    )
    assert parse_workflow(text).step("fan").fan_out == FanOut(source="plan")


def test_fan_out_as_a_sub_table_reports_the_key_line():
    text = wf(
        tool("plan"),
        tool("fan", 'after = ["plan"]', "[steps.fan_out]", 'from = "plan"', 'split = "xml"'),
    )
    assert (
        error(text)
        == "wf.toml:13: steps[1] (id 'fan').fan_out.split: must be one of 'lines', 'json',"
        " got 'xml'"
    )


HEAD = 'name = "w"\n[inputs]\ntopic = "x"\ndoc = "y"'


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            'prompt = "About {inputs.topc}"',
            "prompt: {inputs.topc}: unknown input (inputs: doc, topic)",
        ),
        ('prompt = "{steps.plna.output}"', "prompt: {steps.plna.output}: unknown step 'plna'"),
        (
            'prompt = "{steps.side.output}"',
            "prompt: {steps.side.output}: step 'side' is not a dependency (list it in after, or a"
            " step that runs after it)",
        ),
        (
            'prompt = "{steps.gen.output}"',
            "prompt: {steps.gen.output}: step 'gen' is not a dependency (list it in after, or a"
            " step that runs after it)",
        ),
        ('prompt = "{item}"', "prompt: {item}: only in steps with a dynamic fan_out (from = STEP)"),
        (
            'prompt = "{item}"\nfan_out = 3',
            "prompt: {item}: only in steps with a dynamic fan_out (from = STEP)",
        ),
        ('prompt = "{index}"', "prompt: {index}: only in steps with a fan_out"),
        (
            'prompt = "Return {\\"a\\": 1}"',
            'prompt: {"a": 1}: unknown placeholder (use {inputs.NAME}, {steps.ID.output}, {item}'
            " or {index}; {{ and }} for braces)",
        ),
        (
            'prompt = "{ inputs.topic }"',
            "prompt: { inputs.topic }: unknown placeholder (use {inputs.NAME}, {steps.ID.output},"
            " {item} or {index}; {{ and }} for braces)",
        ),
        (
            'prompt = "{inputs.topic and {inputs.doc}"',
            "prompt: unbalanced '{' at '{inputs.topic and {input' (write '{{' for a literal brace)",
        ),
        ('prompt = "a } b"', "prompt: unbalanced '}' at '} b' (write '}}' for a literal brace)"),
    ],
)
def test_template_errors(extra, message):
    text = wf(
        tool("plan"),
        tool("side"),
        f'[[steps]]\nid = "gen"\nkind = "llm"\nmodel = "m"\nafter = ["plan"]\n{extra}',
        head=HEAD,
    )
    assert error(text) == f"wf.toml:18: steps[2] (id 'gen').{message}"


def test_template_errors_in_commands_and_model_inputs_name_the_element():
    text = wf(tool("a", 'command = ["echo", "{inputs.nope}"]'), head=HEAD).replace(
        'command = ["x"]\n', ""
    )
    assert error(text) == (
        "wf.toml:8: steps[0] (id 'a').command[1]: {inputs.nope}: unknown input (inputs: doc, topic)"
    )
    text = wf(
        '[[steps]]\nid = "m"\nkind = "model"\nmodel = "vis"\ninputs = { steps = "{index}" }',
        head=HEAD,
    )
    assert (
        error(text)
        == "wf.toml:9: steps[0] (id 'm').inputs.steps: {index}: only in steps with a fan_out"
    )


def test_references_through_indirect_dependencies_are_allowed():
    last = '[[steps]]\nid = "c"\nkind = "tool"\nafter = ["b"]\nfan_out = 2\n'
    last += 'command = ["{steps.a.output}", "{index}"]'
    spec = parse_workflow(wf(tool("a"), tool("b", 'after = ["a"]'), last))
    assert spec.step("c").command == ["{steps.a.output}", "{index}"]


def test_errors_without_a_place_in_the_file_name_only_the_file():
    assert error(wf(head='name = "w"')) == "wf.toml: steps: missing"


def test_overrides_replace_defaults():
    spec = parse_workflow(wf(tool("a"), head=HEAD), overrides={"topic": "wind"})
    assert spec.inputs == {"topic": "wind", "doc": "y"}


def test_override_of_an_undeclared_input_is_an_error():
    assert (
        error(wf(tool("a"), head=HEAD), {"topik": "z"})
        == "--set topik: unknown input (inputs: doc, topic)"
    )
    assert error(wf(tool("a")), {"x": "1"}) == "--set x: unknown input (no inputs declared)"


def test_parse_overrides():
    assert parse_overrides(["topic=a=b", " doc =", "topic=c"]) == {"topic": "c", "doc": ""}
    with pytest.raises(WorkflowError, match=r"^--set 'topic': expected NAME=VALUE$"):
        parse_overrides(["topic"])
    with pytest.raises(WorkflowError, match=r"^--set '=x': expected NAME=VALUE$"):
        parse_overrides(["=x"])


def test_load_workflow(tmp_path):
    path = tmp_path / "wf.toml"
    path.write_text(wf(tool("a"), head=HEAD))
    assert load_workflow(path, {"doc": "z"}).source == str(path)
    assert load_workflow(path, {"doc": "z"}).inputs["doc"] == "z"
    with pytest.raises(WorkflowError, match=rf"^{tmp_path}/nope.toml: cannot read workflow: "):
        load_workflow(tmp_path / "nope.toml")
    path.write_bytes(b'name = "\xff"')
    with pytest.raises(WorkflowError, match=r"wf.toml: not UTF-8 text \(byte 8\)$"):
        load_workflow(path)
    path.write_text("slo_s = 0\n" + wf(tool("a")))
    with pytest.raises(WorkflowError, match=r"wf.toml:1: slo_s: must be > 0$"):
        load_workflow(path)


def test_render_fills_every_placeholder():
    template = "{inputs.topic}|{steps.plan.output}|{item}|{index}|{{literal}}|}}{{"
    out = render(template, {"topic": "sun"}, {"plan": "a\nb"}, item="x", index=0)
    assert out == "sun|a\nb|x|0|{literal}|}{"


def test_render_inserts_values_verbatim():
    assert render("{inputs.a}", {"a": "{inputs.b}"}, {}) == "{inputs.b}"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{steps.plan.output}", "{steps.plan.output}: no value to fill in"),
        ("{item}", "{item}: no value to fill in"),
        ("{index}", "{index}: no value to fill in"),
        ("{inputs.x}", "{inputs.x}: no value to fill in"),
        ("{", "unbalanced '{' at '{' (write '{{' for a literal brace)"),
    ],
)
def test_render_without_a_needed_value_raises(template, message):
    with pytest.raises(WorkflowError) as exc:
        render(template, {}, {})
    assert str(exc.value) == message


LINES = FanOut(source="plan")
JSON = FanOut(source="plan", split="json")


def test_split_lines_drops_blank_lines_and_strips():
    assert split_items("  a \n\n b\n   \nc", LINES) == ["a", "b", "c"]
    assert split_items("", LINES) == []


def test_split_json_list_stringifies_non_strings_as_json():
    output = '["a", {"k": "é"}, [1, 2], 3, 1.5, true, null, ""]'
    assert split_items(output, JSON) == [
        "a",
        '{"k": "é"}',
        "[1, 2]",
        "3",
        "1.5",
        "true",
        "null",
        "",
    ]


def test_split_json_accepts_a_code_fence():
    assert split_items('Sure:\n```json\n["a", "b"]\n```', JSON) == [
        "Sure:",
        "```json",
        '["a", "b"]',
        "```",
    ]
    assert split_items('```json\n["a", "b"]\n```\n', JSON) == ["a", "b"]


@pytest.mark.parametrize("output", ['{"a": 1}', "not json\nat all", '"a string"'])
def test_split_json_falls_back_to_lines(output):
    assert split_items(output, JSON) == [line.strip() for line in output.splitlines()]


def test_split_caps_at_max():
    assert split_items("\n".join("abcdef"), FanOut(source="p", max=4)) == ["a", "b", "c", "d"]
    assert split_items(str(list(range(10))), FanOut(source="p", split="json", max=3)) == [
        "0",
        "1",
        "2",
    ]


def test_split_needs_a_dynamic_fan_out():
    with pytest.raises(ValueError, match="dynamic"):
        split_items("a", FanOut(count=2))
