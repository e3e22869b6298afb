"""``dist_clip.testing.assert_clip_matches_unsharded``: the check users run in their own multi-GPU CI.

Inside an existing process group (our gloo ranks) it must pass on DDP, FSDP2 and FSDP1 for every mode it
knows, return the per-parameter norms under the unsharded model's names, and fail with a readable table of
norms per parameter when the sharded model is not what the reference is (here: no data-parallel wrapper at
all, so each rank only sees its own batch). It also spawns its own ranks when given ``world_size``.
Run: ``.venv/bin/python -m pytest tests/test_testing_helper.py``.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from dist_clip import AGC
from dist_clip.testing import assert_clip_matches_unsharded, reference_norm
from tests import beyond_cases as cases


def body_passes() -> list[list[str]]:
    out = []
    for wrap in (cases.wrap_ddp, cases.wrap_fsdp2, cases.wrap_fsdp1_flat):
        for kwargs in (
            {"norm_type": 2.0, "max_norm": 0.05},
            {"norm_type": math.inf, "mode": "per_param", "max_norm": 0.01},
            {"mode": "unitwise", "agc": AGC(0.02)},
            {"mode": "unitwise", "agc": AGC(0.02, exclude=("2.*",))},  # excluded parameters stay unclipped
        ):
            norms = assert_clip_matches_unsharded(cases.build_mlp, wrap, cases.batch, **kwargs)
            out.append(sorted(norms))
    return out


def test_passes_on_ddp_fsdp2_fsdp1_inside_a_process_group(run_ranks):
    names = sorted(n for n, _ in cases.build_mlp().named_parameters())
    for per_rank in run_ranks(2, body_passes):
        assert all(n == names for n in per_rank)


class _MappingNet(nn.Module):
    """Takes its input as a mapping and holds a layer its forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(cases.IN, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.used(batch["x"])


def _mapping_batch(rank: int, world: int) -> dict:
    return {"x": cases.batch(rank, world)}


def _fsdp1_whole(use_orig_params: bool):  # noqa: ANN202
    def wrap(model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP(model, device_id=torch.device("cpu"), use_orig_params=use_orig_params)

    return wrap


def body_unused_parameter_and_a_mapping_batch() -> list[list[str]]:
    """FSDP1 zero-fills the gradient of a trainable parameter the forward did not reach and reports it at 0
    (documented): the float64 model has no gradient there, and every such correct setup failed. A batch given
    as a mapping reached the float64 model in float32 ("mat1 and mat2 must have the same dtype")."""
    out = []
    ddp = functools.partial(nn.parallel.DistributedDataParallel, find_unused_parameters=True)
    for wrap in (_fsdp1_whole(False), _fsdp1_whole(True), ddp):
        for kwargs in ({"max_norm": 0.05}, {"mode": "per_param", "max_norm": 0.05, "norm_type": math.inf}):
            out.append(sorted(assert_clip_matches_unsharded(_MappingNet, wrap, _mapping_batch, **kwargs)))
    return out


def test_a_parameter_without_gradient_and_a_mapping_batch_pass(run_ranks):
    for per_rank in run_ranks(2, body_unused_parameter_and_a_mapping_batch):
        for names in per_rank:  # FSDP1 reports the unused layer at 0, DDP leaves it out
            assert {"used.weight", "used.bias"} <= set(names), names


class _TinyCoefficientNet(nn.Module):
    """One gradient of norm 9.3e37: with max_norm 1e-3 its coefficient (1.1e-41) is a float32 subnormal."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(2))
        self.b = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a * x[:2]).sum() + (self.b * x[2:]).sum()


@pytest.mark.parametrize("mode", ["total", "per_param"])
def test_a_coefficient_float32_holds_only_as_a_subnormal_passes(mode):
    """dist_clip applies such a coefficient as one float64 product rounded once (README "Accuracy"); the check
    expected the gradient times clip_coef's float32 value, 13 bits of it, and failed the correct clip."""
    norms = assert_clip_matches_unsharded(
        _TinyCoefficientNet, lambda m: m, lambda rank, world: torch.tensor([9.3e37, 1.0, 0.3, -0.2, 0.1]),
        loss_fn=lambda out: out, mode=mode, max_norm=1e-3)
    assert norms["a"] == pytest.approx(9.3e37, rel=1e-6)


class _HalfUlpNet(nn.Module):
    """bf16, one gradient 2^127: max_norm 1 + 2^-8 + 2^-30 puts its product just above a bf16 half-ulp point."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a * x).sum()


@pytest.mark.parametrize("mode", ["total", "per_param"])
def test_a_subnormal_coefficient_rounded_once_in_bf16_passes(mode):
    """The check formed its bf16 expectation with torch's float64 -> bf16 cast, two roundings (through float32):
    the correct product rounded once, 1.0078125, read as 1 ulp off its 1.0."""
    norms = assert_clip_matches_unsharded(
        _HalfUlpNet, lambda m: m, lambda rank, world: torch.tensor([2.0**127], dtype=torch.bfloat16),
        loss_fn=lambda out: out, mode=mode, max_norm=1 + 2**-8 + 2**-30)
    assert norms["a"] == 2.0**127


def body_fails_readably() -> str:
    try:
        assert_clip_matches_unsharded(cases.build_mlp, cases.wrap_none, cases.batch)
    except AssertionError as e:
        return str(e)
    return "passed"


def test_fails_with_a_table_of_norms_per_parameter(run_ranks):
    for message in run_ranks(2, body_fails_readably):
        assert "does not match the unsharded float64 model" in message, message
        assert "unsharded reference" in message and "sharded (dist_clip)" in message
        assert "!! 0.weight" in message and "total norm" in message
        assert "rtol=1e-05" in message and "pass rtol" in message  # what to do where the wrapper rounds


def body_low_precision() -> list[bool]:
    """A bf16 model: the float64 model's norms differ by bf16 roundings (4.9e-3), so correct setups failed at
    the default rtol, and at rtol=1e-2 a coefficient off by 1e-3 passed. Now the default follows the dtype, and
    the applied clip is checked bit for bit against the returned norms whatever the dtype."""
    from dist_clip import _scale

    for wrap in (cases.wrap_ddp, cases.wrap_fsdp2):
        for kwargs in ({"max_norm": 0.05}, {"mode": "per_param", "max_norm": 0.02, "norm_type": 1.0}):
            assert_clip_matches_unsharded(cases.build_mlp_bf16, wrap, cases.batch_bf16, **kwargs)
    out = []
    real = _scale.clip_coefficient
    _scale.clip_coefficient = lambda limit, norms: real(limit, norms) * 0.999
    try:
        for kwargs in ({"max_norm": 0.05}, {"mode": "per_param", "max_norm": 0.02}):
            try:
                assert_clip_matches_unsharded(cases.build_mlp_bf16, cases.wrap_ddp, cases.batch_bf16, **kwargs)
            except AssertionError as e:
                out.append("clip_coef" in str(e) and "implies" in str(e))
            else:
                out.append(False)
    finally:
        _scale.clip_coefficient = real
    return out


def test_low_precision_models_pass_and_a_wrong_coefficient_fails(run_ranks):
    assert run_ranks(2, body_low_precision) == [[True, True]] * 2


def _batch_from_the_global_rng(rank: int, world: int) -> torch.Tensor:
    return torch.randn(4, cases.IN) * 3  # no generator of its own: torch's global one, seeded by the helper


def body_a_batch_fn_drawing_from_the_global_rng() -> list[bool]:
    """A ``batch_fn`` drawing from torch's global generator (``torch.randn(4, IN)``, as a test usually writes it)
    was called once for the rank's own batch and again for every rank's batch of the reference, so the wrapped
    model and the float64 model saw different inputs: a correct DDP or FSDP2 clip failed, 0.015 to 0.47 relative off
    per parameter, with the hint to pass rtol for low precision. Each rank's batch is drawn once now, every rank
    drawing all of them in rank order from the same seeded state, and the one batch feeds both models."""
    out = []
    for wrap in (cases.wrap_ddp, cases.wrap_fsdp2):
        try:
            assert_clip_matches_unsharded(cases.build_mlp, wrap, _batch_from_the_global_rng, max_norm=0.05)
            out.append(True)
        except AssertionError as e:
            out.append(str(e).splitlines()[-3:])
    # Without a data-parallel wrapper each rank still sees its own batch only: still a mismatch
    try:
        assert_clip_matches_unsharded(cases.build_mlp, cases.wrap_none, _batch_from_the_global_rng)
        out.append("passed")
    except AssertionError as e:
        out.append("does not match the unsharded float64 model" in str(e))
    return out


def test_a_batch_fn_drawing_from_the_global_rng_passes(run_ranks):
    assert run_ranks(2, body_a_batch_fn_drawing_from_the_global_rng) == [[True, True, True]] * 2


def _build_mlp_with_dropout() -> nn.Module:
    from tests.beyond_cases import HID, IN, MID, OUT

    return nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, MID), nn.Dropout(0.3), nn.Tanh(),
                         nn.Linear(MID, OUT))


def body_a_model_with_dropout() -> list[bool]:
    """A model with dropout in training mode: the wrapped forward and the float64 forward of the same batch drew
    their masks from different points of torch's generator, so a correct DDP or FSDP2 clip failed (per-parameter
    norms 0.4-23% off, told to pass rtol for low precision). Each rank's forward, wrapped or float64, starts from
    the same seed now: on the CPU the masks agree."""
    out = []
    for wrap in (cases.wrap_ddp, cases.wrap_fsdp2):
        try:
            assert_clip_matches_unsharded(_build_mlp_with_dropout, wrap, cases.batch, max_norm=0.05)
            out.append(True)
        except AssertionError as e:
            out.append(str(e).splitlines()[-3:])
    return out


def test_a_model_with_dropout_passes_on_the_cpu(run_ranks):
    assert run_ranks(2, body_a_model_with_dropout) == [[True, True]] * 2


class _ShiftsItsInput(nn.Module):
    """Changes its input in place (``x += 1`` and ``ids.mul_(2)``, as ``x += self.pos`` or ``ids.masked_fill_``
    would), and takes token ids besides."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, cases.IN)
        self.lin = nn.Linear(cases.IN, 3)

    def forward(self, batch: dict) -> torch.Tensor:
        x, ids = batch["x"], batch["ids"]
        x += 1.0
        ids.mul_(2).remainder_(5)
        return self.lin(x + self.emb(ids).mean(1))


def _batch_with_ids(rank: int, world: int) -> dict:
    # (integer ids on the CPU reached the float64 model as the caller's own tensor, not a copy)
    return {"x": cases.batch(rank, world), "ids": (torch.arange(12).reshape(4, 3) + rank) % 5}


def body_a_model_changing_its_input_in_place() -> list[bool]:
    """The one batch of each rank feeds both models since batch_fn is called once per rank, and the wrapped
    forward ran first: a model changing its input in place (x += 1, ids.mul_(2) here) changed this rank's batch
    before the float64 model was fed it, and a correct DDP or FSDP2 clip failed (total norm 7.69 against 5.36; it
    passed while batch_fn was called again for the reference). The float64 model's copies are taken before the
    wrapped forward now, and are copies also of integer and float64 CPU tensors (they were the caller's own)."""
    from torch.distributed.fsdp import fully_shard

    out = []
    for wrap in (cases.wrap_ddp, fully_shard):
        try:
            assert_clip_matches_unsharded(_ShiftsItsInput, wrap, _batch_with_ids, max_norm=0.05)
            out.append(True)
        except AssertionError as e:
            out.append(str(e).splitlines()[1:3])
    return out


def test_a_model_changing_its_input_in_place_passes(run_ranks):
    assert run_ranks(2, body_a_model_changing_its_input_in_place) == [[True, True]] * 2


def test_spawns_its_own_ranks():
    norms = assert_clip_matches_unsharded(cases.build_mlp, cases.wrap_fsdp2, cases.batch, world_size=2,
                                          mode="per_param", max_norm=0.02)
    assert set(norms) == {n for n, _ in cases.build_mlp().named_parameters()}


class _HeldInACycle:
    """Held by the wrapped model, and by itself: only a collection frees it. Writes to ``path`` whether the
    process group was still up when it was freed, and whether the interpreter was exiting then."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.me = self

    def __del__(self) -> None:
        import sys

        import torch.distributed as dist

        with open(self.path, "w") as f:
            f.write(f"group up: {dist.is_initialized()}, exiting: {sys.is_finalizing()}")


def _wrap_ddp_holding_a_cycle(path: str, model: nn.Module) -> nn.Module:
    model.held = _HeldInACycle(path)
    return cases.wrap_ddp(model)


def test_spawned_ranks_collect_the_wrapped_model_before_ending_their_group(tmp_path):
    """A spawned rank destroyed its group while the wrapped model's reference cycles (DDP's, FSDP2's) still held
    it: gloo's threads then died at interpreter exit ("terminate called without an active exception", SIGABRT),
    in the user's CI log after a passing check. The ranks now collect before the group ends (bootstrap.shutdown);
    before, the cycle here was freed only at exit, with the group gone, or never. Freed at exit with the group
    still up (no shutdown at all: the group never ended) is not it either."""
    path = tmp_path / "freed"
    assert_clip_matches_unsharded(cases.build_mlp, functools.partial(_wrap_ddp_holding_a_cycle, str(path)),
                                  cases.batch, world_size=1, max_norm=0.05)
    assert path.exists() and path.read_text() == "group up: True, exiting: False", path.exists() and path.read_text()


def _wrap_zero_holding_a_cycle(path: str, stage: int, model: nn.Module) -> object:
    """A DeepSpeed ZeRO ``stage`` engine over ``model``, which holds a :class:`_HeldInACycle` writing to ``path``;
    at exit, ``path + ".groups"`` says whether DeepSpeed still holds its clone of the world group."""
    import atexit
    import contextlib
    import io
    import os

    import torch.distributed as dist

    from tests import ds_cases

    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))  # deepspeed.initialize asserts it
    deepspeed = ds_cases._quiet()
    from deepspeed.utils import groups

    def at_exit() -> None:
        with open(path + ".groups", "w") as f:
            f.write(f"deepspeed holds a group: {groups._WORLD_GROUP is not None}")

    atexit.register(at_exit)
    model.held = _HeldInACycle(path)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cases.ds_config(stage))
    return engine


@pytest.mark.deepspeed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [2, 3])
def test_spawned_ranks_free_a_deepspeed_engine_before_ending_their_group(tmp_path, stage):
    """A DeepSpeed engine outlived the rank's group, with its model and groups: ZeRO's hooks on every parameter's
    gradient accumulation (held by torch's C++ autograd nodes, out of gc's sight) held it, and ZeRO-3's globals
    held the model; DeepSpeed's module globals held its clone of the world group. The ranks now release the engine
    wrap_fn made (adapters.deepspeed.release) and end the group through DeepSpeed (bootstrap.shutdown). Before,
    the model was freed at exit with the group gone, or never, and the group was held to the end."""
    path = tmp_path / "freed"
    assert_clip_matches_unsharded(cases.build_mlp, functools.partial(_wrap_zero_holding_a_cycle, str(path), stage),
                                  cases.batch, world_size=1, max_norm=0.05, timeout_s=240)
    said = [p.read_text() if p.exists() else None for p in (path, tmp_path / "freed.groups")]
    assert said == ["group up: True, exiting: False", "deepspeed holds a group: False"], said


def test_bad_arguments():
    with pytest.raises(ValueError, match="world_size must be None or an int >= 1, got 0"):
        assert_clip_matches_unsharded(cases.build_mlp, cases.wrap_none, cases.batch, world_size=0)
    with pytest.raises(ValueError, match="mode must be"):
        assert_clip_matches_unsharded(cases.build_mlp, cases.wrap_none, cases.batch, mode="per_group")


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "bogus"}, "mode must be"),
    ({"norm_type": "fro"}, "norm_type"),
    ({"norm_type": -1}, "norm_type"),
    ({"max_norm": -1.0}, "max_norm"),
    ({"rtol": -1.0}, "rtol must be a finite number >= 0"),
    ({"atol": math.nan}, "atol must be a finite number >= 0"),
    ({"timeout_s": math.nan}, "timeout_s must be"),
    ({"timeout_s": "10"}, "timeout_s must be"),
    ({"seed": -1}, r"seed must be an int in \[0, 2\*\*64\)"),
    ({"seed": 2**64}, r"seed must be an int in \[0, 2\*\*64\)"),  # torch.manual_seed's overflow, in the ranks
    ({"mode": "unitwise", "norm_type": 0}, "unitwise"),
    ({"mode": "unitwise", "agc": 0.02}, "agc"),
    ({"agc": AGC(0.5)}, "agc= is the setting of mode='unitwise'"),  # ignored in mode "total", and passed
    ({"build_model": None}, "build_model must be callable"),  # a rank's traceback 5 s later
    ({"wrap_fn": "x"}, "wrap_fn must be callable"),
    ({"loss_fn": 3}, "loss_fn must be callable"),
])
def test_bad_arguments_are_refused_before_any_rank_starts(kwargs, match):
    """With world_size, a bad argument used to surface as a failure of the spawned ranks (or, for rtol < 0, as a
    mismatch that was not there)."""
    fns = {"build_model": cases.build_mlp, "wrap_fn": cases.wrap_none, "batch_fn": cases.batch}
    fns.update({k: kwargs.pop(k) for k in list(kwargs) if k in fns})
    with pytest.raises(TypeError if match == "agc" or "callable" in match else ValueError, match=match):
        assert_clip_matches_unsharded(fns["build_model"], fns["wrap_fn"], fns["batch_fn"], world_size=2, **kwargs)


@pytest.mark.parametrize("mode", ["total", "per_param"])
def test_non_finite_gradients_of_a_correct_setup_pass(mode):
    """NaN gradients (one parameter's): the check expected clip_coef 1 (Python's min(1.0, nan) is 1.0) where the
    clip gives NaN, as torch's does, and its measurement after the clip multiplied every gradient by NaN before
    the bit-for-bit check. Matching infinite norms read as a mismatch (inf - inf is NaN). A numpy rtol passes."""
    import numpy as np

    from dist_clip.testing import _diff_table

    def batch(rank: int, world: int):  # noqa: ANN202
        x = cases.batch(rank, world)
        x[0, 0] = math.inf  # the first layer's weight gradient gets NaN entries, the others stay finite
        return x

    norms = assert_clip_matches_unsharded(cases.build_mlp, cases.wrap_none, batch, mode=mode, rtol=np.float32(1e-5))
    assert math.isnan(norms["0.weight"]) and math.isfinite(norms["4.bias"]), norms
    assert _diff_table({"a": math.inf, "b": 1.0}, {"a": math.inf, "b": 1.0}, 1e-5, 0.0, "x") == []
    assert _diff_table({"a": math.inf}, {"a": 1e38}, 1e-5, 0.0, "x") != []


class _OnAnAccelerator(torch.Tensor):
    """Stands for a tensor on an accelerator: only ``.to("cpu", ...)`` brings it to the float64 CPU model."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func is torch.Tensor.to and torch.device(args[1] if len(args) > 1 else kwargs["device"]).type == "cpu":
            return out.as_subclass(torch.Tensor)
        return out.as_subclass(cls) if isinstance(out, torch.Tensor) else out


def test_an_integer_batch_on_an_accelerator_reaches_the_float64_model_on_the_cpu():
    """The float64 model lives on the CPU, and the batch copies it is fed were moved there for floating and complex
    tensors only: token ids (an LM's batch) stayed on the accelerator, and its embedding raised torch's "Expected
    all tensors to be on the same device" (world_size=None on GPUs). Every tensor goes to the CPU now, its dtype
    kept unless floating (float64) or complex (complex128); other values as they are."""
    from dist_clip.testing import _as64

    ids = torch.arange(6).reshape(2, 3).as_subclass(_OnAnAccelerator)
    mask = torch.ones(2, 3, dtype=torch.bool).as_subclass(_OnAnAccelerator)
    x = torch.randn(2, 3).as_subclass(_OnAnAccelerator)
    got = _as64({"input_ids": ids, "mask": [mask, 7], "x": (x,)})
    assert type(got["input_ids"]) is torch.Tensor and got["input_ids"].dtype == torch.int64
    assert type(got["mask"][0]) is torch.Tensor and got["mask"][0].dtype == torch.bool and got["mask"][1] == 7
    assert type(got["x"][0]) is torch.Tensor and got["x"][0].dtype == torch.float64


def test_scaling_check_names_pieces_not_scaled_by_the_coefficient():
    """The bit-for-bit part of the check: a piece scaled by anything but clip_coef is named, with its count of
    differing entries; pieces scaled right pass in every dtype."""
    import torch

    from dist_clip import GradClipper
    from dist_clip.testing import _local_pieces, _scaling_problems

    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        params = {n: torch.nn.Parameter(torch.zeros(k, dtype=dtype)) for n, k in (("a", 50), ("b", 7))}
        for i, q in enumerate(params.values()):
            q.grad = (torch.randn(q.shape, generator=torch.Generator().manual_seed(i)) * 3).to(dtype)
        for mode in ("total", "per_param"):
            pieces = _local_pieces(params)
            result = GradClipper(max_norm=0.5, mode=mode, report=True)(params)
            assert _scaling_problems(pieces, result, result.norms, 0.5, mode, 2.0) == [], (dtype, mode)
        pieces = _local_pieces(params)
        result = GradClipper(max_norm=0.5, report=True)(params)
        params["b"].grad.mul_(0.5)
        problems = _scaling_problems(pieces, result, result.norms, 0.5, "total", 2.0)
        assert len(problems) == 1 and "b (7 of 7 entries)" in problems[0], problems


def test_references_measure_complex_and_sparse_gradients_as_dist_clip_does():
    """The float64 references cast complex gradients to float64 (the real part: 3 for |3+4j, 1j| = sqrt(26)) and
    raised on sparse ones; the CI helper's float64 model copy dropped complex parameters' imaginary parts."""
    import torch
    from torch import nn

    import dist_clip
    from dist_clip.testing import reference_norm, reference_param_norms

    z = torch.tensor([3 + 4j, 1j], dtype=torch.complex64)
    coo = torch.sparse_coo_tensor(torch.tensor([[0, 1, 1]]), torch.tensor([3.0, 2.0, 2.0]), (3,))  # 3 and 2+2
    for p in (1.0, 2.0, math.inf):
        want = float(dist_clip.get_total_norm([z, coo], p))
        assert reference_norm([z, coo], p) == pytest.approx(want, rel=1e-6)
        assert reference_param_norms({"z": z}, p)["z"] == pytest.approx(float(dist_clip.get_total_norm([z], p)))
    assert reference_norm([z], 2.0) == pytest.approx(math.sqrt(26), rel=1e-12)
    assert reference_norm([coo], 2.0) == pytest.approx(5.0, rel=1e-12)

    def batch(rank: int, world: int) -> torch.Tensor:
        return torch.randn(5, 4, dtype=torch.complex64, generator=torch.Generator().manual_seed(rank))

    assert_clip_matches_unsharded(lambda: nn.Linear(4, 3, dtype=torch.complex64), lambda m: m, batch,
                                  loss_fn=lambda out: out.abs().square().mean(), max_norm=0.1)


class _EmptyAndUnreachedRow(nn.Module):
    """An empty parameter beside a linear layer, and a weight whose row 0 (NaN) the forward never reaches: its
    gradient there is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.empty = nn.Parameter(torch.zeros(0))
        self.w = nn.Parameter(torch.tensor([[math.nan] * 3, [0.5, -1.0, 2.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) @ self.w[1:].T + self.empty.sum()


def _nan_batch4(rank: int, world: int) -> torch.Tensor:
    x = _batch4(rank, world)
    x[0, 0] = math.inf  # NaN in the first layer's gradients
    return x


@pytest.mark.parametrize("p", [0.0, 1.0, 2.0, math.inf])
def test_references_take_nan_empty_and_zero_gradient_units_as_dist_clip_does(p):
    """reference_param_norms counted a NaN as a non-zero at p = 0 (2.0 for [nan, 1, 0], where dist_clip reports
    NaN, as reference_norm gives) and raised on the inf norm of an empty gradient (vector_norm has no identity
    there); reference_agc_ made a zero-gradient row whose weight holds NaN NaN (timm's 0 * NaN, where unit-wise
    clipping leaves it alone) and raised on a row of no elements at inf. So the CI check failed correct setups: a
    model holding an empty parameter at inf (RuntimeError), NaN gradients at p = 0 (a table of mismatches), a
    NaN row the forward does not reach in unitwise mode. reference_agc_ also took a bf16 gradient's norms and
    products in bf16, an ulp off dist_clip's clip in most entries (float64 now, rounded once)."""
    from dist_clip import GradClipper
    from dist_clip.testing import reference_agc_, reference_param_norms

    a, b, e = (nn.Parameter(torch.zeros(n)) for n in (3, 1, 0))
    a.grad, b.grad, e.grad = torch.tensor([math.nan, 1.0, 0.0]), torch.tensor([3.0]), torch.zeros(0)
    got = GradClipper(max_norm=math.inf, mode="per_param", norm_type=p, report=True)({"a": a, "b": b, "e": e}).norms
    want = reference_param_norms({"a": a.grad, "b": b.grad, "e": e.grad}, p)
    assert math.isnan(got["a"]) and math.isnan(want["a"]), (got, want)
    assert got["b"] == want["b"] == (1.0 if p == 0 else 3.0) and got["e"] == want["e"] == 0.0, (got, want)
    if p > 0:
        w = nn.Parameter(torch.tensor([[math.nan, 1.0], [1.0, 1.0], [1.0, 2.0]]))
        z = nn.Parameter(torch.ones(3, 0))
        w.grad, z.grad = torch.tensor([[0.0, 0.0], [5.0, 5.0], [1e-3, 0.0]]), torch.zeros(3, 0)
        ref = {"w": w.grad.clone(), "z": z.grad.clone()}
        reference_agc_({"w": w.detach(), "z": z.detach()}, ref, 0.01, 1e-3, p)
        result = GradClipper(mode="unitwise", norm_type=p)({"w": w, "z": z})
        assert bool(result.finite) and ref["w"][0].eq(0).all() and ref["z"].numel() == 0, (result, ref)
        torch.testing.assert_close(ref["w"], w.grad, rtol=1e-6, atol=0)  # (float32's coefficient: an ulp apart)
        g = torch.Generator().manual_seed(0)
        wb = nn.Parameter(torch.randn(4, 300, generator=g).bfloat16())
        wb.grad = (torch.randn(4, 300, generator=g) * 0.05).bfloat16()
        ref = {"w": wb.grad.clone()}
        reference_agc_({"w": wb.detach()}, ref, 0.01, 1e-3, p)
        GradClipper(mode="unitwise", norm_type=p)({"w": wb})
        # (615-789 of the 1,200 entries differed; a product rounded through float32 may, rarely)
        assert int((ref["w"] != wb.grad).sum()) <= 12, (ref["w"] - wb.grad).abs().max()
    for mode in ("total", "per_param") + (("unitwise",) if p > 0 else ()):
        assert_clip_matches_unsharded(_EmptyAndUnreachedRow, lambda m: m, _batch4, norm_type=p, mode=mode,
                                      max_norm=0.05)
    assert_clip_matches_unsharded(_linear, lambda m: m, _nan_batch4, norm_type=p, max_norm=0.05)


@pytest.mark.parametrize("norm_type", [-1.0, True, "fro", math.nan])
def test_references_refuse_a_bad_norm_type_naming_it(norm_type):
    """The references read norm_type with float(): -1 gave a "norm" (0.5 for two ones), True the L1 norm, "fro"
    Python's "could not convert string to float"; reference_agc_ also took p = 0 and any clipping or eps."""
    from dist_clip.testing import reference_agc_, reference_param_norms

    g = torch.ones(2, 3)
    for call in (lambda: reference_norm([g], norm_type), lambda: reference_param_norms({"g": g}, norm_type),
                 lambda: reference_agc_({"g": g}, {"g": g.clone()}, 0.01, 1e-3, norm_type)):
        with pytest.raises(ValueError, match="norm_type must be"):
            call()
    for clipping, eps, match in ((0.01, 1e-3, "p > 0"), (0.0, 1e-3, "AGC.clipping"), (0.01, -1.0, "AGC.eps")):
        with pytest.raises(ValueError, match=match):
            reference_agc_({"g": g}, {"g": g.clone()}, clipping, eps, 0.0 if match == "p > 0" else 2.0)


def _linear() -> nn.Module:
    return nn.Linear(4, 3)


def _batch4(rank: int, world: int) -> torch.Tensor:
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(rank))


def test_a_wrapper_2e5_off_fails_the_default_fp32_tolerance():
    """rtol=None is 1e-5 for a float32 model: gradients 2e-5 off (the output scaled by 1.00001) fail (a check
    ten times looser passed them)."""

    def wrap(m: nn.Module) -> nn.Module:
        m.register_forward_hook(lambda mod, i, o: o * 1.00001)
        return m

    with pytest.raises(AssertionError, match="total norm"):
        assert_clip_matches_unsharded(_linear, wrap, _batch4, max_norm=0.1)


def test_a_coefficient_5e6_off_fails(monkeypatch):
    """clip_coef must be min(1, max_norm / (norm + 1e-6)) of the returned norm to 1e-6 relative."""
    from dist_clip import clipper

    exact = clipper._scale.clip_coefficient
    monkeypatch.setattr(clipper._scale, "clip_coefficient", lambda *a, **k: exact(*a, **k) * (1 + 5e-6))
    with pytest.raises(AssertionError, match="clip_coef"):
        assert_clip_matches_unsharded(_linear, lambda m: m, _batch4, max_norm=0.1)


@pytest.mark.parametrize("wrong", ["unitwise clip_coef", "clipped", "finite"])
def test_a_wrong_unitwise_clip_coef_clipped_or_finite_fails(monkeypatch, wrong):
    """clip_coef was checked in modes "total" and "per_param" only, clipped and finite in none: a unit-wise clip
    reporting a clip_coef of 1 over clipped rows (each rank's own smallest, say), a result saying clipped=False
    after scaling or finite=True over NaN gradients passed the check in every mode."""
    import dataclasses

    from dist_clip import adaptive, clipper

    if wrong == "unitwise clip_coef":
        measure = adaptive.unitwise_measure

        def ones(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            out = measure(*args, **kwargs)
            return dataclasses.replace(out, min_coef=torch.ones_like(out.min_coef))

        monkeypatch.setattr(clipper, "unitwise_measure", ones)
    else:
        real = clipper.ClipResult
        monkeypatch.setattr(clipper, "ClipResult", lambda *a: real(*a[:2], *(
            (torch.zeros_like(a[2]), a[3]) if wrong == "clipped" else (a[2], torch.ones_like(a[3]))), *a[4:]))
    for mode in ("unitwise",) if wrong == "unitwise clip_coef" else ("total", "per_param", "unitwise"):
        with pytest.raises(AssertionError, match=wrong.split()[-1] + r"( \(the smallest unit coefficient\))?: "):
            assert_clip_matches_unsharded(_linear, lambda m: m, _nan_batch4 if wrong == "finite" else _batch4,
                                          mode=mode, max_norm=0.1)


class _TwoFloat64Weights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.ones(1, dtype=torch.float64))
        self.b = nn.Parameter(torch.ones(1, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * x + self.b * x


def test_a_total_beyond_float64_is_judged_not_raised():
    """Two float64 gradients of 1e154: each norm is finite, their sum of squares is not, and the total dist_clip
    and the float64 model measure is inf. The check's own float64 total of the reported norms raised Python's
    OverflowError ("intermediate overflow in fsum") in mode "total" instead of a verdict."""
    from dist_clip.testing import _combined

    def batch(rank: int, world: int) -> torch.Tensor:
        return torch.full((1,), 1e154, dtype=torch.float64)

    assert_clip_matches_unsharded(_TwoFloat64Weights, lambda m: m, batch, loss_fn=lambda out: out.sum(), max_norm=1.0)
    assert _combined([1e154, 1e154], 2.0) == math.inf and math.isnan(_combined([1.0, math.nan], math.inf))


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.unused = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_an_unused_parameter_reported_other_than_zero_fails():
    """An unused parameter may be reported at 0 (FSDP1 and ZeRO zero-fill it); any other value is a mismatch,
    even one too small to move the total beyond rtol (1e-4 here: passed with the filter taking any value)."""

    def wrap(m: nn.Module) -> nn.Module:
        m.lin.weight.register_post_accumulate_grad_hook(lambda p: setattr(m.unused, "grad", torch.full((2,), 1e-4)))
        return m

    with pytest.raises(AssertionError, match="unused"):
        assert_clip_matches_unsharded(_WithUnused, wrap, _batch4, max_norm=10.0)


def body_two_collectives_fail() -> str:
    import torch.distributed as dist

    from dist_clip import _slots

    exact = _slots.measure

    def measure(*args, **kwargs):  # noqa: ANN202
        for _ in range(2):
            dist.all_reduce(torch.zeros(1))
        return exact(*args, **kwargs)

    _slots.measure = measure
    try:
        assert_clip_matches_unsharded(_linear, lambda m: m, _batch4, max_norm=0.1, world_size=None)
    except AssertionError as e:
        return str(e)
    finally:
        _slots.measure = exact
    return "passed"


def test_a_clip_making_more_than_one_collective_fails(run_ranks):
    """At most one collective a call: a clip making two fails (a limit of two let them through)."""
    (message,) = run_ranks(1, body_two_collectives_fail)
    assert "collectives, expected at most 1" in message, message


def test_a_bf16_wrapper_5_percent_off_fails_the_default_tolerance():
    """rtol=None is 2e-2 for a bf16 model: gradients 5% off fail (ten times looser passed them)."""

    def build() -> nn.Module:
        return nn.Linear(4, 3).to(torch.bfloat16)

    def wrap(m: nn.Module) -> nn.Module:
        m.register_forward_hook(lambda mod, i, o: o * 1.05)
        return m

    def batch(rank: int, world: int) -> torch.Tensor:
        return _batch4(rank, world).to(torch.bfloat16)

    assert_clip_matches_unsharded(build, lambda m: m, batch, max_norm=0.1)  # the same model passes
    with pytest.raises(AssertionError, match="total norm"):
        assert_clip_matches_unsharded(build, wrap, batch, max_norm=0.1)


class _HalfBf16(nn.Module):
    """A float32 layer feeding a bf16 one (a model partly cast to bf16)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)).to(self.b.weight.dtype))


def test_a_model_holding_float32_and_bf16_parameters_takes_the_bf16_tolerance():
    """rtol=None follows the lowest precision a model holds: a float32 layer beside a bf16 one differs from the
    float64 model by bf16 roundings (the float32 tolerance, 1e-5, failed this correct setup)."""
    assert_clip_matches_unsharded(_HalfBf16, lambda m: m, _batch4, max_norm=0.05)
    assert_clip_matches_unsharded(_HalfBf16, lambda m: m, _batch4, max_norm=0.02, mode="per_param")


@pytest.mark.parametrize("p", [0.0, 1.0, 2.0, math.inf])
def test_reference_norm_of_a_nan_gradient_is_nan_for_every_order_as_dist_clip_gives(p):
    """NaN anywhere gives NaN for every order, L0 included (vector_norm counts a NaN as one non-zero: 3.0 here)."""
    import dist_clip

    grads = [torch.tensor([float("nan"), 1.0, 0.0]), torch.tensor([3.0])]
    assert math.isnan(reference_norm(grads, p)), reference_norm(grads, p)
    assert math.isnan(float(dist_clip.get_total_norm([g.clone() for g in grads], p)))
    assert reference_norm([torch.tensor([0.0, 1.0, 0.0]), torch.tensor([3.0])], p) == pytest.approx(
        {0.0: 2.0, 1.0: 4.0, 2.0: math.sqrt(10.0), math.inf: 3.0}[p])


def _wrap_ddp_in_a_group_timing_out_after_180s(model: nn.Module) -> nn.Module:
    """DDP, after checking the spawned ranks' process group waits 0.9 x what is left of timeout_s=200 when they
    start it, spawning and importing done (a fixed 120 s before)."""
    import torch.distributed as dist

    backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    waits = backend.options._timeout.total_seconds()
    if not 0.9 * 140 < waits < 0.9 * 200:
        raise AssertionError(f"the spawned ranks' process group times out after {waits} s, not 0.9 x the rest of 200 s")
    return cases.wrap_ddp(model)


def _wrap_ddp_over_a_new_group_timing_out_with_the_call(model: nn.Module) -> nn.Module:
    """DDP over a group made by ``dist.new_group`` (as DeepSpeed clones the world group, and HSDP's mesh makes
    its replicate and shard groups), after checking that group waits no longer than the default one: a new
    group took torch's 30-minute default, whatever the spawned ranks' group was set to."""
    import torch.distributed as dist

    group = dist.new_group(list(range(dist.get_world_size())))
    waits = group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    if not 0 < waits < 0.9 * 200:
        raise AssertionError(f"a new group of the spawned ranks times out after {waits} s, not within timeout_s=200")
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, process_group=group)


def _wrap_rank_1_hanging_before_a_new_group_collective(model: nn.Module) -> nn.Module:
    import time

    import torch.distributed as dist

    group = dist.new_group(list(range(dist.get_world_size())))
    if dist.get_rank() == 1:
        time.sleep(90)  # killed by the call at its deadline
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, process_group=group)


def _wrap_ddp_rank_1_hanging(model: nn.Module) -> nn.Module:
    import time

    import torch.distributed as dist

    if dist.get_rank() == 1:
        time.sleep(90)  # killed by the call at its deadline
    return cases.wrap_ddp(model)


class _LinearArrivingLate:
    """``_linear`` as a build_model whose unpickling in a spawned rank, before the rank starts its group, takes 10 s
    (a slow start: spawning and importing torch on a busy machine)."""

    def __call__(self) -> nn.Module:
        return _linear()

    def __setstate__(self, state: dict) -> None:
        import time

        time.sleep(10)


@pytest.mark.slow
def test_a_hang_under_a_short_timeout_s_reports_where_the_waiting_rank_waited():
    """README (assert_clip_matches_unsharded): "a collective that hangs fails on the ranks, with their tracebacks,
    before the call stops waiting for them". The group's timeout was 0.9 x timeout_s counted from each rank's own
    start, seconds after the call's (spawning, importing torch): under timeout_s=30 (and 60) rank 0, waiting in
    DDP's first collective for a rank 1 stuck in wrap_fn, failed after the call gave up, which then said only
    "ranks [0, 1] did not report within 30s". Now 0.9 of what is left when the group starts (5 s less at least);
    the ranks start 10 s late here, so the old timeout (40.5 s from then) could not fail within timeout_s=45."""
    with pytest.raises(AssertionError) as failed:
        assert_clip_matches_unsharded(_LinearArrivingLate(), _wrap_ddp_rank_1_hanging, _batch4, world_size=2,
                                      timeout_s=45)
    text = str(failed.value)
    assert "ranks [1] did not report within 45s" in text, text[:500]
    assert "--- rank 0 ---" in text and "DistributedDataParallel" in text, text[:2000]


def test_a_group_made_by_wrap_fn_times_out_with_the_call_too():
    """README (assert_clip_matches_unsharded): "a collective that hangs fails on the ranks, with their tracebacks,
    before the call stops waiting for them". Only the default group was given the call's timeout: a group
    made by ``dist.new_group`` (DeepSpeed's clone of the world group, HSDP's replicate and shard groups) took
    torch's 30 minutes, so a hang in it was reported as "ranks [...] did not report" only (read here, not
    waited for; test_a_hang_in_a_new_group_reports_where_the_waiting_rank_waited waits)."""
    norms = assert_clip_matches_unsharded(_linear, _wrap_ddp_over_a_new_group_timing_out_with_the_call, _batch4,
                                          world_size=2, max_norm=0.1, timeout_s=200)
    assert set(norms) == {"weight", "bias"}


@pytest.mark.slow
def test_a_hang_in_a_new_group_reports_where_the_waiting_rank_waited():
    with pytest.raises(AssertionError) as failed:
        assert_clip_matches_unsharded(_linear, _wrap_rank_1_hanging_before_a_new_group_collective, _batch4,
                                      world_size=2, timeout_s=45)
    text = str(failed.value)
    assert "ranks [1] did not report within 45s" in text, text[:500]
    assert "--- rank 0 ---" in text and "DistributedDataParallel" in text, text[:2000]


def test_a_timeout_s_beyond_the_groups_range_still_runs():
    """timeout_s=1e10 (finite, so accepted): the spawned group's timeout overflowed gloo's nanoseconds, one rank's
    init_process_group raised "Invalid timeout" and the call waited for the other the whole 1e10 s (a hang). The
    groups' timeout is capped at 1e8 s now."""
    norms = assert_clip_matches_unsharded(_linear, cases.wrap_ddp, _batch4, world_size=2, max_norm=0.1,
                                          timeout_s=1e10)
    assert set(norms) == {"weight", "bias"}


def test_spawned_ranks_wait_in_collectives_as_long_as_timeout_s_allows():
    """A wrap_fn slower on one rank than 120 s (a DeepSpeed op build) failed the others' first collective under
    any timeout_s: the spawned process group's timeout is 0.9 x timeout_s now (read here, not waited for)."""
    norms = assert_clip_matches_unsharded(_linear, _wrap_ddp_in_a_group_timing_out_after_180s, _batch4,
                                          world_size=2, max_norm=0.1, timeout_s=200)
    assert set(norms) == {"weight", "bias"}
