"""Tiny models in the *published* layouts, to rehearse the real recipe without downloading 14B weights.

Entry point only (it imports nothing heavy): the implementation and its documentation are in
``helios/commands/published_fixtures.py``.
"""

from helios.config.entry import command
from helios.config.schema import FixturesConfig

main = command("fixtures", FixturesConfig, "helios.commands.published_fixtures:run")

if __name__ == "__main__":
    main()
