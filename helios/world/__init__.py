"""The moving-shapes world of the tiny default: its renderer and its ground-truth measures."""
