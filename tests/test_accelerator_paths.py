"""The accelerator branches on the CPU: a copy of the package whose ``.type == "cpu"`` tests name a device nobody
has, so CPU tensors take the paths CUDA takes (fused multi-tensor kernels, no host reads, 1-element coefficients).

Those paths are otherwise run only on a GPU machine (``tests/test_gpu.py``), which most sessions and CI lack; the
rewrite checks their arithmetic here against the float64 reference, and their host syncs with a recorder
(:data:`_RECORDER`): every operation that would stall the host on CUDA (a read of a device value, an op whose
output size depends on device values, a copy to the host, a blocking copy from it), called from dist_clip's code
on a tensor that stands for a device one. What it cannot check: the CUDA kernels themselves, and syncs inside
torch's own kernels below the op a dist_clip line calls (``tests/test_gpu.py`` under
``torch.cuda.set_sync_debug_mode("error")`` on a GPU).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dist_clip

#: The modules whose device tests decide between the CPU's paths and the accelerators'.
_REWRITTEN = ("_scale.py", "_slots.py", "_reduce.py", "clip.py", "_fused.py", "_norm.py", "clipper.py")
_DEVICE_TEST = re.compile(r'(\.type) (==|!=) "cpu"')


@pytest.fixture(scope="module")
def off_host_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("off_host")
    package = root / "dist_clip"
    shutil.copytree(Path(dist_clip.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "syncs.py").write_text(_RECORDER)
    for name in _REWRITTEN:
        path = package / name
        text, n = _DEVICE_TEST.subn(r'\1 \2 "nodev"', path.read_text())
        assert n, f"{name} has no device test left to rewrite: update _REWRITTEN"
        path.write_text(text)
    return root


_RECORDER = '''
"""Host syncs CUDA would make, recorded on the CPU (see tests/test_accelerator_paths.py).

Every tensor stands for a device tensor except host ones: made by a factory without a device (or on "cpu"),
computed from host tensors alone, or copied to the host. Recorded, where a dist_clip frame of this copy is on the
stack: reads of a device value (item, float, bool, int, index, tolist, numpy; aten._local_scalar_dense), ops whose
output size depends on device values (nonzero, masked_select, boolean-mask indexing, unique, bincount, sparse
coalesce, equal, repeat_interleave without output_size), copies to the host (cpu(), to("cpu"), copy_ into a host
tensor) and blocking copies from it (a host tensor's to(device) without non_blocking, torch.tensor(...,
device=...), copy_ of a host tensor into a device one).
"""
import os
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
_PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_clip") + os.sep
_TAG = "_dist_clip_host"
_SYNC_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default,
             aten.masked_select.default, aten.equal.default, aten._unique.default, aten._unique2.default,
             aten.unique_dim.default, aten.unique_consecutive.default, aten.bincount.default,
             aten._coalesce.default}
_INDEXING = (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_)
_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
          torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__}
_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
              torch.linspace, torch.scalar_tensor, torch.randn, torch.rand, torch.eye}


def host(t):
    return isinstance(t, torch.Tensor) and getattr(t, _TAG, False)


def _tensors(args, kwargs):
    return [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]


def _host_device(d):
    return isinstance(d, str) and d.startswith("cpu")


class _Dispatch(TorchDispatchMode):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors(args, kwargs)
        if not (tensors and all(map(host, tensors))):
            if func in _SYNC_OPS:
                self.record(str(func))
            elif func.overloadpacket in _INDEXING:
                index = args[1] if len(args) > 1 else kwargs.get("indices")
                if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in index or ()):
                    self.record(f"{func} with a boolean index")
            elif (func.overloadpacket is aten.repeat_interleave and func._overloadname.startswith("Tensor")
                  and kwargs.get("output_size") is None):
                self.record(f"{func} without output_size")
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        src = args[0] if args else None
        tensors = _tensors(args, kwargs)
        made_on_host = None
        if func in _READS:
            if not host(src):
                self.record(f"Tensor.{func.__name__}")
            made_on_host = True
        elif func is torch.Tensor.to:
            device = kwargs.get("device")
            for a in args[1:]:
                if isinstance(a, (torch.device, str)):
                    device = a
                elif isinstance(a, torch.Tensor):
                    device = "cpu" if host(a) else a.device
            quiet = kwargs.get("non_blocking", False) or any(a is True for a in args[1:])
            if device is None:
                made_on_host = host(src)
            elif _host_device(device):
                if not host(src):
                    self.record(f"to({device!r}): a copy to the host")
                made_on_host = True
            else:
                if host(src) and not quiet:
                    self.record("to(device) of a host tensor without non_blocking: a blocking copy")
                made_on_host = False
        elif func is torch.Tensor.copy_:
            other = args[1] if len(args) > 1 else kwargs.get("src")
            quiet = kwargs.get("non_blocking", False) or (len(args) > 2 and args[2] is True)
            if host(other) and not host(src) and not quiet and other.dim() > 0:
                self.record("copy_ of a host tensor into a device one: a blocking copy")
            if host(src) and isinstance(other, torch.Tensor) and not host(other):
                self.record("copy_ into a host tensor: a copy to the host")
            made_on_host = host(src)
        elif func in _FACTORIES and all(map(host, tensors)):
            device = kwargs.get("device")
            made_on_host = device is None or _host_device(device)
            if not made_on_host and func in (torch.tensor, torch.as_tensor):
                self.record(f"torch.{func.__name__}(..., device=...): a blocking copy")
        elif tensors:
            made_on_host = all(map(host, tensors))
        if made_on_host:
            for o in tree_flatten(out)[0]:
                if isinstance(o, torch.Tensor) and not any(o is a for a in tensors):
                    setattr(o, _TAG, True)
        return out


class record:
    """``with record() as syncs: ...``: ``syncs`` lists ``(what, dist_clip frames)``; ``quiet=True`` only tells
    host tensors from device ones (for warm-up calls, whose host tensors the recorded call may reuse)."""

    def __init__(self, quiet=False):
        self.syncs = []
        self.quiet = quiet

    def _record(self, what):
        if self.quiet:
            return
        frames = [f for f in traceback.extract_stack() if f.filename.startswith(_PACKAGE)]
        if frames:
            self.syncs.append((what, [f"{f.filename[len(_PACKAGE):]}:{f.lineno} {f.line}" for f in frames[-3:]]))

    def __enter__(self):
        self._modes = [_Function(self._record), _Dispatch(self._record)]
        for mode in self._modes:
            mode.__enter__()
        return self.syncs

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def check(label, prepare, call, warm=2):
    """``call()`` after ``warm`` calls (lazy set-up and a parameter's first step may read the host once), each after
    ``prepare()`` (outside the recorder); returns the syncs of the last call, one line each, as
    ``label: what at innermost <- outer dist_clip frames``."""
    for _ in range(warm):
        prepare()
        with record(quiet=True):
            call()
    prepare()
    with record() as syncs:
        call()
    return [f"{label}: {what} at " + " <- ".join(reversed(where)) for what, where in syncs]
'''


def _run(root: Path, body: str) -> str:
    script = root / "check.py"
    script.write_text(_PRELUDE.format(root=str(root)) + textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": str(root), "DIST_CLIP_NATIVE": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300,
                          cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


#: Runs the checks that need no process of their own (no ranks) one after another in one Python process, each from
#: its own file in a fresh namespace under its own warnings filters, its output going to its own file: a failing
#: check is told as that check's failure, with its output and traceback, and the others still run. One torch
#: import for all (a process each: 2-3 s apiece, 10-15 s under load).
_RUNNER = """
import contextlib, json, sys, traceback, warnings
for path in sys.argv[1:]:
    with open(path + ".out", "w", buffering=1) as out:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                with open(path) as f:
                    exec(compile(f.read(), path, "exec"), {"__name__": "__check__", "__file__": path})
            ok = True
        except BaseException:  # noqa: BLE001 - told as this check's failure
            ok = False
            out.write(traceback.format_exc())
    with open(path + ".ok", "w") as f:
        f.write(str(ok))
"""


@pytest.fixture(scope="module")
def off_host_results(off_host_copy) -> dict[str, tuple[bool, str]]:
    """Every check of ``_SHARED`` run once: name -> (passed, its output). A check that ends the process (a crash)
    fails with what it wrote and the exit status; the checks after it run in a new process."""
    paths = {}
    for name, body in _SHARED.items():
        paths[name] = off_host_copy / f"check_{name}.py"
        paths[name].write_text(_PRELUDE.format(root=str(off_host_copy)) + body)
    (off_host_copy / "run_checks.py").write_text(_RUNNER)
    env = {**os.environ, "PYTHONPATH": str(off_host_copy), "DIST_CLIP_NATIVE": "0", "OMP_NUM_THREADS": "1"}
    results: dict[str, tuple[bool, str]] = {}
    while len(results) < len(paths):
        pending = [name for name in paths if name not in results]
        done = subprocess.run([sys.executable, "run_checks.py", *(str(paths[n]) for n in pending)], env=env,
                              capture_output=True, text=True, timeout=600, cwd=off_host_copy)
        for name in pending:
            told, out = (Path(f"{paths[name]}.{end}") for end in ("ok", "out"))
            said = out.read_text() if out.exists() else ""
            if told.exists():
                results[name] = (told.read_text() == "True", said)
            else:  # the check the process ended in
                results[name] = (False, f"{said}\nthe checks' process exited {done.returncode} in this check:\n"
                                        f"{done.stdout}{done.stderr}")
                break
    return results


def _shared(results: dict[str, tuple[bool, str]], name: str) -> str:
    ok, out = results[name]
    assert ok, out
    return out


_PRELUDE = """
import math, torch, dist_clip
from dist_clip import _norm
from dist_clip.testing import reference_norm
assert dist_clip.__file__.startswith({root!r}), dist_clip.__file__
ORDERS = [0.0, 1.0, 2.0, 3.0, 3.5, math.inf]
RTOL = {{torch.float32: 1e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5}}

def params(gs):
    out = []
    for t in gs:
        q = torch.nn.Parameter(torch.zeros_like(t))
        q.grad = t
        out.append(q)
    return out

def grads(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = (1, 1000, 0, 4097, 3 * 4096 + 5, 0)
    out = [(torch.randn(n, generator=g) * 10.0 ** (i % 3 - 1)).to(dtype) for i, n in enumerate(sizes)]
    out[3][::3] = 0
    return out
"""


_PARTIALS = textwrap.dedent("""
    checked = 0
    for dtype in RTOL:
        for p in ORDERS:
            gs = grads(dtype)
            total = dist_clip.get_total_norm(gs, p)
            want = reference_norm(gs, p)
            assert abs(total.item() - want) <= RTOL[dtype] * want, (dtype, p, total.item(), want)
            gs[1][7] = math.nan
            parts = _norm.local_partials(gs, p)
            assert parts.dtype == torch.float64 and parts.shape == (len(gs),)
            for i, g in enumerate(gs):
                if i == 1:
                    assert math.isnan(parts[i].item()), (dtype, p)
                    continue
                one = reference_norm([g], p)
                one = one if p in (0.0, 1.0) or math.isinf(p) else one ** p
                assert abs(parts[i].item() - one) <= 1e-6 * one, (dtype, p, i, parts[i].item(), one)
            assert math.isnan(dist_clip.get_total_norm(gs, p).item()), (dtype, p)
            checked += 1
    print("checked", checked)
""")


def test_off_host_partials_and_totals_match_the_reference(off_host_results):
    """Per tensor (an empty one 0, a NaN only where it is) and in total, every order and dtype: the inf and L0
    partials come from one fused inf-norm over the list there (an aminmax, or five launches, per tensor before)."""
    out = _shared(off_host_results, "partials")
    assert "checked 18" in out


_HALF_SCALING = textwrap.dedent("""
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        base = [torch.randn((), generator=g), torch.randn(64, 48, generator=g).t(), torch.randn(1, generator=g),
                torch.randn(300, generator=g), torch.randn(4097, generator=g)]
        for fraction in (0.7371, 3e-9):
            gs = [b.to(dtype) for b in base]
            gs[3] = gs[3][::3]  # strided in the gradients' dtype (a conversion of a strided tensor is contiguous)
            assert gs[1].stride() == (1, 48) and gs[3].stride() == (3,)
            before = [t.double() for t in gs]
            layouts = [(t.shape, t.stride(), t.data_ptr()) for t in gs]
            want = reference_norm(gs, 2.0)
            dist_clip.clip_grad_norm_(params(gs), fraction * want)
            coef = fraction * want / (want + 1e-6)
            # one rounding of the float32 product: half an ulp (fp16 subnormals: 2^-24 absolute)
            rtol = {torch.float32: 1e-6, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
            atol = 2.0 ** -25 if dtype == torch.float16 else 0.0
            assert [(t.shape, t.stride(), t.data_ptr()) for t in gs] == layouts  # in place, shapes kept
            for t, b in zip(gs, before):
                exact = b * coef
                if dtype == torch.float16 and fraction < 1e-3:
                    tiny = exact.abs() < 6e-8  # below fp16's subnormals: 0 is the rounding
                    assert bool((t.double()[~tiny] != 0).all()), "fp16 gradients zeroed"
                    continue
                torch.testing.assert_close(t.double(), exact, rtol=rtol, atol=atol)
    # float32 pieces beside a float64 one: a float64 coefficient, the float32 pieces' product taken in float64
    gs = [torch.randn(64, 48, generator=g).t(), torch.randn(500, generator=g)[::2],
          torch.randn(7, generator=g, dtype=torch.float64)]
    before = [t.double().clone() for t in gs]  # (.double() of a float64 tensor is the tensor itself)
    want = reference_norm(gs, 2.0)
    total = dist_clip.clip_grad_norm_(params(gs), 0.7371 * want)
    assert total.dtype == torch.float64
    coef = 0.7371 * want / (want + 1e-6)
    for t, b in zip(gs, before):
        rtol = 2.0 ** -24 if t.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(t.double(), b * coef, rtol=rtol, atol=0)
    print("scaled")
""")


def test_off_host_half_scaling_takes_the_unrounded_coefficient(off_host_results):
    """bf16/fp16 (and fp32 beside a float64 coefficient) pieces multiplied by a 1-element float32 coefficient in
    one list-by-list call, 0-dim ones alone: each piece the float64 product rounded once, odd shapes kept."""
    out = _shared(off_host_results, "half_scaling")
    assert "scaled" in out


_POLICIES = textwrap.dedent("""
    import warnings
    from torch import nn
    warnings.simplefilter("error")  # masked_fill_ on an expanded tensor: torch's deprecation warning
    for nonfinite in (False, True):
        torch.manual_seed(0)
        emb, lin = nn.Embedding(10, 4, sparse=True), nn.Linear(4, 3)
        lin(emb(torch.tensor([1, 2, 2]))).sum().backward()
        lin.bias.grad = torch.tensor([0.5]).expand(3)  # a stride-0 gradient
        if nonfinite:
            lin.weight.grad[0, 0] = math.nan
        before = [emb.weight.grad.coalesce().values().clone(), lin.weight.grad.clone(), lin.bias.grad.clone()]
        want = reference_norm([emb.weight.grad, lin.weight.grad, lin.bias.grad], 2.0)
        r = dist_clip.GradClipper(max_norm=0.1, on_nonfinite="zero")(nn.ModuleList([emb, lin]))
        after = [emb.weight.grad.coalesce().values(), lin.weight.grad, lin.bias.grad]
        if nonfinite:
            assert not bool(r.finite) and all(bool((a == 0).all()) for a in after), after
        else:
            coef = 0.1 / (want + 1e-6)
            for a, b in zip(after, before):
                torch.testing.assert_close(a, b * coef, rtol=1e-6, atol=0)
    for foreach in (None, False):
        torch.manual_seed(0)
        z = nn.Parameter(torch.randn(4, dtype=torch.complex64))
        w = nn.Parameter(torch.randn(3, dtype=torch.bfloat16))
        ((z.conj() * torch.randn(4, dtype=torch.complex64)).real.sum() + (w.float() * 5).sum()).backward()
        assert z.grad.is_conj()
        before = [z.grad.clone(), w.grad.double()]
        want = reference_norm([z.grad, w.grad], 2.0)
        dist_clip.clip_grad_norm_([z, w], 1.0, foreach=foreach)
        coef = 1.0 / (want + 1e-6)
        torch.testing.assert_close(z.grad, before[0] * coef, rtol=1e-6, atol=0)
        torch.testing.assert_close(w.grad.double(), before[1] * coef, rtol=2.0 ** -8, atol=0)
    print("policies")
""")


def test_off_host_zero_policy_conjugate_views_sparse_and_expanded_gradients(off_host_results):
    """The "zero" policy off the host fills non-finite calls' gradients with masked_fill_, which has no sparse
    kernel (every call with a sparse gradient raised after scaling) and warns on expanded ones; a conjugate
    view was refused by the list-by-list multiply (foreach=False too, half-clipped; hunt110)."""
    out = _shared(off_host_results, "policies")
    assert "policies" in out


_SYNC_PRELUDE = """
import syncs
from torch import nn
found = []

def params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (1, 1000, 4097, 300):
        q = nn.Parameter(torch.zeros(n, dtype=dtype))
        q.grad = torch.zeros(n, dtype=dtype)
        out.append(q)
    return out

def refill(ps, nan=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    for q in ps:
        q.grad.copy_(torch.randn(q.shape, generator=g))
    if nan:
        ps[1].grad[3] = math.nan
"""


_DEFAULT_SYNCS = _SYNC_PRELUDE + textwrap.dedent("""
    for dtype in (torch.float32, torch.bfloat16):
        for p in (0.0, 1.0, 2.0, 3.0, math.inf):
            ps = params(dtype)
            def call():
                dist_clip.clip_grads_with_norm_(ps, 1.0, dist_clip.get_total_norm(ps, p))
                dist_clip.clip_grad_norm_(ps, 0.5, p)
                dist_clip.clip_grad_norm_(ps, 0.5, p, foreach=False)
            found += syncs.check(f"functional {dtype} p={p}", lambda: refill(ps), call)
    limit = torch.tensor(0.5)  # a device max_norm, not read
    found += syncs.check("max_norm tensor", lambda: refill(ps), lambda: dist_clip.clip_grad_norm_(ps, limit))
    step = {"n": 0}
    def prepare():
        step["n"] += 1
        refill(ps, nan=step["n"] == 3)  # the recorded call is a non-finite one
    for mode in ("total", "per_param", "per_group", "unitwise"):
        for policy in ("skip", "zero"):
            ps = params()
            opt = torch.optim.AdamW([{"params": ps[:2], "max_norm": 0.5}, {"params": ps[2:], "max_norm": 0.1}],
                                    fused=True)
            kwargs = {"agc": dist_clip.AGC(0.01)} if mode == "unitwise" else {"max_norm": 1.0}
            clipper = dist_clip.GradClipper(mode=mode, on_nonfinite=policy, **kwargs)
            step["n"] = 0
            found += syncs.check(f"GradClipper {mode} {policy}", prepare,
                                 lambda: (clipper(ps, optimizer=opt), opt.step()))
    for limit in (dist_clip.AutoClip(), dist_clip.AutoClip(window=2), dist_clip.ZClip(warmup_steps=2)):
        ps = params()
        opt = torch.optim.AdamW(ps, fused=True)
        clipper = dist_clip.GradClipper(max_norm=limit, on_nonfinite="skip")
        step["n"] = 0
        found += syncs.check(type(limit).__name__, prepare, lambda: (clipper(ps, optimizer=opt), opt.step()),
                             warm=4)
    for make in (lambda q: torch.optim.Adam(q, fused=True), lambda q: torch.optim.AdamW(q, fused=True),
                 lambda q: torch.optim.SGD(q, lr=0.1, momentum=0.9, fused=True),
                 lambda q: torch.optim.Adagrad(q, fused=True)):
        ps = params()
        opt = make(ps)
        step["n"] = 0
        found += syncs.check(f"hand-over to {type(opt).__name__}", prepare,
                             lambda: (dist_clip.clip_grad_norm_(ps, 0.5, optimizer=opt), opt.step()))
        found += syncs.check(f"skip_next_step_ on {type(opt).__name__}", lambda: refill(ps),
                             lambda: (dist_clip.skip_next_step_(opt, False), opt.step()))
    assert not found, "\\n".join(found)

    # The documented ones, each where README says
    ps = params()
    seen = syncs.check("error_if_nonfinite", lambda: refill(ps),
                       lambda: dist_clip.clip_grad_norm_(ps, 0.5, error_if_nonfinite=True))
    assert len(seen) == 2 and all("clip.py" in s and "bool(torch.isfinite(total))" in s for s in seen), seen
    seen = syncs.check("report", lambda: refill(ps), lambda: dist_clip.GradClipper(max_norm=0.5, report=True)(ps))
    assert seen and all("self._report(" in s for s in seen), seen
    strict = dist_clip.GradClipper(max_norm=0.5, on_nonfinite="error")
    seen = syncs.check("error", lambda: refill(ps), lambda: strict(ps))
    assert seen and all('policy == "error" and not bool(finite)' in s for s in seen), seen
    opt = torch.optim.AdamW(ps, foreach=True)  # not fused: its step counters live on the host
    clipper = dist_clip.GradClipper(max_norm=0.5, on_nonfinite="skip")
    seen = syncs.check("skip, host step counters", lambda: refill(ps), lambda: (clipper(ps, optimizer=opt), opt.step()))
    assert seen and all("clipper.py" in s and "loc.copy_" in s for s in seen), seen
    print("no syncs")
""")


def test_off_host_default_paths_make_no_host_sync(off_host_results):
    """Every path README calls sync-free on an accelerator, after a warm-up call, recorded op by op: the
    functional API for p = 0, 1, 2, 3, inf (foreach default and off, a device max_norm), GradClipper's four modes
    under "skip" (fused AdamW) and "zero", a non-finite call included, AutoClip and ZClip, the fused hand-over to
    torch's Adam, AdamW, SGD with momentum and Adagrad (a skipped NaN step included), skip_next_step_. The
    documented syncs are recorded, which keeps the recorder honest: error_if_nonfinite=True, on_nonfinite="error",
    report=True, and the "skip" restore of a non-fused optimizer whose step counters live on the host."""
    out = _shared(off_host_results, "default_syncs")
    assert "no syncs" in out


def test_off_host_ddp_and_fsdp2_make_no_host_sync_on_a_device_backend(off_host_copy):
    """Two gloo ranks taken for NCCL (``_reduce.backends`` says so: the one collective reduces on the device, and
    nothing combined is read on the host, as gloo's copies through the host would allow): DDP and FSDP2 through
    clip_grad_norm_ (p = 2, inf, 0), get_total_norm with clip_grads_with_norm_, GradClipper's total, per_param and
    unitwise modes under "skip" and the fused AdamW hand-over, after a warm-up call: no host sync recorded."""
    out = _run(off_host_copy, """
    import os, tempfile
    import torch.distributed as dist
    import torch.multiprocessing as mp

    def checks(rank, world):
        import syncs
        from torch import nn
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel as DDP
        torch.manual_seed(0)
        ddp = DDP(nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4)))
        fsdp = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 5), nn.Linear(5, 3))
        mesh = init_device_mesh("cpu", (world,))
        for layer in fsdp:
            fully_shard(layer, mesh=mesh)
        fully_shard(fsdp, mesh=mesh)
        x = torch.randn(4, 16) * (rank + 1)
        found = []
        for name, model in (("DDP", ddp), ("FSDP2", fsdp)):
            def backward():
                model.zero_grad()
                model(x).square().sum().backward()
            opt = torch.optim.AdamW(model.parameters(), fused=True)
            for p in (2.0, math.inf, 0.0):
                found += syncs.check(f"{name} p={p}", backward, lambda: dist_clip.clip_grad_norm_(model, 0.5, p))
            found += syncs.check(f"{name} get_total_norm", backward, lambda: dist_clip.clip_grads_with_norm_(
                model, 0.5, dist_clip.get_total_norm(model)))
            for mode in ("total", "per_param", "unitwise"):
                kwargs = {"agc": dist_clip.AGC(0.01)} if mode == "unitwise" else {"max_norm": 0.5}
                clipper = dist_clip.GradClipper(mode=mode, on_nonfinite="skip", **kwargs)
                found += syncs.check(f"{name} GradClipper {mode}", backward,
                                     lambda: (clipper(model, optimizer=opt), opt.step()))
            found += syncs.check(f"{name} hand-over", backward,
                                 lambda: (dist_clip.clip_grad_norm_(model, 0.5, optimizer=opt), opt.step()))
        return found

    def rank_body(rank, world, store):
        from dist_clip import _reduce, bootstrap
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        _reduce.backends = lambda group: {"": "nccl"}
        found = checks(rank, world)
        # The models are gone with checks' frame; the group goes after a collection (as the main job's end does):
        # destroyed while DDP's and FSDP2's cycles still held it, 1 exit in 10 aborted ("terminate called
        # without an active exception") after every check had passed.
        bootstrap.shutdown()
        assert not found, f"rank {rank}:\\n" + "\\n".join(found)

    if __name__ == "__main__":
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(rank_body, args=(2, os.path.join(tmp, "store")), nprocs=2)
        print("no syncs")
    """)
    assert "no syncs" in out


_SPARSE_SYNCS = _SYNC_PRELUDE + textwrap.dedent("""
    torch.manual_seed(0)
    embs = nn.ModuleList([nn.Embedding(10, 4, sparse=True), nn.Embedding(7, 3, sparse=True), nn.Linear(4, 3)])
    ids = torch.tensor([1, 2, 2])
    def backward():
        embs.zero_grad()
        (embs[2](embs[0](ids)).sum() + embs[1](ids).sum()).backward()
    opt = torch.optim.SGD(embs.parameters(), lr=0.1)
    calls = [("clip_grad_norm_", lambda: dist_clip.clip_grad_norm_(embs, 0.5)),
             ("get_total_norm", lambda: dist_clip.get_total_norm(embs, math.inf))]
    for mode in ("total", "per_param"):
        for policy in ("zero", "ignore"):
            clipper = dist_clip.GradClipper(max_norm=0.5, mode=mode, on_nonfinite=policy)
            calls.append((f"GradClipper {mode} {policy}", lambda c=clipper: c(embs)))
    for label, call in calls:
        seen = syncs.check(label, backward, call)
        assert len(seen) == 2, seen  # one per sparse gradient
        assert all("aten._coalesce" in s and "t.coalesce().values()" in s for s in seen), seen
    print("coalesced")
""")


def test_off_host_sparse_gradients_sync_once_each_to_coalesce(off_host_results):
    """A sparse COO gradient (nn.Embedding(sparse=True)) is measured by its coalesced values, and coalescing one
    on CUDA is a host sync (torch learns there how many distinct rows it holds, to size the result): one per sparse
    gradient per call, in the functional API and every GradClipper policy, and nothing else; README says so
    (it called the default path sync-free without this exception)."""
    out = _shared(off_host_results, "sparse_syncs")
    assert "coalesced" in out


#: The checks run together in one process (``off_host_results``), by name.
_SHARED = {"partials": _PARTIALS, "half_scaling": _HALF_SCALING, "policies": _POLICIES,
           "default_syncs": _DEFAULT_SYNCS, "sparse_syncs": _SPARSE_SYNCS}


#: Flows of DDP beside a parameter of rank 0's own (tests/test_flow_fuzz.py's "ddp" setting) whose agreement on the
#: CPU came from reading a flag there (README, Limits: a flag armed by a call that combines, read on the CPU as not
#: set, holds no gradient). Each: (name, flow, whether the last, finite, batch steps on every rank).
_CLASS_E = [
    *[(f"E_{first}_{own}_{last}",
       [("fused", True), ("bwd", (-1, 0)), ("call", first, [0]), ("call", own, [2]), ("call", first, [1]),
        ("replace",), ("call", first, [0]), ("zero", True), ("bwd", None), ("call", last, [0, 1]), ("step",)], True)
      for first, own, last in [("skip", "skip", "skip"), ("hand", "hand", "hand"), ("skip", "hand", "skip"),
                               ("skip", "skip", "hand")]],
    ("E_unfused", [("fused", False), ("bwd", (-1, 0)), ("call", "skip", [0]), ("call", "skip", [2]),
                   ("call", "skip", [1]), ("replace",), ("call", "skip", [0]), ("zero", True), ("bwd", None),
                   ("call", "skip", [0, 1]), ("step",)], True),
    # (the own part's NaN: its flag set, the same on every rank; the batch dropped, both skip alike)
    ("E_own_nan", [("fused", True), ("bwd", (0, 2)), ("call", "skip", [0]), ("call", "hand", [2]),
                   ("call", "skip", [1]), ("replace",), ("call", "skip", [0]), ("zero", True), ("bwd", None),
                   ("call", "hand", [0, 1]), ("step",)], None),
    # ddp seed 1337 minimised: [l1] armed and clipped again, replaced, DDP's whole handed over (rank 0 steps its own
    # parameter beside it: armed as a hand-over applied in place), dropped, DDP's whole handed over again
    ("ddp_1337", [("fused", True), ("bwd", None), ("call", "with_norm", [2]), ("zero", True), ("bwd", (-1, 0)),
                  ("call", "skip", [1]), ("call", "plain", [1]), ("replace",), ("call", "hand", [0, 1]),
                  ("zero", True), ("bwd", None), ("call", "hand", [0, 1]), ("step",)], True),
]


def test_off_host_flows_beside_one_ranks_own_combining_part_agree_without_a_host_read(off_host_copy):
    """Class E off the host (simulated: every flag a device's, never read there): DDP and rank 0's own parameter
    in one AdamW, a NaN in DDP's first layer, [l0] clipped, rank 0's own part clipped over the world (finite; rank 1
    passing nothing), [l1] clipped, every gradient replaced out of place, [l0] clipped again, the batch dropped to
    ``None``, the next one computed and DDP's whole clipped (``GradClipper(on_nonfinite="skip")`` or handed over,
    fused or not). The own part's flag, combined over the ranks (0 on both), was taken as possibly set: rank 0 held
    its own gradient by it, kept [l0]'s replaced NaN flag by that gradient and was forced alone to keep it at the
    last call, while rank 1, whose entry for that flag holds no gradient, forced itself alike or not: rank 0 skipped,
    rank 1 stepped, DDP's replicas parted (where both were forced, a good step skipped). So too where an entry kept
    by a verdict of 0 with no gradient left (rank 0's [l1] flag, decided in a hand-over beside its own parameter,
    which rank 1's hand-over of DDP's whole drops) forced rank 0 alone at the next call (ddp seeds 1156, 1337).
    Every rank steps now (both skip where the own part's NaN was measured, its flag set), and no host sync is
    recorded in dist_clip's code on these paths."""
    repo = str(Path(__file__).resolve().parent.parent)
    out = _run(off_host_copy, f"""
    import json, os, sys, tempfile
    import torch.distributed as dist
    import torch.multiprocessing as mp
    sys.path.append({repo!r})
    from tests.test_flow_fuzz import run_flow, violations
    FLOWS = {[(name, flow) for name, flow, _ in _CLASS_E]!r}

    def rank_body(rank, world, store, tmp):
        import syncs
        from dist_clip import _reduce, bootstrap
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{{store}}", rank=rank, world_size=world)
        _reduce.backends = lambda group: {{"": "nccl"}}
        results, found = {{}}, []
        for name, flow in FLOWS:
            with syncs.record() as seen:
                results[name] = run_flow("ddp", flow)
            found += [f"{{name}}: {{what}} at " + " <- ".join(reversed(where)) for what, where in seen]
        bootstrap.shutdown()
        with open(os.path.join(tmp, f"rank{{rank}}.json"), "w") as f:
            json.dump({{"results": results, "syncs": found}}, f)

    if __name__ == "__main__":
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(rank_body, args=(2, os.path.join(tmp, "store"), tmp), nprocs=2)
            ranks = [json.load(open(os.path.join(tmp, f"rank{{r}}.json"))) for r in range(2)]
        for name, flow in FLOWS:
            per_rank = [r["results"][name] for r in ranks]
            print("FLOW", name, json.dumps({{"took": [[s["took"] for s in steps] for steps in per_rank],
                                             "bad": violations(flow, per_rank)}}))
        for r in ranks:
            for line in r["syncs"]:
                print("SYNC", line)
    """)
    told = {line.split()[1]: json.loads(line.split(" ", 2)[2]) for line in out.splitlines()
            if line.startswith("FLOW ")}
    # (but the documented one: the "skip" restore of a plain AdamW, whose step counters live on the host)
    syncs = [line for line in out.splitlines() if line.startswith("SYNC ")
             and not line.endswith("# one host read: state the device cannot put back")]
    assert not syncs, "\n".join(syncs)
    failures = [f"{name}: {told[name]}" for name, _flow, steps in _CLASS_E
                if told[name]["bad"] or (steps is not None and told[name]["took"] != [[steps], [steps]])]
    assert not failures, "\n".join(failures)
