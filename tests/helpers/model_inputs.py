"""Inputs of one forward of the tiny Helios transformer (history included), for model-level tests."""

import torch

from helios.core.history import HistoryLayout


def tiny_model_inputs() -> dict:
    gen = torch.Generator().manual_seed(3)
    layout = HistoryLayout(4, 2, 1, 3)
    hist = layout.model_inputs(
        torch.randn(2, 16, 7, 8, 8, generator=gen), torch.randn(2, 16, 1, 8, 8, generator=gen)
    )
    return dict(
        hidden_states=torch.randn(2, 16, 3, 8, 8, generator=gen),
        timestep=torch.tensor([300.0, 800.0]),
        encoder_hidden_states=torch.randn(2, 32, 32, generator=gen),
        **hist,
    )
