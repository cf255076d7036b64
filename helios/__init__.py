"""Helios training framework: stage 1-3 training of the Helios autoregressive video DiT."""

__version__ = "0.1.0"
