"""The one collective: every partial of a call travels in one float64 buffer, in one all-reduce.

Finite orders combine with SUM, which propagates NaN by itself. ``inf`` combines with MAX, which backends do
not promise to propagate NaN through (gloo's ``std::max`` and NCCL's ``fmax`` may drop it depending on the
order of operands), so NaN is carried explicitly: the buffer is doubled into ``[values with NaN -> 0,
isnan flags]`` and the flags turn the result back into NaN after the reduction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ._norm import ReduceOp

__all__ = [
    "all_reduce_partials", "backends", "collective_device", "first_copy_in", "group_rank", "group_size", "home_device",
    "reduces_on_host", "reduction_group", "same_everywhere", "same_ranks",
]


def group_size(group: dist.ProcessGroup | None) -> int:
    """World size of ``group`` (1 when there is nothing to combine)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This rank's index in ``group`` (0 when there is nothing to combine)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def _world() -> dist.ProcessGroup:
    world = dist.group.WORLD
    assert world is not None
    return world


def check_covers(group: dist.ProcessGroup | None, peers: dist.ProcessGroup, what: str) -> None:
    """ValueError unless ``group=`` (None: the wrapper's own) holds every rank of ``peers``, the ranks among
    which ``what`` (a wrapper's shards or partitions) are spread: a peer outside it holds pieces no rank of the
    group adds, so each group would return the norm of its own pieces and clip by it."""
    if group is None or group is peers:
        return
    held = set(dist.get_process_group_ranks(group))
    spread = set(dist.get_process_group_ranks(peers))
    if not spread <= held:
        raise ValueError(
            f"group= holds ranks {sorted(held)}, but {what} over ranks {sorted(spread)}: ranks "
            f"{sorted(spread - held)} hold pieces outside the group, so the norm cannot be formed; pass a group "
            "holding them (the wrapper's own group, the world) or no group="
        )


def reduction_group(groups: Iterable[dist.ProcessGroup | None]) -> dist.ProcessGroup | None:
    """The one group a call reduces over: the common group of its pieces, or the world when they differ.

    Reducing pieces of several groups over a bigger one is exact because every piece is counted by exactly
    one rank (the adapters mark replicas ``counted=False``): contributions of ranks outside a piece's own
    group are other pieces, never second copies. Distinct group objects over the same ranks (a root and a
    nested wrapper each given ``new_group(ranks)``) are one group: the world added another job's gradients
    on the other ranks (or waited for them until the timeout).
    """
    distinct: list[dist.ProcessGroup] = []
    for g in groups:
        if g is not None and all(g is not d for d in distinct):
            distinct.append(g)
    if not distinct:
        return None
    if len(distinct) == 1:
        only = distinct[0]
        if not isinstance(only, dist.ProcessGroup) and only == getattr(dist.GroupMember, "NON_GROUP_MEMBER", None):
            # A custom adapter's Shards on a group made with dist.new_group on ranks outside it (torch's int
            # sentinel): the all-reduce over it returned at once, and this rank its own pieces' total as the norm
            # (5.20 on the outsider, 3.87 on the group's two ranks), silently; report=True failed in torch
            # ("Invalid process group specified"). The group's ranks never wait for this rank: it raises alone.
            raise ValueError(
                f"a Shards' group is a process group this rank ({dist.get_rank()}) is not a member of (dist.new_group "
                "returns GroupMember.NON_GROUP_MEMBER on the ranks outside it): its pieces' partials cannot combine "
                "with that group's; give this rank's pieces a group holding it, or call only on the group's ranks"
            )
        return only
    if all(same_ranks(g, distinct[0]) for g in distinct[1:]):
        return same_everywhere(distinct)
    return _world()


def same_ranks(a: dist.ProcessGroup, b: dist.ProcessGroup) -> bool:
    """Whether two process groups hold the same ranks (a group passed as group= may be another object)."""
    return a is b or sorted(dist.get_process_group_ranks(a)) == sorted(dist.get_process_group_ranks(b))


def first_copy_in(copies: dist.ProcessGroup, group: dist.ProcessGroup) -> bool:
    """Whether this rank is the lowest rank of ``copies`` (the ranks holding the same piece) within ``group``:
    the one that counts the piece when ``group`` reduces more than those ranks."""
    ranks = set(dist.get_process_group_ranks(group))
    return dist.get_rank() == min(r for r in dist.get_process_group_ranks(copies) if r in ranks)


def same_everywhere(groups: Sequence[dist.ProcessGroup]) -> dist.ProcessGroup:
    """One of ``groups`` (distinct objects over the same ranks), the same on every rank whatever order they
    were listed in: the first by name (a group's name is the same on each of its ranks)."""
    return min(groups, key=lambda g: g.group_name)


def backends(group: dist.ProcessGroup) -> dict[str, str]:
    """``group``'s backend by device type (``{"cpu": "gloo", "cuda": "nccl"}``), ``{"": name}`` where torch names
    one backend for every device. From torch's backend config: ``dist.get_backend`` says ``"undefined"`` for a
    group started without a backend (torchrun's usual ``init_process_group()``: gloo on the CPU, NCCL on CUDA)
    and ``"cpu:gloo"`` for one started so, both of which reduce host tensors on gloo."""
    try:
        config = str(dist.get_backend_config(group))
    except (AttributeError, RuntimeError, ValueError):
        config = str(dist.get_backend(group))
    config = config.lower().replace(" ", "")
    if ":" not in config:
        return {"": config}
    return dict(item.partition(":")[::2] for item in config.split(",") if item)


def _cuda() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def _device_for(table: dict[str, str], preferred: torch.device) -> torch.device:
    """:func:`collective_device` from a :func:`backends` table read once."""
    if "" in table:  # one backend for every device (an older torch, a custom backend)
        if table[""] == "nccl" and preferred.type == "cpu":
            return _cuda() or preferred
        return preferred
    if preferred.type in table:  # gloo and MPI name CUDA too: they reduce CUDA tensors
        return preferred
    if preferred.type != "cpu":
        return torch.device("cpu")
    return (_cuda() if "cuda" in table else None) or preferred


def collective_device(group: dist.ProcessGroup, preferred: torch.device) -> torch.device:
    """Where the buffer must live for ``group``'s backend: CUDA for NCCL, the grads' device where possible."""
    return _device_for(backends(group), preferred)


def reduces_on_host(group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """Whether ``group`` combines more than one rank with a host backend (gloo or MPI, or any backend registered
    for the CPU alone, ``Backend.register_backend(..., devices=["cpu"])``) for a buffer on ``device``, the same
    answer on every rank (their buffers meet in one collective, so on one backend): there, reading a combined
    value costs no device sync (gloo copies CUDA tensors through the host anyway), so the ranks may agree on
    something through the collective and act on it."""
    if group is None or group_size(group) <= 1:
        return False
    table = backends(group)
    name = table.get("", table.get(_device_for(table, device).type, ""))
    return name in ("gloo", "mpi") or dist.Backend.backend_capability.get(name) == ["cpu"]


def home_device(tensors: Iterable[Tensor], group: dist.ProcessGroup | None) -> torch.device:
    """Where a call's result lives: the first piece's device, else where ``group`` reduces, else the CPU. Where
    ``group`` combines more than one rank, meta pieces hold no data and are passed over: a rank whose first piece
    was one built its buffer there, and the error measuring it raised on that rank alone, before it could join
    the others' collective. Elsewhere (one process, DDP) a meta first piece is the home, as torch's clipping
    takes it: meta gradients give a meta total (they raised ``NotImplementedError`` when passed over)."""
    for t in tensors:
        if t.device.type != "meta" or group is None or group_size(group) == 1:
            return t.device
    if group is not None:
        table = backends(group)
        if "cuda" in table and table.get("cpu") != table["cuda"] and torch.cuda.is_initialized():
            # gloo on the CPU and NCCL on CUDA (init_process_group() without a backend): a rank holding nothing
            # in a job that computes on CUDA joins the others' NCCL collective, not a gloo one of its own
            return _cuda() or torch.device("cpu")
        return _device_for(table, torch.device("cpu"))
    return torch.device("cpu")


def moved(t: Tensor, device: torch.device | str) -> Tensor:
    """``t`` on ``device``: without waiting where the destination is an accelerator (a host-to-device copy of
    pageable memory is staged before it returns), with a wait where it is the CPU: a non-blocking copy to the
    host returns before the data lands (pinned memory filled asynchronously), and the CPU read what was there
    before (zeros, or the previous call's values: a total of 0 or the previous step's norm, silently). torch's
    own clipping copies to the host blocking too."""
    if t.device == device:  # (the usual case: nothing to move, and no device to build)
        return t
    return t.to(device, non_blocking=torch.device(device).type != "cpu")


def all_reduce_partials(partials: Tensor, op: ReduceOp, group: dist.ProcessGroup | None) -> Tensor:
    """Combine a float64 vector of partials across ``group`` with one all-reduce; NaN-safe for MAX.

    Args:
        partials: float64 1-D tensor, the same length and layout on every rank of ``group``.
        op: "sum" or "max".
        group: the ranks to combine over; ``None`` or a one-rank group means no collective at all.

    Returns:
        The combined vector, identical on every rank, on the device of ``partials``.
    """
    if group is None or group_size(group) == 1:
        return partials
    home = partials.device
    device = collective_device(group, home)
    if op == "sum":
        buf = partials.to(device)  # the caller's scratch vector: reducing it in place is fine
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        return moved(buf, home)
    nan = torch.isnan(partials)
    buf = torch.cat([torch.where(nan, torch.zeros_like(partials), partials), nan.to(torch.float64)]).to(device)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    values, flags = moved(buf, home).chunk(2)
    return torch.where(flags > 0, torch.full_like(values, float("nan")), values)
