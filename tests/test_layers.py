"""The rooms of colm import one way, from the ground floor up (README "Where things are")."""

import ast
import pathlib

COLM = pathlib.Path(__file__).resolve().parent.parent / "colm"
# Floor of each room; a module may import from its own floor and the floors below.
FLOORS = {
    "utils": 0, "registry": 0, "ginparse": 0,
    "formats": 1,
    "datasets": 2,
    "moma": 3,
    "models": 4,
    "procedures": 5,
    "checkpoints": 6,
    "tools": 7, "configurables": 7, "main": 7, "quickstart": 7,
}


def _room(dotted: str) -> str:
    """"colm.moma.routing" -> "moma"; "colm.registry" -> "registry"."""
    return dotted.split(".")[1]


def _imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("colm."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "colm":
                yield from (f"colm.{alias.name}" for alias in node.names)
            elif node.module.startswith("colm."):
                yield node.module


def test_every_room_has_a_floor():
    rooms = {p.stem if p.is_file() else p.name for p in COLM.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem != "__init__")}
    assert rooms <= set(FLOORS), f"rooms without a floor in tests/test_layers.py: {sorted(rooms - set(FLOORS))}"


def test_imports_run_from_lower_floors_only():
    upward = []
    for path in sorted(COLM.rglob("*.py")):
        relative = path.relative_to(COLM.parent)
        if len(relative.parts) < 2 or relative.stem == "__init__" and len(relative.parts) == 2:
            continue
        room = relative.parts[1] if len(relative.parts) > 2 else relative.stem
        for imported in _imports(path):
            if FLOORS[_room(imported)] > FLOORS[room]:
                upward.append(f"{relative} imports {imported}")
    assert not upward, "imports from a higher floor:\n" + "\n".join(upward)


def test_t5_module_names_live_in_models_only():
    spelled = []
    for path in sorted(COLM.rglob("*.py")):
        relative = path.relative_to(COLM.parent)
        if relative.parts[1] == "models":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(name in line for name in ("EncDecAttention", "SelfAttention", "DenseReluDense", "decoder.block")):
                spelled.append(f"{relative}:{number}: {line.strip()}")
    assert not spelled, "T5 module names outside colm/models/:\n" + "\n".join(spelled)
