"""Infrastructure: process groups, atomic checkpoints, ZeRO engines, per-role DDP, VRAM offload, sharded
EMA, step guards, metrics and tracking."""
