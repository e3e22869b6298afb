"""Tensor, pipeline, expert and data parallelism composed in one call: a small explicit plan, one collective.

A rank of a composed layout holds pieces of some parameters of the full model: its pipeline stage's
parameters, sliced over the tensor-parallel group, possibly sharded over a data-parallel group, possibly
duplicated. The norm of the full model needs every *distinct* piece counted exactly once. A plan says, per
parameter, along which mesh dimensions the pieces are identical copies; everything else (tensor-parallel
shards, pipeline stages, expert-parallel ranks, FSDP shards) holds distinct pieces. Each rank then counts its
piece only where its coordinate is 0 along every copy dimension (the owner), the partials of every parameter
of every stage travel in one all-reduce over the whole mesh, and tied parameters that appear in two stages
(an embedding and its output projection) are counted once, under the owner's name::

    mesh = init_device_mesh("cuda", (2, 2), mesh_dim_names=("pp", "tp"))
    plan = ParallelPlan(
        mesh,
        names=full_model_parameter_names,            # every rank knows them: identical slots everywhere
        rules=(Rule("*.norm.weight", replicate=("tp",)), Rule("*")),
        tied=(("output.weight", "tok_embeddings.weight"),),
    )
    result = dist_clip.GradClipper(max_norm=1.0)(stage_module, plan=plan)

DTensor gradients add their own ``Replicate`` mesh dimensions to the rule's copy dimensions, so a
tensor-parallel module built with ``parallelize_module`` whose every parameter is a DTensor needs only
``Rule("*")`` (plain parameters the TP plan left out, copies on every tp rank, need ``replicate=``).
``debug=True`` cross-checks the plan once, on the first call, against an all-gathered reference and raises on
any over- or under-counting.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _fused, _norm, _reduce, _slots
from .adapters.fsdp import refuse_partial
from .shards import Shards

__all__ = ["ParallelPlan", "Rule", "clip_grad_norm_", "get_total_norm"]


@dataclass(frozen=True)
class Rule:
    """How the pieces of the parameters whose names match ``pattern`` count.

    Attributes:
        pattern: an ``fnmatch`` pattern over full-model parameter names (``"layers.*.attn_norm.weight"``).
        replicate: mesh dimension names along which ranks hold identical copies of their piece (data-parallel
            replicas, tensor-parallel duplicates of a norm weight): only coordinate 0 counts it. Every other
            dimension holds distinct pieces, or the parameter is absent there, and is summed.
        distinct: mesh dimension names along which ranks hold distinct pieces, whatever the gradients' meshes
            suggest. Without ``replicate=``, a DTensor gradient on a slice of the mesh is counted once over the
            sibling slices this rank's other gradients span (FSDP2 over TP: the norm layers on ``mesh["dp"]``,
            the same on every tp slice); experts on ``mesh["dp"]`` beside dense layers sharded over the
            flattened ``("dp", "ep")`` mesh span the ep line too but differ along it: ``Rule("moe.*",
            distinct=("ep",))`` (without it only ep = 0 counted). A DTensor's own ``Replicate`` dims named here
            count on every coordinate. Must not overlap ``replicate``.

    ``replicate`` and ``distinct`` take any iterable of names and are stored as tuples.
    """

    pattern: str
    replicate: tuple[str, ...] = ()
    distinct: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise TypeError(f"Rule.pattern must be a non-empty str, got {self.pattern!r}")
        for attr in ("replicate", "distinct"):
            dims = getattr(self, attr)
            if isinstance(dims, (str, bytes, Mapping)) or not isinstance(dims, Iterable):
                raise TypeError(f"Rule.{attr} must be a tuple of mesh dimension names, got {dims!r}")
            # A generator was consumed by the check below and left empty (counted everywhere); a set's order is the
            # process's hash order, different on each rank, and the plan's settings fingerprint compares the rules:
            # the names are kept sorted (their order means nothing).
            dims = tuple(sorted(dims)) if isinstance(dims, (set, frozenset)) else tuple(dims)
            if not all(isinstance(d, str) for d in dims):
                raise TypeError(f"Rule.{attr} must be a tuple of mesh dimension names, got {dims!r}")
            object.__setattr__(self, attr, dims)
        both = sorted(set(self.replicate) & set(self.distinct))
        if both:
            raise ValueError(
                f"Rule({self.pattern!r}) names {both} in both replicate= (copies) and distinct= (distinct pieces)"
            )


@dataclass(frozen=True)
class ParallelPlan:
    """Where the parameters of a model live on a device mesh, for an exact norm in one collective.

    Args:
        mesh: a ``DeviceMesh`` with named dimensions spanning every rank of the call (the world, or ``group``).
        names: every parameter of the full, unsharded model (not the tied copies), identical on every rank:
            these are the slots of per-parameter modes and reports.
        rules: first match wins; every name must match one (end with ``Rule("*")`` for a default).
        tied: ``(copy name, owner name)`` pairs: the copy is the owner's parameter appearing in another stage
            (its gradient already summed with the owner's). Copies are scaled, never counted.
        debug: cross-check the plan on the first call against an all-gathered reference (an extra collective,
            once) and raise ``RuntimeError`` on any over- or under-counting.
        group: the process group to reduce over, when the mesh does not span the world.
    """

    mesh: Any
    names: tuple[str, ...]
    rules: tuple[Rule, ...] = (Rule("*"),)
    tied: tuple[tuple[str, str], ...] = ()
    debug: bool = False
    group: dist.ProcessGroup | None = None
    # Not an __init__ field: dataclasses.replace() passed the old plan's memo on (its settings, its debug check done).
    _memo: dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        dims = getattr(self.mesh, "mesh_dim_names", None)
        if not dims:
            raise ValueError("ParallelPlan needs a DeviceMesh with mesh_dim_names (e.g. ('pp', 'tp')), got none")
        # Any iterable, stored as a tuple ("object of type 'generator' has no len()" before; a list of rules
        # or of tied pairs was kept as a list).
        # Not a set: its order is the process's hash order, different on each rank (names are the slots' order,
        # rules are tried in order); a dict's keys() keep their insertion order: taken.
        if isinstance(self.names, (str, bytes, Mapping, set, frozenset)) or not isinstance(self.names, Iterable):
            raise TypeError(f"ParallelPlan.names must be a tuple of parameter names, got {type(self.names).__name__}")
        object.__setattr__(self, "names", tuple(self.names))
        if not all(isinstance(n, str) for n in self.names):
            raise TypeError(f"ParallelPlan.names must be a tuple of parameter names (str), got {self.names[:5]!r}")
        if len(set(self.names)) != len(self.names):
            raise ValueError("ParallelPlan.names has duplicates; list every parameter of the full model once")
        if isinstance(self.rules, (Rule, set, frozenset)) or not isinstance(self.rules, Iterable):
            raise TypeError(f"ParallelPlan.rules must be a tuple of Rule, got {type(self.rules).__name__}")
        object.__setattr__(self, "rules", tuple(self.rules))
        if not all(isinstance(r, Rule) for r in self.rules):
            raise TypeError(f"ParallelPlan.rules must be a tuple of Rule, got {self.rules!r}")
        if not isinstance(self.tied, Iterable) or isinstance(self.tied, (str, bytes, Mapping)):
            raise TypeError(f"ParallelPlan.tied must be a tuple of (copy name, owner name) pairs, got {self.tied!r}")
        object.__setattr__(self, "tied", tuple(
            tuple(pair) if isinstance(pair, Iterable) and not isinstance(pair, (str, bytes, Mapping)) else pair
            for pair in self.tied))
        for pair in self.tied:  # (a 2-character string passed as a pair: "ba" read as copy "b" of owner "a")
            if not isinstance(pair, tuple) or not all(isinstance(n, str) for n in pair):
                raise TypeError(f"ParallelPlan.tied entries must be (copy name, owner name) pairs, got {pair!r}")
        if not isinstance(self.debug, bool):
            raise TypeError(f"ParallelPlan.debug must be True or False, got {self.debug!r}")
        for r in self.rules:
            unknown = [d for d in (*r.replicate, *r.distinct) if d not in dims]
            if unknown:
                raise ValueError(f"Rule({r.pattern!r}) names mesh dimensions {unknown}; the mesh has {tuple(dims)}")
        known = set(self.names)
        copies: set[str] = set()
        for pair in self.tied:
            if len(pair) != 2 or pair[1] not in known or pair[0] in known:
                raise ValueError(
                    f"tied entry {pair!r}: expected (copy name, owner name) with the owner in names and the copy not"
                )
            if pair[0] in copies:
                raise ValueError(f"tied entry {pair!r}: {pair[0]!r} is already tied to another owner; one owner each")
            copies.add(pair[0])
        chosen = {n: self._rule(n) for n in self.names}
        unmatched = [n for n, r in chosen.items() if r is None]
        if unmatched:
            raise ValueError(
                f"no rule matches {unmatched[:5]}{'...' if len(unmatched) > 5 else ''}; add a Rule for them "
                "(Rule('*') makes every remaining piece distinct)"
            )
        # A rule shadowed by earlier ones (it matches names, every one of them taken by an earlier rule: first
        # match wins) was ignored, and the names it meant fell to another rule (Rule('*') before a norm rule:
        # 15.94 for 15.13): refused. A rule matching no name at all is a template's rule for layers this model
        # lacks, or a misspelt pattern: warned. A repeated rule and a catch-all Rule('*') with nothing left are
        # fine.
        used = {id(r) for r in chosen.values()}
        shadowed, unused = [], []
        for i, r in enumerate(self.rules):
            if id(r) in used or r in self.rules[:i]:
                continue
            hits = [fnmatch.fnmatchcase(n, r.pattern) for n in self.names]
            if not all(hits):  # (a catch-all matching every name is a default, even with nothing left)
                (shadowed if any(hits) else unused).append(r)
        if shadowed:
            raise ValueError(
                f"{', '.join(repr(r) for r in shadowed)} never applies: every name it matches is taken by an earlier "
                "rule (rules are tried in order and the first match wins, so a rule after a broader one, such as "
                "Rule('*') first, is never reached); put specific rules first"
            )
        if unused:
            warnings.warn(
                f"dist_clip: {', '.join(repr(r) for r in unused)} match{'es' if len(unused) == 1 else ''} no name of "
                "the plan (a misspelt pattern, or a rule for layers this model lacks): the names it meant, if any, "
                "fall to a later rule",
                UserWarning,
                stacklevel=3,
            )
        if self.group is not None:
            if not isinstance(self.group, dist.ProcessGroup):
                raise TypeError(
                    f"ParallelPlan.group must be a torch.distributed ProcessGroup holding this rank, got "
                    f"{type(self.group).__name__} {self.group!r}"
                )
            held = sorted(dist.get_process_group_ranks(self.group))
            spanned = sorted(int(r) for r in self.mesh.mesh.reshape(-1).tolist())
            if held != spanned:
                # A rank of the group off the mesh had no coordinate and counted nothing (10.13 for 17.42); a
                # group missing coordinate 0 of a replicate dim counted no copy (0 for 17.42).
                raise ValueError(
                    f"ParallelPlan.group holds ranks {held}, but the mesh spans ranks {spanned}: group= must name "
                    "exactly the mesh's ranks"
                )
        elif self.mesh.size() != (dist.get_world_size() if dist.is_initialized() else 1):
            raise ValueError(
                f"the mesh spans {self.mesh.size()} ranks, not the world ({dist.get_world_size()}); pass group= "
                "naming a process group of exactly the mesh's ranks"
            )

    def _rule(self, name: str) -> Rule | None:
        for r in self.rules:
            if fnmatch.fnmatchcase(name, r.pattern):
                return r
        return None

    @property
    def reduction_group(self) -> dist.ProcessGroup | None:
        if self.group is not None:
            return self.group
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        return dist.group.WORLD

    def owner(self, name: str) -> str:
        """The full-model name a local parameter name stands for (the owner of a tied copy)."""
        return dict(self.tied).get(name, name)

    def counts_here(self, name: str, grad: Tensor, siblings: Any = None) -> bool:  # noqa: ANN401
        """Whether this rank is the one that counts its piece of ``name`` (grad may be a DTensor).

        ``siblings``: a :class:`~dist_clip.adapters.fsdp.GroupCounting` over this rank's DTensor gradients. Under
        a rule without ``replicate=`` it finds a DTensor's copies on the sibling slices of its mesh that this
        rank's other gradients span: FSDP2 over tensor parallelism leaves the norm layers' gradients on
        ``mesh["dp"]``, the same on every tp slice (``Rule("*")`` counted them once per slice: 1.33 for 1.28).
        The rule's ``distinct=`` dims are never taken for copies (experts on ``mesh["dp"]`` beside dense layers
        on the flattened ``("dp", "ep")`` mesh: only ep = 0 counted, 6.06 for 8.14).
        """
        dtensor = type(grad).__name__ == "DTensor"
        if dtensor:
            # Refused on every rank holding one, copies too: a replica off coordinate 0 of a replicate= dim passed
            # it (raising the others' "another rank refused" instead of its own ValueError), and a tied copy's
            # Partial gradient, not reduced before its sum with the owner's, was scaled and never refused.
            refuse_partial(name, tuple(grad.placements))
        if name in dict(self.tied):
            return False
        rule = self._rule(self.owner(name))
        assert rule is not None
        coord = self.mesh.get_coordinate()
        if coord is None:
            return False
        dims = list(self.mesh.mesh_dim_names)
        if any(coord[dims.index(d)] != 0 for d in rule.replicate):
            return False
        if dtensor:
            mesh = grad.device_mesh
            sub = mesh.get_coordinate()
            if sub is None:
                return False
            mesh_names = mesh.mesh_dim_names or ()
            distinct = [
                not pl.is_replicate() or (d < len(mesh_names) and mesh_names[d] in rule.distinct)
                for d, pl in enumerate(grad.placements)
            ]
            if siblings is not None and not rule.replicate:
                from .adapters.fsdp import _root_mesh

                return bool(siblings.counted(name, mesh, _root_mesh(mesh), tuple(sub), distinct,
                                             frozenset(rule.distinct)))
            if any(sub[d] != 0 for d, is_d in enumerate(distinct) if not is_d):
                return False
        return True

    def named_shards(self, target: object) -> _slots.Named:
        """This rank's pieces as Shards named by owner names, counted by the owner only."""
        from .adapters.params import gradient_of, listed_stand_ins, refuse_managed

        if isinstance(target, Mapping):
            # As without a plan: refused where FSDP2 has not reduced the gradients, and the sharded parameters
            # standing in for the unsharded ones (dict(model.named_parameters()) read 0 for 0.82 under
            # set_reshard_after_backward(False), 0.11 after an evaluation forward; under sync off each rank's own
            # sums, summed over the mesh: 1.57)
            items = list(listed_stand_ins([(k, target[k]) for k in sorted(target)]))
        elif isinstance(target, nn.Module):
            items = _module_parameters(target)
        elif isinstance(target, Sequence) and all(isinstance(x, nn.Module) for x in target):
            items = [pair for mod in target for pair in _module_parameters(mod)]  # several stages per rank
        else:
            raise TypeError(
                f"a plan's target is this rank's module (or list of stage modules) or a mapping {{name: tensor}}, "
                f"got {type(target).__name__}"
            )
        index = set(self.names)
        group = self.reduction_group
        counted: list[tuple[str, Tensor]] = []
        copies: list[tuple[str, Tensor]] = []
        seen: set[int] = set()
        params: dict[str, Tensor] = {}
        # One tensor under a tied copy's name and its owner's (the tie on one rank, e.g. a plan reused at one
        # pipeline stage): it is the owner's piece, whichever name comes first (the copy's went uncounted). So too
        # for a name of the plan beside an alias outside it (a weight shared by two modules, the full model's
        # named_parameters() listing its first name): a mapping is read in sorted order, and
        # dict(stage.named_parameters(remove_duplicate=False)) was refused when the alias sorted first
        # ('dec.weight' before 'enc.weight': "neither in the plan's names nor a tied copy"; 13.0 as the module).
        own_name: dict[int, str] = {}
        for name, t in items:
            if id(t) not in own_name or (own_name[id(t)] not in index and name in index):
                own_name[id(t)] = name
        items = [(name, t) for name, t in items if own_name[id(t)] == name]
        siblings = None
        if group is not None:
            meshes = [t.device_mesh for _, t in items if type(t).__name__ == "DTensor"]
            if meshes:
                from .adapters.fsdp import GroupCounting

                siblings = GroupCounting(group, meshes)
        for name, t in items:
            if not isinstance(t, Tensor):
                raise TypeError(f"expected tensors or parameters, got {type(t).__name__} at {name!r}")
            # A parameter whose gradient a sharding wrapper holds outside .grad (DeepSpeed ZeRO 1-3's partitions:
            # engine.module as a stage read 0 for 9.83, silently) or as an unnamed shard (fairscale FSDP): the
            # path without a plan refuses them, and so does the plan (the checks of the path without one).
            refuse_managed(name, t, plan=True)
            owner = self.owner(name)
            if owner not in index:
                raise ValueError(
                    f"this rank holds {name!r}, which is neither in the plan's names nor a tied copy; list every "
                    "parameter of the full model in ParallelPlan.names"
                )
            params.setdefault(owner, t)
            if id(t) in seen:
                continue
            seen.add(id(t))
            g = gradient_of(t)
            if g is None:
                continue
            here = self.counts_here(name, g, siblings)
            local = g._local_tensor if type(g).__name__ == "DTensor" else g
            (counted if here else copies).append((owner, local))
        out = [
            Shards([g for _, g in counted], group=group, counted=True, names=[n for n, _ in counted]),
            Shards([g for _, g in copies], group=group, counted=False, names=[n for n, _ in copies]),
        ]
        return _slots.Named(out, tuple(self.names), params)

    @property
    def settings(self) -> str:
        """The plan as the call's settings fingerprint compares it across ranks: rules, tied copies, debug and
        the mesh's dimensions (names are compared as the call's layout). Ranks with different rules gave one
        silent total that one rank's plan did not describe (4.13 by its rules, 10.32 returned). Orders that mean
        nothing (a rule's dimension names, the tied pairs) are sorted: a set's order differs between ranks."""
        cached = self._memo.get("settings")
        if cached is None:
            cached = self._memo["settings"] = (
                f"plan(rules={[(r.pattern, sorted(r.replicate), sorted(r.distinct)) for r in self.rules]!r}, "
                f"tied={sorted(self.tied, key=repr)!r}, debug={self.debug!r}, "
                f"dims={tuple(self.mesh.mesh_dim_names)!r}, shape={tuple(self.mesh.shape)!r})"
            )
        return cached

    def check_once(self, shards: Sequence[Shards], m: _slots.Measurement, p: float) -> None:
        """``debug=True``: on the first call, all-gather every piece and check the counting and the norm."""
        if not self.debug or self._memo.get("checked"):
            return
        from .testing import _wide

        # Each piece's values as the definition measures them (complex by their moduli: a cast to float64 kept
        # the real part only and failed a right plan, 12.37 for 13.04; sparse ones dense, so that their places
        # tell them apart: their reshape raised on that rank alone, the others waiting in the all-gather until
        # the timeout, and two stages' embeddings with equal values in other rows read as one piece).
        local = [
            (s.names[i], bool(s.counted), _wide(t.to_dense() if t.is_sparse else t).clone())
            for s in shards
            for i, t in enumerate(s.tensors)
        ]
        rank = dist.get_rank() if dist.is_initialized() else 0
        group = self.reduction_group
        if group is not None:
            gathered: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, (rank, local), group=group)
        else:
            gathered = [(rank, local)]
        under: list[str] = []
        problems, reference = _audit(gathered, p, under)
        got = float(m.total)
        if not problems and not _close(got, reference):
            problems.append(f"the one-collective norm {got!r} differs from the all-gathered reference {reference!r}")
        # Marked once it passed (on every rank alike): a caught failure audited nothing on the next call.
        self._memo["checked"] = not problems
        if problems:
            # Under a rule without replicate=, a DTensor piece left uncounted was taken for a copy on the sibling
            # slices of its mesh (experts beside a flattened dense mesh): the advice to shorten replicate= was
            # no use there.
            bare = sorted({r.pattern for r in map(self._rule, map(self.owner, under)) if r is not None
                           and not r.replicate})
            advice = "remove a dimension that holds distinct pieces from replicate="
            if bare:
                advice += (
                    f"; under {', '.join(f'Rule({b!r})' for b in bare)}, without replicate=, a DTensor on a slice "
                    "of the mesh is taken to be copied on the sibling slices this rank's other gradients span: "
                    "name the dimension along which the pieces differ in distinct=, e.g. "
                    "Rule('moe.*', distinct=('ep',))"
                )
            raise RuntimeError(
                "ParallelPlan debug check failed (every rank raises together):\n  " + "\n  ".join(problems[:20])
                + "\nA piece counted by two ranks is over-counted (add the copy dimension to the rule's "
                f"replicate=, or declare the tie); a piece counted by none is under-counted ({advice})."
            )


def _module_parameters(module: nn.Module) -> list[tuple[str, Tensor]]:
    """Every name of every parameter (a tied weight under each of its names), unwrapped as
    :func:`dist_clip._slots.module_parameters` names them, with the same checks and FSDP2 swap as the path
    without a plan (:func:`dist_clip.adapters.params.module_parameters`): a module FSDP2 left unsharded after
    backward is measured by its sharded parameters (its plain unsharded ones read 0: 0 for 3.26), gradient sync
    off (FSDP2, composable ``replicate``) and DDP's ``no_sync()`` are refused (each rank measured its own
    unreduced gradients), and DDP is unwrapped (its ``module.`` prefix was not in the plan's names)."""
    from .adapters import deepspeed, fairscale
    from .adapters.params import module_parameters, refuse_managed

    inner = _slots.unwrap_compiled(module)
    engine = deepspeed.matches(inner)
    if engine or fairscale._is(inner, fairscale._SDP):
        # The wrapper passed itself failed on its ``module.`` names, with advice to list them in the plan's names
        # (a ZeRO 1-3 engine's parameters get their own refusal first, below).
        for n, q in module_parameters(inner, remove_duplicate=False):  # type: ignore[arg-type]
            refuse_managed(n, q, plan=True)
        what, remedy = ("a DeepSpeed engine", "the engine itself") if engine else (
            "fairscale's ShardedDataParallel (it reduces each gradient to its OSS owner only)",
            "the ShardedDataParallel or its OSS optimizer")
        raise ValueError(f"a ParallelPlan reads plain, DDP, FSDP2 and DTensor modules, not {what}; clip {remedy} "
                         "without plan=")
    ddp = _slots._ddp_module(inner)  # type: ignore[arg-type]  # refuses a call inside no_sync()
    if ddp is not None:
        inner = _slots.unwrap_compiled(ddp)
    pairs = module_parameters(inner, remove_duplicate=False)  # type: ignore[arg-type]
    if any(getattr(q, "_fsdp_flattened", False) for _, q in pairs):
        # FlatParameters (or, with use_orig_params=True, views of this rank's part of one, whole unreduced
        # gradients inside no_sync()): nothing here maps them to the plan's names and slices.
        raise ValueError(
            "FSDP1 flat parameters are not supported under a plan (the target's parameters are managed by "
            "FullyShardedDataParallel, with use_orig_params or without): clip the FSDP1 module without plan=, "
            "or shard it with FSDP2 (fully_shard), whose DTensor gradients a plan reads"
        )
    return [(_slots.clean_name(n), q) for n, q in pairs]


def _close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b  # inf - inf is NaN: a correct plan on an overflowing step failed its audit
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b)) + 1e-30


def _audit(gathered: Sequence[tuple[int, list[tuple[str, bool, Tensor]]]], p: float,
           under: list[str] | None = None) -> tuple[list[str], float]:
    """Every distinct non-zero piece must be counted by exactly one rank.

    Pieces are told apart by content, whatever name they are held under: copies (replicas, tensor-parallel
    duplicates, tied parameters in two stages) hold the same values, distinct shards of real gradients do not.
    All-zero pieces add nothing to any norm and are not checked. Returns the problems and the reference norm
    over the distinct pieces; the names of under-counted pieces are appended to ``under``.
    """
    by_content: dict[bytes, list[tuple[int, str, bool, Tensor]]] = {}
    for rank, pieces in gathered:
        for name, counted, t in pieces:
            if t.numel() == 0 or not bool((t != 0).any()):
                continue
            by_content.setdefault(_norm.tensor_bytes(t), []).append((rank, name, counted, t))
    problems: list[str] = []
    distinct: list[Tensor] = []
    for holders in sorted(by_content.values(), key=lambda h: (h[0][1], h[0][0])):
        names = sorted({n for _, n, _, _ in holders})
        counters = sorted(r for r, _, c, _ in holders if c)
        ranks = sorted(r for r, _, _, _ in holders)
        what = f"a piece of {names[0]!r}" if len(names) == 1 else f"a piece held as {names}"
        if len(counters) > 1:
            problems.append(f"over-counted: {what} held by ranks {ranks} is counted by ranks {counters}")
        elif not counters:
            problems.append(f"under-counted: {what} held by ranks {ranks} is counted by no rank")
            if under is not None:
                under.extend(names)
        distinct.append(holders[0][3])
    if not distinct:
        return problems, 0.0
    flat = torch.cat(distinct)
    if bool(flat.isnan().any()):  # NaN for every p, as the one-collective norm gives (vector_norm counts it at 0)
        return problems, math.nan
    return problems, float(torch.linalg.vector_norm(flat, p))


@_fused.never_traced  # see clip._eager
def get_total_norm(target: object, plan: ParallelPlan, norm_type: float | str = 2.0) -> Tensor:
    """The norm of the full model's gradients under ``plan``; one collective. Must be called on every rank.

    A measurement only: the gradients are not touched (a clipper with an infinite limit multiplied them by
    inf / (inf + 1e-6) = NaN when the norm was inf or NaN; it now leaves them alone for an inf norm, and a NaN
    norm still makes them NaN)."""
    from . import _norm
    from . import clip as _clip_api
    from .clipper import _with_agreed, named_under_plan

    p = _norm.parse_norm_type(norm_type)
    if not isinstance(plan, ParallelPlan):
        raise TypeError(f"plan must be a dist_clip.ParallelPlan, got {type(plan).__name__}")
    # one stage's bad input: every rank raises together (with the verdict's slot, as the call sends it)
    named, _ = named_under_plan(plan, target, p, None, None, True)
    index = {n: i for i, n in enumerate(named.names)}
    tensors = [t for s in named.shards for t in s.tensors]
    _clip_api.settle_hand_over(target, lambda: tensors)
    # This rank's read of every optimizer's agreed skip flags, one more value in the all-reduce, which decides
    # them (see _fused.Agreement), as in the other calls (0 unread where the plan's group is this rank alone)
    agreement = _fused.Agreement()
    red = _slots.reduction_group_of(named.shards, plan.reduction_group)
    m = _slots.measure(named.shards, (lambda n, _i: index[n]) if named.names else None,
                       max(len(named.names), 1), p, None, presence=True, group=plan.reduction_group,
                       layout=named.names, extra=_with_agreed(None, agreement.sent(_reduce.group_size(red) > 1)),
                       result_dtype=_clip_api._result_dtype(tensors, None),
                       settings=f"norm_type={p!r}, {plan.settings}")
    assert m.extra is not None
    agreement.agree(m.extra[-1], alone=_reduce.group_size(m.group) <= 1, group=m.group)
    plan.check_once(named.shards, m, p)
    assert m.result_dtype is not None
    return m.total.to(m.result_dtype)


@_fused.never_traced  # see clip._eager
def clip_grad_norm_(target: object, max_norm: float, plan: ParallelPlan, norm_type: float | str = 2.0) -> Tensor:
    """Clip this rank's pieces so that the full model's gradient norm is at most ``max_norm``; one collective.

    Must be called on every rank of the plan's mesh. Returns the total norm before clipping (0-dim float32).
    """
    from . import _norm
    from .clipper import GradClipper, _refuse_together

    try:
        clipper = GradClipper(max_norm=max_norm, norm_type=norm_type)
    except (ValueError, TypeError):
        # A bad max_norm on this stage alone (NaN, negative, not a number: the clipper's config refuses it) joins
        # the others' collective as a refusal under the plan does: it raised alone, and the others' collective met
        # this rank's next call (gloo aborted its process on the lengths). Not where the layout is unknown here
        # (an invalid norm_type: its combine op; a plan of another type), as in the other calls.
        try:
            p = _norm.parse_norm_type(norm_type)
        except (ValueError, TypeError):
            p = None
        if p is not None and isinstance(plan, ParallelPlan):
            _refuse_together(plan, p, False, True)  # (as the call's plan path lays it out: total mode, the verdict)
        raise
    return clipper(target, plan=plan).total_norm
