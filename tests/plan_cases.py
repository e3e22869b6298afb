"""Rank-side bodies of tests/test_random_plans.py: random layouts under a ParallelPlan, against the float64 model.

Each trial draws (from its seed, the same on every rank) a mesh of 1-3 named dimensions (pp, tp, dp, ep, sizes 1-4)
and a full model of 2-7 parameters of random shapes (1-3 dims, sizes 1-9), then lays every parameter out on it:
a pipeline stage (pp), an expert held on one ep coordinate or a dense copy along ep, and along tp and dp either
a copy (a plain tensor under ``replicate=``, or a ``Replicate`` DTensor) or a shard along a random tensor dimension,
cut as DTensor cuts (``torch.chunk``: uneven pieces, empty ones where a dimension is smaller than the mesh), held
as a DTensor over the tp/dp dims or as a plain hand-cut piece. Stages may hold nothing, a parameter may appear as a
tied copy in another stage, and on 4 ranks two jobs may run side by side with ``group=`` their own slice.

Checked against the float64 unsharded gradients: the total and per-parameter norms for p in {0, 1, 2, 3.5, inf},
the clipped pieces in "total", "per_param" and "per_group" modes (an optimizer per stage holding its own pieces),
``foreach``, bf16 and fp16 gradients, ``debug=True``, and non-finite gradients under ``on_nonfinite`` "error" and
"skip"; each measurement makes one collective (three on a ``debug=True`` plan's first call, its audit's).
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
import torch.distributed as dist

import dist_clip
from dist_clip import GradClipper, ParallelPlan, Rule, compose
from dist_clip.testing import count_collectives, reference_norm
from tests.fsdp_cases import mesh as cached_mesh

ORDERS = (0.0, 1.0, 2.0, 3.5, math.inf)
RTOL = 1e-5


def _close(got: float, want: float, rtol: float = RTOL) -> bool:
    if math.isnan(want):
        return math.isnan(got)
    return got == want if want in (0.0, math.inf) else abs(got - want) <= rtol * abs(want)


def _draw_mesh(rnd: random.Random, ws: int) -> tuple[tuple[int, ...], tuple[str, ...], bool]:
    """(shape, names, jobs): 1-3 named dims whose sizes multiply to ``ws`` (size-1 dims among them); with
    ``jobs`` a leading "job" dim of 2 splits the world into two plans, each over its own slice and group."""
    jobs = ws == 4 and rnd.random() < 0.2
    left = ws // 2 if jobs else ws
    sizes = [left] if left in (1, 2, 3) or rnd.random() < 0.4 else [2, 2]
    if rnd.random() < 0.3 and len(sizes) < 3:
        sizes.insert(rnd.randrange(len(sizes) + 1), 1)
    names = tuple(rnd.sample(["pp", "tp", "dp", "ep"], len(sizes)))
    if jobs:
        return (2, *sizes), ("job", *names), True
    return tuple(sizes), names, False


def _draw_model(rnd: random.Random, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    full = {}
    for i in range(rnd.randint(2, 7)):
        shape = tuple(rnd.randint(1, 9) for _ in range(rnd.randint(1, 3)))
        full[f"p{i}"] = torch.randn(shape, generator=g, dtype=torch.float64) * rnd.choice((0.01, 1.0, 3.0, 100.0))
    return full


class Layout:
    """Where one parameter's pieces live: ``where[dim]`` is "copy", ("shard", tensor dim) or ("at", coordinate),
    ``dtensor`` the mesh dims it is a DTensor over (tp/dp only)."""

    def __init__(self, where: dict[str, Any], dtensor: tuple[str, ...]) -> None:
        self.where = where
        self.dtensor = dtensor

    def __repr__(self) -> str:
        return f"{self.where}{' DT' + str(self.dtensor) if self.dtensor else ''}"


def _draw_layout(rnd: random.Random, shape: tuple[int, ...], dims: dict[str, int]) -> Layout:
    where: dict[str, Any] = {}
    for d, size in dims.items():
        if d in ("pp", "ep"):
            where[d] = ("at", rnd.randrange(size)) if d == "pp" or rnd.random() < 0.5 else "copy"
        else:
            where[d] = "copy" if rnd.random() < 0.35 else ("shard", rnd.randrange(len(shape)))
    tpdp = [d for d in dims if d in ("tp", "dp")]
    dtensor: tuple[str, ...] = ()
    if tpdp and rnd.random() < 0.6:
        dtensor = tuple(d for d in tpdp if rnd.random() < 0.8) or (tpdp[0],)
    return Layout(where, dtensor)


def _piece(full: torch.Tensor, layout: Layout, coord: dict[str, int], dims: dict[str, int]) -> torch.Tensor | None:
    """This rank's piece (None where it holds none), cut along the mesh dims in mesh order, as DTensor cuts."""
    t = full
    for d, size in dims.items():
        w = layout.where[d]
        if w == "copy":
            continue
        if w[0] == "at":
            if coord[d] != w[1]:
                return None
            continue
        chunks = list(t.chunk(size, dim=w[1]))
        if coord[d] < len(chunks):
            t = chunks[coord[d]]
        else:  # (torch.chunk gives fewer chunks than asked where the dim is small: this rank's is empty)
            shape = list(t.shape)
            shape[w[1]] = 0
            t = t.new_zeros(shape)
    return t.contiguous().clone()


def _as_dtensor(local: torch.Tensor, layout: Layout, mesh: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Replicate, Shard

    sub = mesh[layout.dtensor] if len(layout.dtensor) > 1 else mesh[layout.dtensor[0]]
    placements = [Replicate() if layout.where[d] == "copy" else Shard(layout.where[d][1]) for d in layout.dtensor]
    return DTensor.from_local(local, sub, placements, run_check=False)


def _rule(name: str, layout: Layout, rnd: random.Random) -> Rule:
    replicate = [d for d, w in layout.where.items() if w == "copy" and (d not in layout.dtensor or rnd.random() < 0.3)]
    # A DTensor held over some tp/dp dims and cut by hand along another: that dim holds distinct pieces.
    distinct = [d for d, w in layout.where.items()
                if layout.dtensor and d not in layout.dtensor and d in ("tp", "dp") and w != "copy"]
    return Rule(name, replicate=tuple(replicate), distinct=tuple(distinct))


def draw(seed: int, ws: int) -> dict[str, Any]:
    """The trial's drawing, identical on every rank."""
    rnd = random.Random(seed)
    shape, names, jobs = _draw_mesh(rnd, ws)
    dims = dict(zip(names, shape))
    if jobs:
        dims.pop("job")
    full = _draw_model(rnd, seed)
    layouts = {n: _draw_layout(rnd, tuple(t.shape), dims) for n, t in full.items()}
    tied: list[tuple[str, str]] = []
    if "pp" in dims and dims["pp"] > 1 and rnd.random() < 0.5:
        owner = rnd.choice(sorted(full))
        lo = layouts[owner]
        other = rnd.choice([s for s in range(dims["pp"]) if s != lo.where["pp"][1]])
        layouts["tie0"] = Layout({**lo.where, "pp": ("at", other)}, lo.dtensor)
        tied.append(("tie0", owner))
    rules = [_rule(n, lo, rnd) for n, lo in layouts.items() if n not in dict(tied)]
    if rnd.random() < 0.3:  # the plain distinct ones under a catch-all
        rules = [r for r in rules if r.replicate or r.distinct] + [Rule("*")]
    return dict(rnd=rnd, shape=shape, names=names, jobs=jobs, dims=dims, full=full, layouts=layouts, tied=tied,
                rules=tuple(rules))


def _pieces(d: dict[str, Any], full: dict[str, torch.Tensor], coord: dict[str, int], m: Any,
            dtype: torch.dtype) -> dict[str, torch.nn.Parameter]:
    out = {}
    owners = dict(d["tied"])
    for name, lo in d["layouts"].items():
        src = full[owners.get(name, name)]
        g = _piece(src, lo, coord, d["dims"])
        w = _piece(src.nan_to_num(0.0, 0.0, 0.0) * 0.5 + 1.0, lo, coord, d["dims"])
        if g is None:
            continue
        g, w = g.to(dtype), w.to(dtype)
        if lo.dtensor:
            g, w = _as_dtensor(g, lo, m), _as_dtensor(w, lo, m)
        q = torch.nn.Parameter(w)
        q.grad = g
        out[name] = q
    return out


_GROUPS: dict[tuple[int, ...], Any] = {}


def _job_group(world_mesh: Any, job: int) -> Any:
    """The process group of this job's ranks (every rank makes both jobs' groups, in the same order)."""
    key = tuple(world_mesh.mesh.shape)
    if key not in _GROUPS:
        _GROUPS[key] = [dist.new_group([int(r) for r in world_mesh.mesh[j].reshape(-1).tolist()]) for j in (0, 1)]
    return _GROUPS[key][job]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if type(t).__name__ == "DTensor" else t


def one_trial(seed: int, ws: int, heavy: bool = True) -> list[str]:
    d = draw(seed, ws)
    rnd = d["rnd"]
    world_mesh = cached_mesh(d["shape"], d["names"])
    coord = dict(zip(d["names"], world_mesh.get_coordinate()))
    full = dict(d["full"])
    group = None
    m = world_mesh
    if d["jobs"]:
        job = coord.pop("job")
        rest = tuple(n for n in d["names"] if n != "job")
        m = world_mesh[rest] if len(rest) > 1 else world_mesh[rest[0]]
        group = m.get_group() if len(rest) == 1 else _job_group(world_mesh, job)
        # each job its own model: scaled apart
        full = {n: t * (1 + 3 * job) for n, t in full.items()}
    where = f"seed {seed} ws {ws} mesh {dict(zip(d['names'], d['shape']))} layouts {d['layouts']} tied {d['tied']}"
    errors: list[str] = []

    def plan(**kw: Any) -> ParallelPlan:
        return ParallelPlan(m, names=tuple(full), rules=d["rules"], tied=tuple(d["tied"]), group=group, **kw)

    # (one draw for both half dtypes, so that the seeds' later draws stay as they were; seeds 0-5 draw both)
    draw_dtype = rnd.random()
    dtype = torch.bfloat16 if draw_dtype < 0.24 else torch.float16 if draw_dtype < 0.32 else torch.float32
    ref = {n: t.to(dtype).double() for n, t in full.items()}
    # clipped pieces, rounded to their dtype: fp16's subnormals (below 6.1e-5, a small group limit's coefficient
    # times a 0.01-scaled gradient) are 6e-8 apart
    tol, atol = (1e-6, 1e-9) if dtype == torch.float32 else (1e-2, 1e-7 if dtype == torch.float16 else 1e-9)
    tag = f"{where} {dtype}"

    def target_of(params: dict[str, torch.nn.Parameter]) -> Any:
        if rnd.random() < 0.5:
            return params  # a mapping of parameters
        module = torch.nn.Module()  # the stage as a module (the path of _module_parameters)
        for n, q in params.items():
            module.register_parameter(n, q)
        return module if rnd.random() < 0.5 else [module, torch.nn.Module()]  # or a list of stage modules

    # ---- norms
    for p in ORDERS:
        params = _pieces(d, full, coord, m, dtype)
        want = reference_norm(list(ref.values()), p)
        try:
            target = target_of(params)
            debug = rnd.random() < 0.2
            with count_collectives() as calls:
                got = compose.get_total_norm(target, plan(debug=debug), p).item()
        except Exception as e:  # noqa: BLE001
            errors.append(f"{tag} p={p}: get_total_norm raised {type(e).__name__}: {e}")
            continue
        # one all-reduce; debug=True's audit adds all_gather_object's two all-gathers (sizes, then data)
        if calls.names.count("gloo:all_reduce") != 1 or calls.total != (3 if debug else 1):
            errors.append(f"{tag} p={p} debug={debug}: collectives {calls.names}")
        if not _close(got, want):
            errors.append(f"{tag} p={p}: total {got} != {want}")
        norms = GradClipper(max_norm=1e30, norm_type=p, mode="per_param", report=True)(target_of(params),
                                                                                        plan=plan()).norms
        for n, g in ref.items():
            w1 = reference_norm([g], p)
            if n not in norms or not _close(norms[n], w1):
                errors.append(f"{tag} p={p}: per_param {n} {norms.get(n)} != {w1}")
    if not heavy:
        return errors
    # ---- clipping, total and per_param
    p = rnd.choice(ORDERS)
    for mode in ("total", "per_param"):
        params = _pieces(d, full, coord, m, dtype)
        before = {n: _local(q.grad).double().clone() for n, q in params.items()}
        total = reference_norm(list(ref.values()), p)
        max_norm = 0.5 * total if total else 1.0
        foreach = rnd.choice((None, False, True))
        if mode == "total" and rnd.random() < 0.5:
            compose.clip_grad_norm_(params, max_norm, plan(), p)
        else:
            GradClipper(max_norm=max_norm, norm_type=p, mode=mode, foreach=foreach)(params, plan=plan())
        owners = dict(d["tied"])
        for n, q in params.items():
            o = owners.get(n, n)
            base = total if mode == "total" else reference_norm([ref[o]], p)
            coef = min(1.0, max_norm / (base + 1e-6))
            if not torch.allclose(_local(q.grad).double(), before[n] * coef, rtol=tol, atol=atol):
                errors.append(f"{tag} {mode} p={p} foreach={foreach}: clipped {n} coef {coef}")
    # ---- per_group: an optimizer per rank over its own pieces, group of each owner drawn
    n_groups = rnd.randint(1, 3)
    group_of = {n: rnd.randrange(n_groups) for n in full}
    limits = [rnd.choice((0.1, 1.0, 10.0)) for _ in range(n_groups)]
    params = _pieces(d, full, coord, m, dtype)
    owners = dict(d["tied"])
    before = {n: _local(q.grad).double().clone() for n, q in params.items()}
    opt = torch.optim.SGD([{"params": [q for n, q in params.items() if group_of[owners.get(n, n)] == k],
                            "max_norm": limits[k]} for k in range(n_groups)], lr=0.1)
    pg = rnd.choice((0.0, 1.0, 2.0, math.inf))
    try:
        res = GradClipper(norm_type=pg, mode="per_group")(params, plan=plan(), optimizer=opt)
        want_g = [reference_norm([t for n, t in ref.items() if group_of[n] == k], pg) for k in range(n_groups)]
        coefs = [min(1.0, limits[k] / (want_g[k] + 1e-6)) for k in range(n_groups)]
        got_c = res.clip_coef.reshape(-1).tolist()
        if len(got_c) != n_groups or not all(_close(a, b) for a, b in zip(got_c, coefs)):
            errors.append(f"{tag} per_group p={pg} groups {group_of}: coefs {got_c} != {coefs}")
        for n, q in params.items():
            if not torch.allclose(_local(q.grad).double(), before[n] * coefs[group_of[owners.get(n, n)]],
                                  rtol=tol, atol=atol):
                errors.append(f"{tag} per_group p={pg}: clipped {n}")
    except Exception as e:  # noqa: BLE001
        errors.append(f"{tag} per_group p={pg} groups {group_of}: raised {type(e).__name__}: {e}")
    # ---- adaptive limits: three calls, each on fresh pieces of the model scaled by the call, against the same
    # policy fed the float64 reference norms (AutoClip: percentile of the history, current norm included)
    pa = rnd.choice((1.0, 2.0, math.inf))
    policy = rnd.choice(("autoclip", "zclip"))
    limit = dist_clip.AutoClip(percentile=50) if policy == "autoclip" else dist_clip.ZClip(warmup_steps=2)
    clipper = GradClipper(max_norm=limit, norm_type=pa)
    norms_seen: list[float] = []
    for k, scale in enumerate((1.0, 3.0, 0.5)):
        params = _pieces(d, {n: t * scale for n, t in full.items()}, coord, m, dtype)
        res = clipper(params, plan=plan())
        want_n = reference_norm([(t * scale).to(dtype).double() for t in full.values()], pa)
        norms_seen.append(want_n)
        if not _close(float(res.total_norm), want_n):
            errors.append(f"{tag} {policy} call {k} p={pa}: total {float(res.total_norm)} != {want_n}")
        if policy == "autoclip":
            thr = float(torch.quantile(torch.tensor(norms_seen, dtype=torch.float64), 0.5))
            coef = min(1.0, thr / (want_n + 1e-6))
            if not _close(float(res.clip_coef), coef, 1e-4):
                errors.append(f"{tag} autoclip call {k} p={pa}: coef {float(res.clip_coef)} != {coef}")
        errors += [] if dist.get_world_size() == 1 else _agree(float(res.clip_coef), f"{tag} {policy} call {k}", group)
    # ---- non-finite: a NaN or inf in one owner's full gradient (every holder of it sees it)
    bad = rnd.choice(sorted(full))
    value = rnd.choice((math.nan, math.inf))
    poisoned = {n: t.clone() for n, t in full.items()}
    poisoned[bad].view(-1)[rnd.randrange(poisoned[bad].numel())] = value
    for policy in ("error", "skip"):
        params = _pieces(d, poisoned, coord, m, dtype)
        before = {n: _local(q.grad).clone() for n, q in params.items()}
        weights = {n: _local(q).detach().clone() for n, q in params.items()}
        opt = torch.optim.SGD([{"params": list(params.values())}], lr=0.1)
        try:
            res = GradClipper(max_norm=1.0, on_nonfinite=policy)(params, plan=plan(), optimizer=opt)
            if policy == "skip":
                opt.step()
                if not all(torch.equal(_local(q).detach(), weights[n]) for n, q in params.items()):
                    errors.append(f"{tag} nonfinite {bad}={value} skip: stepped")
            if policy == "error":
                errors.append(f"{tag} nonfinite {bad}={value} error: returned {res.total_norm}")
            elif bool(res.finite) or not all(torch.equal(_local(q.grad), before[n]) or
                                              (torch.isnan(before[n]).any() and torch.equal(
                                                  _local(q.grad).isnan(), before[n].isnan()))
                                              for n, q in params.items()):
                errors.append(f"{tag} nonfinite {bad}={value} skip: finite={res.finite} or gradients touched")
        except RuntimeError as e:
            if policy != "error":
                errors.append(f"{tag} nonfinite {bad}={value} {policy}: raised {e}")
        except Exception as e:  # noqa: BLE001
            errors.append(f"{tag} nonfinite {bad}={value} {policy}: raised {type(e).__name__}: {e}")
    return errors


def _agree(value: float, what: str, group: Any = None) -> list[str]:
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, value, group=group)
    same = all(v == everyone[0] or (math.isnan(v) and math.isnan(everyone[0])) for v in everyone)
    return [] if same else [f"{what}: ranks differ {everyone}"]


def random_plans(seeds: list[int], heavy: bool = True) -> list[str]:
    ws = dist.get_world_size()
    errors: list[str] = []
    for seed in seeds:
        try:
            errors += one_trial(seed, ws, heavy)
        except Exception as e:  # noqa: BLE001
            import traceback

            errors.append(f"seed {seed}: raised {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
            raise RuntimeError("\n".join(errors[-3:])) from e
    return errors


def _module_trial(seed: int, ws: int) -> list[str]:
    """A real model under a plan: random widths, layers drawn column- or row-parallel over tp
    (``parallelize_module``) or left out, sharded over dp by ``fully_shard`` or not; the gradients FSDP2 leaves
    unreduced are averaged over dp by hand, as a user must. Rules name every copy dim explicitly, or are left to
    the placements and the sibling inference (``Rule("*")``) where every layer is FSDP2 and tensor parallel."""
    import copy

    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from tests.random_cases import Layer

    rnd = random.Random(seed)
    shape, names = {2: [((2,), ("tp",)), ((2,), ("dp",)), ((1, 2), ("dp", "tp"))], 3: [((3,), ("tp",))],
                    4: [((2, 2), ("dp", "tp")), ((4,), ("tp",)), ((2, 2), ("tp", "dp"))]}[ws][rnd.randrange(
                        {2: 3, 3: 1, 4: 3}[ws])]
    m = cached_mesh(shape, names)
    dims = dict(zip(names, shape))
    coord = dict(zip(names, m.get_coordinate()))
    widths = [rnd.randint(1, 9) for _ in range(rnd.randint(2, 5))]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[Layer(a, b, rnd.random() < 0.7) for a, b in zip(widths, widths[1:])])
    ref = copy.deepcopy(model).double()
    ndp = dims.get("dp", 1)

    def batch(k: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(3, widths[0], generator=torch.Generator().manual_seed(500 + k)).to(dtype)

    for k in range(ndp):
        (ref(batch(k, torch.float64)).pow(2).sum() / ndp).backward()
    want = {n: q.grad.detach().clone() for n, q in ref.named_parameters()}
    tp_kind: list[str] = []
    if "tp" in dims:
        i = 0
        while i < len(model):
            r = rnd.random()
            # (a pair cut unevenly between them fails in torch's DTensor matmul, on some ranks only)
            if r < 0.3 and i + 1 < len(model) and widths[i + 1] % dims["tp"] == 0:
                tp_kind += ["col", "row"]
                i += 2
                continue
            tp_kind.append("colrep" if r < 0.5 else "rowrep" if r < 0.7 else "none")
            i += 1
        styles = {"col": ColwiseParallel(), "row": RowwiseParallel(),
                  "colrep": ColwiseParallel(output_layouts=Replicate()),
                  "rowrep": RowwiseParallel(input_layouts=Replicate())}
        parallelize_module(model, m["tp"], {f"{i}.lin": styles[k] for i, k in enumerate(tp_kind) if k in styles})
    else:
        tp_kind = ["none"] * len(model)
    sharded = []
    if "dp" in dims:
        for i, layer in enumerate(model):
            # (an empty tensor-parallel shard under fully_shard fails in torch's reduce-scatter on that rank only:
            # "_chunk_cat expects non-empty tensor")
            cut = {"col": widths[i + 1], "colrep": widths[i + 1], "row": widths[i], "rowrep": widths[i]}
            if rnd.random() < 0.7 and cut.get(tp_kind[i], 99) >= dims.get("tp", 1):
                fully_shard(layer, mesh=m["dp"])
                sharded.append(i)
    model(batch(coord.get("dp", 0), torch.float32)).pow(2).sum().backward()
    dp_group = m.get_group("dp") if "dp" in dims else None
    for i, layer in enumerate(model):
        if i in sharded or dp_group is None:
            continue
        for q in layer.parameters():
            if q.grad is not None:
                local = q.grad._local_tensor if type(q.grad).__name__ == "DTensor" else q.grad
                dist.all_reduce(local, group=dp_group)
                local.div_(ndp)
    rules = []
    for i in range(len(model)):
        rep = [d for d in dims if (d == "dp" and i not in sharded) or (d == "tp" and tp_kind[i] == "none")]
        # FSDP2 layers off tp are copies over tp: the placements do not say so (left to the sibling inference
        # where another gradient spans both dims, else named)
        if "tp" in dims and i in sharded and tp_kind[i] == "none" and "dp" in dims:
            spans = any(j in sharded and tp_kind[j] != "none" for j in range(len(model)))
            if not spans or rnd.random() < 0.5:
                rep.append("tp")
        rules.append(Rule(f"{i}.*", replicate=tuple(rep)))
    plan_names = tuple(want)
    where = f"module seed {seed} mesh {dims} widths {widths} tp {tp_kind} fsdp {sharded}"
    errors: list[str] = []
    for p in ORDERS:
        plan = ParallelPlan(m, names=plan_names, rules=tuple(rules), debug=rnd.random() < 0.3)
        try:
            got = compose.get_total_norm(model, plan, p).item()
        except Exception as e:  # noqa: BLE001
            errors.append(f"{where} p={p}: raised {type(e).__name__}: {e}")
            continue
        w = reference_norm(list(want.values()), p)
        if not _close(got, w):
            errors.append(f"{where} p={p}: total {got} != {w}")
        norms = GradClipper(max_norm=1e30, norm_type=p, mode="per_param", report=True)(model, plan=plan).norms
        for n, g in want.items():
            if n not in norms or not _close(norms[n], reference_norm([g], p)):
                errors.append(f"{where} p={p}: per_param {n} {norms.get(n)} != {reference_norm([g], p)}")
    p = rnd.choice(ORDERS)
    total = reference_norm(list(want.values()), p)
    max_norm = 0.5 * total if total else 1.0
    coef = min(1.0, max_norm / (total + 1e-6))
    before = {n: _local(q.grad).double().clone() for n, q in model.named_parameters() if q.grad is not None}
    compose.clip_grad_norm_(model, max_norm, ParallelPlan(m, names=plan_names, rules=tuple(rules)), p)
    for n, q in model.named_parameters():
        if q.grad is not None and not torch.allclose(_local(q.grad).double(), before[n] * coef, rtol=1e-6, atol=1e-9):
            errors.append(f"{where} clip p={p}: {n}")
    return errors


def random_modules(seeds: list[int]) -> list[str]:
    ws = dist.get_world_size()
    errors: list[str] = []
    for seed in seeds:
        errors += _module_trial(seed, ws)
    return errors
