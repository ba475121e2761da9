"""The code reads one way: no module of the package imports one that imports it back (even
inside a function), the package never imports a script, model.py depends on torch alone, and the
losses are pure functions of tensors that reach for nothing but torch (STYLE.md rules 1 and 6;
they live in dpo.py and reward.py, beside the objective that feeds them)."""
import ast
import math
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minialign import dpo, reward

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


def module_globals_used(fn) -> dict:
    """The module-level names a function's code reads, with what they are, nested code included."""
    names, todo = set(), [fn.__code__]
    while todo:
        code = todo.pop()
        names.update(code.co_names)
        todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return {n: fn.__globals__[n] for n in names if n in fn.__globals__}


def test_losses_reach_for_torch_alone():
    """The loss functions read no module-level name but torch, F, their fp32 promotion helper and
    the loss-type names: no model, no batch, no other minialign module."""
    allowed = {"torch": torch, "F": F, "DPO_LOSS_TYPES": dpo.DPO_LOSS_TYPES}
    for fn in (dpo.dpo_loss, dpo.simpo_loss, reward.bradley_terry_loss):
        used = module_globals_used(fn)
        helper = used.pop("_precise", None)
        assert helper is None or module_globals_used(helper) == {"torch": torch}, fn.__name__
        assert all(allowed.get(n) is v for n, v in used.items()), (fn.__name__, sorted(used))


def test_model_depends_on_torch_alone():
    own, other = imports_of(PACKAGE / "model.py")
    assert own <= {"config"} and other <= {"torch", "__future__", "math", "dataclasses"}, (own, other)


MAX_FUNCTION_LINES = 60  # lines per function, its docstring and blank lines apart (comments count) (issue 30)


def code_lines(lines: list[str], fn: ast.FunctionDef) -> int:
    body = fn.body
    has_doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)
    doc = range(body[0].lineno, body[0].end_lineno + 1) if has_doc else range(0)
    return sum(1 for i in range(fn.lineno, fn.end_lineno + 1)
               if i not in doc and lines[i - 1].strip())


def test_every_function_fits_on_a_screen():
    long = []
    for p in sorted(PACKAGE.glob("*.py")):
        source = p.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = code_lines(source.splitlines(), node)
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{p.name}:{node.name} ({n} lines)")
    assert not long, long


def files_run_by(fn, *args):
    """fn(*args), and the package's files whose Python code ran meanwhile (sys.setprofile)."""
    import sys

    seen = set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(str(PACKAGE) + "/"):
            seen.add(Path(frame.f_code.co_filename).name)

    sys.setprofile(profile)
    try:
        out = fn(*args)
    finally:
        sys.setprofile(None)
    return out, seen


@pytest.mark.parametrize("loss_type,packed", [("sigmoid", True), ("sigmoid", False), ("simpo", True), ("rm", True),
                                              ("rm", False)])
def test_one_step_runs_in_five_library_files(loss_type, packed):
    """The hallway of one DPO (or reward-model) step, from the step's pairs to optimizer.step():
    the loop's batch (packing.make_batch) and train.train_step, with the policy, a live reference
    and the gradient sync. With train_dpo.py (train_rm.py), which calls train(), six files: no other
    module's code runs, so a reader following the step opens no other file."""
    from minialign.collate import TokenizedPair
    from minialign.distributed import DistEnv
    from minialign.dpo import DPOObjective, LiveReference
    from minialign.model import CausalLM, RewardModel
    from minialign.packing import make_batch
    from minialign.reducer import GradReducer
    from minialign.reward import RewardObjective
    from minialign.train import build_optimizer, train_step
    from test_model import tiny_config

    torch.manual_seed(0)
    policy = RewardModel(tiny_config()) if loss_type == "rm" else CausalLM(tiny_config())
    reference = CausalLM(tiny_config()).eval()
    items = [TokenizedPair([5, 6, 7], [8, 9, 2], [10, 2], line=i) for i in range(4)]
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    if loss_type == "rm":
        objective, chapter = RewardObjective(), "reward.py"
    else:
        objective, chapter = DPOObjective(loss_type, 0.1, reference=None if loss_type == "simpo" else LiveReference(reference)), "dpo.py"
    grad_sync, optimizer = GradReducer(policy, env), build_optimizer(policy, 1e-3, 0.0)

    def step():
        batches = [make_batch(items, ids, 0, "train", env.device, packed) for ids in ([0, 1], [2, 3])]
        return train_step(policy, objective, batches, optimizer, grad_sync, 1e-3, 1.0, torch.autocast("cpu", enabled=False), env)

    sums, files = files_run_by(step)
    assert sums["pairs"] == 4 and math.isfinite(sums["loss"])
    assert files == {"train.py", chapter, "packing.py", "model.py", "reducer.py"}, sorted(files)
