"""Shared pieces of the "beyond the anchors" tests: tiny models, wrappers and batches.

Everything here is module level so that spawned ranks can import it. Models are small on purpose (the whole
suite runs on a 2-core machine) but shaped so that FSDP1 flat shards cut rows in the middle and FSDP2 shards
leave some ranks with uneven or empty pieces.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

IN, HID, MID, OUT = 6, 10, 7, 3

_MESHES: dict[tuple[int, ...], object] = {}


def mesh(shape: tuple[int, ...], names: tuple[str, ...] | None = None):  # noqa: ANN201
    """One CPU DeviceMesh per shape for the life of the rank (creating groups is a collective and slow)."""
    from torch.distributed.device_mesh import init_device_mesh

    key = (*shape, *(names or ()))
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh("cpu", shape, mesh_dim_names=names)
    return _MESHES[key]


def build_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, MID), nn.Tanh(), nn.Linear(MID, OUT))


def batch(rank: int, world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(4, IN, generator=g) * 3


def build_mlp_bf16() -> nn.Module:
    return build_mlp().to(torch.bfloat16)


def batch_bf16(rank: int, world: int) -> torch.Tensor:
    return batch(rank, world).to(torch.bfloat16)


def wrap_none(model: nn.Module) -> nn.Module:
    return model


def wrap_ddp(model: nn.Module) -> nn.Module:
    return nn.parallel.DistributedDataParallel(model)


def wrap_fsdp2(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    m = mesh((dist.get_world_size(),))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=m)
    fully_shard(model, mesh=m)
    return model


def wrap_hsdp(model: nn.Module) -> nn.Module:
    """FSDP2 on a 2 x (world/2) mesh: replicated over dim 0, sharded over dim 1."""
    from torch.distributed.fsdp import fully_shard

    m = mesh((2, dist.get_world_size() // 2), ("replicate", "shard"))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=m)
    fully_shard(model, mesh=m)
    return model


def _fsdp1(model: nn.Module, use_orig_params: bool, **kwargs: object) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    cpu = torch.device("cpu")
    model[2] = FSDP(model[2], device_id=cpu, use_orig_params=use_orig_params, **kwargs)
    return FSDP(model, device_id=cpu, use_orig_params=use_orig_params, **kwargs)


def wrap_fsdp1_flat(model: nn.Module) -> nn.Module:
    return _fsdp1(model, False)


def wrap_fsdp1_orig(model: nn.Module) -> nn.Module:
    return _fsdp1(model, True)


def wrap_fsdp1_noshard(model: nn.Module) -> nn.Module:
    import warnings

    from torch.distributed.fsdp import ShardingStrategy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # NO_SHARD is deprecated, still supported
        return _fsdp1(model, False, sharding_strategy=ShardingStrategy.NO_SHARD)


WRAPS = {
    "ddp": wrap_ddp,
    "fsdp2": wrap_fsdp2,
    "fsdp1_flat": wrap_fsdp1_flat,
    "fsdp1_orig": wrap_fsdp1_orig,
    "fsdp1_noshard": wrap_fsdp1_noshard,
}


def trained(wrap_name: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(wrapped model after one backward on this rank's batch, float64 reference after the global batch)."""
    import copy

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    model = build_mlp()
    ref = copy.deepcopy(model).double()
    target = WRAPS[wrap_name](model)
    target(batch(rank, world)).square().mean().backward()
    torch.stack([ref(batch(r, world).double()).square().mean() for r in range(world)]).mean().backward()
    return target, ref
