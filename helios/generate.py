"""``python -m helios.generate checkpoint=PATH prompt="..." num_frames=N output=FILE.mp4``.

Entry point only (it imports nothing heavy): the implementation and its documentation are in
``helios/commands/video_generation.py``.
"""

from helios.config.entry import command
from helios.config.schema import GenerateConfig

main = command("generate", GenerateConfig, "helios.commands.video_generation:run")

if __name__ == "__main__":
    main()
