"""The layout's rules (docs/layout.md): packages import only packages below them, never each other, and
few modules stay at pipeline/'s top."""
from __future__ import annotations

import ast
from pathlib import Path

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"
# bottom to top; a package may import only packages of a lower level
LEVEL = {"data": 0, "clip": 0, "dino": 0, "labels": 1, "models": 2, "eval": 3, "cams": 4, "train": 5}
TOP_MODULES = {"io", "procs", "classes", "checkpoint"}


def _room(module: list[str]) -> str:
    """'pipeline.labels.crf.torch_backend' -> 'labels'; a top-level module -> 'top'."""
    return module[1] if len(module) > 1 and (PIPELINE / module[1]).is_dir() else "top"


def imports() -> list[tuple[str, str, str]]:
    """(importing room, imported room, file) for every import between rooms of pipeline/."""
    found = []
    for path in PIPELINE.rglob("*.py"):
        rel = path.relative_to(PIPELINE.parent).with_suffix("")
        module = list(rel.parts)
        package = module[:-1]  # the package a relative import starts from (also for __init__)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                target = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "pipeline":
                target = node.module.split(".")
            else:
                continue
            if len(target) == 1:  # from pipeline import x / from .. import x
                for alias in node.names:
                    found.append((_room(module), _room(target + [alias.name]), str(rel)))
            else:
                found.append((_room(module), _room(target), str(rel)))
    return [(a, b, f) for a, b, f in found if a != b]


def test_packages_import_only_downwards():
    upward = [(a, b, f) for a, b, f in imports() if b != "top" and (a == "top" or LEVEL[b] >= LEVEL[a])]
    assert not upward, f"imports that point up or sideways (docs/layout.md): {upward}"


def test_few_modules_at_the_top():
    top = {p.stem for p in PIPELINE.glob("*.py")}
    assert top <= TOP_MODULES, f"new top-level modules {top - TOP_MODULES}: give them a room (docs/layout.md)"
    assert {p.name for p in PIPELINE.iterdir() if (p / "__init__.py").is_file()} == set(LEVEL)
