"""DeepSpeed engines: ZeRO stages 0-3, fp32 / bf16 / fp16 with loss scaling, ZeRO-Offload.

The loop stays the plain one, with DeepSpeed's own ``gradient_clipping`` left at 0::

    loss = engine(batch)
    engine.backward(loss)
    dist_clip.clip_grad_norm_(engine, 1.0, norm_type)   # every rank, at accumulation boundaries
    engine.step()

No hook on ``engine.step()`` is needed: in the DeepSpeed releases this adapter is tested with, every stage has
finished reducing and partitioning the gradients when ``engine.backward()`` returns at a gradient accumulation
boundary, and ``step()`` reads them from the very buffers read here:

* ZeRO 1/2: ``optimizer.averaged_gradients[i]``, this rank's partition of each parameter group as a list of
  pieces (views into the reduced gradients); with ``offload_optimizer`` the fp32 partition
  ``single_partition_of_fp32_groups[i].grad`` on the host.
* ZeRO 3: ``optimizer.averaged_gradients[i]``, views of this rank's gradient partition buffer; with
  ``offload_optimizer`` the fp32 partition ``fp32_partitioned_groups_flat[i].grad``.
* stage 0 and the non-ZeRO mixed-precision wrappers: whole gradients, identical on every rank after
  DeepSpeed's all-reduce (``param.grad``, or ``BF16_Optimizer``'s fp32 accumulation buffers).

Partitions are distinct pieces (their partials are summed over the data-parallel group); the alignment padding
DeepSpeed appends is sliced off. Under fp16 the buffers hold loss-scaled gradients: the ``Shards`` carry the
loss scale, so the norm is that of the unscaled gradients, and the coefficient multiplies the scaled buffers,
which ``step()`` then unscales as usual. An fp16 overflow makes the norm inf or NaN; the scaled buffers then
hold inf or NaN and ``step()`` skips the step and lowers the loss scale exactly as it would without dist_clip.

These buffers are internals of DeepSpeed, so the adapter checks the version (``TESTED_VERSIONS``) and the
attributes it reads, and raises a ``RuntimeError`` naming what changed instead of clipping the wrong tensors.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch.distributed as dist
from torch import Tensor

from ..shards import Shards

__all__ = ["ALLOW_UNTESTED_ENV", "TESTED_VERSIONS", "check_version", "matches", "required_attributes", "shards"]

#: (major, minor) releases of DeepSpeed whose ZeRO internals this adapter was tested against.
TESTED_VERSIONS: tuple[tuple[int, int], ...] = ((0, 19),)
#: Set to 1 to use the adapter with an untested DeepSpeed release anyway (the attribute checks still run).
ALLOW_UNTESTED_ENV = "DIST_CLIP_ALLOW_UNTESTED_DEEPSPEED"

_INSTALL_HINT = "pip install dist_clip[deepspeed]"


def _require() -> Any:
    try:
        import deepspeed
    except ModuleNotFoundError as e:
        raise ImportError(
            f"dist_clip's DeepSpeed adapter needs DeepSpeed, which is not installed: {_INSTALL_HINT}"
        ) from e
    return deepspeed


def check_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` unless ``version`` (default: the installed DeepSpeed) is a tested release."""
    if version is None:
        version = _require().__version__
    try:
        major, minor = (int(x) for x in version.split("+")[0].split(".")[:2])
    except ValueError:
        major, minor = -1, -1
    if (major, minor) in TESTED_VERSIONS or os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        return
    tested = ", ".join(f"{a}.{b}.x" for a, b in TESTED_VERSIONS)
    raise RuntimeError(
        f"dist_clip's DeepSpeed adapter reads ZeRO's gradient partitions, whose layout changes between "
        f"releases; it is tested with DeepSpeed {tested}, found {version}. Install a tested release, or set "
        f"{ALLOW_UNTESTED_ENV}=1 to try this one (the attributes it reads are still checked)"
    )


#: What the adapter reads, by optimizer class name; a test asserts that every name still exists.
_ZERO12 = ("averaged_gradients", "cpu_offload", "single_partition_of_fp32_groups", "real_dp_process_group",
           "bit16_groups", "groups_padding", "loss_scaler")
_ZERO3 = ("averaged_gradients", "offload_optimizer", "fp32_partitioned_groups_flat", "fp16_groups",
          "dp_process_group", "loss_scaler", "_swappable_optimizer_subgroup", "grad_position", "get_param_id")
_BF16 = ("fp32_groups_gradients", "fp32_groups_has_gradients", "bf16_groups")
_FP16_UNFUSED = ("fp16_groups",)


def required_attributes() -> dict[str, tuple[str, ...]]:
    """Optimizer class name -> the attributes (or methods) of its instances that the adapter reads."""
    return {
        "DeepSpeedZeroOptimizer": _ZERO12,
        "DeepSpeedZeroOptimizer_Stage3": _ZERO3,
        "BF16_Optimizer": _BF16,
        "FP16_UnfusedOptimizer": _FP16_UNFUSED,
        "FP16_Optimizer": _FP16_UNFUSED,
    }


def matches(target: object) -> bool:
    # An engine can only exist once DeepSpeed is imported: never import it here (it takes seconds).
    engine = sys.modules.get("deepspeed.runtime.engine")
    return engine is not None and isinstance(target, engine.DeepSpeedEngine)


def _check_attributes(opt: object, names: tuple[str, ...]) -> None:
    missing = [n for n in names if not hasattr(opt, n)]
    if missing:
        raise RuntimeError(
            f"{type(opt).__name__} of DeepSpeed {_require().__version__} lacks {missing}, which dist_clip reads "
            "to find the gradient partitions: this DeepSpeed release changed its ZeRO internals and is not "
            f"supported (tested: {TESTED_VERSIONS})"
        )


def _real_pieces(pieces: list[Tensor] | None, what: str) -> list[Tensor]:
    if pieces is None:
        raise RuntimeError(
            f"the engine holds no reduced gradients ({what} is empty): call dist_clip after engine.backward() "
            "and before engine.step(), on a gradient accumulation boundary"
        )
    return [t for t in pieces if not getattr(t, "_zero_padding", False)]


def _zero12_shards(opt: Any, group: dist.ProcessGroup | None, scale: float) -> list[Shards]:
    _check_attributes(opt, _ZERO12)
    out: list[Shards] = []
    for i in range(len(opt.bit16_groups)):
        pg = group if group is not None else opt.real_dp_process_group[i]
        if opt.cpu_offload:
            flat = opt.single_partition_of_fp32_groups[i].grad
            pieces = _real_pieces(None if flat is None else [flat], "single_partition_of_fp32_groups[i].grad")
            pad = int(opt.groups_padding[i])
            if pad:
                pieces = [pieces[0].narrow(0, 0, pieces[0].numel() - pad)]
        else:
            pieces = _real_pieces(opt.averaged_gradients.get(i), "averaged_gradients")
        out.append(Shards(pieces, group=pg, loss_scale=scale, names=[f"zero_group{i}"] * len(pieces)))
    return out


def _zero3_shards(opt: Any, group: dist.ProcessGroup | None, scale: float) -> list[Shards]:
    _check_attributes(opt, _ZERO3)
    out: list[Shards] = []
    for i, params in enumerate(opt.fp16_groups):
        if group is not None:
            pg = group
        elif hasattr(opt, "_get_sub_group_process_group"):
            pg = opt._get_sub_group_process_group(i)
        else:
            pg = opt.dp_process_group
        rank = dist.get_rank(pg)
        pieces: list[Tensor] = []
        names: list[str] = []
        if opt.offload_optimizer:
            if opt._swappable_optimizer_subgroup(i):
                raise NotImplementedError(
                    "ZeRO-3 with NVMe optimizer swapping keeps gradients on disk: dist_clip cannot reach them"
                )
            flat = opt.fp32_partitioned_groups_flat[i].grad
            if flat is None:
                _real_pieces(None, "fp32_partitioned_groups_flat[i].grad")
            for p in params:
                _, offset, _ = opt.grad_position[opt.get_param_id(p)]
                real = _real_numel(p, rank)
                pieces.append(flat.narrow(0, int(offset), real))
                names.append(getattr(p, "ds_name", f"ds_id{p.ds_id}"))
        else:
            grads = _real_pieces(opt.averaged_gradients.get(i), "averaged_gradients")
            for p, g in zip(params, grads):
                pieces.append(g.reshape(-1).narrow(0, 0, _real_numel(p, rank)))
                names.append(getattr(p, "ds_name", f"ds_id{p.ds_id}"))
        out.append(Shards(pieces, group=pg, loss_scale=scale, names=names))
    return out


def _real_numel(param: Any, rank: int) -> int:
    """Elements of ``param``'s ZeRO-3 partition on ``rank`` that are not alignment padding."""
    per_rank = int(param.partition_numel())
    return max(0, min(per_rank, int(param.ds_numel) - rank * per_rank))


def _loss_scale(opt: Any, zero_optimizer: type) -> float:
    """The factor engine.backward() multiplied the loss by: ``ZeROOptimizer.scale_if_loss`` in DeepSpeed 0.19.

    Only ZeRO optimizers (BF16_Optimizer among them) scale the loss; the other wrappers' gradients are not
    scaled, whatever their ``loss_scale`` attribute says.
    """
    if not isinstance(opt, zero_optimizer):
        return 1.0
    if getattr(opt, "torch_autocast_gradscaler", None):
        raise NotImplementedError("dist_clip's DeepSpeed adapter does not handle torch autocast's GradScaler")
    if getattr(opt, "custom_loss_scaler", False):
        return float(opt.external_loss_scale)
    scaler = getattr(opt, "loss_scaler", None)
    return float(scaler.cur_scale) if scaler is not None else 1.0


def _replicated_shards(engine: Any, opt: Any) -> list[Shards]:
    """Whole gradients, identical on every rank after DeepSpeed's all-reduce: nothing to combine."""
    name = type(opt).__name__
    if name == "BF16_Optimizer":
        _check_attributes(opt, _BF16)
        pieces = [
            g for i, grads in enumerate(opt.fp32_groups_gradients) for j, g in enumerate(grads)
            if opt.fp32_groups_has_gradients[i][j]
        ]
        return [Shards(pieces, group=None)]
    if name in ("FP16_UnfusedOptimizer", "FP16_Optimizer"):
        _check_attributes(opt, _FP16_UNFUSED)
        pieces = [p.grad for group in opt.fp16_groups for p in group if p.grad is not None]
        return [Shards(pieces, group=None)]
    named = [(n, p.grad) for n, p in engine.module.named_parameters() if p.grad is not None]
    return [Shards([g for _, g in named], group=None, names=[n for n, _ in named])]


def shards(target: object, group: dist.ProcessGroup | None) -> list[Shards]:
    ds = _require()
    check_version(ds.__version__)
    engine: Any = target
    managed = getattr(engine, "managed_gradient_accumulation", None)
    if managed is not None and not managed():
        raise NotImplementedError(
            "with managed_gradient_accumulation=false DeepSpeed reduces the gradients inside engine.step(), "
            "where dist_clip cannot reach them; keep the default (managed) gradient accumulation"
        )
    if not engine.is_gradient_accumulation_boundary():
        raise ValueError(
            "dist_clip was called on a DeepSpeed engine between gradient accumulation boundaries: its gradients "
            "are not reduced yet. Clip only where engine.is_gradient_accumulation_boundary() is True (after the "
            "last engine.backward() of the accumulation window, before engine.step())"
        )
    if engine.gradient_clipping() > 0:
        warnings.warn(
            f"DeepSpeed's gradient_clipping is {engine.gradient_clipping()}, so engine.step() clips the gradients "
            "again with DeepSpeed's own L2 norm after dist_clip; set \"gradient_clipping\": 0 in the DeepSpeed "
            "config when clipping with dist_clip",
            UserWarning,
            stacklevel=4,
        )
    if getattr(engine, "has_moe_layers", False):
        raise NotImplementedError("dist_clip's DeepSpeed adapter does not handle MoE expert groups yet")
    if getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
        raise NotImplementedError("dist_clip's DeepSpeed adapter does not handle torch autocast's GradScaler")
    opt = engine.optimizer
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    scale = _loss_scale(opt, ZeROOptimizer)

    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        return _zero3_shards(opt, group, scale)
    if isinstance(opt, DeepSpeedZeroOptimizer):
        return _zero12_shards(opt, group, scale)
    return _replicated_shards(engine, opt)
