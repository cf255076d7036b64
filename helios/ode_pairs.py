"""``python -m helios.ode_pairs teacher=PATH output=DIR``: ODE-pair shards for Staged ODE Init (§3.4.2).

Entry point only (it imports nothing heavy): the implementation and its documentation are in
``helios/commands/teacher_ode_pairs.py``.
"""

from helios.config.entry import command
from helios.config.schema import OdePairsConfig

main = command("ode_pairs", OdePairsConfig, "helios.commands.teacher_ode_pairs:run")

if __name__ == "__main__":
    main()
