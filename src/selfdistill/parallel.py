"""How several processes share the trained model (`distributed.strategy`): whole replicas (`ddp`) or FSDP2 shards
(`fsdp2`). The trainer calls the same few methods whichever is chosen; only the strategy knows what they do.

`fsdp2` drives `torch.distributed.fsdp.fully_shard` directly (accelerate's FSDP plugin switches on only for
GPU-like devices; `torchrun` or `accelerate launch` only start the processes), so it runs, and is tested, on the
CPU with gloo. The units: every decoder layer; the output layer when it is not tied to the embedding; and the
model itself (embedding, final norm, a tied output layer). Each process holds 1/N of every parameter, of its
gradient and of its AdamW state; a unit is all-gathered for its forward and backward pass and freed after.

The fused output layer (`tokenstats.hidden_objective`) multiplies hidden states by the output weight outside the
model's forward pass, so the strategy gathers that weight explicitly around each fused pass
(`whole_output_layers`): inside, `output_weight(model)` is the whole `[V,d]` matrix as a plain parameter, and the
kernel's hand-written gradient goes into its `.grad`, which FSDP reduce-scatters after the backward pass like
every other unit's gradient (the gradients are summed, not averaged: the loss is already normalized by the
global token count).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import Tensor

from selfdistill.collectives import Collectives
from selfdistill.config import ConfigError
from selfdistill.forward import base_model


class DataParallel:
    """`ddp`: every process holds the whole model; gradients are summed across processes by `Collectives`."""

    sharded = False

    def copy_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """A copy of `model` with its own weights (a teacher's copy): a deep copy."""
        return copy.deepcopy(model)

    def wrap(self, model: torch.nn.Module, *, like: torch.nn.Module | None = None) -> torch.nn.Module:
        return model

    def whole_output_layers(self, *models: torch.nn.Module | None) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def generation(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def reduce_gradients(self, params: list[Tensor], collectives: Collectives) -> None:
        """Sum every `.grad` over the processes, in place, in `collectives`' buckets."""
        collectives.sum_gradients(params)

    def clip_gradients(self, params: list[Tensor], max_norm: float) -> float:
        """The global gradient norm before clipping (`max_norm = inf`: no clipping)."""
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """Every tensor of `model`'s state dict, whole, on the CPU (every process has them)."""
        return {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}


class FullyShardedParallel:
    """`fsdp2`: `fully_shard` on every decoder layer, the untied output layer and the model (see the module
    docstring). `compute_dtype` bfloat16 on a GPU gathers and computes the layers in bfloat16 and reduces the
    gradients in float32 (the sharded master weights stay float32); on the CPU everything is float32."""

    sharded = True

    def __init__(self, device: torch.device, world: int, *, compute_dtype: torch.dtype) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if not dist.is_initialized():  # one process: a group of one, so the same sharded code runs
            dist.init_process_group("gloo" if device.type == "cpu" else "nccl", store=dist.HashStore(), rank=0,
                                    world_size=1)
        if dist.get_world_size() != world:
            raise RuntimeError(f"the process group has {dist.get_world_size()} processes, accelerate counts {world}")
        self.device = device
        self.world = world
        self.mesh = init_device_mesh(device.type, (world,))
        low_precision = compute_dtype != torch.float32 and device.type != "cpu"
        self.mp_policy = MixedPrecisionPolicy(param_dtype=compute_dtype if low_precision else None,
                                              reduce_dtype=torch.float32)

    # -- sharding a model

    @staticmethod
    def copy_model(model: torch.nn.Module) -> torch.nn.Module:
        """A copy of `model`'s structure whose parameters are on the meta device (no memory; buffers are copied):
        `wrap(copy, like=model)` shards it and fills each process's shards from `model`'s, so no process ever
        holds the copy whole, nor a second whole model while loading."""
        memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                for p in model.parameters()}  # a tied parameter stays one parameter in the copy
        return copy.deepcopy(model, memo)

    def wrap(self, model: torch.nn.Module, *, like: torch.nn.Module | None = None) -> torch.nn.Module:
        """Shard `model` in place (a peft wrapper is looked through); returns it. Must come after LoRA. With
        `like` (a model sharded by `wrap` since `copy_model` copied it), `model` is that meta-device copy: its
        shards are made on the meta device, then filled from `like`'s own shards, each process its slice
        (converted to the copy's dtype, e.g. an EMA teacher's float32 average of a bfloat16 base)."""
        from torch.distributed.fsdp import fully_shard

        base = base_model(model)
        layers = getattr(base.get_decoder(), "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
            raise ConfigError(f"distributed.strategy: fsdp2 shards a decoder's `layers`; "
                              f"{type(base.get_decoder()).__name__} has none")
        options = {"mesh": self.mesh, "mp_policy": self.mp_policy}
        for layer in layers:
            fully_shard(layer, **options)
        head = base.get_output_embeddings()
        if head.weight is not base.get_input_embeddings().weight:  # a tied output layer stays with the embedding
            fully_shard(head, **options)
        fully_shard(base, **options)
        for unit in self._units(model):
            unit.set_gradient_divide_factor(1.0)  # summed: the loss is normalized by the global token count
            unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
        if like is not None:
            self._fill_from(model, like)
        # FSDP picks its root at the first forward pass: make it the model (the pass generation runs), not a
        # decoder layer reached first through `get_decoder()`.
        with torch.no_grad():
            base(input_ids=torch.ones(1, 1, dtype=torch.long, device=self.device))
        for unit in self._units(model):
            unit.reshard()
        return model

    def _fill_from(self, model: torch.nn.Module, source: torch.nn.Module) -> None:
        """Materialize `model`'s meta-device shards on the device with the values of `source`'s shards (the same
        structure, sharded alike: each process copies its local slice). Buffers keep the values they were copied
        with (`to_empty` would leave them uninitialized)."""
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        model.to_empty(device=self.device)
        sources = dict(source.named_parameters())
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
            for name, p in model.named_parameters():
                mine, theirs = local_shard(p), local_shard(sources[name])
                if mine.shape != theirs.shape:
                    raise RuntimeError(f"{name}: the copy's shard is {tuple(mine.shape)}, the source's "
                                       f"{tuple(theirs.shape)}; copy_model and wrap must shard alike")
                mine.copy_(theirs)

    @staticmethod
    def _units(model: torch.nn.Module) -> list:
        from torch.distributed.fsdp import FSDPModule

        return [m for m in base_model(model).modules() if isinstance(m, FSDPModule)]

    @staticmethod
    def _output_units(model: torch.nn.Module) -> list:
        """The units that hold the embedding and output layer: the model itself, and the untied output layer."""
        from torch.distributed.fsdp import FSDPModule

        base = base_model(model)
        head = base.get_output_embeddings()
        return [base] + ([head] if isinstance(head, FSDPModule) else [])

    # -- what the trainer calls

    @contextlib.contextmanager
    def whole_output_layers(self, *models: torch.nn.Module | None) -> Iterator[None]:
        """Gather the embedding, final norm and output layer of each model given (the student, a teacher's copy)
        for what runs inside: the decoder called directly and the fused output layer reading `output_weight` (or the
        model's own forward pass). A backward pass inside reduce-scatters their gradients and reshards them; leaving
        reshards the rest."""
        units = [unit for model in models if model is not None for unit in self._output_units(model)]
        roots = {id(base_model(model)) for model in models if model is not None}
        heads = [unit for unit in units if id(unit) not in roots]  # untied output layers
        for unit in heads:  # stay gathered even if the model's own forward runs inside (`check_output_layer`)
            unit.set_reshard_after_forward(False, recurse=False)
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            for unit in heads:
                unit.set_reshard_after_forward(True, recurse=False)
            for unit in units:
                unit.reshard()

    @contextlib.contextmanager
    def generation(self, model: torch.nn.Module) -> Iterator[None]:
        """Each unit stays gathered after its first forward pass until generation ends (the weights only, no
        gradients or optimizer state), and is resharded then. So only the first forward pass makes collectives:
        processes whose rollouts end after different numbers of tokens never wait for each other, and no layer is
        all-gathered again for every generated token."""
        units = self._units(model)
        root = base_model(model)
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                if unit is not root:  # the root never reshards after forward (FSDP's own choice for it)
                    unit.set_reshard_after_forward(True, recurse=False)
                unit.reshard()

    def reduce_gradients(self, params: list[Tensor], collectives: Collectives) -> None:
        """Nothing left to do: each backward pass reduce-scattered the gradients into the shards."""

    def clip_gradients(self, params: list[Tensor], max_norm: float) -> float:
        """The global norm over every process's gradient shards before clipping (`max_norm = inf`: none)."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """`model`'s state dict gathered whole on the CPU of the first process (a collective: every process calls
        it; the others get an empty dict). Never more than one unit whole on a GPU at a time."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.world == 1:  # nothing was gathered: the tensors are the CPU parameters themselves
            full = {name: t.clone() for name, t in full.items()}
        return full


def local_shard(tensor: Tensor) -> Tensor:
    """This process's slice of a sharded tensor (a DTensor), sharing its storage; a plain tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


STRATEGIES = {
    "ddp": lambda device, world, compute_dtype: DataParallel(),
    "fsdp2": lambda device, world, compute_dtype: FullyShardedParallel(device, world, compute_dtype=compute_dtype),
}


def make_parallel(strategy: str, *, device: torch.device, world: int,
                  compute_dtype: torch.dtype) -> DataParallel | FullyShardedParallel:
    """The strategy `distributed.strategy` names (one of `STRATEGIES`)."""
    return STRATEGIES[strategy](device, world, compute_dtype)
