"""``python -m helios.prepare input=PATH output=DIR``: raw videos + captions -> latent shards.

Entry point only (it imports nothing heavy): the implementation and its documentation are in
``helios/commands/latent_shards.py``.
"""

from helios.config.entry import command
from helios.config.schema import PrepareConfig

main = command("prepare", PrepareConfig, "helios.commands.latent_shards:run")

if __name__ == "__main__":
    main()
