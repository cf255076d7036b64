"""Data: synthetic videos, decoding, latent shards, training clips."""
