"""The commands' implementations (``run(config)`` each). ``python -m helios.<command>`` runs a thin entry
module (``helios/<command>.py``) that parses and validates the config first and imports its
implementation from here only then, so ``--help`` and a bad config answer before torch and diffusers load."""
