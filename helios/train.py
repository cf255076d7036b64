"""``python -m helios.train [key=value ...]`` and ``torchrun ... -m helios.train ...``: the trainer
(``train_helios.py``, installed with the package) from any directory, without a checkout; the launchers in
``helios/launch`` start it this way."""

import runpy

if __name__ == "__main__":
    runpy.run_module("train_helios", run_name="__main__", alter_sys=True)
