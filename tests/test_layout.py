"""The README's map of the house is complete and true: every module has a row, and imports point down the floors."""

from __future__ import annotations

import ast
import re

from conftest import REPO

PACKAGES = ("rewards", "sampling", "cli")  # one row each in the map


def _row_of(module: str) -> str:
    """The map row of a dotted module name: ``rlvr_vocab.rewards.text`` -> ``rlvr_vocab/rewards/``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "rlvr_vocab/__init__.py"
    if parts[1] in PACKAGES:
        return f"rlvr_vocab/{parts[1]}/"
    return f"rlvr_vocab/{parts[1]}.py"


def _map_rows() -> list[str]:
    readme = (REPO / "README.md").read_text()
    return [m for m in re.findall(r"^\| `([^`]+)` \|", readme, flags=re.M) if m.startswith("rlvr_vocab")]


def _imports(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rlvr_vocab":
            found |= {f"{node.module}.{a.name}" for a in node.names} if node.module == "rlvr_vocab" else {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "rlvr_vocab"}
    return found


def test_every_module_has_a_row_in_the_readme_map():
    rows = _map_rows()
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts) for p in (REPO / "rlvr_vocab").rglob("*.py")}
    missing = sorted({_row_of(m.removesuffix(".__init__")) for m in modules} - set(rows))
    assert missing == [], f"README.md's layout table has no row for {missing}"


def test_imports_point_down_the_floors():
    """A module imports only modules of the rows above its own (config.py is the bottom floor)."""
    rows = _map_rows()
    floor = {row: i for i, row in enumerate(rows)}
    upward = []
    for path in (REPO / "rlvr_vocab").rglob("*.py"):
        own = _row_of(".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"))
        for module in _imports(path):
            target = _row_of(module)
            if target != own and floor[target] > floor[own]:
                upward.append(f"{path.relative_to(REPO)} imports {module} ({target} is a floor above {own})")
    assert upward == []
