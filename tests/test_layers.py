"""The layers of DESIGN.md hold: the core library imports no built-in plugin, no service and no demo.

The CLI hands off to them lazily (inside its command functions), which is the one allowed exception: `prsmed
serve` starts the service and `prsmed convert llava-med` runs the plugin's converter. Everything else a core module
needs from a component goes through the interfaces in prsmed/interfaces.py, so a third-party plugin can take part.
"""

from __future__ import annotations

import ast
from pathlib import Path

import prsmed

CORE = Path(prsmed.__file__).parent
OUTSIDE_THE_CORE = ("prsmed_plugins", "prsmed_service", "prsmed_demo", "service", "demo")
LAZY_HAND_OFFS = {"cli.py"}


def _imports(tree: ast.AST):
    """(module imported, whether the import sits inside a function) for every import in ``tree``."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, in_function
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                yield child.module, in_function
            yield from walk(child, inner)

    yield from walk(tree, False)


def test_core_imports_no_plugin_service_or_demo():
    breaches = []
    for path in sorted(CORE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = path.relative_to(CORE).as_posix()
        for module, in_function in _imports(tree):
            if module.split(".")[0] not in OUTSIDE_THE_CORE:
                continue
            if rel in LAZY_HAND_OFFS and in_function:
                continue
            breaches.append(f"prsmed/{rel} imports {module}")
    assert not breaches, "\n".join(breaches)


def test_the_walk_sees_imports_inside_functions():
    """The check above would pass vacuously if it missed nested imports."""
    tree = ast.parse("def f():\n    from prsmed_plugins.llms import llava\nimport demo.app\n")
    assert sorted(_imports(tree)) == [("demo.app", False), ("prsmed_plugins.llms", True)]
