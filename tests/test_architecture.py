"""The package's layers (README "How it works"): no import runs upward, none hides inside a function."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helios.trainer import Trainer
from tests.helpers.runs import SMALL_WORLD, train_in_process

ROOT = Path(__file__).resolve().parents[1]


def _lint() -> subprocess.CompletedProcess:
    lint = shutil.which("lint-imports")
    assert lint, "import-linter is part of the dev install: pip install -e '.[dev]'"
    return subprocess.run(
        [lint, "--config", ".importlinter", "--no-cache"], cwd=ROOT, capture_output=True, text=True
    )


def _function_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom):
                    names = [inner.module or ""]
                else:
                    names = [a.name for a in inner.names] if isinstance(inner, ast.Import) else []
                where = f"{path.relative_to(ROOT)}:{getattr(inner, 'lineno', 0)}"
                found += [f"{where} {name}" for name in names if name.split(".")[0] == "helios"]
    return found


def test_no_import_runs_upward():
    """The import-linter contract in .importlinter (grimp reads imports inside functions too)."""
    proc = _lint()
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_no_helios_import_hides_inside_a_function():
    """A cycle dodged by an import inside a function is still a cycle: every helios import is at the top."""
    found = [hit for path in sorted((ROOT / "helios").rglob("*.py")) for hit in _function_imports(path)]
    assert not found, "\n".join(found)


def test_both_checks_catch_an_upward_import_hidden_in_a_function():
    probe = ROOT / "helios" / "world" / "_probe_upward.py"
    probe.write_text("def f():\n    from helios.trainer import Trainer\n\n    return Trainer\n")
    try:
        assert _function_imports(probe) == ["helios/world/_probe_upward.py:2 helios.trainer"]
        proc = _lint()
        assert proc.returncode != 0 and "helios.world._probe_upward -> helios.trainer" in proc.stdout
    finally:
        probe.unlink()


ENTRIES = ("prepare", "generate", "export", "ode_pairs", "memory", "fixtures", "tiny_vae")


def _implementation_targets(path: Path) -> list[str]:
    """The ``"module:function"`` strings an entry hands to ``command``/``implementation``."""
    tree = ast.parse(path.read_text())
    return [
        arg.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("command", "implementation")
        for arg in node.args
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and ":" in arg.value
    ]


def test_command_entries_start_without_torch_and_name_a_commands_implementation():
    """``python -m helios.<command> --help`` and a bad config answer before torch/diffusers load: the entry
    imports only helios.config, and its implementation, in helios.commands, is loaded by name afterwards."""
    code = "import sys\n" + "".join(f"import helios.{name}\n" for name in ENTRIES)
    code += "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    proc = subprocess.run(["python", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    from helios.config.entry import implementation

    for name in ENTRIES:
        targets = _implementation_targets(ROOT / "helios" / f"{name}.py")
        (target,) = targets
        assert target.startswith("helios.commands."), (name, target)
        assert callable(implementation(targets[0]))


def test_no_two_modules_share_a_file_name():
    """A file name says what its module is, once: an entry and its implementation, or a schema and the
    code it configures, do not share one."""
    names = [p.name for p in (ROOT / "helios").rglob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_only_the_command_entries_load_modules_by_name():
    """``implementation`` is the one by-name import in the package, used only by the top-layer entries, so
    it cannot carry an upward import past the contract."""
    users = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "helios").rglob("*.py")
        if _implementation_targets(path) or "import_module" in path.read_text()
    )
    assert users == ["helios/config/entry.py"] + [f"helios/{name}.py" for name in sorted(ENTRIES)]


def _test_module_imports(path: Path) -> list[str]:
    """Imports of other test modules (``tests.<...>`` outside ``tests.helpers``) in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found += [
            f"{path.name}:{node.lineno} {name}"
            for name in names
            if name.split(".")[0] == "tests" and not name.startswith("tests.helpers")
        ]
    return found


def test_tests_mirror_the_package_and_import_no_other_test_module(tmp_path):
    layers = {p.name for p in (ROOT / "helios").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    tests = ROOT / "tests"
    for folder in (p for p in tests.iterdir() if p.is_dir() and p.name not in ("helpers", "__pycache__")):
        assert folder.name in layers | {"trainer"}, f"tests/{folder.name} mirrors no helios package"
    found = [hit for path in sorted(tests.rglob("test_*.py")) for hit in _test_module_imports(path)]
    assert not found, f"test modules import other test modules: {found}"
    probe = tmp_path / "test_probe.py"  # the check sees a test-to-test import, and only that
    probe.write_text("from tests.core.test_flow import x\nfrom tests.helpers.runs import ROOT\n")
    assert _test_module_imports(probe) == ["test_probe.py:1 tests.core.test_flow"]


# ---------------------------------------------------------------- who owns a training step (issue #36)
STEP_LAYERS = (("helios.stages", "S"), ("helios.infra", "I"))


def _layer(frame) -> str | None:
    name = frame.f_globals.get("__name__", "")
    return next((label for prefix, label in STEP_LAYERS if name.startswith(prefix)), None)


def crossings(path: str) -> tuple[int, int]:
    """``path``: the stages (S) and infra (I) frames of one call stack, outermost first, runs of one layer
    collapsed; the crossings stages -> infra and infra -> stages along it."""
    return path.count("SI"), path.count("IS")


class StepPaths:
    """Every call stack seen while tracing (``sys.setprofile``): the worst crossings, each with one stack."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], list[str]] = {}

    def __call__(self, frame, event, arg) -> None:
        if event != "call" or _layer(frame) is None:
            return
        stack, f = [], frame
        while f is not None:
            label = _layer(f)
            if label is not None and (not stack or stack[-1][0] != label):
                stack.append((label, f"{f.f_globals['__name__']}.{f.f_code.co_qualname}"))
            f = f.f_back
        stack.reverse()
        self.seen.setdefault(crossings("".join(label for label, _ in stack)), [w for _, w in stack])


def test_crossings_count_each_way():
    assert crossings("SIS") == (1, 1) and crossings("SISI") == (2, 1) and crossings("ISIS") == (1, 2)
    assert crossings("S") == (0, 0) and crossings("IS") == (0, 1)


@pytest.mark.parametrize(
    "overrides",
    [
        ["stage=3", "distill.offload=true", "distill.offload_prefetch=true"],  # the offload pool's blocks
        ["stage=3", "parallel=zero3"],  # the roles' ZeRO-3 engines, the ranks' agreement on forwards
        ["stage=2", *SMALL_WORLD],
    ],
    ids=["stage3-offload", "stage3-zero3", "stage2"],
)
def test_no_step_path_crosses_between_stages_and_infra_more_than_once_each_way(tmp_path, overrides):
    """The method owns its step: the trainer calls the stage once, the stage uses infra's services (a
    role's placement block, its forward through its wrapper or engine, its backward), and infra calls back
    into the stage only to run the role's forward it was given -- never stage -> infra -> stage -> infra.
    Traced over two optimizer steps (stage 3: a generator and a critic-only iteration, the GAN on)."""
    paths = StepPaths()
    train_step = Trainer.train_step

    def traced(self, metrics=True):
        sys.setprofile(paths)
        try:
            return train_step(self, metrics)
        finally:
            sys.setprofile(None)

    common = ["trainer.max_steps=2", "distill.ttur=2", "distill.gan.start_step=0", "distill.ema_start=0"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "train_step", traced)
        train_in_process([*common, *overrides], tmp_path)
    worst = max(paths.seen, key=sum)
    assert all(a <= 1 and b <= 1 for a, b in paths.seen), " -> ".join(paths.seen[worst])
    if overrides[0] == "stage=3":  # the tracer sees a crossing back: the role's forward runs the rollout
        assert (1, 1) in paths.seen and paths.seen[(1, 1)][-1].endswith("StagedRollout.__call__")
