"""fairscale 0.4: the OSS optimizer (with ShardedDataParallel or torch DDP) and FullyShardedDataParallel.

* ``OSS`` (target: the optimizer, or a ``ShardedDataParallel`` module, whose optimizers are used): every rank
  steps only the parameters OSS assigned to it, so it measures and scales only their gradients, which are
  whole and reduced there (by ShardedDDP's reduce to the owner, or DDP's all-reduce). Owned sets are disjoint:
  their partials are summed over the OSS group.
* ``FullyShardedDataParallel`` (target: the root module, nested wrappers included, flattened or not): each
  parameter's gradient is this rank's shard, padded with zeros at the end of the last shards; the padding is
  sliced off. Parameters of a one-rank wrapper are whole and identical everywhere (replicated).

The adapter reads fairscale's public attributes and patches nothing. fairscale's FSDP itself needs CUDA.
"""

from __future__ import annotations

import sys
from typing import Any

import torch.distributed as dist
from torch import Tensor

from ..shards import Shards

__all__ = ["matches", "shards"]

_INSTALL_HINT = "pip install dist_clip[fairscale]"
_OSS = ("fairscale.optim.oss", "OSS")
_SDP = ("fairscale.nn.data_parallel.sharded_ddp", "ShardedDataParallel")
_FSDP = ("fairscale.nn.data_parallel.fully_sharded_data_parallel", "FullyShardedDataParallel")


def _require() -> Any:
    try:
        import fairscale
    except ModuleNotFoundError as e:
        raise ImportError(
            f"dist_clip's fairscale adapter needs fairscale, which is not installed: {_INSTALL_HINT}"
        ) from e
    return fairscale


def _loaded(where: tuple[str, str]) -> type | None:
    # A fairscale object can only exist once its module is imported: never import fairscale here.
    module = sys.modules.get(where[0])
    return getattr(module, where[1], None) if module is not None else None


def _is(target: object, where: tuple[str, str]) -> bool:
    cls = _loaded(where)
    return cls is not None and isinstance(target, cls)


def matches(target: object) -> bool:
    return _is(target, _OSS) or _is(target, _SDP) or _is(target, _FSDP)


def _oss_shards(optimizers: list[Any], group: dist.ProcessGroup | None) -> list[Shards]:
    out: list[Shards] = []
    for opt in optimizers:
        mine = opt.partition_parameters()[opt.rank]  # this rank's param groups, cached by OSS
        owned = [p.grad for g in mine for p in g["params"] if p.grad is not None]
        out.append(Shards(owned, group=group if group is not None else opt.group))
    return out


def _fsdp_shards(root: Any, group: dist.ProcessGroup | None) -> list[Shards]:
    fsdp = _loaded(_FSDP)
    names = {id(p): n for n, p in root.named_parameters()}
    sharded: dict[int, tuple[dist.ProcessGroup, list[str], list[Tensor]]] = {}
    replicated: list[Tensor] = []
    for module in root.modules():
        if not isinstance(module, fsdp):
            continue
        for p, pad in zip(module.params, module.numel_padded_per_param):
            if p.grad is None:
                continue
            if not getattr(p, "_is_sharded", False):
                replicated.append(p.grad)
                continue
            g = p.grad.reshape(-1)
            if pad:
                g = g.narrow(0, 0, g.numel() - int(pad))  # fairscale pads the last shards with zeros
            pg = group if group is not None else module.process_group
            entry = sharded.setdefault(id(pg), (pg, [], []))
            entry[1].append(names.get(id(p), "flat_param"))
            entry[2].append(g)
    out = [Shards(ts, group=pg, names=ns) for pg, ns, ts in sharded.values()]
    if replicated or not out:
        out.append(Shards(replicated, group=None))
    return out


def shards(target: object, group: dist.ProcessGroup | None) -> list[Shards]:
    _require()
    if _is(target, _FSDP):
        return _fsdp_shards(target, group)
    if _is(target, _SDP):
        optimizers = list({id(o): o for o in target._sharded_optimizers}.values())  # type: ignore[attr-defined]
        return _oss_shards(optimizers, group)
    if _is(target, _OSS):
        return _oss_shards([target], group)
    raise TypeError(f"not a fairscale OSS optimizer, ShardedDataParallel or FullyShardedDataParallel: {type(target)}")
