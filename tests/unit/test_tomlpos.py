import sys

import pytest

from swarmx.tomlpos import Positions, locate

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

TEXT = '''\
name = "w"   # 1
slo_s = 5

[inputs]
topic = "x"  # 5
"quoted key" = 1
site.region = "eu"

[[steps]]    # 9
id = "a"
prompt = """
after = "not a key: inside a string"
[[steps]]
"""
after = []   # 15

[[steps]]    # 17
id = "b"
command = [
  "[x]",
  "y = 1",   # 21
]
fan_out = { from = "a", max = 8 }  # 23

[[steps]]    # 25
id = "c"
[steps.inputs]
image_px = 512  # 28
[steps.fan_out]
from = "a"      # 30

[[node.replicas]]  # 32
model = "m"
[[node.replicas]]  # 34
model = "n"
'''


def test_text_is_valid_toml():
    tomllib.loads(TEXT)


@pytest.mark.parametrize(
    ("path", "line"),
    [
        ("name", 1),
        ("slo_s", 2),
        ("inputs", 4),
        ("inputs.topic", 5),
        ("inputs.quoted key", 6),
        ("inputs.site.region", 7),
        ("inputs.site", 7),
        ("inputs.missing", 4),  # not in the table: the table's header
        ("steps", 9),  # the first [[steps]]
        ("steps[0]", 9),
        ("steps[0].after", 15),  # not the look-alike inside the multi-line string
        ("steps[0].prompt", 11),
        ("steps[1]", 17),
        ("steps[1].after", 17),  # not in the block: the block's header
        ("steps[1].id", 18),
        ("steps[1].command", 19),
        ("steps[1].command[1]", 19),  # an array element: the key's line
        ("steps[1].fan_out.max", 23),  # inside an inline table: the key's line
        ("steps[1].fan_out.split", 23),
        ("steps[2].id", 26),
        ("steps[2].inputs.image_px", 28),  # a sub-table of the 3rd element
        ("steps[2].fan_out", 29),
        ("steps[2].fan_out.from", 30),
        ("steps[2].fan_out.max", 29),
        ("node.replicas[0].model", 33),
        ("node.replicas[1].model", 35),
        ("node.replicas[1]", 34),
    ],
)
def test_locate(path, line):
    assert locate(TEXT, path) == line


@pytest.mark.parametrize("path", ["missing", "steps[3].id", "nodes.x", "", "a..b", "steps[x]"])
def test_unknown_or_malformed_paths_give_none(path):
    assert locate(TEXT, path) is None


def test_nested_arrays_of_tables_count_per_parent():
    text = "[[a]]\n[[a.b]]\nx = 1\n[[a]]\n[[a.b]]\nx = 2\n[[a.b]]\nx = 3\n"
    assert locate(text, "a[0].b[0].x") == 3
    assert locate(text, "a[1].b[0].x") == 6
    assert locate(text, "a[1].b[1].x") == 8


def test_literal_and_escaped_strings_do_not_end_early():
    text = "a = 'it\"s'\nb = \"say \\\"hi\\\" = 2\"\nc = '''\nd = 1\n'''\ne = 3\n"
    tomllib.loads(text)
    assert [locate(text, k) for k in "abcde"] == [1, 2, 3, None, 6]


def test_unterminated_text_does_not_hang():
    assert locate('a = "open\n[[b', "a") == 1
    assert locate('x = """never closed', "y") is None


def test_nesting_depth_and_its_line():
    pos = Positions("a = 1\nb = [1, [2, {c = [3]}]]\nd = [[\n  [4],\n]]\n")
    assert (pos.depth, pos.depth_line) == (4, 2)
    assert Positions('s = "[[[[" # [[[[\n').depth == 0  # inside strings and comments


def test_many_lookups_cost_one_scan():
    text = "".join(f'[[steps]]\nid = "s{i}"\nafter = ["x"]\n' for i in range(5000))
    pos = Positions(text)
    assert [pos.line(f"steps[{i}]") for i in (0, 4999)] == [1, 14_998]
    assert pos.line("steps[4999].after") == 15_000
    assert pos.line("steps[4999].prompt") == 14_998  # not set: the step's header
