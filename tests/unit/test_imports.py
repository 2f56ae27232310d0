"""A node agent on a CPU tool host must not pay for torch: neither the CLI nor the daemons import
it until a torch replica or a trained predictor is actually used."""

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import swarmx


def test_cli_and_daemons_do_not_import_torch():
    code = (
        "import sys, swarmx.cli.main, swarmx.daemon.node, swarmx.daemon.scheduler, "
        "swarmx.models.online; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _module_imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package modules ``name`` imports at module level, ``if TYPE_CHECKING:`` included
    (imports inside functions are deliberate late bindings, such as torch's)."""
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(node.orelse)

    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in modules and m != name}


def test_the_package_imports_form_no_circle():
    """The daemon once had observe -> workflows -> scaling -> observe; arrows run one way."""
    root = Path(swarmx.__file__).parent
    paths = {
        ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in root.rglob("*.py")
    }
    graph = {name: _module_imports(path, name, set(paths)) for name, path in paths.items()}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"import circle: {' -> '.join(exc.args[1])}") from None
