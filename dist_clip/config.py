"""The main job's configuration: frozen dataclasses, loaded from YAML and validated field by field.

A config file names every knob of a demo run (wrapper and topology, model size, optimisation, clipping,
precision, backend, seed). Loading is strict: an unknown key, a value of the wrong type or out of range raises
:class:`ConfigError` naming the file and the dotted field, which the command line prints as one line. This
module needs PyYAML only when a file is read, and never torch, so a bad config fails fast, before any rank
starts up.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys
import types
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

from . import _norm

__all__ = [
    "BACKENDS",
    "CLIP_MODES",
    "PRECISIONS",
    "NORM_TOLERANCE_FACTOR",
    "WRAPPERS",
    "ClipConfig",
    "ConfigError",
    "MAX_DATA_BYTES",
    "ModelConfig",
    "STDLIB_BYTES",
    "check_data_size",
    "check_world_size",
    "data_files",
    "data_root",
    "read_files",
    "TrainConfig",
    "default_tolerance",
    "from_dict",
    "load_config",
    "read_config_data",
    "stdlib_files",
    "training_text_limit",
    "with_overrides",
]

#: Wrappers the training loop knows. ``none`` is one plain process; ``hsdp`` is FSDP2 on a 2-D mesh.
WRAPPERS: tuple[str, ...] = ("none", "ddp", "fsdp1", "fsdp2", "hsdp", "zero1", "zero2", "zero3", "fairscale-oss")
#: ``auto`` picks nccl when CUDA gives each rank of the node a GPU of its own and gloo otherwise.
BACKENDS: tuple[str, ...] = ("auto", "gloo", "nccl")
#: ``bf16`` runs forward and backward under bfloat16 autocast; parameters, gradients and optimizer stay fp32.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
#: ``dist_clip`` clips with this library; ``native`` with the wrapper's own clipping (for comparison);
#: ``off`` only measures the norm.
CLIP_MODES: tuple[str, ...] = ("dist_clip", "native", "off")

#: Relative tolerance of the loss comparison with the unsharded replay, by precision. In fp32 the run differs
#: from the replay only by the order of floating-point sums (per-rank batches and an all-reduce vs one batch):
#: at most about 3e-6 relative over 60 steps of the default model, so 1e-4 leaves a wide margin. bf16 autocast
#: rounds every matmul output to 8 bits of mantissa, and a different batch split changes which elements round
#: which way: up to about 4e-3 over 60 steps, hence 2e-2.
_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}
#: The gradient norm before clipping is a noisier quantity than the loss (a step on either side of max_norm
#: changes the update): in fp32 it is compared at ten times the loss tolerance (seen: up to 8e-5 relative).
#: In bf16 it moves by up to about 50% per step (README; 14.9% in one fsdp2-bf16 run here) and is reported, not
#: compared with the replay; every rank's norms are still compared with each other.
NORM_TOLERANCE_FACTOR = {"fp32": 10.0, "bf16": None}


#: The largest count or size a config may give (seed aside, which takes any signed 64-bit value >= 0).
_MAX_INT = 2**31 - 1


class ConfigError(ValueError):
    """A config file or value is wrong. ``str()`` is the one line the command line prints."""

    def __init__(self, source: str, field_name: str, why: str) -> None:
        self.source = source
        self.field = field_name
        self.why = why
        super().__init__(f"{source}: {field_name}: {why}" if field_name else f"{source}: {why}")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer over bytes (vocabulary 256)."""

    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 64
    mlp_ratio: int = 4


@dataclass(frozen=True)
class ClipConfig:
    max_norm: float = 1.0
    norm_type: Union[float, str] = 2.0  # noqa: UP007 - evaluated by get_type_hints on Python 3.10
    mode: str = "dist_clip"


@dataclass(frozen=True)
class TrainConfig:
    """One demo run. The defaults are ``configs/fsdp2.yaml``, the config of ``make demo``.

    Attributes:
        name: label of the run (defaults to the config file's stem); the log goes to ``out_dir/name``.
        wrapper: one of :data:`WRAPPERS`.
        mesh: ``[replicas, shard size]`` for ``hsdp``; ``None`` shards within a node, replicates across.
        backend: one of :data:`BACKENDS`.
        precision: one of :data:`PRECISIONS`.
        seed: seeds the initial weights and the choice of batches (identical on every rank).
        steps: optimizer steps.
        lr: AdamW learning rate (constant).
        weight_decay: AdamW weight decay.
        batch_size: sequences per rank per step; the global batch is ``batch_size * world size``.
        data: ``stdlib`` (the Python standard library's own source, read at run time) or a file or folder.
        out_dir: where the run's folder (JSON-lines log, plot) is written.
        tolerance: relative tolerance on the loss in the replay check; ``None`` = by precision (fp32 1e-4,
            bf16 2e-2). In fp32 the norms before clipping are compared at ten times this tolerance.
    """

    name: str = "fsdp2"
    wrapper: str = "fsdp2"
    mesh: Union[list[int], None] = None  # noqa: UP007
    backend: str = "auto"
    precision: str = "fp32"
    seed: int = 0
    steps: int = 50
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 8
    data: str = "stdlib"
    out_dir: str = "runs"
    tolerance: Union[float, None] = None  # noqa: UP007
    model: ModelConfig = field(default_factory=ModelConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)

    @property
    def norm_p(self) -> float:
        """The norm order as a float (``inf`` for ``"inf"``)."""
        return float(self.clip.norm_type)

    @property
    def rtol(self) -> float:
        """Relative tolerance on the loss of every step."""
        return self.tolerance if self.tolerance is not None else default_tolerance(self.precision)

    @property
    def norm_rtol(self) -> float | None:
        """Relative tolerance on the norm before clipping of every step; None where it is not compared."""
        factor = NORM_TOLERANCE_FACTOR[self.precision]
        return None if factor is None else factor * self.rtol

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_tolerance(precision: str) -> float:
    return _TOLERANCE[precision]


# --- loading and validation -------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):  # "clip: expected ClipConfig" named a class the user never sees
        return f"a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, tp.__name__)


def _describe(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max:
        # (its repr is hundreds of digits, and Python refuses to write one of over 4300: a ValueError of its own)
        return f"an integer of {_norm.int_digits(value)} digits"
    return f"{type(value).__name__} {value!r}" if not isinstance(value, dict) else "a mapping"


def _coerce(value: Any, tp: Any, source: str, name: str) -> Any:
    """``value`` checked against the annotation ``tp``; raises ConfigError naming ``name``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _coerce(value, option, source, name)
            except ConfigError:
                continue
        raise ConfigError(source, name, f"expected {_type_name(tp)}, got {_describe(value)}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(v, get_args(tp)[0], source, f"{name}[{i}]") for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, source, f"{name}.")
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # No strings: float() took YAML 1.1's 1_000 and 1_0e-3 (and "nan"); the loader reads 3e-4 as a number.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, int) and abs(value) > sys.float_info.max:
                # (float() raised OverflowError: a traceback and exit 1 instead of the one line and exit 2)
                raise ConfigError(source, name, f"expected a number within float64's range, got {_describe(value)}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(source, name, f"expected {_type_name(tp)}, got {_describe(value)}")


def _build(cls: type, data: dict[str, Any], source: str, prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(source, f"{prefix}{key}", f"unknown key (known: {', '.join(known)})")
        kwargs[key] = _coerce(value, hints[key], source, f"{prefix}{key}")
    return cls(**kwargs)


def _one_of(value: str, options: tuple[str, ...], source: str, name: str) -> None:
    if value not in options:
        raise ConfigError(source, name, f"expected one of {', '.join(options)}, got {value!r}")


def _validate(cfg: TrainConfig, source: str) -> TrainConfig:
    _one_of(cfg.wrapper, WRAPPERS, source, "wrapper")
    _one_of(cfg.backend, BACKENDS, source, "backend")
    _one_of(cfg.precision, PRECISIONS, source, "precision")
    _one_of(cfg.clip.mode, CLIP_MODES, source, "clip.mode")

    def positive(name: str, value: float, strict: bool = True) -> None:
        if math.isnan(value) or (value <= 0 if strict else value < 0):
            raise ConfigError(source, name, f"must be {'> 0' if strict else '>= 0'}, got {value}")
        if math.isinf(value):
            raise ConfigError(source, name, f"must be finite, got {value}")

    for int_name in ("steps", "batch_size", "model.d_model", "model.n_layers", "model.n_heads", "model.seq_len",
                     "model.mlp_ratio"):
        value = cfg
        for part in int_name.split("."):
            value = getattr(value, part)
        if value > _MAX_INT:  # steps: 99999999999999999999999 ran "forever" (and bigger sizes failed in torch)
            raise ConfigError(source, int_name, f"must be at most {_MAX_INT} (2**31 - 1), got {value}")
    if cfg.mesh is not None and max(cfg.mesh, default=0) > _MAX_INT:
        raise ConfigError(source, "mesh", f"entries must be at most {_MAX_INT} (2**31 - 1), got {cfg.mesh}")
    positive("steps", cfg.steps)
    positive("batch_size", cfg.batch_size)
    positive("lr", cfg.lr)
    positive("weight_decay", cfg.weight_decay, strict=False)
    if cfg.clip.max_norm == math.inf:  # checked first: its message says what to use instead
        raise ConfigError(source, "clip.max_norm", "must be finite (use clip.mode: off to measure without clipping)")
    positive("clip.max_norm", cfg.clip.max_norm, strict=False)
    if cfg.tolerance is not None:
        positive("tolerance", cfg.tolerance)
    if not 0 <= cfg.seed < 2**63:  # torch.manual_seed takes a signed 64-bit value
        raise ConfigError(source, "seed", f"must be in [0, 2**63), got {cfg.seed}")
    p = cfg.clip.norm_type
    if isinstance(p, str):
        if p.lower() not in ("inf", "+inf", "infinity", "+infinity"):  # float() took "1_0" and "nan"
            raise ConfigError(source, "clip.norm_type", f"expected a number >= 0 or inf, got {p!r}")
        p = math.inf
    if math.isnan(p) or p < 0 or (math.isinf(p) and p < 0):
        raise ConfigError(source, "clip.norm_type", f"expected a number >= 0 or inf, got {cfg.clip.norm_type!r}")
    if cfg.clip.mode == "native" and cfg.wrapper.startswith("zero"):
        if p != 2.0:
            raise ConfigError(source, "clip.norm_type", "DeepSpeed's own clipping (clip.mode: native) only does 2")
        if cfg.clip.max_norm == 0:
            raise ConfigError(source, "clip.max_norm", "DeepSpeed's own clipping (clip.mode: native) reads "
                              "gradient_clipping: 0 as no clipping; use a max_norm > 0")
    if cfg.clip.mode == "native" and p == 0 and cfg.wrapper in ("fsdp1", "fairscale-oss"):
        # FSDP1's clip_grad_norm_ and OSS.clip_grad_norm take the sharded total to the power 1 / norm_type.
        raise ConfigError(source, "clip.norm_type", f"the {cfg.wrapper} wrapper's own clipping (clip.mode: native) "
                          "divides by norm_type and cannot do 0; use clip.mode: dist_clip")
    if cfg.clip.mode == "native" and p == 0:
        # torch.nn.utils.clip_grad_norm_(norm_type=0) counts the tensors with a non-zero entry: the check, against
        # the L0 norm (entries), could only fail.
        raise ConfigError(source, "clip.norm_type", "torch's own clipping (clip.mode: native) at norm_type 0 counts "
                          "tensors with a non-zero entry, not entries, so it cannot match the L0 norm the check "
                          "replays; use clip.mode: dist_clip")
    m = cfg.model
    for name in ("d_model", "n_layers", "n_heads", "mlp_ratio"):
        positive(f"model.{name}", getattr(m, name))
    if m.seq_len < 2:
        raise ConfigError(source, "model.seq_len", f"must be >= 2, got {m.seq_len}")
    if m.d_model % m.n_heads:
        raise ConfigError(source, "model.n_heads", f"must divide model.d_model ({m.d_model}), got {m.n_heads}")
    if cfg.mesh is not None:
        if cfg.wrapper != "hsdp":
            raise ConfigError(source, "mesh", f"only used by wrapper hsdp, not {cfg.wrapper}; remove it")
        if len(cfg.mesh) != 2 or min(cfg.mesh) < 1:
            raise ConfigError(source, "mesh", f"expected [replicas, shard size] of positive integers, got {cfg.mesh}")
    if not cfg.data.strip() or "\0" in cfg.data:  # Path("") is the current folder: never what was meant
        raise ConfigError(source, "data", f"expected 'stdlib' or the path of a file or folder, got {cfg.data!r}")
    if not cfg.out_dir.strip() or "\0" in cfg.out_dir:
        raise ConfigError(source, "out_dir", f"expected the path of a folder, got {cfg.out_dir!r}")
    name = cfg.name
    if (not name or name in (".", "..") or name != name.strip() or any(c in name for c in "/\\")
            or any(unicodedata.category(c) in _NOT_IN_NAMES for c in name)):
        # " " or a newline or backslash made an odd run folder (or, with a separator, one somewhere else); the
        # test was for ASCII controls only, and took U+0085 (a line break), U+202E (right-to-left override) and
        # a lone surrogate (UnicodeEncodeError when the folder was made).
        raise ConfigError(source, "name", f"must be a plain non-empty file name (no / or \\, control or format "
                          f"characters, line breaks, or leading or trailing spaces), got {name!r}")
    # ~ as data: reads it (out_dir: ~/runs made a folder named "~" in the current one).
    return dataclasses.replace(cfg, out_dir=os.path.expanduser(cfg.out_dir),
                               clip=dataclasses.replace(cfg.clip, norm_type=float(p)))


#: Unicode categories refused in a run name: controls, format characters, surrogates, private use, unassigned,
#: and the line and paragraph separators.
_NOT_IN_NAMES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def from_dict(data: Any, source: str = "<config>", name: str | None = None) -> TrainConfig:
    """A validated config from a parsed mapping; ``name`` is the default of the ``name`` field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, "", f"expected a mapping of keys to values at the top level, got {_describe(data)}")
    if name is not None and "name" not in data:
        data = {**data, "name": name}
    return _validate(_build(TrainConfig, data, source), source)


def _yaml_loader(yaml: Any) -> type:
    """PyYAML's SafeLoader with YAML 1.2 booleans and integers: only true/false are booleans, so ``clip: {mode:
    off}`` reads as the string "off" (YAML 1.1 also reads on/off/yes/no/y/n as booleans); integers are decimal
    (``010`` is 10, not YAML 1.1's octal 8), ``0o17`` or ``0x1f``, and floats are YAML 1.2's (``3e-4`` without a dot
    is a number; YAML 1.1's ``1_000``, ``0b11``, ``1:30``, ``1_000.5`` and ``1:30.5`` are strings, refused where a
    number is expected). Merge keys (``<<: *defaults``) work as in PyYAML."""
    import re

    merge_tag = "tag:yaml.org,2002:merge"

    class Loader(yaml.SafeLoader):  # type: ignore[misc,name-defined]
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:  # noqa: ANN401
            # A key given twice (``steps: 3`` ... ``steps: 4``): PyYAML keeps the last one silently. Keys brought
            # in by a merge key may be overridden: that is what merge keys are for.
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == merge_tag:
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, str) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} given twice in one mapping", key_node.start_mark
                    )
                if isinstance(key, str):  # (a list or mapping key is unhashable: PyYAML's own error says so)
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    bool_tag = "tag:yaml.org,2002:bool"
    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != bool_tag]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))

    int_tag, float_tag = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (int_tag, float_tag)]
        for first, resolvers in Loader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(int_tag, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                 list("-+0123456789"))
    # YAML 1.2's floats, after the integers: 3e-4 (no dot) is a number; 1_000.5 and 1:30.5 are strings.
    Loader.add_implicit_resolver(
        float_tag,
        re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                   r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+.0123456789"),
    )

    def construct_int(loader: Any, node: Any) -> int:  # noqa: ANN401
        text = loader.construct_scalar(node)
        try:
            if text[:2] in ("0o", "0x"):
                return int(text[2:], 8 if text[1] == "o" else 16)
            return int(text, 10)
        except ValueError:  # an explicit !!int on something else
            raise yaml.constructor.ConstructorError(
                None, None, f"not an integer: {text!r}", node.start_mark
            ) from None

    Loader.add_constructor(int_tag, construct_int)
    return Loader


#: Bytes of the standard library's source used as the default corpus (a deterministic prefix).
STDLIB_BYTES = 2 << 20
#: Most bytes read from a user's ``--data`` folder.
MAX_DATA_BYTES = 256 << 20


def stdlib_files() -> tuple[pathlib.Path, list[pathlib.Path]]:
    """The folder of the standard library and its ``*.py`` files, sorted: the ``stdlib`` corpus."""
    import sysconfig

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return root, sorted(p for p in root.glob("*.py") if p.is_file())


def training_text_limit(data: str) -> int:
    """The most bytes of its files a run reads from ``data`` (``stdlib``, or a file or folder)."""
    return STDLIB_BYTES if data == "stdlib" else MAX_DATA_BYTES


def data_root(data: str, source: str) -> pathlib.Path:
    """The file or folder ``data`` names (not "stdlib"), else ConfigError: read by the training loop, and checked
    by ``--validate-only`` before any rank starts."""
    root = pathlib.Path(data).expanduser()
    try:
        if root.is_file() or root.is_dir():
            return root
        exists = root.exists()
    except OSError as e:  # a name over the file system's limit, a folder on the way that cannot be searched
        raise ConfigError(source, "data", f"cannot be looked up: {data} ({e.strerror or e})") from None
    if exists:
        raise ConfigError(source, "data", f"is neither a regular file nor a folder: {data}")
    raise ConfigError(source, "data", f"no such file or folder: {data}")


def data_files(data: str, source: str) -> tuple[pathlib.Path, list[pathlib.Path]]:
    """The file or folder ``data`` names (not "stdlib") and the files training reads from it: the file itself, or
    the folder's files sorted (hidden files and folders inside it skipped; a dotted folder above it, ~/.cache, is
    not)."""
    root = data_root(data, source)
    if root.is_file():
        return root, [root]
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts))
    return root, files


def read_files(files: list[pathlib.Path], limit: int) -> bytes:
    """The training text of ``files``: at most ``limit`` of their bytes, joined by newlines; unreadable files are
    skipped. Read by the training loop and, up to the bytes a run needs, by ``--validate-only``."""
    chunks: list[bytes] = []
    total = 0
    for path in files:
        try:
            with open(path, "rb") as f:
                chunks.append(f.read(limit - total))
        except OSError:
            continue
        total += len(chunks[-1])
        if total >= limit:
            break
    return b"\n".join(chunks)


def check_data_size(size: int, data: str, source: str, seq_len: int | None = None) -> None:
    """ConfigError unless the ``size`` bytes read from ``data`` can train: none at all, or (given the model's
    ``seq_len``) fewer than one window of ``seq_len + 2``. One check for every rank's training loop and for
    ``--validate-only`` (which let an empty or too small ``--data`` file through to fail every started rank)."""
    if size == 0:
        raise ConfigError(source, "data", f"{data} holds no readable bytes")
    if seq_len is not None and size < seq_len + 2:
        raise ConfigError(source, "data", f"{data} holds {size} bytes, fewer than model.seq_len + 2 = {seq_len + 2}")


def check_world_size(cfg: TrainConfig, source: str, world_size: int) -> None:
    """ConfigError unless ``cfg`` can train on ``world_size`` ranks: ``wrapper: none`` on one, an ``hsdp`` mesh on
    as many as it holds. Checked by every rank once the world is known, and by ``--validate-only`` when the launch
    script can tell the world size (``launch/torchrun.sh`` on one node: torchrun reported the ranks' exit status 2
    as its own 1, with its traceback)."""
    if cfg.wrapper == "none" and world_size > 1:
        raise ConfigError(source, "wrapper", f"none trains one process, but {world_size} were launched")
    if cfg.wrapper == "hsdp" and cfg.mesh and cfg.mesh[0] * cfg.mesh[1] != world_size:
        raise ConfigError(source, "mesh", f"{list(cfg.mesh)} needs {cfg.mesh[0] * cfg.mesh[1]} ranks, launched with "
                          f"{world_size}")


def load_config(path: str | os.PathLike[str]) -> TrainConfig:
    """Read, parse and validate a YAML config file; every failure is a one-line :class:`ConfigError`."""
    data, stem = read_config_data(path)
    return from_dict(data, os.fspath(path), name=stem)


def read_config_data(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """A YAML config file read and parsed, not validated, and its stem (the default ``name``); every failure is a
    one-line :class:`ConfigError`."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(source, "", "no such file") from None
    except OSError as e:
        raise ConfigError(source, "", f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(source, "", f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        import yaml
    except ImportError:
        raise ConfigError(source, "", "reading YAML needs PyYAML: pip install 'dist_clip[train]'") from None
    try:
        data = yaml.load(text, Loader=_yaml_loader(yaml))  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(source, "", f"invalid YAML: {where}{problem}") from None
    except RecursionError:  # PyYAML composes recursively: `steps: [[[...]]]` 1000 deep was a traceback, exit 1
        raise ConfigError(source, "", "invalid YAML: nested too deeply") from None
    return data, os.path.splitext(os.path.basename(source))[0]


def with_overrides(cfg: TrainConfig, source: str, **values: Any) -> TrainConfig:
    """``cfg`` with top-level fields replaced (command-line overrides), validated again."""
    data = cfg.to_dict()
    data.update({k: v for k, v in values.items() if v is not None})
    return from_dict(data, source)
