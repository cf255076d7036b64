"""``python -m helios.memory [training overrides] world_size=N``: the peak memory of a training run per
GPU and per node's host, phase by phase, counted without weights or a GPU (paper §4.2: four 14B models
on 80 GB).

The transformers of the config are built on the meta device at their real shapes (the shape fields
of ``model.transformer``, or the ``config.json`` of ``model.transformer.path`` when it exists), with
the adapters each role gets (``Stage.role_loras``); every parameter is counted in the dtype the
trainer gives it (frozen: the compute dtype, trainable: fp32). Activations are counted, not guessed
(:mod:`helios.commands.memory_trace`): a forward under fake tensors of each role that trains, at the
configured micro-batch and the real token counts, under bf16 autocast, records every tensor autograd
saves, with gradient checkpointing as configured; the backward adds the largest block's own saved
tensors (recomputed one block at a time) and ``backward_transient``, the activation gradients and
temporaries of a backward, the live-bytes peak of a forward + backward of the same role cut to two
blocks less what it saved. Validation counts a sampling forward (no gradients) and the VAE decoding
a section, also as live-bytes peaks. Placements follow the trainer: DDP replicates (gradients as
bucket views, no second copy; the AdamW state sharded with ``parallel.shard_optimizer``), ZeRO-2
partitions gradients and optimizer state, ZeRO-3 also the weights, the offload pool keeps frozen bases
in pinned host memory and makes resident what stage 3's step activates (``offload_schedule``).

The phases, each a peak of its own (:func:`report`): building the models, the training step,
validation, writing a checkpoint, loading one at resume, and encoding the validation prompts at
start-up. ``runtime_overhead`` (CUDA context and library workspaces, NCCL buffers, allocator
fragmentation) is a documented constant per backend (:data:`RUNTIME_OVERHEAD_GIB`) until a GPU
calibrates it; each rank's process itself (Python, the CUDA and NCCL host libraries, data-loader
workers) is :data:`PROCESS_HOST_GIB` of host memory. Not counted: the GAN heads' activations (a few
[tokens, 1536] features per discriminator layer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from helios.commands import memory_trace as trace
from helios.config.schema import KernelsConfig
from helios.core.history import HistoryLayout
from helios.infra.node_share import aligned
from helios.infra.resolve import resolve_num_workers, resolve_precision
from helios.model import apply_lora, build_transformer
from helios.model.activation_offload import offloaded_checkpoint
from helios.model.encoders import TINY_VAE_KWARGS, tiny_text_encoder_config, tiny_tokenizer
from helios.model.gan import GanHeads
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
    step, as helios/stages/distilled/post.py activates them: validation (the pool itself starts with
    nothing resident); the generator's
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


PHASES = ("build", "prompts", "step", "validation", "checkpoint", "resume")
PHASE_NAMES = {
    "build": "building the models",
    "prompts": "start-up: encoding the validation prompts (main rank)",
    "step": "training step",
    "validation": "validation",
    "checkpoint": "writing a checkpoint",
    "resume": "loading a checkpoint at resume",
}
# runtime_overhead per GPU, GiB, until the GPU issue calibrates it: the CUDA context with cuBLAS / cuDNN
# workspaces (~1 GiB on an H100 with lazy module loading), NCCL's buffers (~0.5 GiB per communicator on
# 8 NVLink GPUs; DDP uses one, ZeRO one per engine plus its partition groups) and the caching
# allocator's fragmentation with expandable segments (every launcher sets them): ~1-2 GiB at these sizes.
RUNTIME_OVERHEAD_GIB = {"ddp": 3.0, "zero2": 3.5, "zero3": 4.0}
PROCESS_HOST_GIB = 4.0  # per rank: Python, torch, the CUDA / NCCL host libraries
LOADER_WORKER_HOST_GIB = 1.0  # per data-loader worker process of a rank


TRAINING = ("step", "validation", "checkpoint", "resume")  # the phases after the models are built


@dataclass
class Item:
    """One category: bytes on each GPU and in host memory during the phases ``when`` (default: from the
    first step on). Host bytes are per rank, or once per node (``host_per="node"``: page cache the node's
    ranks share, or what only the main rank holds)."""

    category: str
    gpu: float = 0.0
    host: float = 0.0
    when: tuple[str, ...] = TRAINING
    host_per: str = "rank"  # rank | node


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
    config = _config_json(t.path, t.subfolder)
    if config is None:
        return {}
    found = json.loads(config.read_text())
    return {k: found[k] for k in SHAPE_KEYS if k in found}


def _config_json(path: str | None, subfolder: str | None) -> Path | None:
    """A pretrained directory's ``config.json`` (in ``subfolder``, or at its top) when it is here."""
    if not path:
        return None
    for config in (Path(path) / (subfolder or "") / "config.json", Path(path) / "config.json"):
        if config.exists():
            return config
    return None


def build_roles(cfg, compute_dtype: torch.dtype, num_layers: int | None = None) -> list[Role]:
    """Every transformer the stage builds, with its adapters, on the meta device (no memory, no files);
    ``num_layers``: cut to that many blocks (the backward's transient is one block's)."""

    shape = {k: (list(v) if isinstance(v, tuple) else v) for k, v in _shape_overrides(cfg).items()}
    if num_layers is not None:
        shape["num_layers"] = min(num_layers, shape.get("num_layers", cfg.model.transformer.num_layers))
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


def pinned_bytes(sizes: list[int]) -> int:
    """Host bytes of the offload pool's buffer for tensors of ``sizes`` bytes: one exact-size
    allocation, each tensor 16-byte aligned (helios/infra/offload.py)."""

    return sum(aligned(n) for n in sizes)


GROUP_OF = {"model": "model", "generator": "generator", "fake": "critic", "real": "real"}  # role -> group


def weight_items(role: Role, trainable: int, kind: str, p, world_size: int, offload: bool) -> list[Item]:
    """One role's frozen base (unless in the offload pool), trainable weights, gradients and AdamW
    state under its backend (``ddp`` replicates, but for the AdamW state with ``shard_optimizer``;
    ``zero2`` partitions gradients and optimizer state,
    ``zero3`` the weights too)."""
    label, base = role.name, sum(role.frozen)
    items = []
    hpz = p.zero_hpz_partition_size if kind == "zero3" else 1
    if kind == "zero3" and not offload:  # its partition + the gathered block in flight
        resident, on_host = base / world_size + 2 * role.largest_block, p.zero_offload_params
        if hpz > 1:  # ZeRO++'s node-local second partition (on the device even with parameter offload)
            items.append(Item(f"{label}: frozen base, hpZ partition over {hpz} ranks", base / hpz))
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
        Item(
            f"{label}: trainable weights (fp32)",
            4 * trainable / (world_size if kind == "zero3" else 1) + (4 * trainable / hpz if hpz > 1 else 0),
        ),
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
            "offloaded bases, pinned (one exact-size buffer per role"
            + (", once per node in /dev/shm)" if cfg.parallel.node_shared_weights else ", per rank)"),
            0,
            sum(pinned_bytes(r.frozen) for r in roles),
            host_per="node" if cfg.parallel.node_shared_weights else "rank",
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


def pyramid_forwards(cfg, latent_hw: tuple[int, int]) -> list[tuple[tuple[int, int] | None, int]]:
    """Stage 2's forwards of one micro-batch: with ``pyramid.stage_draw=every`` one per pyramid stage, at
    its resolution, of ``stage_ratios[k]`` times the clips; ``random``: the worst draw, every clip at full
    resolution."""
    p = cfg.pyramid
    if p.stage_draw == "random":
        return [(None, 1)]
    h, w = latent_hw
    scale = [2 ** (p.stages - 1 - k) for k in range(p.stages)]
    return [((h // s, w // s), round(r)) for s, r in zip(scale, p.stage_ratios) if r]


@dataclass
class Activations:
    """One graph's activation bytes at the backward's peak: what its forwards saved, the largest block
    recomputed (gradient checkpointing) and ``backward_transient``, the activation gradients and
    temporaries of that block's backward."""

    role: str
    saved: int
    recompute: int
    transient: int
    host: int = 0  # the blocks' inputs in host memory (``checkpoint_offload``)

    @property
    def peak(self) -> int:
        return self.saved + self.recompute + self.transient


class Counted(NamedTuple):
    """One training forward's bytes: saved for the backward, the largest block recomputed, the transient;
    ``host``: the blocks' inputs waiting in host memory (``model.transformer.checkpoint_offload``)."""

    saved: int
    recompute: int
    transient: int
    host: int = 0


class FakeRoles:
    """The roles as fake-tensor models, whole and cut to two blocks, counted once per (role, size)."""

    def __init__(self, cfg, roles: list[Role], dtype: torch.dtype) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.cfg = cfg
        self.whole = {r.name: r for r in roles}
        self.short = {r.name: r for r in build_roles(cfg, dtype, num_layers=2)}
        self.modes = {}
        for role in [*self.whole.values(), *self.short.values()]:
            self.modes[id(role.module)] = mode = FakeTensorMode(allow_non_fake_inputs=True)
            trace.to_fake(role.module, mode, dtype)
        self.counted: dict[tuple, Counted] = {}

    def _mode(self, role: Role):
        return self.modes[id(role.module)]

    def training(self, name: str, inputs: trace.Inputs) -> Counted:
        """One training forward of role ``name`` and its backward."""
        key = (name, inputs.batch, inputs.latent_hw, inputs.noisy_hw)
        if key not in self.counted:
            whole, short = self.whole[name], self.short[name]
            saved, block = trace.saved_bytes(self.cfg, whole.module, inputs, self._mode(whole))
            offload, short_offload = offloaded_checkpoint(whole.module), offloaded_checkpoint(short.module)
            host = restored = 0
            if offload is not None:  # the blocks' inputs wait on the host; one comes back per recompute
                host, restored = offload.moved_bytes, offload.largest_bytes
            if short_offload is not None:
                short.module.enable_gradient_checkpointing()  # the transient as without (no host copies)
            after, peak = trace.training_peak(self.cfg, short.module, inputs, self._mode(short))
            if short_offload is not None:
                short.module.enable_gradient_checkpointing(short_offload)
            self.counted[key] = Counted(saved, block + restored, max(0, peak - after - block), host)
        return self.counted[key]

    def sampling(self, name: str, inputs: trace.Inputs) -> int:
        short = self.short[name]
        return trace.inference_peak(self.cfg, short.module, inputs, self._mode(short))


def count_activations(cfg, fakes: FakeRoles, latent_hw: tuple[int, int]) -> Activations:
    """The training step's activation peak: the largest of the graphs the step runs one at a time (stage
    3 post: :func:`stage3_graphs`; else one graph per trainable role); within a graph, every forward's
    saved tensors wait while the backward runs through the one with the largest recompute + transient."""
    post = cfg.stage == 3 and cfg.distill.phase != "ode"
    trainable = [r.name for r in fakes.whole.values() if r.trainable]
    forwards = pyramid_forwards(cfg, latent_hw) if cfg.stage == 2 else [(None, 1)]
    graphs = stage3_graphs(cfg, latent_hw) if post else {name: [forwards] for name in trainable}
    best: Activations | None = None
    for name, parts in graphs.items():
        for forwards in parts:  # the parts of a graph are backpropagated one after the other
            counts = [
                (count, fakes.training(name, trace.Inputs(cfg.trainer.batch_size, latent_hw, hw)))
                for hw, count in forwards
            ]
            saved = sum(count * c.saved for count, c in counts)
            widest = max((c for _, c in counts), key=lambda c: c.recompute + c.transient)
            host = sum(count * c.host for count, c in counts)
            candidate = Activations(name, saved, widest.recompute, widest.transient, host)
            if best is None or candidate.peak > best.peak:
                best = candidate
    assert best is not None
    return best


def build_vae_meta(cfg) -> nn.Module:
    """The config's VAE on the meta device: the pretrained directory's config, or (no directory here) the
    published Wan 2.1 VAE (diffusers' defaults), or the tiny one."""
    from diffusers import AutoencoderKLWan

    v = cfg.model.vae
    config = _config_json(v.path, v.subfolder) if v.source == "pretrained" else None
    with torch.device("meta"):
        if config is not None:
            return AutoencoderKLWan.from_config(json.loads(config.read_text()))
        if v.source == "pretrained":
            return AutoencoderKLWan()
        return AutoencoderKLWan(base_dim=v.base_dim, **TINY_VAE_KWARGS)


UMT5_XXL = {  # the published umt5-xxl encoder (Wan 2.1's text encoder)
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
}


def text_encoder_bytes(cfg) -> int:
    """The text encoder's weights as loaded (fp32, as stored in the Wan diffusers checkpoint)."""
    from transformers import UMT5Config, UMT5EncoderModel

    t = cfg.model.text_encoder
    config = _config_json(t.path, t.subfolder) if t.source == "pretrained" else None
    if config is not None:
        umt5 = UMT5Config.from_json_file(str(config))
    elif t.source == "pretrained":
        umt5 = UMT5Config(**UMT5_XXL)
    else:
        umt5 = tiny_text_encoder_config(t, len(tiny_tokenizer()))
    with torch.device("meta"):
        return 4 * sum(p.numel() for p in UMT5EncoderModel(umt5).parameters())


def validation_items(cfg, fakes: FakeRoles, latent_hw: tuple[int, int]) -> list[Item]:
    """Validation on every rank: a sampling forward of the trained model (batch 1, no gradients; CFG runs
    its branches one after the other), the VAE (fp32) decoding one section, and (stage 3 post) the
    training weights kept on the host while the EMA is written into the generator. The prompts'
    embeddings were encoded at start-up, so no text encoder is loaded."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    name = "generator" if "generator" in fakes.whole else "model"
    sampling = fakes.sampling(name, trace.Inputs(1, latent_hw))
    vae = build_vae_meta(cfg)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    trace.to_fake(vae, mode, torch.float32)
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    window = HistoryLayout.from_config(cfg.history).window
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decode = trace.vae_decode_peak(vae, (1, vae.config.z_dim, window, *latent_hw), mode)
    items = [
        Item("validation: sampling forward (batch 1, no gradients, counted)", sampling, when=("validation",)),
        Item(
            "validation: VAE (fp32) + decoding one section (counted)", weights + decode, when=("validation",)
        ),
        Item("VAE between validations (host, fp32)", 0, weights),
    ]
    if cfg.stage == 3 and cfg.distill.phase != "ode":
        raw = 4 * fakes.whole["generator"].trainable
        items.append(
            Item(
                "validation: the generator's training weights while the EMA samples",
                0,
                raw,
                when=("validation",),
            )
        )
    return items


def checkpoint_items(
    cfg, roles: list[Role], trainable: dict[str, int], world_size: int, offload: bool
) -> list[Item]:
    """Writing a checkpoint and loading one at resume. Writing: the main rank alone assembles what it
    writes (the trainable weights, the whole EMA, DDP's whole optimizer state), gathered to it; ZeRO
    engines write each rank's partition from its host copy; ZeRO-3 roles gather their trainable weights
    on every rank (the frozen bases stay partitioned). Loading: every rank maps the files (page cache,
    once per node) and copies each tensor into place; ZeRO engines read their partition."""
    p = cfg.parallel
    post = cfg.stage == 3 and cfg.distill.phase != "ode"
    ema = 4 * trainable["generator"] if post else 0
    ddp_trainable = sum(n for name, n in trainable.items() if p.role_backend(GROUP_OF[name]) == "ddp")
    zero_trainable = sum(trainable.values()) - ddp_trainable
    payload = 4 * sum(trainable.values()) + ema + 8 * ddp_trainable  # weights, EMA, DDP's AdamW moments
    items = [
        Item(
            "checkpoint: what the main rank writes (host)", 0, payload, when=("checkpoint",), host_per="node"
        ),
        Item(
            "resume: the checkpoint files mapped (page cache, once per node)",
            0,
            payload,
            when=("resume",),
            host_per="node",
        ),
    ]
    if ema:
        items.append(Item("checkpoint: EMA gathered on the main rank", ema, when=("checkpoint",)))
    if zero_trainable:  # fp32 master weights + AdamW moments of this rank's partition
        part = 12 * zero_trainable / world_size
        items.append(
            Item(
                "checkpoint / resume: this rank's ZeRO partition (host)",
                0,
                part,
                when=("checkpoint", "resume"),
            )
        )
    gathered = [r for r in roles if not offload and p.role_backend(GROUP_OF[r.name]) == "zero3"]
    if gathered:  # save_checkpoint gathers the ZeRO-3 roles' trainable weights (the frozen bases stay put)
        full = sum(4 * r.trainable * (1 - 1 / world_size) for r in gathered)
        names = ", ".join(r.name for r in gathered)
        items.append(
            Item(f"checkpoint: ZeRO-3 trainable weights gathered ({names})", full, when=("checkpoint",))
        )
        # the trainer moves the built model to the GPU before DeepSpeed partitions its ZeRO-3 roles
        whole = sum(sum(r.frozen) + 4 * trainable[r.name] for r in roles)
        items.append(
            Item("start-up: every role on the GPU before ZeRO-3 partitions it", whole, when=("build",))
        )
    return items


def runtime_items(cfg, roles: list[Role]) -> list[Item]:
    """``runtime_overhead`` on every GPU in every phase (the costliest of the roles' backends); each rank's
    process and loader workers (host)."""
    backends = {cfg.parallel.role_backend(GROUP_OF[r.name]) for r in roles}
    backend = max(backends, key=RUNTIME_OVERHEAD_GIB.__getitem__)
    workers = resolve_num_workers(cfg.trainer.num_workers, torch.device("cuda"))
    return [
        Item(
            f"runtime_overhead: CUDA context, NCCL buffers, fragmentation ({backend}; a constant until a GPU "
            "calibrates it)",
            RUNTIME_OVERHEAD_GIB[backend] * GIB,
            when=PHASES,
        ),
        Item(
            f"process: Python, CUDA / NCCL host libraries, {workers} loader workers (host)",
            0,
            (PROCESS_HOST_GIB + workers * LOADER_WORKER_HOST_GIB) * GIB,
            when=PHASES,
        ),
    ]


def estimate(cfg, world_size: int, latent_hw: tuple[int, int]) -> list[Item]:
    """Every category per GPU and in host memory for ``cfg`` on ``world_size`` ranks."""

    dtype = resolve_precision(cfg.trainer.precision, torch.device("cuda"))
    roles = build_roles(cfg, dtype)
    by_name = {r.name: r for r in roles}
    heads = gan_head_parameters(cfg, roles)
    p = cfg.parallel
    post = cfg.stage == 3 and cfg.distill.phase != "ode"
    offload = cfg.stage == 3 and cfg.distill.offload
    trainable = {
        r.name: r.trainable + (heads if r.name == "fake" else 0) for r in roles
    }  # + the critic's heads
    items: list[Item] = []
    for role in roles:
        kind = p.role_backend(GROUP_OF[role.name])
        items += weight_items(role, trainable[role.name], kind, p, world_size, offload)
    if post:
        items.append(Item("EMA shard (fp32)", 4 * by_name["generator"].trainable / world_size))
    if offload:
        items += offload_items(cfg, roles)
    fakes = FakeRoles(cfg, roles, dtype)
    act = count_activations(cfg, fakes, latent_hw)
    b = f"batch {cfg.trainer.batch_size}"
    if cfg.stage == 2 and cfg.pyramid.samples_per_clip() > 1:
        b += f" clip(s) x {cfg.pyramid.samples_per_clip()} pyramid stage-samples"
    items += [
        Item(
            f"activations saved for backward ({b}, counted; the largest graph: {act.role})",
            act.saved,
            when=("step",),
        ),
        Item("backward: one block recomputed (gradient checkpointing)", act.recompute, when=("step",)),
        *(
            [Item("activations: the blocks' saved inputs in pinned host memory", 0, act.host, ("step",))]
            if act.host
            else []
        ),
        Item(
            "backward_transient: the block's activation gradients and temporaries (counted)",
            act.transient,
            when=("step",),
        ),
    ]
    items += validation_items(cfg, fakes, latent_hw)
    items += checkpoint_items(cfg, roles, trainable, world_size, offload)
    if cfg.validation.enabled:
        encoder = text_encoder_bytes(cfg)
        items.append(
            Item(
                "start-up: the text encoder encoding the validation prompts (main rank)",
                encoder,
                encoder,
                when=("prompts",),
                host_per="node",
            )
        )
    items += build_host(cfg, roles, dtype)
    items += runtime_items(cfg, roles)
    return items


def build_host(cfg, roles: list[Role], dtype: torch.dtype) -> list[Item]:
    """Host memory while the models are built, as the code builds them: each base is loaded once in the
    compute dtype and held by its role itself (``Stage.build_model``: the state's tensors assigned, no
    second copy; a merged ``init_from`` chain rebuilds one model at a time). The bases read through the
    weights loader (stage 3's roles, an ``init_from`` run's merged model) are held once per node with
    ``parallel.node_shared_weights`` (:meth:`helios.infra.node_share.NodeShare.state`): every such base in
    ``/dev/shm`` plus one more base at a time, the node's first rank reading the next one (or the offload
    pool copying one into its buffer); the others per rank, with every rank's fp32 trainable weights."""
    shared = cfg.parallel.node_shared_weights
    through_loader = cfg.stage == 3 or bool(cfg.init_from)
    bases = [sum(r.frozen) for r in roles]
    label = f"{len(roles)} base{'s' * (len(roles) > 1)} in {str(dtype).removeprefix('torch.')}"
    trainable = Item(
        "host at build: trainable weights (fp32)", 0, 4 * sum(r.trainable for r in roles), ("build",)
    )
    if not (shared and through_loader):
        return [trainable, Item(f"host at build: {label}", 0, sum(bases), when=("build",))]
    return [
        trainable,
        Item(
            f"host at build: {label}, once per node in /dev/shm, + one read or copied at a time",
            0,
            sum(bases) + max(bases),
            when=("build",),
            host_per="node",
        ),
    ]


@dataclass
class Peaks:
    """Each phase's GiB per GPU and host GiB per node; the peaks are their maxima."""

    phases: dict[str, tuple[float, float]]

    @property
    def gpu(self) -> float:
        return max(g for g, _ in self.phases.values())

    @property
    def host(self) -> float:
        return max(h for _, h in self.phases.values())


def phase_peaks(items: list[Item], gpus_per_node: int) -> Peaks:
    """Per phase: the GPU bytes of the items held then, and the host bytes per node (rank items times the
    node's ranks, node items once)."""
    phases = {}
    for phase in PHASES:
        held = [i for i in items if phase in i.when]
        if not any(i.gpu or i.host for i in held if i.when != PHASES):
            continue  # nothing of its own, e.g. no prompts to encode
        gpu = sum(i.gpu for i in held)
        host = sum(i.host * (1 if i.host_per == "node" else gpus_per_node) for i in held)
        phases[phase] = (gpu / GIB, host / GIB)
    return Peaks(phases)


def report(items: list[Item], gpus_per_node: int) -> tuple[str, float, float]:
    """The table (each category, then each phase's peak), the peak GiB per GPU and host GiB per node over
    every phase."""
    peaks = phase_peaks(items, gpus_per_node)
    width = 84
    lines = [f"{'category':<{width}} {'GiB/GPU':>8} {'GiB host':>9}  held during"]
    for i in items:
        when = "training" if i.when == TRAINING else "all" if i.when == PHASES else ", ".join(i.when)
        per = "/node" if i.host_per == "node" else "/rank"
        lines.append(f"{i.category:<{width}} {i.gpu / GIB:>8.2f} {i.host / GIB:>9.2f}{per}  {when}")
    lines.append(f"{'phase peaks':<{width}} {'GiB/GPU':>8} {'GiB host/node':>14}")
    for phase, (gpu, host) in peaks.phases.items():
        lines.append(f"{PHASE_NAMES[phase]:<{width}} {gpu:>8.2f} {host:>14.2f}")
    return "\n".join(lines), peaks.gpu, peaks.host


def print_report(cfg, world_size: int, gpus_per_node: int, height: int, width: int) -> None:
    """Print every category and each phase's peak; the last line is ``peak_gib_per_gpu=<x>
    host_gib_per_node=<y>`` (the maxima over the phases)."""
    items = estimate(cfg, world_size, (height // 8, width // 8))
    table, gpu, host = report(items, gpus_per_node)
    print(
        f"helios.memory: stage {cfg.stage} ({cfg.phase}), parallel={cfg.parallel.backend}, "
        f"world_size={world_size}, gpus_per_node={gpus_per_node}, {height}x{width}"
    )
    print(table)
    print(f"peak_gib_per_gpu={gpu:.1f} host_gib_per_node={host:.1f}")
