"""The package's layers (docs/architecture.md): each folder imports only the folders below it, and nothing in the
library imports a command."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "retinaseg"
# Bottom up; folders of one rank do not import each other. The commands are the modules at the package's top.
RANKS = {"core": 0, "data": 1, "inference": 2, "evaluation": 3, "model": 4, "runs": 5, "tracking": 5}
COMMANDS_RANK = 6


def layer(module: str) -> str:
    """The folder of `retinaseg.<folder>.<...>`, or "commands" for a module at the package's top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or parts[1] in RANKS else "commands"


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("retinaseg."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("retinaseg"):
            if node.module == "retinaseg":  # `from retinaseg import results`: the names are modules
                found.update(f"retinaseg.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
    return found


def rank(folder: str) -> int:
    return RANKS.get(folder, COMMANDS_RANK)


def test_every_folder_is_ranked():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders - {"pretrained"} == set(RANKS)


def test_imports_point_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        source = layer(module) if path.name != "__init__.py" else path.parent.name
        for target in imported_modules(path):
            target_layer = layer(target)
            if target_layer != source and rank(target_layer) >= rank(source):
                upward.append(f"{module} ({source}) imports {target} ({target_layer})")
    assert upward == []


def test_the_check_finds_an_upward_import(tmp_path):
    # The check itself: a library module importing a command, or model importing runs, is caught.
    module = tmp_path / "x.py"
    module.write_text("from retinaseg.eval import evaluate\nimport retinaseg.runs.rundir\n")
    targets = {layer(target) for target in imported_modules(module)}
    assert targets == {"commands", "runs"}
    assert all(rank(target) >= rank("model") for target in targets)
