"""The main job: a small byte-level transformer LM trained under a wrapper, clipped by dist_clip, then replayed.

Every rank builds the same model from the config's seed and draws the same global batch per step from a
seed-derived generator; rank ``r`` trains on rows ``[r*B, (r+1)*B)`` of it. Because every wrapper here averages
gradients over ranks, one distributed step is mathematically one step of the unsharded model on the whole
global batch with a mean loss. :func:`replay` does exactly that on one process (same init, same batches, same
AdamW, dist_clip on plain parameters), and :func:`compare` checks that the two loss and norm curves agree
within a relative tolerance stated by precision: losses within 1e-4 and norms before and after clipping within
1e-3 in fp32; losses within 2e-2 in bf16 (see :mod:`dist_clip.config`). In either precision every norm the run
reports must be finite (or the replay's same infinity) and every rank's norms identical (gathered once, after the run).

Wrappers: ``none`` (one plain process), ``ddp``, ``fsdp1``, ``fsdp2``, ``hsdp`` (FSDP2 on a 2-D mesh),
``zero1``/``zero2``/``zero3`` (DeepSpeed) and ``fairscale-oss`` (OSS + ShardedDataParallel). DeepSpeed and
fairscale are imported only when their wrapper is asked for.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import os
import secrets
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import dist_clip

from . import _norm
from .bootstrap import DistInfo
from .config import (  # noqa: F401 - STDLIB_BYTES and MAX_DATA_BYTES are read here by tests and users
    MAX_DATA_BYTES,
    STDLIB_BYTES,
    ConfigError,
    ModelConfig,
    TrainConfig,
    check_data_size,
    check_world_size,
    data_files,
    read_files,
    stdlib_files,
    training_text_limit,
)

__all__ = [
    "CheckResult",
    "StepRecord",
    "TinyLM",
    "compare",
    "global_batch",
    "load_text",
    "plot",
    "replay",
    "run_job",
    "train",
    "write_log",
]

VOCAB = 256  # byte-level: any text, no vocabulary to agree on
_ADAM = {"betas": (0.9, 0.95), "eps": 1e-8}


# --- model ------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP, each with a residual."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    """A decoder-only transformer over bytes; untied embeddings keep every wrapper's bookkeeping simple."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, VOCAB, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                continue  # biases start at zero and LayerNorm weights at one (their defaults)
            std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def make_model(cfg: TrainConfig, device: torch.device) -> TinyLM:
    """The initial model, identical wherever it is built with the same config (seeded on the CPU)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = TinyLM(cfg.model)
    return model.to(device)


def lm_loss(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, precision: str) -> Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))


# --- data -------------------------------------------------------------------------------------------------


def load_text(data: str, source: str | None = None) -> tuple[Tensor, str]:
    """The corpus as a uint8 tensor and a description; ``stdlib``, a file, or a folder (files sorted). Errors
    name ``source`` (the config file; default ``data`` itself) and its field ``data``."""
    source = str(data) if source is None else source
    if data == "stdlib":
        root, files = stdlib_files()
        what = f"the standard library's source ({root})"
    else:
        root, files = data_files(data, source)
        what = str(root)
    text = read_files(files, training_text_limit(data))
    check_data_size(len(text), data, source)
    return torch.frombuffer(bytearray(text), dtype=torch.uint8), what


def global_batch(text: Tensor, step: int, seed: int, rows: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-byte targets of the whole global batch of ``step`` (same on every rank and the replay)."""
    n = text.numel()
    if n < seq_len + 2:
        raise ConfigError("data", "data", f"holds {n} bytes, fewer than model.seq_len + 2 = {seq_len + 2}")
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (1 << 63))  # manual_seed takes < 2^63
    starts = torch.randint(0, n - seq_len - 1, (rows,), generator=g)
    window = text[starts[:, None] + torch.arange(seq_len + 1)].long()
    return window[:, :-1], window[:, 1:]


def _agree_on_data(text: Tensor, info: DistInfo) -> None:
    """Fail on every rank together when ranks read different corpora (e.g. different Python versions)."""
    if info.world_size == 1 or info.backend is None:
        return
    mine = torch.tensor([text.numel(), zlib.crc32(_norm.tensor_bytes(text))], dtype=torch.int64, device=info.device)
    everyone = [torch.zeros_like(mine) for _ in range(info.world_size)]
    dist.all_gather(everyone, mine)
    if any(not torch.equal(e, mine) for e in everyone):
        raise RuntimeError(
            "ranks read different training text (sizes/CRCs differ across ranks); pass --data with a file "
            "that is identical on every node"
        )


# --- wrappers ---------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """A wrapped model and how to train it: forward, backward, clip target, optimizer step."""

    forward: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor], None]
    step: Callable[[], None]
    clip_target: object
    native_clip: Callable[[], Tensor | None] | None  # returns the norm before clipping; None: clips in step()
    after_step_norm: Callable[[], float | None] | None = None
    # Run once training is over (or has failed): lets go of what gc cannot see, so that the wrapped model is freed
    # before the process group ends (bootstrap.shutdown). A DeepSpeed engine was held, with its optimizer and
    # process groups, by the hooks ZeRO puts on every parameter's gradient accumulation (which torch's C++ autograd
    # nodes hold) and, under ZeRO-3, by two of DeepSpeed's globals: it lived on after the group ended.
    release: Callable[[], None] | None = None


def _adamw(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **_ADAM)


def _torch_setup(module: nn.Module, cfg: TrainConfig, clip_native: Callable[[], Tensor]) -> Setup:
    opt = _adamw(module.parameters(), cfg)

    def step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Setup(module, lambda loss: loss.backward(), step, module, clip_native)


def _torch_native(module: nn.Module, cfg: TrainConfig) -> Callable[[Tensor], Tensor]:
    def clip() -> Tensor:
        total = torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.clip.max_norm, cfg.norm_p)
        return total.full_tensor() if hasattr(total, "full_tensor") else total  # FSDP2 gives a DTensor

    return clip


def _needs_adapter(wrapper: str, module_name: str) -> None:
    try:
        importlib.import_module(module_name)
    except ImportError as e:
        raise RuntimeError(
            f"wrapper {wrapper} needs the adapter {module_name}, which cannot be imported here ({e})"
        ) from None


def _wrap(model: nn.Module, cfg: TrainConfig, info: DistInfo, source: str) -> Setup:
    w = cfg.wrapper
    if w == "none":
        return _torch_setup(model, cfg, _torch_native(model, cfg))
    if w == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[info.device] if info.device.type == "cuda" else None)
        return _torch_setup(ddp, cfg, _torch_native(ddp, cfg))
    if w == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        # device_id is required on the CPU too ("FSDP needs a non-CPU accelerator device" otherwise).
        fsdp = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=info.device, use_orig_params=True)
        return _torch_setup(fsdp, cfg, lambda: fsdp.clip_grad_norm_(cfg.clip.max_norm, cfg.norm_p))
    if w in ("fsdp2", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if w == "fsdp2":
            mesh = init_device_mesh(info.device.type, (info.world_size,))
        else:
            if not cfg.mesh:
                _same_node_sizes(info, source)
            shape = tuple(cfg.mesh) if cfg.mesh else (info.world_size // info.local_world_size, info.local_world_size)
            if shape[0] * shape[1] != info.world_size:
                raise ConfigError(source, "mesh", f"{list(shape)} needs {shape[0] * shape[1]} ranks, launched with "
                                  f"{info.world_size}")
            mesh = init_device_mesh(info.device.type, shape, mesh_dim_names=("replicate", "shard"))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return _torch_setup(model, cfg, _torch_native(model, cfg))
    if w.startswith("zero"):
        return _wrap_deepspeed(model, cfg, info, int(w[-1]), source)
    if w == "fairscale-oss":
        return _wrap_oss(model, cfg)
    raise AssertionError(f"unhandled wrapper {w}")  # config validation lists every wrapper


def _same_node_sizes(info: DistInfo, source: str) -> None:
    """``mesh: null`` shards within a node: every rank must read the same node size, or each built the mesh its
    own node's size gives (nodes of 1 and 2 ranks: rank 0 a (3, 1) mesh and trained, ranks 1 and 2 refused
    (1, 2) without a word, not being rank 0, and rank 0 failed with gloo's "Connection closed by peer"). One
    all-gather at set-up; a ConfigError on every rank alike."""
    if info.backend is None or info.world_size == 1:
        return
    mine = torch.tensor([info.local_world_size], dtype=torch.int64, device=info.device)
    everyone = [torch.zeros_like(mine) for _ in range(info.world_size)]
    dist.all_gather(everyone, mine)
    sizes = [int(e) for e in everyone]
    if len(set(sizes)) > 1:
        raise ConfigError(source, "mesh", f"null shards within a node, but the nodes hold different numbers of "
                          f"ranks (local world size by rank: {sizes}); give mesh: [replicas, shard size]")


def _wrap_deepspeed(model: nn.Module, cfg: TrainConfig, info: DistInfo, stage: int, source: str) -> Setup:
    if cfg.clip.mode != "native":  # DeepSpeed's own clipping needs no adapter
        _needs_adapter(cfg.wrapper, "dist_clip.adapters.deepspeed")
    os.environ.setdefault("DS_ACCELERATOR", info.device.type)  # cpu where backend auto took gloo beside a GPU
    import warnings

    import deepspeed

    from .adapters import deepspeed as deepspeed_adapter

    # DeepSpeed calls torch collectives that torch 2.13 deprecates, once per call: not the user's business.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

    native = cfg.clip.mode == "native"  # its limits (p = 2, max_norm > 0) are checked with the config
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        # 0 turns DeepSpeed's clipping off: dist_clip clips between backward() and step().
        "gradient_clipping": cfg.clip.max_norm if native else 0.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=_adamw(model.parameters(), cfg), config=ds_config)

    def after_step_norm() -> float | None:
        norm = engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    return Setup(
        engine, engine.backward, engine.step, engine, None if not native else (lambda: None),
        after_step_norm if native else None, functools.partial(deepspeed_adapter.release, engine),
    )


def _wrap_oss(model: nn.Module, cfg: TrainConfig) -> Setup:
    _needs_adapter(cfg.wrapper, "dist_clip.adapters.fairscale")
    from fairscale.nn.data_parallel import ShardedDataParallel
    from fairscale.optim.oss import OSS

    opt = OSS(model.parameters(), optim=torch.optim.AdamW, lr=cfg.lr, weight_decay=cfg.weight_decay, **_ADAM)
    sddp = ShardedDataParallel(model, opt)

    def step() -> None:
        opt.step()
        sddp.zero_grad(set_to_none=True)

    def clip_native() -> Tensor:
        return opt.clip_grad_norm(cfg.clip.max_norm, cfg.norm_p)

    return Setup(sddp, lambda loss: loss.backward(), step, opt, clip_native)


# --- one step, the loop, the replay -----------------------------------------------------------------------


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step: global mean loss, total norm before and after clipping, clip coefficient."""

    step: int
    loss: float
    norm: float
    norm_clipped: float | None
    clip_coef: float
    time_s: float


def _coef(norm: float, cfg: TrainConfig) -> float:
    """The factor the gradients were multiplied by (as dist_clip and torch compute it)."""
    if cfg.clip.mode == "off":
        return 1.0
    if math.isnan(norm):
        return math.nan
    return min(1.0, cfg.clip.max_norm / (norm + 1e-6))


def _clip(setup: Setup, cfg: TrainConfig, p: float) -> tuple[float | None, float | None]:
    """Clip as configured; the norm before clipping (None if only the step knows) and after."""
    mode = cfg.clip.mode
    if mode == "dist_clip":
        norm = float(dist_clip.clip_grad_norm_(setup.clip_target, cfg.clip.max_norm, p))
    elif mode == "native":
        assert setup.native_clip is not None
        total = setup.native_clip()
        if total is None:
            return None, None
        norm = float(total)
    else:
        norm = float(dist_clip.get_total_norm(setup.clip_target, p))
        return norm, norm
    return norm, float(dist_clip.get_total_norm(setup.clip_target, p))


def _threads_for(ranks_here: int) -> int:
    """Intra-op threads per rank: ``OMP_NUM_THREADS`` if set (torchrun sets 1), else a fair share of the cores.

    Never more threads than cores: OpenMP threads spin while they wait, so oversubscribed ranks slow down
    many times over instead of sharing.
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, ranks_here))


@contextlib.contextmanager
def _released(setup: Setup) -> Iterator[None]:
    """Run ``setup.release`` on the way out, whether training finished or raised."""
    try:
        yield
    finally:
        if setup.release is not None:
            setup.release()


@contextlib.contextmanager
def _progress(enabled: bool, total: int, desc: str) -> Iterator[Callable[[StepRecord], None]]:
    """A tqdm bar on a terminal; plain lines (about ten per run) when stderr is a file or a pipe, or when tqdm
    (the ``train`` extra) is not installed."""
    if not enabled:
        yield lambda rec: None
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and sys.stderr.isatty():
        import shutil

        # A terminal of unknown size (a pty without a window) reports 0 x 0, and tqdm then hides the bar.
        size = shutil.get_terminal_size((100, 24))
        bar = tqdm(total=total, desc=desc, unit="step", ncols=min(size.columns, 120), nrows=max(size.lines, 24))

        def update(rec: StepRecord) -> None:
            bar.set_postfix({"loss": f"{rec.loss:.4f}", "norm": f"{rec.norm:.4f}", "coef": f"{rec.clip_coef:.3f}"},
                            refresh=False)
            bar.update(1)

        try:
            yield update
        finally:
            bar.close()
        return
    every = max(1, total // 10)

    def line(rec: StepRecord) -> None:
        if rec.step % every == 0 or rec.step in (1, total):
            print(f"{desc} step {rec.step:>4}/{total}  loss {rec.loss:.4f}  norm {rec.norm:.4f}  "
                  f"coef {rec.clip_coef:.3f}  {rec.time_s:.1f}s", file=sys.stderr, flush=True)

    yield line


def train(
    cfg: TrainConfig, info: DistInfo, text: Tensor, *, progress: bool = False, source: str = "<config>"
) -> list[StepRecord]:
    """Train under ``cfg.wrapper`` on this rank; every rank returns the same losses (global mean loss) and the
    norms it clipped by (the same on every rank when the clipping is right: :func:`compare` checks it).

    Must be called on every rank of the default process group (or alone when ``cfg.wrapper`` is ``none``).
    """
    check_world_size(cfg, source, info.world_size)
    if info.device.type == "cpu":
        torch.set_num_threads(_threads_for(info.local_world_size))
    _agree_on_data(text, info)
    check_data_size(text.numel(), cfg.data, source, cfg.model.seq_len)  # every rank alike (they agreed just above)
    setup = _wrap(make_model(cfg, info.device), cfg, info, source)
    rows, p = cfg.batch_size * info.world_size, cfg.norm_p
    mine = slice(info.rank * cfg.batch_size, (info.rank + 1) * cfg.batch_size)
    records: list[StepRecord] = []
    start = time.perf_counter()
    with _released(setup), _progress(progress and info.is_main, cfg.steps, f"{cfg.wrapper} x{info.world_size}") as show:
        for step in range(1, cfg.steps + 1):
            x, y = global_batch(text, step, cfg.seed, rows, cfg.model.seq_len)
            loss = lm_loss(setup.forward, x[mine].to(info.device), y[mine].to(info.device), cfg.precision)
            setup.backward(loss)
            norm, after = _clip(setup, cfg, p)
            setup.step()
            if norm is None:  # DeepSpeed clipped inside step() and knows the norm only now
                norm = setup.after_step_norm() if setup.after_step_norm else float("nan")
                norm = float("nan") if norm is None else norm
            total = loss.detach().float().reshape(1)
            if info.world_size > 1:
                dist.all_reduce(total)  # gloo has no AVG: sum, then divide
            rec = StepRecord(step, float(total) / info.world_size, norm, after, _coef(norm, cfg),
                             time.perf_counter() - start)
            records.append(rec)
            show(rec)
    return records


def replay(
    cfg: TrainConfig, text: Tensor, world_size: int, device: torch.device, *, progress: bool = False
) -> list[StepRecord]:
    """The same steps on one process, unsharded: the reference of the check.

    Each step sees the concatenation of every rank's micro-batch (the whole global batch of ``world_size``
    ranks) with a mean loss, from the same initial weights and with the same AdamW, and is clipped by dist_clip
    on plain parameters (measured only, for ``clip.mode: off``).
    """
    model = make_model(cfg, device)
    opt = _adamw(model.parameters(), cfg)
    rows, p = cfg.batch_size * world_size, cfg.norm_p
    records: list[StepRecord] = []
    start = time.perf_counter()
    with _progress(progress, cfg.steps, "replay x1") as show:
        for step in range(1, cfg.steps + 1):
            x, y = global_batch(text, step, cfg.seed, rows, cfg.model.seq_len)
            loss = lm_loss(model, x.to(device), y.to(device), cfg.precision)
            loss.backward()
            if cfg.clip.mode == "off":
                norm = after = float(dist_clip.get_total_norm(model.parameters(), p))
            else:
                norm = float(dist_clip.clip_grad_norm_(model.parameters(), cfg.clip.max_norm, p))
                after = float(dist_clip.get_total_norm(model.parameters(), p))
            opt.step()
            opt.zero_grad(set_to_none=True)
            rec = StepRecord(step, loss.item(), norm, after, _coef(norm, cfg), time.perf_counter() - start)
            records.append(rec)
            show(rec)
    return records


# --- the check, the log, the plot -------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    rtol: float
    norm_rtol: float | None
    max_abs_loss_diff: float
    max_rel_loss_diff: float
    max_rel_norm_diff: float
    first_failed_step: int  # 0 when passed
    first_nonfinite_norm_step: int = 0  # 0: every norm the run reported is finite (or inf as the replay's)
    ranks_disagree_step: int = 0  # 0: every rank had the same norms at every step (or only one rank)
    ranks_disagree: str = ""  # which ranks, and their norms at that step

    def line(self, precision: str) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        norm_tol = "not compared" if self.norm_rtol is None else f"tolerance {self.norm_rtol:g}"
        return (
            f"check: {verdict}  max |loss - replay| = {self.max_abs_loss_diff:.3g} (relative "
            f"{self.max_rel_loss_diff:.3g}, tolerance {self.rtol:g}, {precision}); max relative norm difference "
            f"{self.max_rel_norm_diff:.3g} ({norm_tol})"
            + ("" if self.passed else f"; first out of tolerance at step {self.first_failed_step}")
            + ("" if not self.first_nonfinite_norm_step else
               f"; the run's norm is not finite at step {self.first_nonfinite_norm_step}")
            + ("" if not self.ranks_disagree_step else
               f"; the ranks' norms differ at step {self.ranks_disagree_step}: {self.ranks_disagree}")
        )


def _rel(a: float, b: float) -> float:
    if a == b:  # also inf == inf
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(b), 1e-12)


def _off_infinite(run: float | None, ref: float | None) -> bool:
    """A norm of the run that is NaN, or infinite where the replay's is not the same infinity."""
    return run is not None and not math.isfinite(run) and run != ref


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _ranks_disagree(rank_norms: Sequence[Sequence[tuple[float, float]]]) -> tuple[int, str]:
    """The first step at which some rank's norms (before and after clipping) differ from rank 0's, and a
    description naming those ranks; ``(0, "")`` when every rank saw the same norms."""
    if len(rank_norms) < 2:
        return 0, ""
    for i, mine in enumerate(rank_norms[0]):
        odd = [r for r in range(1, len(rank_norms))
               if not all(_same(x, y) for x, y in zip(rank_norms[r][i], mine))]
        if odd:
            shown = [0, *odd[:3]]
            values = ", ".join(f"rank {r} {rank_norms[r][i][0]!r} (after clipping {rank_norms[r][i][1]!r})"
                               for r in shown)
            more = f" and {len(odd) - 3} more" if len(odd) > 3 else ""
            who = "rank {} differs" if len(odd) == 1 else "ranks {} differ"
            return i + 1, f"{who.format(', '.join(map(str, odd[:3])) + more)} from rank 0: {values}"
    return 0, ""


def compare(
    run: Sequence[StepRecord], ref: Sequence[StepRecord], rtol: float, norm_rtol: float | None = None,
    *, norm_unreported: bool = False, rank_norms: Sequence[Sequence[tuple[float, float]]] | None = None,
) -> CheckResult:
    """Do the distributed and replayed curves agree step by step?

    The loss of every step must agree within ``rtol`` (relative); the norms before and after clipping within
    ``norm_rtol`` where given. Whatever ``norm_rtol``, a norm the run reports must be finite (or infinite as
    the replay's: a tiny p overflows both): only where the run's clipping may not report the norm
    (``norm_unreported``: DeepSpeed's own, ``clip.mode: native`` on ``zero*``) is a NaN norm left uncompared.
    ``rank_norms``: every rank's ``(norm, norm after clipping)`` per step (NaN where not reported), which must be
    identical on every rank: the records are rank 0's, and a rank that clipped by another norm changes the loss
    too little to see under AdamW. A missing step fails.
    """
    if len(run) != len(ref):
        return CheckResult(False, rtol, norm_rtol, math.inf, math.inf, math.inf, min(len(run), len(ref)) + 1)
    abs_loss = rel_loss = rel_norm = 0.0
    first = nonfinite = 0
    for a, b in zip(run, ref):
        d_abs, d_rel = abs(a.loss - b.loss), _rel(a.loss, b.loss)
        unreported = norm_unreported and math.isnan(a.norm)
        d_norm = 0.0 if unreported and not math.isnan(b.norm) else _rel(a.norm, b.norm)
        if a.norm_clipped is not None and b.norm_clipped is not None:
            d_norm = max(d_norm, _rel(a.norm_clipped, b.norm_clipped))
        # Non-finite where the replay's is not the same infinity: a tiny p overflows float64 in the reference
        # too (p = 0.01: inf in both, a correct run, which this failed); NaN never matches.
        if not nonfinite and not unreported and (
                _off_infinite(a.norm, b.norm) or _off_infinite(a.norm_clipped, b.norm_clipped)):
            nonfinite = a.step
        if math.isnan(d_abs):
            d_abs = d_rel = math.inf
        abs_loss, rel_loss, rel_norm = max(abs_loss, d_abs), max(rel_loss, d_rel), max(rel_norm, d_norm)
        if not first and (d_rel > rtol or (norm_rtol is not None and d_norm > norm_rtol)):
            first = a.step
    disagree_step, disagree = _ranks_disagree(rank_norms or ())
    first = min((s for s in (first, nonfinite, disagree_step) if s), default=0)
    return CheckResult(first == 0, rtol, norm_rtol, abs_loss, rel_loss, rel_norm, first, nonfinite, disagree_step,
                       disagree)


def write_log(path: Path, header: dict[str, Any], run: Sequence[StepRecord], ref: Sequence[StepRecord] | None,
              check: CheckResult | None) -> None:
    """JSON lines: one ``run`` header, one ``step`` per step, one ``replay`` per replayed step, one ``check``."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(v: Any) -> Any:  # strict JSON has no NaN or inf: null and "inf"/"-inf" instead
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None if math.isnan(v) else str(v)
        return v

    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(clean({"kind": "run", **header}), allow_nan=False) + "\n")
        for rec in run:
            f.write(json.dumps(clean({"kind": "step", **asdict(rec)}), allow_nan=False) + "\n")
        for rec in ref or ():
            f.write(json.dumps(clean({"kind": "replay", **asdict(rec)}), allow_nan=False) + "\n")
        if check is not None:
            f.write(json.dumps(clean({"kind": "check", **asdict(check)}), allow_nan=False) + "\n")


def plot(path: Path, title: str, cfg: TrainConfig, run: Sequence[StepRecord], ref: Sequence[StepRecord] | None) -> None:
    """Two panels sharing the step axis: loss (run and replay), and the gradient norm before and after clipping
    on a log scale with ``max_norm`` as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in run]
    fig, (ax_loss, ax_norm) = plt.subplots(2, 1, sharex=True, figsize=(8, 6), constrained_layout=True)
    ax_loss.plot(steps, [r.loss for r in run], label="distributed", color="C0")
    if ref:
        ax_loss.plot([r.step for r in ref], [r.loss for r in ref], "--", label="unsharded replay", color="C1")
    ax_loss.set_ylabel("loss (nats/byte)")
    ax_loss.legend()
    ax_loss.set_title(title)
    ax_norm.plot(steps, [r.norm for r in run], label="before clipping", color="C2")
    ax_norm.plot(steps, [math.nan if r.norm_clipped is None else r.norm_clipped for r in run], "--",
                 label="after clipping", color="C3")
    if cfg.clip.mode != "off":
        ax_norm.axhline(cfg.clip.max_norm, linestyle=":", color="gray", label=f"max_norm {cfg.clip.max_norm:g}")
    ax_norm.set_yscale("log")
    ax_norm.set_xlabel("step")
    ax_norm.set_ylabel(f"gradient norm (p={cfg.clip.norm_type:g})")
    ax_norm.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the whole job ----------------------------------------------------------------------------------------


def _count_params(cfg: TrainConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in TinyLM(cfg.model).parameters())


def _launched_by(info: DistInfo) -> str:
    return "no launcher" if info.launcher == "single" else f"launched by {info.launcher}"


def _say(info: DistInfo, *lines: str) -> None:
    if info.is_main:
        for line in lines:
            print(line, flush=True)


def _job_token(info: DistInfo) -> int:
    """A number rank 0 draws for this job and broadcasts (one collective, once the run is over): it names the
    job's keys on the rendezvous store, which may outlive the job (torchrun's workers share the agent's store
    across restarts)."""
    if info.backend is None or info.world_size == 1:
        return 0
    token = torch.tensor([secrets.randbits(62) if info.is_main else 0], dtype=torch.int64, device=info.device)
    dist.broadcast(token, 0)
    return int(token.item())


def _verdict_everywhere(code: int, info: DistInfo, token: int) -> int:
    """Rank 0's exit code, on every rank (so that every launcher agrees on the job's status)."""
    if info.backend is None or info.world_size == 1:
        return code
    # Through the rendezvous store, not a collective: the others wait for the whole of rank 0's replay, which
    # may take longer than the collective timeout. A rank 0 that dies ends the job through its launcher
    # (torchrun, mpirun), or closes the store it hosts (env:// rendezvous): an error, not a hang.
    store = dist.distributed_c10d._get_default_store()
    # One key per job, named by the token rank 0 drew for it: a fixed key gave a second job in the same processes
    # the first job's verdict (ranks 1+ returned 0 while rank 0 returned 1), and a count of the ranks' calls on the
    # store was shifted for good by a failed attempt whose rank 0 died in its replay (torchrun --max-restarts: the
    # next attempt's rank 1 waited 24 hours for a key nobody set).
    key = f"dist_clip/verdict/{token}"
    if info.rank == 0:
        store.set(key, str(code))
        return code
    store.wait([key], timedelta(hours=24))
    return int(store.get(key))


def run_job(
    cfg: TrainConfig,
    info: DistInfo,
    *,
    source: str = "<config>",
    out_dir: str | None = None,
    replay_check: bool = True,
    show_progress: bool = True,
    make_plot: bool = True,
) -> int:
    """Train, log, plot, replay and check; returns the exit code (0: agrees or not checked, 1: disagrees).

    Must be called on every rank. Rank 0 prints, writes the log and the plot, and runs the replay while the
    other ranks wait for its verdict.
    """
    # Before the header: a config the world cannot run (wrapper: none on several ranks, an hsdp mesh of another
    # size) is one config error line, not the run's header and data lines followed by it.
    check_world_size(cfg, source, info.world_size)
    text, what = load_text(cfg.data, source)
    n_params = _count_params(cfg)
    rows = cfg.batch_size * info.world_size
    _say(info, f"dist-clip: {cfg.name}: {cfg.wrapper} on {info.world_size} rank(s) ({info.backend or 'no group'}, "
               f"{info.device.type}, {_launched_by(info)}), {n_params / 1e6:.2f} M parameters, "
               f"{cfg.steps} steps x {rows} sequences of {cfg.model.seq_len} bytes, {cfg.precision}, "
               f"clip {cfg.clip.mode} max_norm {cfg.clip.max_norm:g} p={cfg.clip.norm_type:g}",
         f"data: {what}, {text.numel() / 1e6:.1f} MB")
    t0 = time.perf_counter()
    run = train(cfg, info, text, progress=show_progress, source=source)
    train_s = time.perf_counter() - t0
    rank_norms = _gather_norms(run, info)
    token = _job_token(info)
    code = 1  # what the other ranks hear if rank 0 fails below
    try:
        code = _finish(cfg, info, run, rank_norms, text, what, n_params, train_s, source, out_dir, replay_check,
                       show_progress, make_plot) if info.is_main else 0
    finally:
        code = _verdict_everywhere(code, info, token)
    return code


def _gather_norms(run: Sequence[StepRecord], info: DistInfo) -> list[list[tuple[float, float]]]:
    """Every rank's ``(norm, norm after clipping)`` of every step (NaN where not reported), by rank: one
    all-gather once the run is over, none per step. The records are rank 0's; the check needs them all."""
    rows = [(r.norm, math.nan if r.norm_clipped is None else r.norm_clipped) for r in run]
    if info.backend is None or info.world_size == 1:
        return [rows]
    mine = torch.tensor(rows, dtype=torch.float64, device=info.device).reshape(len(rows), 2)
    everyone = [torch.empty_like(mine) for _ in range(info.world_size)]
    dist.all_gather(everyone, mine)
    return [[(float(a), float(b)) for a, b in e.tolist()] for e in everyone]


def _norm_unreported(cfg: TrainConfig) -> bool:
    """DeepSpeed's own clipping happens inside ``engine.step()`` and may not report the norm it clipped by."""
    return cfg.clip.mode == "native" and cfg.wrapper.startswith("zero")


def _finish(cfg: TrainConfig, info: DistInfo, run: list[StepRecord], rank_norms: list[list[tuple[float, float]]],
            text: Tensor, what: str, n_params: int, train_s: float, source: str, out_dir: str | None,
            replay_check: bool, show_progress: bool, make_plot: bool) -> int:
    """Rank 0's part after training: replay, check, log, plot, summary lines."""
    ref = check = None
    folder = Path(out_dir if out_dir is not None else cfg.out_dir) / cfg.name
    _say(info, f"train: {cfg.steps} steps in {train_s:.1f} s, final loss {run[-1].loss:.4f}")
    if replay_check:
        t1 = time.perf_counter()
        ref = replay(cfg, text, info.world_size, info.device, progress=show_progress)
        check = compare(run, ref, cfg.rtol, cfg.norm_rtol, norm_unreported=_norm_unreported(cfg),
                        rank_norms=rank_norms)
        _say(info, f"replay: the same {cfg.steps} steps unsharded on 1 process in {time.perf_counter() - t1:.1f} s")
    header = {"config": cfg.to_dict(), "source": source, "world_size": info.world_size, "backend": info.backend,
              "device": str(info.device), "launcher": info.launcher, "params": n_params, "data": what,
              "torch": torch.__version__, "dist_clip": dist_clip.__version__, "train_s": train_s}
    write_log(folder / "log.jsonl", header, run, ref, check)
    outputs = [f"log: {folder / 'log.jsonl'}"]
    if make_plot:
        title = f"{cfg.name}: {cfg.wrapper} on {info.world_size} rank(s), {cfg.precision}"
        if check is not None:
            verdict = "PASS" if check.passed else "FAIL"
            title += f"; replay check {verdict} (max rel. loss diff {check.max_rel_loss_diff:.1e})"
        plot(folder / "plot.png", title, cfg, run, ref)
        outputs.append(f"plot: {folder / 'plot.png'}")
    _say(info, "  ".join(outputs))
    if check is None:
        step, disagree = _ranks_disagree(rank_norms)
        if step:  # nothing is checked without the replay, but the records are rank 0's alone
            _say(info, f"warning: the ranks' norms differ at step {step}: {disagree}")
        return 0
    _say(info, check.line(cfg.precision))
    return 0 if check.passed else 1
