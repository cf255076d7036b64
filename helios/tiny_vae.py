"""Train the tiny default's VAE: a small ``AutoencoderKLWan`` fitted to the moving-shapes world, so that

Entry point only (it imports nothing heavy): the implementation and its documentation are in
``helios/commands/tiny_vae_training.py``.
"""

from helios.config.entry import command
from helios.config.schema import TinyVaeConfig

main = command("tiny_vae", TinyVaeConfig, "helios.commands.tiny_vae_training:run")

if __name__ == "__main__":
    main()
