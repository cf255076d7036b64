"""``python -m helios.memory [training overrides] world_size=N``: what a training config holds per GPU
and in each node's host memory, counted without weights or a GPU (paper §4.2: four 14B models on 80 GB).

The transformers of the config are built on the meta device at their real shapes (the shape fields
of ``model.transformer``, or the ``config.json`` of ``model.transformer.path`` when it exists), with
the adapters each role gets (``Stage.role_loras``); every parameter is counted in the dtype the
trainer gives it (frozen: the compute dtype, trainable: fp32). Activations are counted, not guessed:
a forward under fake tensors of each role that trains, at the configured micro-batch and the real
token counts, under bf16 autocast, records every tensor autograd saves, with gradient checkpointing
as configured; the backward adds the largest block's own saved tensors (recomputed one block at a
time). Placements follow the trainer: DDP replicates (gradients as bucket views, no second copy;
the AdamW state sharded with ``parallel.shard_optimizer``), ZeRO-2 partitions gradients and optimizer
state, ZeRO-3 also the weights, the offload pool keeps
frozen bases in pinned host memory and makes resident what stage 3's step activates
(``offload_schedule``). Not counted: the CUDA context, allocator fragmentation, communication
buffers of NCCL, the GAN heads' activations, the VAE and text encoder (they live on the CPU between
validations).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from helios.config.schema import KernelsConfig
from helios.core.history import HistoryLayout
from helios.infra.offload import ALIGN
from helios.infra.resolve import resolve_precision
from helios.model import apply_lora, build_transformer
from helios.model.gan import GanHeads
from helios.model.lora import lora_inputs_uncast
from helios.model.transformer import frozen_dtypes
from helios.stages import STAGES

GIB = 2**30
SHAPE_KEYS = (
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
    "rope_dim",
)


def offload_schedule(d) -> list[tuple[set[str], str | None]]:
    """Stage 3 (post, ``distill.offload=true``): (roles activated, role in flight) at each point of a
    step, as helios/stages/distilled/post.py activates them: placement / validation; the generator's
    rollout; the real score (+ the critic's base) for the DMD gradient while the generator's graph waits; the
    generator's backward (with the critic when the GAN term's graph runs through it); the critic's
    losses and backward. In flight only with ``distill.offload_prefetch``.
    tests/commands/test_memory.py checks it against real steps."""

    def ahead(role: str) -> str | None:
        return role if d.offload_prefetch else None

    uncached_gan = d.gan.enabled and not d.cache_gan_grad
    return [
        ({"generator"}, None),
        ({"generator"}, ahead("critic")),
        ({"critic", "real"}, ahead("generator")),
        ({"generator", "critic"} if uncached_gan else {"generator"}, ahead("critic")),
        ({"critic"}, ahead("generator")),
    ]


@dataclass
class Item:
    """One category: bytes on each GPU and in each rank's host memory, held always, during the training
    step only (activations), while a checkpoint is written only, or while the models are built."""

    category: str
    gpu: float = 0.0
    host: float = 0.0
    when: str = "always"  # always | step | checkpoint | build


@dataclass
class Role:
    """A transformer of the step, built under fake tensors."""

    name: str
    module: nn.Module
    frozen: list[int]  # bytes of each frozen tensor in the compute dtype
    trainable: int  # trainable parameters (fp32)
    largest_block: int  # bytes of the largest block's frozen weights (ZeRO-3 gathers one at a time)


def _shape_overrides(cfg) -> dict:
    """The transformer's shape: the pretrained directory's config.json when it is here, else the
    config's own shape fields (the 14B defaults of the schema)."""
    t = cfg.model.transformer
    if t.path:
        for config in (Path(t.path) / (t.subfolder or "") / "config.json", Path(t.path) / "config.json"):
            if config.exists():
                found = json.loads(config.read_text())
                return {k: found[k] for k in SHAPE_KEYS if k in found}
    return {}


def build_roles(cfg, compute_dtype: torch.dtype) -> list[Role]:
    """Every transformer the stage builds, with its adapters, under fake tensors (no memory, no files)."""

    shape = {k: (list(v) if isinstance(v, tuple) else v) for k, v in _shape_overrides(cfg).items()}
    tcfg = replace(cfg.model.transformer, source="random", path=None, **shape)
    roles = []
    for name, lora in STAGES[cfg.stage](cfg).role_loras().items():
        with torch.device("meta"):
            model = build_transformer(tcfg, KernelsConfig(), "sdpa")  # kernels do not change the weights
            model = apply_lora(model, lora) if lora is not None else model.requires_grad_(False)
        params = dict(model.named_parameters())  # frozen bytes in training (diffusers' fp32 modules fp32)
        nbytes = {
            id(params[n]): params[n].numel() * d.itemsize
            for n, d in frozen_dtypes(model, compute_dtype).items()
        }
        frozen = list(nbytes.values())
        blocks = [sum(nbytes.get(id(p), 0) for p in b.parameters()) for b in model.blocks]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        roles.append(Role(name, model, frozen, trainable, max(blocks, default=0)))
    return roles


def gan_head_parameters(cfg, roles: list[Role]) -> int:
    """Trainable parameters of stage 3's GAN heads (the critic's group)."""

    d = cfg.distill
    fake = next((r for r in roles if r.name == "fake"), None)
    if fake is None or not d.gan.enabled:
        return 0
    c = fake.module.config
    with torch.device("meta"):
        heads = GanHeads(
            d.gan.layers,
            c.num_layers,
            c.num_attention_heads * c.attention_head_dim,
            d.gan.dim,
            out_channels=c.out_channels if d.gan.output_head else None,
        )
        return sum(p.numel() for p in heads.parameters())


def _to_fake(module: nn.Module, mode, compute_dtype: torch.dtype) -> None:
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


def activation_bytes(
    cfg,
    role: Role,
    batch: int,
    latent_hw: tuple[int, int],
    compute_dtype: torch.dtype,
    noisy_hw: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """(bytes autograd saves in one training forward of ``role`` with gradient checkpointing as
    configured, the largest block's own saved bytes: the extra of recomputing it in the backward).
    ``noisy_hw``: the noisy window's latent size when it is not ``latent_hw`` (a pyramid stage, a GAN
    crop); the history keeps ``latent_hw``."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.multiprocessing.reductions import StorageWeakRef

    layout = HistoryLayout.from_config(cfg.history)
    model, c = role.module, role.module.config
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _to_fake(model, mode, compute_dtype)
    h, w = latent_hw
    saved: list[int] = []
    per_block: dict[int, int] = {}
    current: list[int] = []

    weights = {StorageWeakRef(p.untyped_storage()) for p in model.parameters()}
    seen: set = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        """Each storage once (every block's checkpoint holds the same timestep projection; views share
        their base), parameters not at all (counted as weights)."""
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

    def leave() -> None:
        current.pop()

    hooks = []
    for i, block in enumerate(model.blocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: enter(i)))
        hooks.append(block.register_forward_hook(lambda m, a, o: leave()))
    checkpointing = model.is_gradient_checkpointing

    def forward(checkpoint: bool) -> int:
        saved.clear()
        seen.clear()
        if checkpoint:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
        with mode:
            x = torch.zeros(batch, c.in_channels, layout.window, *(noisy_hw or (h, w)))
            history = torch.zeros(batch, c.in_channels, layout.num_history, h, w)
            inputs = layout.model_inputs(history, torch.zeros(batch, c.in_channels, 1, h, w))
            embeds = torch.zeros(batch, cfg.model.text_encoder.max_sequence_length, c.text_dim)
            with (
                torch.autocast("cpu", dtype=torch.bfloat16),
                lora_inputs_uncast(model, autocast=True),  # as the trainer's step
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            ):
                model(
                    hidden_states=x.requires_grad_(),
                    timestep=torch.zeros(batch),
                    encoder_hidden_states=embeds,
                    **inputs,
                    return_dict=False,
                )
        return sum(saved)

    try:
        whole = forward(checkpoint=False)
        block_peak = max(per_block.values(), default=0)
        total = forward(checkpoint=True) if checkpointing else whole
    finally:
        for hook in hooks:
            hook.remove()
        if checkpointing:
            model.enable_gradient_checkpointing()
    return total, block_peak if checkpointing else 0


def pinned_bytes(sizes: list[int]) -> int:
    """Host bytes of the offload pool's buffer for tensors of ``sizes`` bytes: one exact-size
    allocation, each tensor 16-byte aligned (helios/infra/offload.py)."""

    return sum(-(-n // ALIGN) * ALIGN for n in sizes)


GROUP_OF = {"model": "model", "generator": "generator", "fake": "critic", "real": "real"}  # role -> group


def weight_items(role: Role, trainable: int, kind: str, p, world_size: int, offload: bool) -> list[Item]:
    """One role's frozen base (unless in the offload pool), trainable weights, gradients and AdamW
    state under its backend (``ddp`` replicates, but for the AdamW state with ``shard_optimizer``;
    ``zero2`` partitions gradients and optimizer state,
    ``zero3`` the weights too)."""
    label, base = role.name, sum(role.frozen)
    items = []
    if kind == "zero3" and not offload:  # its partition + the gathered block in flight
        resident, on_host = base / world_size + 2 * role.largest_block, p.zero_offload_params
        items.append(
            Item(
                f"{label}: frozen base (ZeRO-3 partition + gathered)",
                0 if on_host else resident,
                base / world_size if on_host else 0,
            )
        )
    elif not offload:
        items.append(Item(f"{label}: frozen base", base))
    if not trainable:
        return items
    shard = world_size if kind in ("zero2", "zero3") else 1
    bucket = p.zero_bucket_size * 4 if shard > 1 else 0  # fp32 gradient elements
    zero1 = kind == "ddp" and p.shard_optimizer  # ZeroRedundancyOptimizer: AdamW state only
    optimizer = 8 * trainable / (world_size if zero1 else shard)
    on_host = shard > 1 and p.zero_offload_optimizer
    return [
        *items,
        Item(f"{label}: trainable weights (fp32)", 4 * trainable / (world_size if kind == "zero3" else 1)),
        Item(f"{label}: gradients (fp32)", 4 * trainable / shard + bucket),
        Item(f"{label}: AdamW state (fp32)", 0 if on_host else optimizer, optimizer if on_host else 0),
    ]


def offload_items(cfg, roles: list[Role]) -> list[Item]:
    """The offload pool: the bases resident and in flight at the step's peak (``offload_schedule``) on
    the GPU, every base pinned on the host."""
    bases = {GROUP_OF[r.name]: sum(r.frozen) for r in roles}
    peak = max(
        sum(bases.get(r, 0) for r in resident) + (bases.get(ahead, 0) if ahead not in resident else 0)
        for resident, ahead in offload_schedule(cfg.distill)
    )
    return [
        Item("frozen bases resident + in flight (offload peak)", peak),
        Item(
            "offloaded bases, pinned (one exact-size buffer per role)",
            0,
            sum(pinned_bytes(r.frozen) for r in roles),
        ),
    ]


def stage3_graphs(
    cfg, latent_hw: tuple[int, int]
) -> dict[str, list[list[tuple[tuple[int, int] | None, int]]]]:
    """Stage-3 post's two graphs, each alive alone (the generator's backward runs before the critic's
    forward), as parts backpropagated one after the other: per part, the noisy sizes of the forwards it
    keeps for its backward, with their counts. The generator: the exit step of each pyramid stage
    (Staged Backward Simulation, the stage sizes halved from the full one), + the discriminator on the
    crop when the GAN gradient is not cached; the critic: its flow-matching forward, then three
    discriminator forwards on the crop with the GAN (real, fake and the approximate R1's perturbed real;
    its D(real) is the GAN loss's) - a second part under DDP with ``distill.critic_backward=parts``, the
    same graph otherwise (a ZeRO engine takes one backward per micro-batch)."""
    d = cfg.distill
    h, w = latent_hw
    stages = len(d.steps)
    crop = (max(2, int(h * d.gan.crop) // 2 * 2), max(2, int(w * d.gan.crop) // 2 * 2))
    generator = [((h >> (stages - 1 - k), w >> (stages - 1 - k)), 1) for k in range(stages)]
    critic: list[list] = [[(None, 1)]]
    if d.gan.enabled:
        if d.critic_backward == "parts" and cfg.parallel.role_backend("critic") == "ddp":
            critic.append([(crop, 3)])
        else:
            critic[0].append((crop, 3))
        if not d.cache_gan_grad:
            generator.append((crop, 1))
    return {"generator": [generator], "fake": critic}


def estimate(cfg, world_size: int, latent_hw: tuple[int, int]) -> list[Item]:
    """Every category per GPU and per rank's host memory for ``cfg`` on ``world_size`` ranks."""

    dtype = resolve_precision(cfg, torch.device("cuda"))
    roles = build_roles(cfg, dtype)
    by_name = {r.name: r for r in roles}
    heads = gan_head_parameters(cfg, roles)
    p = cfg.parallel
    post = cfg.stage == 3 and cfg.distill.phase != "ode"
    offload = cfg.stage == 3 and cfg.distill.offload
    items: list[Item] = []
    for role in roles:
        trainable = role.trainable + (heads if role.name == "fake" else 0)
        items += weight_items(role, trainable, p.role_backend(GROUP_OF[role.name]), p, world_size, offload)
    if post:
        items.append(Item("EMA shard (fp32)", 4 * by_name["generator"].trainable / world_size))
    if offload:
        items += offload_items(cfg, roles)
    b = cfg.trainer.batch_size
    graphs = stage3_graphs(cfg, latent_hw) if post else {r.name: [[(None, 1)]] for r in roles if r.trainable}
    saved, recompute, counted = {}, 0, {}
    for name, parts in graphs.items():  # one role's graph (one part of it) at a time
        saved[name] = 0
        for forwards in parts:
            part = 0
            for hw, count in forwards:
                if (name, hw) not in counted:
                    counted[name, hw] = activation_bytes(cfg, by_name[name], b, latent_hw, dtype, hw)
                total, block = counted[name, hw]
                part += count * total
                recompute = max(recompute, block)
            saved[name] = max(saved[name], part)
    largest = max(saved, key=saved.get)
    label = f"activations saved for backward (batch {b}, counted; the largest graph: {largest})"
    items.append(Item(label, saved[largest], when="step"))
    items.append(Item("backward: one block recomputed (gradient checkpointing)", recompute, when="step"))
    gathered = [  # save_checkpoint gathers every ZeRO-3 role's full weights at once
        r for r in roles if not offload and p.role_backend(GROUP_OF[r.name]) == "zero3"
    ]
    if gathered:
        full = sum((sum(r.frozen) + 4 * r.trainable) * (1 - 1 / world_size) for r in gathered)
        names = ", ".join(r.name for r in gathered)
        items.append(Item(f"checkpoint: ZeRO-3 weights gathered ({names})", full, when="checkpoint"))
        # the trainer moves the built model to the GPU before DeepSpeed partitions its ZeRO-3 roles
        whole = sum(sum(r.frozen) + 4 * r.trainable for r in roles) + 4 * heads
        items.append(
            Item("start-up: every role on the GPU before ZeRO-3 partitions it", whole, when="startup")
        )
    items.append(build_host(cfg, roles, dtype))
    return items


def build_host(cfg, roles: list[Role], dtype: torch.dtype) -> Item:
    """Host memory per rank while the models are built, as the code builds them: each base is loaded
    once in the compute dtype and held by its role itself (``Stage.build_model``: the state's tensors
    assigned, no second copy; a merged ``init_from`` chain rebuilds one model at a time), so the peak
    is every role's frozen base (a separate real score: its own copy) plus its fp32 trainable weights.
    The offload pool then copies each base tensor by tensor into its host buffer (counted as steady
    host memory)."""
    held = sum(sum(r.frozen) + 4 * r.trainable for r in roles)
    return Item(
        f"host at build: {len(roles)} bases in {str(dtype).removeprefix('torch.')}", 0, held, when="build"
    )


def report(items: list[Item], gpus_per_node: int) -> tuple[str, float, float]:
    """The table, the peak GiB per GPU (the training step, writing a checkpoint or starting up, whichever
    is largest) and host GiB per node (steady state or model building, whichever is larger)."""

    def total(field: str, *when: str) -> float:
        return sum(getattr(i, field) for i in items if i.when in when)

    step, ckpt = total("gpu", "always", "step"), total("gpu", "always", "checkpoint")
    startup = total("gpu", "startup")  # alone: nothing else is on the GPU yet
    steady, build = total("host", "always", "step"), total("host", "build")
    lines = [f"{'category':<70} {'GiB/GPU':>8} {'GiB host/rank':>14}"]
    lines += [f"{i.category:<70} {i.gpu / GIB:>8.2f} {i.host / GIB:>14.2f}" for i in items]
    lines.append(f"{'training step':<70} {step / GIB:>8.2f} {steady / GIB:>14.2f}")
    if ckpt > total("gpu", "always"):
        lines.append(f"{'writing a checkpoint':<70} {ckpt / GIB:>8.2f}")
    if startup:
        lines.append(f"{'starting up':<70} {startup / GIB:>8.2f}")
    lines.append(f"{'building the models':<70} {'':>8} {build / GIB:>14.2f}")
    return "\n".join(lines), max(step, ckpt, startup) / GIB, gpus_per_node * max(steady, build) / GIB


def print_report(cfg, world_size: int, gpus_per_node: int, height: int, width: int) -> None:
    """Print every category per GPU and per node; the last line is ``peak_gib_per_gpu=<x>
    host_gib_per_node=<y>``."""
    items = estimate(cfg, world_size, (height // 8, width // 8))
    table, gpu, host = report(items, gpus_per_node)
    print(
        f"helios.memory: stage {cfg.stage} ({cfg.phase}), parallel={cfg.parallel.backend}, "
        f"world_size={world_size}, {height}x{width}"
    )
    print(table)
    print(f"peak_gib_per_gpu={gpu:.1f} host_gib_per_node={host:.1f}")
