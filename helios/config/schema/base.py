"""Schema building blocks: :class:`ConfigError`, the field checks and the :class:`Validated` mixin.

Each dataclass validates its own fields in ``validate(prefix)``; cross-field rules live in
:meth:`helios.config.schema.root.TrainConfig.validate`.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass

# The negative prompt of the reference code's training (its DataConfig.negative_prompt, Wan's): the real
# score's unconditional branch in stage 3, encoded by helios.prepare next to the empty prompt.
REFERENCE_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still "
    "picture, messy background, three legs, many people in the background, walking backwards"
)


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"config error at '{key}': {reason}")
        self.key = key
        self.reason = reason


def check(cond: bool, key: str, reason: str) -> None:
    if not cond:
        raise ConfigError(key, reason)


def choice(value: str, options: tuple[str, ...], key: str) -> None:
    check(value in options, key, f"must be one of {list(options)}, got {value!r}")


def check_range(values: list[float], key: str, lo: float, hi: float) -> None:
    check(len(values) == 2, key, f"must be a [min, max] pair, got {values}")
    check(lo <= values[0] <= values[1] <= hi, key, f"must satisfy {lo} <= min <= max <= {hi}, got {values}")


class Validated:
    """Mixin: validate this node, then every nested dataclass field."""

    def validate(self, prefix: str = "") -> None:
        self._validate(prefix)
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if is_dataclass(value) and isinstance(value, Validated):
                value.validate(f"{prefix}{f.name}.")

    def _validate(self, prefix: str) -> None:  # overridden where a node has rules
        return None
