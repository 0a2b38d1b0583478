"""Data-parallel helpers (rank/world queries, object gathering: no-ops in one process) and FSDP2 sharding.

`trainer=fsdp` selects `FSDP2Strategy`: Lightning's ModelParallelStrategy (the FSDP2 path of Lightning 2.6; its
FSDP1 `FSDPStrategy` wraps the LightningModule, which the RL loop bypasses when it calls the policy directly, and
refuses CPU), with the parallelisation that strategy leaves to `LightningModule.configure_model` applied here, so
the RLModule stays strategy-agnostic:
- every decoder layer (and vision block) of each transformers model in the module is its own `fully_shard` unit,
  then the model itself (the root unit: embeddings, final norm, lm_head); the layer classes are the model's
  `_no_split_modules` (Qwen2DecoderLayer for Qwen2.5-7B, Qwen3MoeDecoderLayer for Qwen3-30B-A3B,
  Qwen2_5_VLDecoderLayer + Qwen2_5_VLVisionBlock for Qwen2.5-VL) unless `layer_classes` names them;
- `bf16-mixed`: bf16 all-gathers and compute, fp32 gradient reduction, fp32 sharded master weights and AdamW
  state (a bf16 checkpoint is up-cast shard by shard); activation checkpointing of the decoder layers through
  transformers' own gradient checkpointing (non-reentrant; it runs inside the FSDP units);
- sharded checkpoints (torch.distributed.checkpoint, one folder, a file per rank) unless
  `save_distributed_checkpoint=false`.

Generation. FSDP2 all-gathers a unit's weights in its forward, which makes every forward a collective: ranks
that decode different numbers of steps (rows stop at their own end-of-sequence) would deadlock. So the policy's
weights are gathered once before the rollout (`gather_params`: all-gather every unit, keep them unsharded through
forward) and resharded at its first gradient-enabled forward (the first PPO minibatch) or the end of the step,
and for the whole of validation. That holds the full bf16 weights during generation (see seqrl.capacity); the
frozen reference model is never gathered (one forward per step, in lockstep).
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects; small payloads only)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items: list) -> list:
    """This rank's share of `items` (round-robin, no padding: every item is seen by exactly one rank)."""
    return items[rank()::world_size()]


def rank_share(n_items: int, steps: int, batch: int, seed: int, world: int, rank: int) -> list[int]:
    """Item indices of `rank` for `steps` global batches of `batch` items drawn from a seeded shuffle (reshuffled
    each pass over the data). The global batches do not depend on `world`: rank r takes positions r, r + world, ...
    of each, so any number of ranks sees exactly the batches one process would."""
    order = torch.utils.data.RandomSampler(range(n_items), num_samples=steps * batch,
                                           generator=torch.Generator().manual_seed(seed))
    return [i for pos, i in enumerate(order) if pos % batch % world == rank]


# ------------------------------------------------------------------------------------------------------ FSDP2
def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units of `model`, root first ([] when it is not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def layer_classes(model: nn.Module, names: list[str] | None = None) -> set[str]:
    """Class names of the modules that become FSDP units: `names`, else the model's `_no_split_modules` (the
    decoder layer of every transformers model, plus the vision block of vision-language ones)."""
    found = {type(m).__name__ for m in model.modules()}
    wanted = set(names) if names else set(getattr(model, "_no_split_modules", None) or ()) & found
    if not wanted or wanted - found:
        raise ValueError(f"trainer.strategy.layer_classes={sorted(wanted) or None}: not all are modules of "
                         f"{type(model).__name__}; allowed: class names among its modules, e.g. decoder layers")
    return wanted


def shard_model(model: nn.Module, mesh, *, names: list[str] | None = None, mp_policy=None,
                trainable: bool = True) -> int:
    """Apply `fully_shard` to each layer of `model` (classes from `layer_classes`), then to the model; returns the
    number of units. The trainable root keeps its weights after forward (backward needs them at once); a frozen
    model's root reshards (it is only ever run forward)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kinds = layer_classes(model, names)
    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    layers = [m for m in model.modules() if type(m).__name__ in kinds]
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True, **kwargs)
    fully_shard(model, reshard_after_forward=not trainable, **kwargs)
    return len(layers) + 1


def gather_params(model: nn.Module) -> bool:
    """All-gather every FSDP unit of `model` and keep the weights unsharded through forward passes (a collective:
    every rank calls it at the same point). False (and nothing done) when `model` is not sharded."""
    units = fsdp_units(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    return bool(units)


def reshard_params(model: nn.Module) -> None:
    """Free the gathered weights of `model` (local, no collective) and restore resharding after forward as
    `shard_model` set it (every layer; the root only when the model is frozen)."""
    units = fsdp_units(model)
    frozen = not any(p.requires_grad for p in model.parameters())
    for unit in units:
        unit.reshard()
        unit.set_reshard_after_forward(unit is not units[0] or frozen, recurse=False)


@contextmanager
def full_params(model: nn.Module):
    """Context: `model`'s full weights on every rank (gather_params ... reshard_params); no-op when unsharded."""
    gathered = gather_params(model)
    try:
        yield model
    finally:
        if gathered:
            reshard_params(model)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict of a sharded `model` on CPU on rank 0, {} on other ranks (a collective);
    None when `model` is not sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not fsdp_units(model):
        return None
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_policy(policy, dtype: torch.dtype):
    """The policy to export in HF format: `policy` itself when unsharded; for a sharded one, on rank 0 a plain CPU
    copy (weights from `full_state_dict`, cast to `dtype`, tied weights re-tied), None on other ranks. Every rank
    must call it (it gathers)."""
    from seqrl.models import get_family

    state = full_state_dict(policy.model)
    if state is None:
        return policy
    if rank() != 0:
        return None
    with torch.device("meta"):
        plain = get_family(policy.family).auto_model.from_config(policy.model.config, dtype=dtype)
    plain.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    plain.tie_weights()
    plain.generation_config = policy.model.generation_config
    return dataclasses.replace(policy, model=plain.eval())


def params_checksum(params) -> float:
    """Sum of all weights as float64 (full tensors of sharded parameters, a collective when sharded); equal on
    every rank iff the replicas agree (DDP) — FSDP ranks see the same full weights by construction."""
    from torch.distributed.tensor import DTensor

    total = 0.0
    for p in params:
        p = p.detach()
        total += float((p.full_tensor() if isinstance(p, DTensor) else p).double().sum())
    return total


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with seqrl's FSDP2 parallelisation applied by the strategy (see module
    docstring); one data-parallel mesh over all processes of all nodes.

    Args: layer_classes (FSDP unit class names; None = each model's `_no_split_modules`), activation_checkpointing
    (decoder layers of trainable models), gather_for_generation (see module docstring; false is only safe with a
    rollout engine that runs the same number of forwards on every rank), save_distributed_checkpoint (sharded
    checkpoint folder), reduce_dtype (gradient reduce-scatter dtype under bf16-mixed).
    """

    def __init__(self, layer_classes: list[str] | None = None, activation_checkpointing: bool = True,
                 gather_for_generation: bool = True, save_distributed_checkpoint: bool = True,
                 reduce_dtype: str = "float32", **kwargs) -> None:
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        if reduce_dtype not in DTYPES:
            raise ValueError(f"trainer.strategy.reduce_dtype={reduce_dtype!r}: allowed: {', '.join(DTYPES)}")
        self.layer_classes = list(layer_classes) if layer_classes else None
        self.activation_checkpointing = activation_checkpointing
        self.gather_for_generation = gather_for_generation
        self.reduce_dtype = DTYPES[reduce_dtype]
        self._gathered: list[nn.Module] = []

    def setup_environment(self) -> None:
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    def setup(self, trainer) -> None:
        """ModelParallelStrategy.setup with `configure_model` replaced by `shard_module` (run once)."""
        from lightning.fabric.utilities.optimizer import _optimizers_to_device
        from lightning.pytorch.trainer.states import TrainerFn

        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.shard_module(self.lightning_module)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)  # after sharding: AdamW holds the sharded fp32 master weights
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    @property
    def precision(self) -> str:
        """Lightning's precision flag: bf16-mixed (bf16 compute over fp32 master weights), 32-true, bf16-true."""
        return getattr(self.precision_plugin, "precision", "32-true")

    def shard_module(self, module: nn.Module) -> None:
        """Shard every transformers model held by `module` (the policy, the frozen reference); no-op if done."""
        from torch.distributed.fsdp import MixedPrecisionPolicy
        from transformers import PreTrainedModel

        mp = MixedPrecisionPolicy(torch.bfloat16, self.reduce_dtype) if self.precision == "bf16-mixed" else None
        mesh = self.device_mesh["data_parallel"]
        for model in module.children():
            if not isinstance(model, PreTrainedModel) or fsdp_units(model):
                continue
            trainable = any(p.requires_grad for p in model.parameters())
            if trainable and self.activation_checkpointing and model.supports_gradient_checkpointing:
                enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
                enable({"use_reentrant": False})  # transformers 5 renamed it
            shard_model(model, mesh, names=self.layer_classes, mp_policy=mp, trainable=trainable)
            if trainable and self.precision in ("32-true", "bf16-mixed"):
                model.to(torch.float32)  # fp32 master weights: only this rank's shard is up-cast
            if trainable and self.gather_for_generation:
                model.register_forward_pre_hook(self._reshard_for_grad, prepend=True)  # before FSDP's own hook

    def _gather(self) -> None:
        if self.gather_for_generation and not self._gathered:
            self._gathered = [m for m in self.lightning_module.children()
                              if fsdp_units(m) and any(p.requires_grad for p in m.parameters()) and gather_params(m)]

    def _reshard(self) -> None:
        while self._gathered:
            reshard_params(self._gathered.pop())

    def _reshard_for_grad(self, module, args) -> None:
        if torch.is_grad_enabled():
            self._reshard()

    def training_step(self, *args, **kwargs):
        """The RL step with the policy gathered for its rollout, resharded by its first gradient-enabled forward."""
        self._gather()
        try:
            return super().training_step(*args, **kwargs)
        finally:
            self._reshard()

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._gather()

    def on_validation_end(self) -> None:
        self._reshard()
        super().on_validation_end()
