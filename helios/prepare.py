"""``python -m helios.prepare input=PATH output=DIR``: raw videos + captions -> latent shards.

Entry point only (it imports nothing heavy): the implementation and its documentation are in
``helios/commands/prepare.py``.
"""

from helios.config.entry import command
from helios.config.schema import PrepareConfig

main = command("prepare", PrepareConfig, "helios.commands.prepare:run")

if __name__ == "__main__":
    main()
