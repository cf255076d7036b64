"""``python -m helios.export checkpoint=PATH output=DIR``: a training checkpoint -> diffusers format.

Entry point only (it imports nothing heavy): the implementation and its documentation are in
``helios/commands/diffusers_export.py``.
"""

from helios.config.entry import command
from helios.config.schema import ExportConfig

main = command("export", ExportConfig, "helios.commands.diffusers_export:export")

if __name__ == "__main__":
    main()
