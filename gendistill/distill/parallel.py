"""Processes: torchrun environment, FSDP2 / DDP wrapping, full (world-size independent) state dicts, reductions.

One process needs none of this: every function here is a no-op or a plain call when `world == 1`.
FSDP2 (`fully_shard`) shards each KDA/attention mixer, then each decoder layer, then the root (the
`StudentObjective` that holds the student and computes the losses), so calling a layer or a mixer directly, as the
alignment stages do, gathers exactly its parameters. The optimiser is built after sharding. The teacher is
replicated on every process (frozen, no gradients, nothing to synchronise).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn


@dataclasses.dataclass(frozen=True)
class Env:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> Env:
    """Read torchrun's environment; start the process group (nccl on CUDA, gloo on CPU) once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda"
                                else None)
    return Env(rank=rank, world=world, local_rank=local_rank, device=device)


def barrier(env: Env) -> None:
    if env.world > 1:
        dist.barrier()


def all_sum(env: Env, values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (a copy; the input is left alone)."""
    values = values.clone()
    if env.world > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(env: Env, obj):
    if env.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(objective: nn.Module, env: Env, strategy: str, find_unused: bool) -> nn.Module:
    """FSDP2 or DDP around the StudentObjective (in place for FSDP2); unchanged for one process."""
    if env.world == 1:
        return objective
    if strategy == "auto":
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
            strategy = "fsdp"
        except ImportError:  # torch without FSDP2
            strategy = "ddp"
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in objective.student.model.layers:
            fully_shard(layer.self_attn)
            fully_shard(layer)
        fully_shard(objective)
        return objective
    device_ids = [env.device] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(objective, device_ids=device_ids, find_unused_parameters=find_unused)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def no_sync(module: nn.Module, skip: bool):
    """Skip the gradient all-reduce of all but the last micro-batch (it is done once, on the summed gradients)."""
    if not skip:
        return contextlib.nullcontext()
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def fsdp_no_sync():
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return contextlib.nullcontext()


def full_state(module: nn.Module, optimizer: torch.optim.Optimizer | None, env: Env):
    """(model state, optimiser state) as full CPU tensors keyed by parameter name, the same for any world size.
    Collective under FSDP: every process must call it; the result is complete on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    module = unwrap(module)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(module, options=options), None
    return get_state_dict(module, optimizer, options=options)


def load_full_state(module: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict,
                    env: Env) -> None:
    """Inverse of `full_state`: every process passes the full dicts; each keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(unwrap(module), optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True, strict=True))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
