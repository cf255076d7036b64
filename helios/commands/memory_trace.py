"""Memory counted under fake tensors, for ``python -m helios.memory``: what autograd saves in a training
forward, the peak of live bytes over a forward and its backward, and the peak of an inference forward
(no weights, no GPU: the ops run on FakeTensorMode, which computes shapes and dtypes only).

:class:`LiveBytes` is the counter behind the peaks; on real CPU tensors it reads the same peak as the torch
profiler's memory events of the step (tests/commands/test_memory.py), so a fake count is what the
allocator would see, before the caching allocator's rounding and fragmentation.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from helios.core.history import HistoryLayout
from helios.model.activation_offload import offloaded_checkpoint
from helios.model.lora import lora_inputs_uncast
from helios.model.transformer import frozen_dtypes


class LiveBytes(TorchDispatchMode):
    """The bytes of the storages the ops under it create that are still alive, and their peak: a storage is
    counted once, when an op first returns it, and released when it dies; storages registered with
    :meth:`ignore` (weights, preallocated gradients, counted elsewhere) never count."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.sizes: dict[StorageWeakRef, int] = {}
        self.ignored: set[StorageWeakRef] = set()

    def ignore(self, tensors) -> None:
        self.ignored.update(StorageWeakRef(t.untyped_storage()) for t in tensors if t is not None)

    def _release(self, key: StorageWeakRef) -> None:
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = StorageWeakRef(storage)
                if key not in self.sizes and key not in self.ignored:
                    self.sizes[key] = storage.nbytes()
                    self.live += self.sizes[key]
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key)
        return out


def to_fake(module: nn.Module, mode, compute_dtype: torch.dtype) -> None:
    """Meta parameters and buffers -> fake CPU tensors (frozen in their training dtypes, trainable fp32),
    assigned in place: fake tensors cannot go through ``Module.to``."""

    frozen = frozen_dtypes(module, compute_dtype)
    with mode:
        for prefix, sub in module.named_modules():
            for key, p in sub._parameters.items():
                if p is not None:
                    name = f"{prefix}.{key}" if prefix else key
                    dtype = torch.float32 if p.requires_grad else frozen.get(name, compute_dtype)
                    fake = torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype)
                    sub._parameters[key] = nn.Parameter(fake, requires_grad=p.requires_grad)
            for key, b in sub._buffers.items():
                if b is not None:
                    sub._buffers[key] = torch.empty(b.shape, dtype=b.dtype)


@dataclass
class Inputs:
    """A forward's inputs at the real token counts: the noisy window (``noisy_hw``: a pyramid stage or GAN
    crop; else ``latent_hw``), the history at ``latent_hw``, the padded text embeddings."""

    batch: int
    latent_hw: tuple[int, int]
    noisy_hw: tuple[int, int] | None = None

    def forward(self, cfg, model: nn.Module, grad: bool) -> torch.Tensor:
        """The model's output under bf16 autocast (and the LoRA inputs as the trainer's step feeds them);
        call under the fake mode."""
        layout, c = HistoryLayout.from_config(cfg.history), model.config
        b, (h, w) = self.batch, self.latent_hw
        x = torch.zeros(b, c.in_channels, layout.window, *(self.noisy_hw or (h, w)))
        history = torch.zeros(b, c.in_channels, layout.num_history, h, w)
        inputs = layout.model_inputs(history, torch.zeros(b, c.in_channels, 1, h, w))
        embeds = torch.zeros(b, cfg.model.text_encoder.max_sequence_length, c.text_dim)
        with (
            torch.autocast("cpu", dtype=torch.bfloat16),
            lora_inputs_uncast(model, autocast=grad),
            torch.set_grad_enabled(grad),
        ):
            return model(
                hidden_states=x.requires_grad_(grad),
                timestep=torch.zeros(b),
                encoder_hidden_states=embeds,
                **inputs,
                return_dict=False,
            )[0]


def saved_bytes(cfg, model: nn.Module, inputs: Inputs, mode) -> tuple[int, int]:
    """(bytes autograd saves in one training forward of the fake ``model`` with gradient checkpointing
    as configured, the largest block's own saved bytes: the extra of recomputing it in the backward).
    Each storage counts once (every block's checkpoint holds the same timestep projection; views share
    their base), parameters not at all (counted as weights)."""

    saved: list[int] = []
    per_block: dict[int, int] = {}
    current: list[int] = []
    weights = {StorageWeakRef(p.untyped_storage()) for p in model.parameters()}
    seen: set = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = StorageWeakRef(t.untyped_storage())
        if key in weights or key in seen:
            return t
        seen.add(key)
        nbytes = t.untyped_storage().nbytes()
        saved.append(nbytes)
        if current:
            per_block[current[-1]] = per_block.get(current[-1], 0) + nbytes
        return t

    def enter(i: int) -> None:
        current.append(i)

    def leave() -> None:  # a forward hook that returned a value would replace the block's output
        current.pop()

    hooks = []
    for i, block in enumerate(model.blocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: enter(i)))
        hooks.append(block.register_forward_hook(lambda m, a, o: leave()))
    checkpointing = model.is_gradient_checkpointing
    offload = offloaded_checkpoint(model)  # its hooks pack the blocks' inputs: counted by it, or here
    if offload is not None:
        offload.keep = pack

    def forward(checkpoint: bool) -> int:
        saved.clear()
        seen.clear()
        if checkpoint:
            model.enable_gradient_checkpointing(offload)
            if offload is not None:
                offload.moved_bytes = offload.largest_bytes = 0
        else:
            model.disable_gradient_checkpointing()
        with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            inputs.forward(cfg, model, grad=True)
        return sum(saved)

    try:
        whole = forward(checkpoint=False)
        block_peak = max(per_block.values(), default=0)
        total = forward(checkpoint=True) if checkpointing else whole
    finally:
        for hook in hooks:
            hook.remove()
        if checkpointing:
            model.enable_gradient_checkpointing(offload)
        if offload is not None:
            offload.keep = lambda t: t
    return total, block_peak if checkpointing else 0


def training_peak(cfg, model: nn.Module, inputs: Inputs, mode) -> tuple[int, int]:
    """(live bytes after the forward, their peak over the forward and the backward) of one training
    forward + backward of the fake ``model`` (an MSE loss on its fp32 output, as the stages' losses),
    the trainable parameters' gradients preallocated (DDP's bucket views, ZeRO's buckets: counted as
    gradients) so that what a backward computes into them is a temporary."""
    tracker = LiveBytes()
    with mode:
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    tracker.ignore([*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters())])
    with mode, tracker:
        out = inputs.forward(cfg, model, grad=True)
        after_forward = tracker.live
        out.float().square().mean().backward()
    for p in model.parameters():
        p.grad = None
    return after_forward, tracker.peak


def inference_peak(cfg, model: nn.Module, inputs: Inputs, mode) -> int:
    """Peak live bytes of one forward of the fake ``model`` without gradients (a sampling step)."""
    tracker = LiveBytes()
    tracker.ignore([*model.parameters(), *model.buffers()])
    with mode, tracker:
        inputs.forward(cfg, model, grad=False)
    return tracker.peak


def vae_decode_peak(vae: nn.Module, latents: tuple[int, ...], mode) -> int:
    """Peak live bytes of decoding fake ``latents`` of that shape with the fake ``vae`` (fp32, no
    gradients), the output frames included."""
    tracker = LiveBytes()
    tracker.ignore([*vae.parameters(), *vae.buffers()])
    with mode, tracker, torch.no_grad():
        vae.decode(torch.zeros(latents), return_dict=False)
    return tracker.peak
