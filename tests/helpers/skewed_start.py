"""Start ``train_helios.py`` (path in argv[1]) after a rank-dependent delay: rank r waits 1.5·r s, so the
ranks of one launch start the trainer in different seconds (as ranks do on a loaded cluster)."""

import os
import runpy
import sys
import time

time.sleep(1.5 * int(os.environ.get("RANK", "0")))
script, *args = sys.argv[1:]
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
