"""The native CPU kernel (``_native.c``): build once with the system C compiler, load with ctypes.

Why a small C file and not plain torch, inductor or a torch C++ extension (measured on the 2-core CI machine,
see the README's Benchmarks): torch's single-pass reductions are float32-accurate only (vector_norm p=2) or
cover one order (aminmax for inf); every accurate plain-torch formulation of p=1, p=3, other p, bf16 and fp16
is two or more passes and misses the bandwidth target. The kernel widens each element to double and reads the
gradients once for every order and dtype, at the bandwidth of ``torch.sum``. It needs no torch headers: one
compiler call of about 4 s, once per machine (then loaded from the cache in milliseconds); inductor's first
compile took 17 s here and then 3 s in every new process, spawned ranks included.

The build is cached by a hash of the source, compiler and flags under ``$DIST_CLIP_CACHE_DIR`` (default
``$XDG_CACHE_HOME/dist_clip`` or ``~/.cache/dist_clip``) and published with an atomic rename, so concurrent
first uses are safe. ``python -m dist_clip._native`` builds it ahead of time (for ``make install``). Anything
that goes wrong (no compiler, a read-only cache, ``DIST_CLIP_NATIVE=0``) leaves the plain-torch path in charge:
:func:`available` says which, and :func:`status` says why.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import hashlib
import itertools
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DTYPES", "available", "build", "partials", "scale_", "scaled_flatten", "status", "supports"]

_SOURCE = Path(__file__).with_name("_native.c")
_VERSION = 3
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_OP_COUNT, _OP_P1, _OP_P2, _OP_P3, _OP_POW, _OP_MAX = range(6)
# Flag sets tried in order: OpenMP with per-CPU clones, then without clones (no ifunc: musl, old binutils),
# then without OpenMP (a compiler without it: single-threaded, still one pass). -fno-trapping-math changes no
# result (the kernel never reads FP exception flags); it lets gcc turn the float selects of pow_pos into blends
# and vectorise it without AVX-512's masks: 0.17 -> 0.8 GB/s a core for p = 3.5 on AVX2.
_BASE = ["-O3", "-std=gnu11", "-ffp-contract=fast", "-fno-trapping-math"]
_FLAG_SETS = (
    [*_BASE, "-fopenmp"],
    [*_BASE, "-fopenmp", "-DDC_NO_CLONES"],
    [*_BASE, "-DDC_NO_CLONES"],
)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_why = "not loaded yet"


def _cache_dir() -> Path:
    env = os.environ.get("DIST_CLIP_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dist_clip"


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "gcc", "cc", "clang"):
        if cand:
            exe = shutil.which(cand.split()[0])
            if exe:
                return exe
    return None


def _target(cc: str, flags: Sequence[str]) -> Path:
    h = hashlib.sha256()
    h.update(_SOURCE.read_bytes())
    for part in (cc, " ".join(flags), sys.platform, os.uname().machine if hasattr(os, "uname") else ""):
        h.update(part.encode() + b"\0")
    return _cache_dir() / f"dist_clip_native-{h.hexdigest()[:16]}.so"


def build(verbose: bool = False) -> Path | None:
    """Compile the kernel into the cache (a no-op when it is there already); its path, or None on failure."""
    global _why
    cc = _compiler()
    if cc is None:
        _why = "no C compiler found (set CC)"
        return None
    for flags in _FLAG_SETS:
        if _target(cc, flags).exists():
            return _target(cc, flags)
    errors = []
    for flags in _FLAG_SETS:
        target = _target(cc, flags)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
            os.close(fd)
        except OSError as e:
            _why = f"cache directory {target.parent} is not writable ({e}); set DIST_CLIP_CACHE_DIR"
            return None
        cmd = [cc, *flags, "-shared", "-fPIC", str(_SOURCE), "-o", tmp, "-lm"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            out = None
            errors.append(f"{' '.join(cmd)}: {e}")
        if out is not None and out.returncode == 0:
            # Durable and readable before it is published: os.replace without an fsync could leave a truncated
            # file under the final name after a crash (mapped, it killed every later process with SIGBUS), and
            # mkstemp's mode 0600 kept other users sharing DIST_CLIP_CACHE_DIR on the slower torch path.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o755 & ~umask)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)  # atomic: a concurrent builder publishes an identical file
            if verbose:
                print(" ".join(cmd), file=sys.stderr)
            return target
        if out is not None:
            errors.append(f"{' '.join(cmd)}:\n{out.stderr.strip()}")
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    _why = "compilation failed:\n" + "\n".join(errors)
    return None


def intact(path: Path) -> bool:
    """Whether a cached ELF library is whole: its section header table, which the linker writes at the end, lies
    inside the file (a truncated copy, mapped, dies with SIGBUS at its first call). Other formats: trusted."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 64 or head[:4] != b"\x7fELF":
        return head[:4] != b"\x7fELF" and len(head) > 0  # not ELF (macOS): nothing to check; empty: broken
    order = "little" if head[5] == 1 else "big"
    if head[4] == 2:  # ELF64
        shoff, entsize, num = (int.from_bytes(head[0x28:0x30], order), int.from_bytes(head[0x3A:0x3C], order),
                               int.from_bytes(head[0x3C:0x3E], order))
    else:  # ELF32
        shoff, entsize, num = (int.from_bytes(head[0x20:0x24], order), int.from_bytes(head[0x2E:0x30], order),
                               int.from_bytes(head[0x30:0x32], order))
    return 0 < shoff and shoff + entsize * num <= size


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _why
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if os.environ.get("DIST_CLIP_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
                _why = "disabled by DIST_CLIP_NATIVE=0"
                return None
            path = build()
            if path is not None and not intact(path):  # a damaged cache entry: rebuilt, never mapped
                with contextlib.suppress(OSError):
                    path.unlink()
                path = build()
                if path is not None and not intact(path):
                    _why = f"{path} is damaged and could not be rebuilt"
                    return None
            if path is None:
                return None
            lib = ctypes.CDLL(str(path))
            if lib.dc_version() != _VERSION:
                _why = f"{path} has interface version {lib.dc_version()}, expected {_VERSION}"
                return None
            fn = lib.dc_partials
            fn.restype = ctypes.c_int
            fn.argtypes = [
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_double,
                ctypes.c_int64,
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_int,
            ]
            sc = lib.dc_scale
            sc.restype = ctypes.c_int
            sc.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int]
            st = lib.dc_scale_to
            st.restype = ctypes.c_int
            st.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                           ctypes.c_float, ctypes.c_int]
            _lib = lib
            _why = f"loaded {path}"
        except OSError as e:
            _why = f"loading failed: {e}"
        finally:
            _tried = True
    return _lib


def available() -> bool:
    """Whether the native kernel serves CPU norms in this process (builds it on first call)."""
    return _load() is not None


def status() -> str:
    """Why the native kernel is or is not in use."""
    _load()
    return _why


def _op(p: float) -> int:
    if p == 0:
        return _OP_COUNT
    if math.isinf(p):
        return _OP_MAX
    return {1.0: _OP_P1, 2.0: _OP_P2, 3.0: _OP_P3}.get(p, _OP_POW)


#: The tensor types the kernel reads through ``data_ptr()``. A subclass may have no storage of its own (a nested
#: jagged tensor, a wrapper subclass, a FakeTensor: contiguous, ``data_ptr()`` 0; the kernel read address 0 and
#: the process died) or mean its elements differently: it takes torch's ops.
PLAIN = frozenset({Tensor, torch.nn.Parameter})


def plain(tensors: Sequence[Tensor]) -> bool:
    """Whether every tensor is a plain ``Tensor`` or ``Parameter`` (:data:`PLAIN`): no Python loop."""
    return set(map(type, tensors)) <= PLAIN


def supports(t: Tensor) -> bool:
    """Whether ``t`` can go through the kernel: a contiguous CPU float32/bfloat16/float16 plain tensor."""
    return (type(t) in PLAIN and t.device.type == "cpu" and t.dtype in DTYPES and t.is_contiguous()
            and not t.is_conj())


def _null(ptrs: array.array, numels: array.array) -> bool:
    """Whether a tensor with elements has no memory (``data_ptr()`` 0: a plain-typed ZeroTensor, which the
    kernel read at address 0 and the process died): such calls take torch's ops. One C-level scan."""
    return 0 in ptrs and any(p == 0 and n > 0 for p, n in zip(ptrs, numels))


def partials(tensors: Sequence[Tensor], p: float) -> Tensor | None:
    """Per-tensor float64 partials of order ``p`` (see ``_norm``), or None when the kernel is unavailable.

    Every tensor must pass :func:`supports` and share one dtype (the caller groups by dtype).
    """
    lib = _load()
    if lib is None:
        return None
    n = len(tensors)
    out = torch.empty(n, dtype=torch.float64)
    if n == 0:
        return out
    # list(map(...)) then array: the cheapest way found to hand 1000 pointers to C (about 0.1 us a tensor).
    ptrs = array.array("q", list(map(Tensor.data_ptr, tensors)))
    numels = array.array("q", list(map(Tensor.numel, tensors)))
    if _null(ptrs, numels):
        return None
    rc = lib.dc_partials(
        DTYPES[tensors[0].dtype],
        _op(p),
        float(p),
        n,
        ptrs.buffer_info()[0],
        numels.buffer_info()[0],
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if rc != 0:  # pragma: no cover - only on allocation failure
        raise RuntimeError(f"dist_clip native kernel failed with code {rc} on {n} tensors")
    return out


def scale_(tensors: Sequence[Tensor], coef: float) -> bool:
    """Multiply every tensor in place by ``coef`` (a float32 value), rounding as torch's ``mul_`` does; False
    when the kernel cannot (unavailable, or fp16 without F16C) and the caller must scale.

    Every tensor must pass :func:`supports` and share one dtype.
    """
    lib = _load()
    if lib is None or not tensors:
        return lib is not None
    n = len(tensors)
    ptrs = array.array("q", list(map(Tensor.data_ptr, tensors)))
    numels = array.array("q", list(map(Tensor.numel, tensors)))
    if _null(ptrs, numels):
        return False
    rc = lib.dc_scale(
        DTYPES[tensors[0].dtype], n, ptrs.buffer_info()[0], numels.buffer_info()[0], coef, torch.get_num_threads()
    )
    if rc == -2:
        return False
    if rc != 0:  # pragma: no cover - only on allocation failure
        raise RuntimeError(f"dist_clip native kernel failed with code {rc} scaling {n} tensors")
    # Written through raw pointers: torch's version counters learn of it as after mul_ (autograd's check of
    # saved tensors modified in place, the hand-over's staleness test), where they stayed unchanged.
    torch.autograd.graph.increment_version(tensors)
    return True


def scaled_flatten(tensors: Sequence[Tensor], coef: float) -> Tensor | None:
    """``torch.cat([t.reshape(-1) for t in tensors]) * coef`` in one pass (each piece multiplied straight into
    its place, rounded as torch's ``mul`` rounds), or None when the kernel cannot (unavailable, fp16 without
    F16C). Every tensor must pass :func:`supports` and share one dtype."""
    lib = _load()
    if lib is None or not tensors:
        return None
    dtype = tensors[0].dtype
    numel_list = list(map(Tensor.numel, tensors))
    out = torch.empty(sum(numel_list), dtype=dtype)
    size = out.element_size()
    ptrs = array.array("q", list(map(Tensor.data_ptr, tensors)))
    numels = array.array("q", numel_list)
    if _null(ptrs, numels):
        return None
    # Each piece's place in ``out``: its byte offset, a running sum of the sizes before it.
    dst = array.array("q", itertools.accumulate((n * size for n in numel_list[:-1]), initial=out.data_ptr()))
    rc = lib.dc_scale_to(DTYPES[dtype], len(tensors), ptrs.buffer_info()[0], dst.buffer_info()[0],
                         numels.buffer_info()[0], coef, torch.get_num_threads())
    if rc == -2:
        return None
    if rc != 0:  # pragma: no cover - only on allocation failure
        raise RuntimeError(f"dist_clip native kernel failed with code {rc} flattening {len(tensors)} tensors")
    return out


def main() -> None:
    """Build ahead of time and report: ``make install`` runs ``python -c 'import dist_clip._native as n; n.main()'``
    (``python -m dist_clip._native`` warns that the package's ``__init__`` already imported this module)."""
    path = build(verbose=True)
    print(path if path else f"dist_clip native kernel not built: {_why}")
    print(f"status: {status()}")


if __name__ == "__main__":
    main()
