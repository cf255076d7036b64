"""Gradient checkpointing with the blocks' saved inputs in host memory (model.transformer.checkpoint_offload,
issue #32): the same outputs and gradients, and no block input left referenced on the device."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from helios.config import ConfigError, compose
from helios.model import build_transformer
from helios.model.activation_offload import OffloadedCheckpoint, offloaded_checkpoint
from tests.helpers.model_inputs import tiny_model_inputs
from tests.helpers.runs import train_in_process as _train


def _step(offload: bool, probe=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    overrides = ["model.transformer.gradient_checkpointing=true"]
    overrides += ["model.transformer.checkpoint_offload=true"] if offload else []
    model = build_transformer(compose(overrides).model.transformer)
    model.requires_grad_(True)
    if probe is not None:
        probe(model)
    out = model(**tiny_model_inputs(), return_dict=False)[0]
    if probe is not None:
        gc.collect()
        probe(None)
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_offloaded_checkpointing_computes_what_checkpointing_computes():
    out, grads = _step(offload=False)
    out_offload, grads_offload = _step(offload=True)
    assert torch.equal(out, out_offload)
    assert grads.keys() == grads_offload.keys() and all(
        torch.equal(grads[k], grads_offload[k]) for k in grads
    )


@pytest.mark.parametrize("offload", [False, True])
def test_no_block_input_stays_referenced_between_the_forward_and_the_backward(offload):
    """Each block's input is held by the checkpoint until the backward: with the offload, by its host copy
    only (the tensor the previous block returned is freed), without it, by the device tensor itself."""
    inputs: list[weakref.ref] = []
    alive: list[int] = []
    moved: list[OffloadedCheckpoint | None] = []

    def probe(model):
        if model is None:  # after the forward (the backward's recomputation calls the blocks again)
            alive.append((sum(ref() is not None for ref in inputs), len(inputs)))
            return
        moved.append(offloaded_checkpoint(model))
        for block in model.blocks[1:]:  # block 0's input is the patch embedding's output
            block.register_forward_pre_hook(lambda m, args: inputs.append(weakref.ref(args[0])))

    _step(offload, probe)
    [(referenced, blocks)] = alive
    assert blocks >= 1 and referenced == (0 if offload else blocks)
    if offload:
        assert moved[0].moved_bytes == (blocks + 1) * moved[0].largest_bytes > 0


def test_checkpoint_offload_needs_checkpointing():
    with pytest.raises(ConfigError, match=r"model\.transformer\.checkpoint_offload.*gradient_checkpointing"):
        compose(["model.transformer.checkpoint_offload=true"])


def test_a_run_with_offloaded_activations_trains_exactly_as_without(tmp_path):
    common = [
        "trainer.max_steps=3",
        "trainer.checkpoint_every=0",
        "model.transformer.gradient_checkpointing=true",
    ]
    plain = _train(common, tmp_path / "plain")
    offload = _train([*common, "model.transformer.checkpoint_offload=true"], tmp_path / "offload")
    assert [m["loss"] for m in offload] == [m["loss"] for m in plain]
