"""The package's layers (README "How it works"): no import runs upward, none hides inside a function."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

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
