"""A real install: ``pip install .`` (not editable) into a fresh virtualenv, then every command from a
directory that is not the checkout. The virtualenv sees this interpreter's packages (torch, diffusers, ...)
so only the project itself is installed; its own copy must win over the checkout."""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    out = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return env_dir


def _run(env_dir: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{env_dir / 'bin'}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, " ".join(args) + "\n" + out.stdout[-2000:] + out.stderr[-4000:]
    return out


def test_installed_package_runs_every_command_from_any_directory(installed, tmp_path):
    python = str(installed / "bin" / "python")
    where = _run(
        installed,
        [python, "-c", "import helios, helios.config.load as l; print(helios.__file__, l.CONFIG_DIR)"],
        tmp_path,
    )
    package, configs = where.stdout.split()
    assert package.startswith(str(installed)) and Path(configs).is_relative_to(installed)
    assert (Path(configs) / "stage1" / "init.yaml").exists()
    assert "commands:" in _run(installed, ["helios"], tmp_path).stdout
    for module in (
        "helios.prepare",
        "helios.generate",
        "helios.export",
        "helios.ode_pairs",
        "helios.fixtures",
        "helios.memory",
        "helios.tiny_vae",
    ):
        assert "python -m" in _run(installed, [python, "-m", module, "--help"], tmp_path).stdout, module
    assert "usage" in _run(installed, ["helios", "bench", "sampler", "--help"], tmp_path).stdout
    # the tiny stage-3 job's bootstrap ships with the benchmarks (train_helios.py imports it for that job)
    recipe = [python, "-c", "import helios.bench.tiny_recipe as r; print(r.__file__)"]
    assert Path(_run(installed, recipe, tmp_path).stdout.strip()).is_relative_to(installed)
    train = ["trainer.max_steps=2", "validation.enabled=false", "trainer.progress=false"]
    _run(installed, ["helios", "train", f"hydra.run.dir={tmp_path / 'a'}", "stage=2", *train], tmp_path)
    assert (tmp_path / "a" / "checkpoints" / "step_2" / "COMPLETE").exists()
    # the checkout's script, started from elsewhere, with the installed package
    _run(
        installed,
        [python, str(ROOT / "train_helios.py"), f"hydra.run.dir={tmp_path / 'b'}", *train],
        tmp_path,
    )
    assert (tmp_path / "b" / "config.yaml").exists()
    _run(
        installed,
        [python, "-m", "helios.export", f"checkpoint={tmp_path / 'a'}", f"output={tmp_path / 'e'}"],
        tmp_path,
    )
    assert (tmp_path / "e" / "model_index.json").exists()


def test_an_installed_package_launches_without_a_checkout(installed, tmp_path):
    """``torchrun -m helios.train`` and the launchers (shipped as helios/launch, found by ``helios launch``)
    from a directory that holds no checkout."""
    python = str(installed / "bin" / "python")
    folder = Path(_run(installed, ["helios", "launch", "path"], tmp_path).stdout.strip())
    assert folder.is_relative_to(installed) and (folder / "helios.sbatch").exists()
    train = ["trainer.max_steps=1", "validation.enabled=false", "trainer.progress=false"]
    torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    _run(installed, [*torchrun, "-m", "helios.train", f"hydra.run.dir={tmp_path / 'ddp'}", *train], tmp_path)
    assert (tmp_path / "ddp" / "checkpoints" / "step_1" / "COMPLETE").exists()
    env_run = dict(NPROC_PER_NODE="1", HELIOS_PYTHON=python, MASTER_PORT="29517")
    out = subprocess.run(
        ["helios", "launch", "torchrun", f"hydra.run.dir={tmp_path / 'launched'}", *train],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            **env_run,
            "PATH": f"{installed / 'bin'}:{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1",
        },
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "launched" / "checkpoints" / "step_1" / "COMPLETE").exists()
