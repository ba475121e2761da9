"""The code reads one way: no module of the package imports one that imports it back (even
inside a function), the package never imports a script, and model.py and losses.py depend on
torch alone (STYLE.md rule 1)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minialign"
SCRIPTS = {"train_rm", "train_dpo", "evaluate"}


def imports_of(path: Path) -> tuple[set, set]:
    """(minialign modules, other top-level modules) imported anywhere in the file."""
    own, other = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                own.add(node.module.split(".")[0])
            elif node.level == 1:
                own.update(a.name for a in node.names)
            elif node.module and node.module.startswith("minialign."):
                own.add(node.module.split(".")[1])
            elif node.module:
                other.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            other.update(a.name.split(".")[0] for a in node.names)
    return own, other


def graph() -> dict:
    return {p.stem: imports_of(p)[0] for p in PACKAGE.glob("*.py")}


def test_no_import_cycle():
    g = graph()

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in g.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = [m for m in g if m in reachable(m)]
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_package_never_imports_a_script():
    for p in PACKAGE.glob("*.py"):
        own, other = imports_of(p)
        assert not (other & SCRIPTS), p.name


def test_model_and_losses_depend_on_torch_alone():
    for name in ("losses", "logprobs"):
        own, other = imports_of(PACKAGE / f"{name}.py")
        assert own == set() and other <= {"torch", "__future__", "math"}, (name, own, other)
    own, other = imports_of(PACKAGE / "model.py")
    assert own <= {"config"} and other <= {"torch", "__future__", "math", "dataclasses"}, (own, other)
