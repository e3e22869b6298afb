"""The accelerator branches on the CPU: a copy of the package whose ``.type == "cpu"`` tests name a device nobody
has, so CPU tensors take the paths CUDA takes (fused multi-tensor kernels, no host reads, 1-element coefficients).

Those paths are otherwise run only on a GPU machine (``tests/test_gpu.py``), which most sessions and CI lack; the
rewrite checks their arithmetic here against the float64 reference. What it cannot check: the CUDA kernels
themselves and host syncs (``tests/test_gpu.py`` on a GPU).
"""

from __future__ import annotations

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
    for name in _REWRITTEN:
        path = package / name
        text, n = _DEVICE_TEST.subn(r'\1 \2 "nodev"', path.read_text())
        assert n, f"{name} has no device test left to rewrite: update _REWRITTEN"
        path.write_text(text)
    return root


def _run(root: Path, body: str) -> str:
    script = root / "check.py"
    script.write_text(_PRELUDE.format(root=str(root)) + textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": str(root), "DIST_CLIP_NATIVE": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300,
                          cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


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


def test_off_host_partials_and_totals_match_the_reference(off_host_copy):
    """Per tensor (an empty one 0, a NaN only where it is) and in total, every order and dtype: the inf and L0
    partials come from one fused inf-norm over the list there (an aminmax, or five launches, per tensor before)."""
    out = _run(off_host_copy, """
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
    assert "checked 18" in out


def test_off_host_half_scaling_takes_the_unrounded_coefficient(off_host_copy):
    """bf16/fp16 (and fp32 beside a float64 coefficient) pieces multiplied by a 1-element float32 coefficient in
    one list-by-list call, 0-dim ones alone: each piece the float64 product rounded once, odd shapes kept."""
    out = _run(off_host_copy, """
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
    assert "scaled" in out


def test_off_host_zero_policy_conjugate_views_sparse_and_expanded_gradients(off_host_copy):
    """The "zero" policy off the host fills non-finite calls' gradients with masked_fill_, which has no sparse
    kernel (every call with a sparse gradient raised after scaling) and warns on expanded ones; a conjugate
    view was refused by the list-by-list multiply (foreach=False too, half-clipped; hunt110)."""
    out = _run(off_host_copy, """
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
    assert "policies" in out
