"""Settings that need an optional package (pyproject's extras) are refused at start-up when it is missing,
naming the setting and the install command, before anything is built."""

import importlib.util
import subprocess
import sys

import pytest

from helios.config import compose
from helios.config.schema import ConfigError
from helios.infra import resolve
from tests.helpers.runs import ROOT


@pytest.mark.parametrize(
    ("override", "package", "key", "extra"),
    [
        ("parallel=zero2", "deepspeed", "parallel", "cluster"),
        ("logging.wandb=true", "wandb", "logging.wandb", "cluster"),
        ("model.kernels.rope=triton", "triton", "model.kernels.rope", "gpu"),
    ],
)
def test_a_setting_without_its_package_is_a_config_error(monkeypatch, override, package, key, extra):
    cfg = compose([override])
    resolve.check_installed(cfg)  # installed here (the dev extra)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a)
    )
    with pytest.raises(
        ConfigError, match=rf"needs the {package} package: pip install 'helios-train\[{extra}\]'"
    ) as e:
        resolve.check_installed(cfg)
    assert e.value.key == key
    resolve.check_installed(compose([]))  # the tiny default needs none of them


def test_the_trainer_refuses_before_building_anything(tmp_path):
    """The whole command: exit 2, one line, no run dir content (deepspeed hidden from the process)."""
    code = (
        "import sys, importlib.util as u; real = u.find_spec; "
        "u.find_spec = lambda n, *a: None if n == 'deepspeed' else real(n, *a); "
        f"sys.argv = ['train_helios.py', 'parallel=zero2', 'hydra.run.dir={tmp_path / 'run'}']; "
        "import runpy; runpy.run_path('train_helios.py', run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "parallel=zero2 needs the deepspeed package" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_tiny_job_trains_without_the_extras(tmp_path):
    """A laptop install (no extras: triton, deepspeed, wandb, submitit unimportable) trains the tiny job."""
    code = (
        "import sys\n"
        "for name in ('triton', 'deepspeed', 'wandb', 'submitit', 'hydra_plugins.hydra_submitit_launcher'):\n"
        "    sys.modules[name] = None\n"
        f"sys.argv = ['train_helios.py', 'trainer.max_steps=1', 'validation.enabled=false', "
        f"'hydra.run.dir={tmp_path / 'run'}']\n"
        "import runpy\n"
        "runpy.run_path('train_helios.py', run_name='__main__')\n"
        "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step_1" / "COMPLETE").exists()
