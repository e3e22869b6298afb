"""The main job: configs, the ``dist-clip`` command, and every wrapper's training run against its unsharded replay.

What it checks: the shipped configs load and the default one is ``configs/fsdp2.yaml``; bad configs (unknown
key, wrong type, negative max_norm, bad YAML, missing file) exit 2 with one ``config error:`` line and no
traceback; a one-process run writes its JSON-lines log and PNG plot and agrees with its replay; ``check``
exits 1 when the curves disagree; and each wrapper (DDP, FSDP1, FSDP2 in fp32/bf16/inf-norm, DeepSpeed ZeRO
1-3, fairscale OSS) trains on 2 spawned gloo ranks and agrees with the single-process replay of the same
global batches. DeepSpeed and fairscale cases skip, saying why, until their adapters import.

Run with ``.venv/bin/python -m pytest tests/test_main_job.py`` (launchers: ``tests/test_launchers.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_clip import cli
from dist_clip.config import WRAPPERS, ConfigError, TrainConfig, from_dict, load_config
from dist_clip.train import load_text

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
#: Small enough for a second or two per run on one core, big enough to have several FSDP units.
TINY = {"steps": 6, "batch_size": 4, "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 16}}


@pytest.fixture(autouse=True)
def _in_a_folder_of_its_own(tmp_path, monkeypatch):
    """Every test runs in its own folder: a run's ``out_dir`` (``runs`` by default) is relative to it, and a run
    refused for a value removes the previous outputs of its run folder. ``cli.main(["train", "--steps", "0"])``
    (the built-in config) from the repository removed ``runs/fsdp2/log.jsonl`` and ``plot.png``: the demo's, when
    ``make test`` followed ``make demo``."""
    monkeypatch.chdir(tmp_path)


def write_config(folder: Path, name: str, **fields) -> Path:
    data = {**TINY, **fields}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --- configs ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_shipped_configs_load_and_cover_every_wrapper():
    configs = {p.stem: load_config(p) for p in sorted(CONFIGS.glob("*.yaml"))}
    assert {c.wrapper for c in configs.values()} == set(WRAPPERS)
    for name, cfg in configs.items():
        assert cfg.name == name
        if cfg.wrapper == "hsdp":
            assert cfg.mesh == [2, 2]
    # The built-in default config is the demo's configs/fsdp2.yaml, key for key.
    assert dataclasses.replace(configs["fsdp2"], name="x") == dataclasses.replace(TrainConfig(), name="x")
    assert configs["fsdp2-bf16"].rtol == 2e-2 and configs["fsdp2-bf16"].norm_rtol is None
    assert configs["fsdp2"].rtol == 1e-4 and configs["fsdp2"].norm_rtol == pytest.approx(1e-3)


@pytest.mark.timeout(60)
def test_yaml_numbers_without_a_dot_and_inf_norms_are_read_as_numbers(tmp_path):
    path = tmp_path / "nums.yaml"
    path.write_text("lr: 3e-4\nweight_decay: 1E-2\nclip: {norm_type: .inf, max_norm: 0}\n")
    cfg = load_config(path)
    assert cfg.lr == 3e-4 and cfg.weight_decay == 1e-2 and math.isinf(cfg.norm_p) and cfg.clip.max_norm == 0.0
    for text in ("inf", "+inf", "Infinity", "+INFINITY"):  # the spellings float() reads, less "nan" and "1_0"
        assert from_dict({"clip": {"norm_type": text}}).norm_p == math.inf
    path.write_text("clip: {norm_type: inf}\n")
    assert load_config(path).norm_p == math.inf


BAD_CONFIGS = [
    ("wrapper: ddp\nfoo: 1\n", "foo", "unknown key"),
    ("steps: ten\n", "steps", "expected an integer"),
    ("steps: 2.5\n", "steps", "expected an integer"),
    ("clip:\n  max_norm: -1\n", "clip.max_norm", "must be >= 0"),
    ("clip: {norm_type: -2}\n", "clip.norm_type", ">= 0 or inf"),
    ("model: {d_model: 30, n_heads: 4}\n", "model.n_heads", "must divide"),
    ("model: {depth: 3}\n", "model.depth", "unknown key"),
    # (these said "expected ClipConfig" / "expected ModelConfig", a class the user never meets)
    ("clip: 1.0\n", "clip", "expected a mapping of max_norm, norm_type, mode, got float 1.0"),
    ("model:\n", "model", "expected a mapping of d_model, n_layers, n_heads, seq_len, mlp_ratio, got NoneType None"),
    ("wrapper: fsdp3\n", "wrapper", "expected one of"),
    ("precision: fp8\n", "precision", "expected one of"),
    ("batch_size: true\n", "batch_size", "expected an integer"),
    ("wrapper: ddp\nmesh: [2, 2]\n", "mesh", "only used by wrapper hsdp"),
    ("lr: .inf\n", "lr", "must be finite"),
    ("weight_decay: .inf\n", "weight_decay", "must be finite"),
    ("tolerance: .inf\n", "tolerance", "must be finite"),
    ("seed: 100000000000000000000000\n", "seed", "must be in [0, 2**63)"),
    ("seed: -3\n", "seed", "must be in [0, 2**63)"),
    ("wrapper: zero1\nclip: {mode: native, max_norm: 0}\n", "clip.max_norm", "reads gradient_clipping: 0"),
    ("wrapper: zero3\nclip: {mode: native, norm_type: inf}\n", "clip.norm_type", "only does 2"),
    ("batch_size: yes\n", "batch_size", "expected an integer"),
    ("wrapper: fairscale-oss\nclip: {mode: native, norm_type: 0}\n", "clip.norm_type", "cannot do 0"),
    ("wrapper: fsdp1\nclip: {mode: native, norm_type: 0.0}\n", "clip.norm_type", "cannot do 0"),
    ("wrapper: ddp\nclip: {mode: native, norm_type: 0}\n", "clip.norm_type", "counts tensors with a non-zero"),
    ("wrapper: fsdp2\nclip: {mode: native, norm_type: 0}\n", "clip.norm_type", "counts tensors with a non-zero"),
    ('name: "x\\0y"\n', "name", "plain non-empty file name"),
    ('data: ""\n', "data", "expected 'stdlib' or the path"),
    # The boundaries (a mutation run passed each bound moved by one: lr 0, seq_len 1, a 3-entry mesh, seed 2**63)
    ("lr: 0\n", "lr", "must be > 0, got 0.0"),
    ("model: {seq_len: 1}\n", "model.seq_len", "must be >= 2, got 1"),
    ("wrapper: hsdp\nmesh: [2, 2, 1]\n", "mesh", "expected [replicas, shard size] of positive integers"),
    ("seed: 9223372036854775808\n", "seed", "must be in [0, 2**63)"),
    ("wrapper: hsdp\nmesh: [2, 0]\n", "mesh", "expected [replicas, shard size] of positive integers"),
    ("tolerance: 0\n", "tolerance", "must be > 0, got 0.0"),
    ("lr: true\n", "lr", "expected a number, got bool True"),
    # An integer beyond float64 (YAML reads 1e400 as .inf, but 1 and 400 zeros as an int): float()'s OverflowError
    # was a traceback and exit 1
    ("lr: 1" + "0" * 400 + "\n", "lr", "expected a number within float64's range, got an integer of 401 digits"),
    ("clip: {norm_type: 1" + "0" * 400 + "}\n", "clip.norm_type", "got an integer of 401 digits"),
]


def test_yaml_off_on_yes_no_are_strings(tmp_path):
    """YAML 1.1 reads unquoted off/on/yes/no as booleans; the config reads YAML 1.2's: only true/false."""
    path = tmp_path / "off.yaml"
    path.write_text("clip: {mode: off}\nname: off\n")
    cfg = load_config(path)
    assert cfg.clip.mode == "off" and cfg.name == "off"
    path.write_text("wrapper: ddp\n")
    assert load_config(path).wrapper == "ddp"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text,field,why", BAD_CONFIGS, ids=[b[1] + ":" + b[2] for b in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_the_field(tmp_path, capsys, text, field, why):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"config error: {path}: {field}: ") and why in err, err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text,why", [("steps: [\n", "invalid YAML: line 2"), ("- a\n", "expected a mapping"),
                                      ("steps: 3\nclip: {max_norm: 1, max_norm: 2}\n",  # the last one won silently
                                       "invalid YAML: line 2, column 21: key 'max_norm' given twice"),
                                      # (a traceback, exit 1: the duplicate check hashed every key)
                                      ("? [steps, 3]\n: 1\n", "found unhashable key"),
                                      # (named no file: the decode error reached the generic handler)
                                      ("steps: 3\n".encode("utf-16"), "not UTF-8 text"),
                                      # (PyYAML's RecursionError: a traceback from every rank, exit 1)
                                      ("steps: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply")])
def test_unparsable_config_is_one_line(tmp_path, capsys, text, why):
    path = tmp_path / "bad.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    assert cli.main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"config error: {path}: ") and why in err, err


@pytest.mark.timeout(60)
def test_bad_override_is_a_config_error(capsys):
    assert cli.main(["train", "--steps", "0"]) == 2
    assert "steps: must be > 0, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("rank,printed", [("0", True), ("1", False)])
def test_usage_errors_are_printed_by_rank_0_only(monkeypatch, capsys, rank, printed):
    """Under a launcher every rank parses the same bad arguments: one usage message, not one per rank."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--stepz", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert ("unrecognized arguments: --stepz" in err and "usage: dist-clip" in err) if printed else err == ""


@pytest.mark.timeout(120)
def test_missing_and_bad_config_from_the_command_line_exit_2_without_traceback(tmp_path):
    """The real entry points, in a fresh interpreter: exit status 2, one line on stderr, nothing on stdout."""
    bad = tmp_path / "neg.yaml"
    bad.write_text("clip: {max_norm: -0.5}\n")
    script = Path(sys.executable).parent / "dist-clip"  # the console script, where the package is installed
    commands = [[sys.executable, "-m", "dist_clip", "train"], [str(script), "check"] if script.exists() else None]
    cases = [(commands[0], tmp_path / "missing.yaml", "no such file"),
             (commands[1] or commands[0], bad, "clip.max_norm: must be >= 0")]
    for command, path, expected in cases:
        proc = subprocess.run([*command, "--config", str(path)], capture_output=True, text=True, timeout=100,
                              cwd=ROOT)
        assert proc.returncode == 2, proc
        assert proc.stderr.startswith(f"config error: {path}: {expected}"), proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and proc.stdout == ""


# --- one process ------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread(monkeypatch):
    """One intra-op thread in this process (the machine's cores are shared with other test processes)."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what train() reads
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_log(path: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["kind"], []).append(rec)
    return out


@pytest.mark.timeout(120)
def test_single_process_run_writes_log_and_plot_and_agrees(tmp_path, capsys, one_thread):
    cfg = write_config(tmp_path, "solo", wrapper="none")
    assert cli.main(["train", "--config", str(cfg), "--out", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "none on 1 rank(s)" in out and out.rstrip().splitlines()[-1].startswith("check: PASS  max |loss - replay|")
    log = read_log(tmp_path / "runs" / "solo" / "log.jsonl")
    assert len(log["run"]) == 1 and log["run"][0]["config"]["wrapper"] == "none"
    assert [r["step"] for r in log["step"]] == list(range(1, 7)) == [r["step"] for r in log["replay"]]
    for rec in log["step"]:
        assert rec["norm_clipped"] <= min(rec["norm"], 1.0) * (1 + 1e-5)
        assert rec["clip_coef"] == pytest.approx(min(1.0, 1.0 / (rec["norm"] + 1e-6)))
    assert log["check"][0]["passed"] is True and log["check"][0]["max_rel_loss_diff"] == 0.0
    assert (tmp_path / "runs" / "solo" / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(120)
def test_check_exits_1_when_the_replay_disagrees(tmp_path, capsys, monkeypatch, one_thread):
    from dist_clip import train

    real = train.replay

    def off_by_a_bit(*args, **kwargs):
        recs = real(*args, **kwargs)
        return [dataclasses.replace(r, loss=r.loss * (1 + 1e-3)) if r.step == 4 else r for r in recs]

    monkeypatch.setattr(train, "replay", off_by_a_bit)
    cfg = write_config(tmp_path, "solo", wrapper="none", data=str(Path(__file__)))  # a --data file works too
    assert cli.main(["check", "--config", str(cfg), "--out", str(tmp_path)]) == 1
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.startswith("check: FAIL") and "first out of tolerance at step 4" in last
    assert not (tmp_path / "solo" / "plot.png").exists()  # check draws no plot


@pytest.mark.timeout(120)
def test_a_run_leaves_no_previous_run_outputs_behind(tmp_path, capsys, monkeypatch, one_thread):
    """A run into an out_dir holding a previous run's log.jsonl and plot.png: a refused run (exit 2) left the old
    log with its passing check line, and `train --no-plot` or `check` left the old plot beside the new log. Rank 0
    removes those two files (and no other) when the run starts or its config is refused."""
    cfg = write_config(tmp_path, "solo", wrapper="none", steps=2)
    folder = tmp_path / "solo"

    def previous_run() -> None:
        folder.mkdir(exist_ok=True)
        (folder / "log.jsonl").write_text('{"kind": "check", "passed": true}\n')
        (folder / "plot.png").write_bytes(b"old plot")
        (folder / "notes.txt").write_text("mine")

    previous_run()
    monkeypatch.setenv("DIST_CLIP_TIMEOUT_S", "abc")
    assert cli.main(["check", "--config", str(cfg), "--out", str(tmp_path), "--validate-only"]) == 2
    assert not (folder / "log.jsonl").exists() and not (folder / "plot.png").exists()
    monkeypatch.delenv("DIST_CLIP_TIMEOUT_S")
    previous_run()
    assert cli.main(["check", "--config", str(cfg), "--out", str(tmp_path), "--validate-only"]) == 0
    assert (folder / "plot.png").exists()  # a passing check alone removes nothing: the run that follows does
    for args in (["train", "--no-plot", "--no-replay"], ["check"]):
        previous_run()
        assert cli.main([*args, "--config", str(cfg), "--out", str(tmp_path)]) == 0
        assert not (folder / "plot.png").exists(), args
        assert '"kind": "step"' in (folder / "log.jsonl").read_text(), args  # the new log
        assert (folder / "notes.txt").read_text() == "mine"
    capsys.readouterr()


def test_a_refused_run_removes_a_previous_runs_outputs_that_are_symbolic_links(tmp_path, capsys):
    """A log.jsonl or plot.png that is a symbolic link is removed as a link (its target, a file or none, is left
    alone): a dangling one stayed, and the next run's log was written through it wherever it pointed."""
    folder = tmp_path / "fsdp2"
    folder.mkdir()
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("not the run's")
    (folder / "log.jsonl").symlink_to(tmp_path / "gone.jsonl")  # dangling
    (folder / "plot.png").symlink_to(elsewhere)
    assert cli.main(["train", "--steps", "-1", "--out", str(tmp_path)]) == 2
    assert not (folder / "log.jsonl").is_symlink() and not (folder / "plot.png").is_symlink()
    assert elsewhere.read_text() == "not the run's" and not (tmp_path / "gone.jsonl").exists()
    assert "steps: must be > 0, got -1" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_a_config_refused_as_it_is_read_leaves_no_previous_run_outputs_behind(tmp_path, capsys):
    """README: "a run whose config is refused (exit 2) removes them too". Only refusals after the config was read
    did (DIST_CLIP_TIMEOUT_S, the out folder, --data's size): a bad value in the file itself (the README's own
    `clip.max_norm: must be >= 0` example) or in --steps left the previous run's log with its passing check line.
    The run folder then comes from the file's name and out_dir alone, and --out; where those cannot be told
    (a bad name, invalid YAML, no such file) nothing is removed."""
    def previous_run(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "log.jsonl").write_text('{"kind": "check", "passed": true}\n')
        (folder / "plot.png").write_bytes(b"old plot")
        (folder / "notes.txt").write_text("mine")

    def removed(folder: Path) -> bool:
        assert (folder / "notes.txt").read_text() == "mine"
        return not (folder / "log.jsonl").exists() and not (folder / "plot.png").exists()

    bad = write_config(tmp_path, "solo", wrapper="none", steps=2, out_dir=str(tmp_path), clip={"max_norm": -1.0})
    for out, folder in ((None, tmp_path / "solo"), (tmp_path / "elsewhere", tmp_path / "elsewhere" / "solo")):
        previous_run(folder)
        args = ["train", "--config", str(bad)] + ([] if out is None else ["--out", str(out)])
        assert cli.main(args) == 2
        assert removed(folder), out
    named = tmp_path / "named.yaml"
    named.write_text(f"name: mine\nout_dir: {tmp_path / 'o'}\nsteps: 0\n")
    previous_run(tmp_path / "o" / "mine")
    assert cli.main(["check", "--config", str(named)]) == 2
    assert removed(tmp_path / "o" / "mine")
    previous_run(tmp_path / "fsdp2")  # the built-in config, refused for its --steps
    assert cli.main(["train", "--steps", "-1", "--out", str(tmp_path)]) == 2
    assert removed(tmp_path / "fsdp2")
    for text in ("name: ../solo\nsteps: 0\n", "name: solo\nsteps: [\n"):  # no run folder to trust: left alone
        previous_run(tmp_path / "solo")
        odd = tmp_path / "odd.yaml"
        odd.write_text(text)
        assert cli.main(["train", "--config", str(odd), "--out", str(tmp_path)]) == 2
        assert not removed(tmp_path / "solo"), text
    capsys.readouterr()


@pytest.mark.timeout(60)
def test_compare_tolerances():
    from dist_clip.train import StepRecord, compare

    ref = [StepRecord(i, 3.0, 2.0, 1.0, 0.5, 0.0) for i in range(1, 4)]
    near = [dataclasses.replace(r, loss=3.0 * (1 + 5e-5), norm=2.0 * (1 + 5e-4)) for r in ref]
    assert compare(near, ref, 1e-4, 1e-3).passed
    assert not compare(near, ref, 1e-4, 1e-4).passed
    assert compare(near, ref, 1e-4, None).passed  # norms reported, not compared
    nan = [dataclasses.replace(ref[0], loss=math.nan), *ref[1:]]
    assert not compare(nan, ref, 1e-4).passed
    unknown_norm = [dataclasses.replace(r, norm=math.nan) for r in ref]  # DeepSpeed's own clipping: unreported
    assert compare(unknown_norm, ref, 1e-4, 1e-3, norm_unreported=True).passed
    # Anywhere else a NaN norm is a broken run, not an unreported one (it used to pass every check).
    assert not compare(unknown_norm, ref, 1e-4, 1e-3).passed
    assert compare(unknown_norm, ref, 1e-4, 1e-3).first_failed_step == 1
    assert not compare(ref[:2], ref, 1e-4).passed


def test_the_configs_tolerances_and_the_logged_coefficient():
    """The tolerances a config gives the check (README, Tolerance: fp32 losses 1e-4 and norms ten times that,
    bf16 losses 2e-2 and no norms), which rule lets a NaN norm pass (DeepSpeed's own clipping only), and the
    logged clip_coef: the factor min(1, max_norm / (norm + 1e-6)) dist_clip applies (a pytest.approx of the
    logged value at norm ~2 could not see the 1e-6 left out)."""
    from dist_clip.train import _coef, _norm_unreported

    assert (from_dict({}).rtol, from_dict({}).norm_rtol) == (1e-4, pytest.approx(1e-3, rel=1e-12))
    assert from_dict({"tolerance": 1e-3}).norm_rtol == pytest.approx(1e-2, rel=1e-12)
    assert (from_dict({"precision": "bf16"}).rtol, from_dict({"precision": "bf16"}).norm_rtol) == (2e-2, None)
    cfg = from_dict({"clip": {"max_norm": 1.0}})
    assert [_coef(n, cfg) for n in (0.0, 1e-6, 1.0)] == [1.0, 1.0, 1.0 / (1.0 + 1e-6)]
    assert _coef(1e-6, from_dict({"clip": {"max_norm": 1e-6}})) == 0.5
    assert math.isnan(_coef(math.nan, cfg)) and _coef(math.nan, from_dict({"clip": {"mode": "off"}})) == 1.0
    for wrapper in ("zero1", "zero2", "zero3"):
        assert _norm_unreported(from_dict({"wrapper": wrapper, "clip": {"mode": "native"}}))
        assert not _norm_unreported(from_dict({"wrapper": wrapper, "clip": {"mode": "dist_clip"}}))
    assert not _norm_unreported(from_dict({"wrapper": "fsdp2", "clip": {"mode": "native"}}))


def test_compare_fails_on_a_nonfinite_norm_whatever_the_norm_tolerance():
    """bf16 compares no norms (norm_rtol None), and a run whose norms were all NaN passed there, although a NaN
    norm fails the check anywhere but under DeepSpeed's own clipping."""
    from dist_clip.train import StepRecord, compare

    ref = [StepRecord(i, 3.0, 2.0, 1.0, 0.5, 0.0) for i in range(1, 4)]
    for bad in (math.nan, math.inf):
        run = [dataclasses.replace(r, norm=bad, norm_clipped=bad) if r.step == 2 else r for r in ref]
        got = compare(run, ref, 2e-2, None)
        assert not got.passed and got.first_failed_step == 2 and got.first_nonfinite_norm_step == 2, got
        assert "the run's norm is not finite at step 2" in got.line("bf16")
    unreported = [dataclasses.replace(r, norm=math.nan, norm_clipped=None) for r in ref]
    assert compare(unreported, ref, 2e-2, None, norm_unreported=True).passed
    inf_unreported = [dataclasses.replace(r, norm=math.inf, norm_clipped=None) for r in ref]
    assert not compare(inf_unreported, ref, 2e-2, None, norm_unreported=True).passed
    # A tiny p overflows float64 in the replay too (p = 0.01: inf in both): a correct run, which this failed.
    inf_both = [dataclasses.replace(r, norm=math.inf) for r in ref]
    for norm_rtol in (1e-3, None):
        assert compare(inf_both, inf_both, 1e-4, norm_rtol).passed
        assert not compare([dataclasses.replace(r, norm=math.nan) for r in ref], inf_both, 1e-4, norm_rtol).passed


def test_compare_fails_when_the_ranks_norms_differ():
    """The records are rank 0's: a rank that clipped by a norm 1.5 times too big passed (AdamW hides a per-rank
    gradient scale from the loss). Every rank's norms must be the same, and the norm after clipping must agree
    with the replay's as the norm before clipping does."""
    from dist_clip.train import StepRecord, compare

    ref = [StepRecord(i, 3.0, 2.0, 1.0, 0.5, 0.0) for i in range(1, 4)]
    same = [[(2.0, 1.0)] * 3] * 2
    assert compare(ref, ref, 1e-4, 1e-3, rank_norms=same).passed
    nan_alike = [[(math.nan, math.nan)] * 3] * 2  # an unreported norm is NaN on every rank
    assert compare([dataclasses.replace(r, norm=math.nan, norm_clipped=None) for r in ref], ref, 1e-4, 1e-3,
                   norm_unreported=True, rank_norms=nan_alike).passed
    for r1 in ((3.0, 0.6667), (2.0, 1.5), (math.nan, 1.0)):
        ranks = [[(2.0, 1.0)] * 3, [(2.0, 1.0), r1, (2.0, 1.0)], [(2.0, 1.0)] * 3]
        for norm_rtol in (1e-3, None):  # bf16 too: the ranks' norms are the same whatever the precision
            got = compare(ref, ref, 1e-4, norm_rtol, rank_norms=ranks)
            assert not got.passed and got.first_failed_step == 2 and got.ranks_disagree_step == 2, got
            assert got.ranks_disagree.startswith("rank 1 differs from rank 0: rank 0 2.0 (after clipping 1.0), "
                                                 f"rank 1 {r1[0]!r} (after clipping {r1[1]!r})"), got
            assert "; the ranks' norms differ at step 2: rank 1 differs" in got.line("fp32")
    after = [dataclasses.replace(r, norm_clipped=1.01) if r.step == 3 else r for r in ref]  # a wrong coefficient
    got = compare(after, ref, 1e-4, 1e-3)
    assert not got.passed and got.first_failed_step == 3 and got.max_rel_norm_diff == pytest.approx(0.01)


# --- every wrapper on 2 spawned gloo ranks ----------------------------------------------------------------


def _case_run_job(cfg_dict: dict, out_dir: str) -> int:
    """Rank body: the whole job (train, rank-0 replay and check, verdict broadcast) on the pool's group."""
    from dist_clip import bootstrap, train
    from dist_clip.config import from_dict

    cfg = from_dict(cfg_dict, "<test>")
    info = bootstrap.init_distributed(cfg.backend)  # already initialised by the pool: reads it
    return train.run_job(cfg, info, source="<test>", out_dir=out_dir, show_progress=False, make_plot=False)


def _case_config_error(cfg_dict: dict) -> str:
    from dist_clip import bootstrap, train
    from dist_clip.config import from_dict

    cfg = from_dict(cfg_dict, "<test>")
    try:
        train.run_job(cfg, bootstrap.init_distributed(cfg.backend), source="<test>", show_progress=False,
                      make_plot=False)
    except ConfigError as e:
        return str(e)
    return "no error"


WRAPPER_CASES = [
    pytest.param({"wrapper": "ddp"}, id="ddp"),
    pytest.param({"wrapper": "fsdp1"}, id="fsdp1"),
    pytest.param({"wrapper": "fsdp2"}, id="fsdp2"),
    pytest.param({"wrapper": "fsdp2", "precision": "bf16"}, id="fsdp2-bf16"),
    pytest.param({"wrapper": "fsdp2", "clip": {"norm_type": "inf", "max_norm": 0.05}}, id="fsdp2-inf"),
    pytest.param({"wrapper": "fsdp1", "clip": {"mode": "native"}}, id="fsdp1-native"),
    pytest.param({"wrapper": "ddp", "clip": {"mode": "off"}}, id="ddp-off"),
    pytest.param({"wrapper": "zero1"}, id="zero1", marks=pytest.mark.deepspeed),
    pytest.param({"wrapper": "zero2"}, id="zero2", marks=pytest.mark.deepspeed),
    pytest.param({"wrapper": "zero3"}, id="zero3", marks=pytest.mark.deepspeed),
    pytest.param({"wrapper": "fairscale-oss"}, id="fairscale-oss", marks=pytest.mark.fairscale),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fields", WRAPPER_CASES)
def test_wrapper_run_agrees_with_unsharded_replay(run_ranks, tmp_path, fields):
    cfg = {**TINY, "name": "case", **fields}
    # The first DeepSpeed engine on a fresh machine JIT-builds its shared-memory op (25-50 s, more when busy).
    slow = {"timeout_s": 240, "pg_timeout_s": 240.0} if cfg["wrapper"].startswith("zero") else {"timeout_s": 120}
    codes = run_ranks(2, _case_run_job, cfg, str(tmp_path), **slow)
    log = read_log(tmp_path / "case" / "log.jsonl")
    check = log["check"][0]
    assert codes == [0, 0], check
    assert check["passed"] and log["run"][0]["world_size"] == 2
    if fields.get("precision") != "bf16":
        assert check["max_rel_loss_diff"] < 1e-5, check  # the stated tolerance is 1e-4; seen: about 1e-7
    steps = log["step"]
    assert len(steps) == TINY["steps"] and steps[-1]["loss"] < steps[0]["loss"]
    if fields.get("clip", {}).get("mode") == "off":
        assert all(s["clip_coef"] == 1.0 and s["norm_clipped"] == s["norm"] for s in steps)
    else:
        max_norm = fields.get("clip", {}).get("max_norm", 1.0)
        assert any(s["clip_coef"] < 1 for s in steps)  # clipping really happened
        assert all(s["norm_clipped"] <= max_norm * (1 + 1e-4) for s in steps)


def _case_train_frees_the_engine(cfg_dict: dict) -> list[str]:
    """Rank body: train, then collect; the DeepSpeed objects of this run still alive (their class names)."""
    import gc
    import weakref

    import torch

    from dist_clip import bootstrap, train
    from dist_clip.config import from_dict

    cfg = from_dict(cfg_dict, "<test>")
    made: list[weakref.ref] = []
    real = train._wrap

    def spy(*args, **kwargs):
        setup = real(*args, **kwargs)
        made.extend(weakref.ref(x) for x in (setup.clip_target, setup.clip_target.optimizer))
        return setup

    train._wrap = spy
    try:
        text = (torch.arange(4096) * 7 % 256).to(torch.uint8)  # the same on every rank
        train.train(cfg, bootstrap.init_distributed(cfg.backend), text, source="<test>")
    finally:
        train._wrap = real
    gc.collect()
    return [type(ref()).__name__ for ref in made if ref() is not None]


@pytest.mark.timeout(300)
@pytest.mark.deepspeed
@pytest.mark.parametrize("wrapper", ["zero2", "zero3"])
def test_a_zero_run_frees_its_engine_before_the_group_ends(run_ranks, wrapper):
    """The engine and its ZeRO optimizer outlived training and bootstrap.shutdown() (gc first), with their
    process groups, until interpreter exit: ZeRO's hooks on every parameter's gradient accumulation (held by
    torch's C++ autograd nodes, out of gc's sight) held the optimizer, which held the engine, and ZeRO-3's
    globals held the module. Training now ends with adapters.deepspeed.release."""
    cfg = {**TINY, "steps": 1, "wrapper": wrapper}
    assert run_ranks(2, _case_train_frees_the_engine, cfg, timeout_s=240, pg_timeout_s=240.0) == [[], []]


def _case_run_job_rank1_norm_off(cfg_dict: dict, out_dir: str, factor: float) -> int:
    """The whole job with rank 1's float64 total multiplied by ``factor`` (a wrong norm, hence coefficient, on
    that rank alone); restored afterwards, since the pool's processes serve later tests."""
    import torch.distributed as dist

    import dist_clip.clip as clip

    real = clip._wide_total

    def off(*args, **kwargs):
        wide, out = real(*args, **kwargs)
        return wide * factor, out

    if dist.get_rank() == 1:
        clip._wide_total = off
    try:
        return _case_run_job(cfg_dict, out_dir)
    finally:
        clip._wide_total = real


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fields", [{"wrapper": "fsdp2"}, {"wrapper": "ddp", "precision": "bf16"}],
                         ids=["fsdp2", "ddp-bf16"])
def test_a_rank_that_clipped_by_a_wrong_norm_fails_the_check(run_ranks, tmp_path, fields):
    """Rank 1 clipped by a norm 1.5 times too big and the check passed (loss relative difference 2e-7): the
    records held rank 0's norms only, and AdamW hides a per-rank constant gradient scale from the loss."""
    cfg = {**TINY, "name": "case", **fields}
    codes = run_ranks(2, _case_run_job_rank1_norm_off, cfg, str(tmp_path), 1.5, timeout_s=120)
    check = read_log(tmp_path / "case" / "log.jsonl")["check"][0]
    # Every rank's status: the pool's ranks share one store for the whole session, where ranks 1+ read an earlier
    # test's verdict (0) from the one key it had.
    assert codes == [1, 1], check
    assert not check["passed"] and check["first_failed_step"] == 1 and check["ranks_disagree_step"] == 1, check
    assert check["ranks_disagree"].startswith("rank 1 differs from rank 0: rank 0 "), check


def _case_rank0_fails_after_training(cfg_dict: dict, out_dir: str) -> object:
    """The whole job with rank 0 raising once training is over (its log, replay or check): rank 0 gives the
    error's text, the other ranks their exit status."""
    import time

    import torch.distributed as dist

    from dist_clip import train

    real = train._finish

    def fail(*args, **kwargs):
        time.sleep(2)  # the other ranks wait for the verdict first: a stale one on the store would be read now
        raise OSError("injected: rank 0 cannot write its log")

    if dist.get_rank() == 0:
        train._finish = fail
    try:
        return _case_run_job(cfg_dict, out_dir)
    except OSError as e:
        return str(e)
    finally:
        train._finish = real


@pytest.mark.timeout(300)
def test_a_rank_0_that_fails_after_training_fails_every_rank(run_ranks, tmp_path):
    """Rank 0 failing in its log, replay or check (a full disk, a bug) must not leave the other ranks exiting 0:
    they hear 1 from it, as from a disagreeing replay; a job before on the same store left a passing verdict."""
    cfg = {**TINY, "steps": 2, "name": "case", "wrapper": "ddp"}
    assert run_ranks(2, _case_run_job, cfg, str(tmp_path), timeout_s=120) == [0, 0]  # a passing job first
    got = run_ranks(2, _case_rank0_fails_after_training, cfg, str(tmp_path), timeout_s=120)
    assert got == ["injected: rank 0 cannot write its log", 1], got


def _case_different_text(rank1_byte: int) -> str:
    """Rank body: the ranks' corpora agree or not (rank 1's first byte replaced by ``rank1_byte``)."""
    import torch
    import torch.distributed as dist

    from dist_clip import bootstrap, train

    text = torch.arange(64, dtype=torch.uint8)
    if dist.get_rank() == 1:
        text[0] = rank1_byte
    try:
        train._agree_on_data(text, bootstrap.init_distributed("gloo"))
    except RuntimeError as e:
        return str(e).split(" (")[0]
    return "agreed"


@pytest.mark.timeout(120)
def test_ranks_reading_different_text_fail_together_on_every_rank(run_ranks):
    """Each rank draws its rows of the global batch from its own copy of the corpus: ranks reading different
    text (another Python's standard library, a data file that differs between nodes) train on other batches
    than the replay, so every rank refuses together before the first step; the same text passes."""
    assert run_ranks(2, _case_different_text, 0, timeout_s=60) == ["agreed"] * 2
    assert run_ranks(2, _case_different_text, 7, timeout_s=60) == ["ranks read different training text"] * 2


def test_bf16_precision_runs_the_forward_under_bf16_autocast():
    """``precision: bf16`` computes the forward in bfloat16 (torch.autocast), in the run and its replay alike:
    the loss differs from the float32 one by bf16 rounding (a run that left autocast off trained in fp32 and
    still passed its check against a replay in fp32)."""
    import torch

    from dist_clip.train import global_batch, lm_loss, make_model

    cfg = from_dict({**TINY, "precision": "bf16"})
    model = make_model(cfg, torch.device("cpu"))
    x, y = global_batch(torch.arange(256, dtype=torch.uint8).repeat(4), 1, cfg.seed, 2, cfg.model.seq_len)
    with torch.no_grad():
        fp32, bf16 = (float(lm_loss(model, x, y, precision)) for precision in ("fp32", "bf16"))
    assert fp32 != bf16 and bf16 == pytest.approx(fp32, rel=2e-2)


def _case_config_error_printed(cfg_dict: dict) -> tuple[str, str]:
    """:func:`_case_config_error`, and what the job printed on stdout before it."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        error = _case_config_error(cfg_dict)
    return error, out.getvalue()


@pytest.mark.timeout(120)
def test_topology_errors_are_config_errors_on_every_rank(run_ranks):
    """Found before the run's header: under a launcher that cannot tell the world size up front (the DeepSpeed
    launcher, torchrun on several nodes) rank 0 printed the header and data lines, then the config error."""
    got = run_ranks(2, _case_config_error_printed, {**TINY, "wrapper": "hsdp", "mesh": [2, 2]}, timeout_s=60)
    assert got == [("<test>: mesh: [2, 2] needs 4 ranks, launched with 2", "")] * 2
    got = run_ranks(2, _case_config_error_printed, {**TINY, "wrapper": "none"}, timeout_s=60)
    assert got == [("<test>: wrapper: none trains one process, but 2 were launched", "")] * 2


def _case_config_error_on_nodes(cfg_dict: dict, layout: list[tuple[int, int]]) -> str:
    """:func:`_case_config_error` with the launcher saying this rank is ``(local rank, local world size)``."""
    import os

    import torch.distributed as dist

    local_rank, local_size = layout[dist.get_rank()]
    saved = {k: os.environ.get(k) for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    os.environ.update(LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(local_size))
    try:
        return _case_config_error(cfg_dict)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.timeout(120)
def test_hsdp_mesh_null_on_nodes_of_different_sizes_is_a_config_error_on_every_rank(run_ranks):
    """Nodes of 1 and 2 ranks (torchrun agents with --nproc-per-node 1 and 2): rank 0 read a (3, 1) mesh and
    trained, ranks 1 and 2 a (1, 2) mesh that needs 2 ranks and refused it without a word (not being rank 0),
    and rank 0 failed in its first collective with gloo's "Connection closed by peer"."""
    got = run_ranks(3, _case_config_error_on_nodes, {**TINY, "wrapper": "hsdp"}, [(0, 1), (0, 2), (1, 2)],
                    timeout_s=90)
    assert got == ["<test>: mesh: null shards within a node, but the nodes hold different numbers of ranks (local "
                   "world size by rank: [1, 2, 2]); give mesh: [replicas, shard size]"] * 3


@pytest.mark.timeout(120)
def test_unusable_data_is_a_config_error_naming_the_path_on_every_rank(run_ranks, tmp_path):
    short = tmp_path / "short.txt"
    short.write_bytes(b"x" * 10)
    got = run_ranks(2, _case_config_error, {**TINY, "wrapper": "ddp", "data": str(short)}, timeout_s=60)
    seq_len = TINY["model"]["seq_len"]
    assert got == [f"<test>: data: {short} holds 10 bytes, fewer than model.seq_len + 2 = {seq_len + 2}"] * 2
    with pytest.raises(ConfigError, match="/dev/null: data: is neither a regular file nor a folder"):
        load_text("/dev/null")
    with pytest.raises(ConfigError, match="no such file or folder"):
        load_text(str(tmp_path / "missing"))


@pytest.mark.timeout(60)
def test_data_too_small_to_train_is_found_by_validate_only(tmp_path, capsys):
    """An empty or too small --data file passed --validate-only (launch/torchrun.sh's check), then every started
    rank failed with exit 1 and torchrun's traceback; the empty file's error named the data file, not the config."""
    cfg = write_config(tmp_path, "ddp", wrapper="ddp")
    seq_len = TINY["model"]["seq_len"]
    empty, tiny, enough = tmp_path / "empty.txt", tmp_path / "tiny.txt", tmp_path / "enough.txt"
    empty.write_bytes(b"")
    tiny.write_bytes(b"abc")
    enough.write_bytes(b"x" * (seq_len + 2))
    source = f"{cfg} (with command-line overrides)"
    for data, why in ((empty, "holds no readable bytes"),
                      (tiny, f"holds 3 bytes, fewer than model.seq_len + 2 = {seq_len + 2}")):
        args = ["check", "--config", str(cfg), "--data", str(data), "--out", str(tmp_path), "--validate-only"]
        assert cli.main(args) == 2
        assert capsys.readouterr().err == f"config error: {source}: data: {data} {why}\n"
    assert cli.main(["check", "--config", str(cfg), "--data", str(enough), "--out", str(tmp_path),
                     "--validate-only"]) == 0
    assert capsys.readouterr().err == ""
    with pytest.raises(ConfigError, match=f"^{cfg}: data: {empty} holds no readable bytes$"):
        load_text(str(empty), str(cfg))  # what each rank reads names the config too


@pytest.mark.timeout(60)
def test_a_window_longer_than_the_stdlib_corpus_is_found_by_validate_only(tmp_path, capsys):
    """data: stdlib was not read by --validate-only: model.seq_len: 3000000 (the run reads 2 MiB of it) passed, then
    every rank torchrun started failed on it, with torchrun's traceback and exit 1."""
    from dist_clip.train import STDLIB_BYTES

    cfg = write_config(tmp_path, "long", wrapper="ddp", model={**TINY["model"], "seq_len": STDLIB_BYTES + 5000})
    assert cli.main(["check", "--config", str(cfg), "--out", str(tmp_path), "--validate-only"]) == 2
    err = capsys.readouterr().err
    source = f"{cfg} (with command-line overrides)"  # (--out)
    assert err.startswith(f"config error: {source}: data: stdlib holds ") and err.count("\n") == 1, err
    size = len(load_text("stdlib")[0])  # the very text every rank reads, and refuses
    assert err.endswith(f"holds {size} bytes, fewer than model.seq_len + 2 = {STDLIB_BYTES + 5002}\n"), err


@pytest.mark.parametrize("seed", [0, 18446688733643, 2 * 10**13, 2**63 - 1])
def test_every_accepted_seed_draws_batches(seed):
    """The config takes seeds in [0, 2^63); the batch generator's seed (seed * 1000003 + step) overflowed
    manual_seed above seed 1.8e13. Seeds below that draw the batches they always drew."""
    import torch

    from dist_clip.train import global_batch

    text = torch.arange(256, dtype=torch.uint8).repeat(4)
    x, y = global_batch(text, 3, seed, rows=2, seq_len=8)
    assert x.shape == y.shape == (2, 8) and torch.equal(x[:, 1:], y[:, :-1])
    if seed < 18446688733643:
        g = torch.Generator().manual_seed(seed * 1_000_003 + 3)
        assert torch.equal(x[:, 0], text[torch.randint(0, text.numel() - 9, (2,), generator=g)].long())


def test_options_before_the_subcommand_are_kept(tmp_path, capsys):
    """``dist-clip --config X train``: the subcommand's defaults overwrote what came before it, so the built-in
    config ran and X was never read (a missing file passed --validate-only with exit 0)."""
    missing = tmp_path / "missing.yaml"
    assert cli.main(["--config", str(missing), "train", "--validate-only"]) == 2
    assert f"config error: {missing}: no such file" in capsys.readouterr().err
    assert cli.main(["--steps", "-3", "check", "--validate-only"]) == 2
    assert "steps: must be > 0, got -3" in capsys.readouterr().err
    args = cli._parser().parse_args(["--steps", "2", "--out", "o", "train", "--no-plot"])
    assert (args.steps, args.out, args.config, args.no_plot) == (2, "o", None, True)
    args = cli._parser().parse_args(["--steps", "2", "check", "--steps", "5"])  # after the subcommand wins
    assert args.steps == 5


def test_output_paths_that_cannot_hold_the_run_are_config_errors_on_every_rank(tmp_path, capsys, monkeypatch):
    """A file where the run folder goes, or a folder where its log goes: found before training (tracebacks
    after training and replay before), and on every rank, each without printing (a rank that went on alone
    waited in MPI_Init for a rank 0 that had exited)."""
    cfg = write_config(tmp_path, "solo", wrapper="none")
    (tmp_path / "o1").mkdir()
    (tmp_path / "o1" / "solo").write_text("")
    (tmp_path / "o2" / "solo" / "log.jsonl").mkdir(parents=True)
    (tmp_path / "afile").write_text("")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        for out, why in (("o1", "holds a file where the run folder goes"),
                         ("o2", "holds a folder where the run's log.jsonl goes"),
                         ("afile", "cannot be made a folder" if rank == "0" else "is not a folder")):
            assert cli.main(["check", "--config", str(cfg), "--out", str(tmp_path / out), "--validate-only"]) == 2
            err = capsys.readouterr().err
            assert (why in err and "(with command-line overrides): out_dir:" in err) if rank == "0" else err == ""


def test_data_reads_stop_at_the_byte_limit(tmp_path):
    """``read_files`` reads at most ``limit`` of the files' bytes (the stdlib corpus is its first 2 MiB, a --data
    folder its first 256 MiB); the newlines joining files come on top."""
    from dist_clip.config import read_files
    from dist_clip.train import STDLIB_BYTES

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"x" * 100)
    b.write_bytes(b"y" * 100)
    assert read_files([a], 10) == b"x" * 10
    assert read_files([a, b], 150) == b"x" * 100 + b"\n" + b"y" * 50
    assert read_files([a, b], 100) == b"x" * 100  # the limit reached: b not read
    text, _ = load_text("stdlib")
    assert STDLIB_BYTES <= text.numel() <= STDLIB_BYTES + 2000, text.numel()  # (+ one newline a file joined)


def test_a_data_folder_under_a_dotted_folder_is_read(tmp_path):
    """Hidden files inside the folder are skipped, not every file under a dotted parent (~/.cache/...)."""
    root = tmp_path / ".cache" / "corpus"
    root.mkdir(parents=True)
    (root / "a.txt").write_text("hello world " * 20)
    (root / ".hidden.txt").write_text("x" * 1000)
    data, _ = load_text(str(root))
    assert bytes(data.tolist()) == b"hello world " * 20  # the hidden file left out


def test_a_bad_timeout_variable_is_a_config_error(monkeypatch, capsys, tmp_path):
    from dist_clip import bootstrap

    for bad in ("abc", "-5", "0", "nan"):
        monkeypatch.setenv("DIST_CLIP_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match=f"DIST_CLIP_TIMEOUT_S must be a number of seconds > 0, got '{bad}'"):
            bootstrap._timeout()
        # Found by --validate-only too (launch/torchrun.sh's check before the ranks start), not only by the ranks.
        assert cli.main(["check", "--out", str(tmp_path), "--validate-only"]) == 2
        assert capsys.readouterr().err == f"config error: DIST_CLIP_TIMEOUT_S must be a number of seconds > 0, " \
                                          f"got '{bad}'\n"
    # torch counts whole milliseconds: 0.0004 passed and every start-up wait failed at once ("after 0ms")
    monkeypatch.setenv("DIST_CLIP_TIMEOUT_S", "0.0004")
    assert cli.main(["check", "--out", str(tmp_path), "--validate-only"]) == 2
    assert capsys.readouterr().err == ("config error: DIST_CLIP_TIMEOUT_S must be at least 0.001 seconds (torch "
                                       "counts whole milliseconds), got '0.0004'\n")
    monkeypatch.setenv("DIST_CLIP_TIMEOUT_S", "0.001")
    assert bootstrap._timeout().total_seconds() == 0.001
    monkeypatch.setenv("DIST_CLIP_TIMEOUT_S", "1e14")  # over timedelta's range: an OverflowError traceback
    assert cli.main(["check", "--out", str(tmp_path), "--validate-only"]) == 2
    assert capsys.readouterr().err.startswith("config error: DIST_CLIP_TIMEOUT_S must be at most ")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["9e9", "1e10", "5e13"])
def test_a_timeout_past_what_torch_deadlines_hold_is_a_config_error(monkeypatch, capsys, tmp_path, value):
    """Values within timedelta's range but past the C++ deadlines' passed --validate-only: 9e9 spun forever in
    gloo, 1e10 was a traceback, 5e13 "Invalid timeout" on one rank. At most 1e9 seconds now."""
    monkeypatch.setenv("DIST_CLIP_TIMEOUT_S", value)
    assert cli.main(["check", "--out", str(tmp_path), "--validate-only"]) == 2
    assert capsys.readouterr().err == ("config error: DIST_CLIP_TIMEOUT_S must be at most 1000000000 seconds "
                                       f"(about 31 years), got '{value}'\n")
    monkeypatch.setenv("DIST_CLIP_TIMEOUT_S", "1e9")
    assert cli.main(["check", "--out", str(tmp_path), "--validate-only"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.timeout(120)
def test_a_lone_process_gets_the_variables_deepspeed_asserts():
    """zero1-3 run with no launcher (or mpirun -n 1) crashed in deepspeed.initialize: "DeepSpeed requires the
    LOCAL_RANK environment variable"; the one-rank group now sets what a launcher would."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    code = ("import os; from dist_clip import bootstrap; bootstrap.init_distributed('gloo'); "
            "print(*(os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100, env=env, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.split() == ["0", "1", "0", "1"], proc


_INIT_AGAIN = """
import sys
import torch.distributed as dist
from dist_clip import bootstrap, cli
seen = []
for end in (bootstrap.shutdown, dist.destroy_process_group, bootstrap.shutdown):
    info = bootstrap.init_distributed("gloo")
    seen.append(f"{info.launcher}:{info.rank}/{info.world_size}")
    end()
print(*seen)
if sys.argv[1:]:  # the same run twice in one process: the second was 'config error: rendezvous environment'
    print(*(cli.main(sys.argv[1:]) for _ in range(2)))
"""


def _without_launch(**extra: str) -> dict[str, str]:
    """This environment less every launcher's variables (a lone process, whatever the test runner was started
    under), one OpenMP thread, and ``extra``."""
    import os

    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "MASTER_ADDR",
              "MASTER_PORT", "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "TORCHELASTIC_RUN_ID")
    return {**{k: v for k, v in os.environ.items() if k not in launch}, "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.timeout(200)
@pytest.mark.parametrize("env, launcher", [({}, "single"), ({"PMI_RANK": "0", "PMI_SIZE": "1"}, "mpi")],
                         ids=["no-launcher", "mpirun-n-1"])
def test_a_lone_process_starts_again_after_its_group_is_destroyed(tmp_path, env, launcher):
    """The variables a lone process's group writes (RANK=0, WORLD_SIZE=1) were read back as an env:// launch once
    the group was destroyed: a second init_distributed raised ValueError 'environment variable MASTER_PORT
    expected, but not set', and a second cli.main in the same process returned 2 with that as a config error."""
    args = []
    if not env:
        cfg = write_config(tmp_path, "ddp", wrapper="ddp", steps=2, batch_size=2,
                           model={"d_model": 16, "n_layers": 1, "n_heads": 2, "seq_len": 8})
        args = ["train", "--config", str(cfg), "--out", str(tmp_path), "--no-replay", "--no-plot"]
    proc = subprocess.run([sys.executable, "-c", _INIT_AGAIN, *args], capture_output=True, text=True, timeout=180,
                          env=_without_launch(**env, DIST_CLIP_MPI4PY="0"), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = ("dist-clip:", "data:", "train:", "log:")  # the runs' own lines
    lines = [line for line in proc.stdout.splitlines() if not line.startswith(said)]
    assert lines[0].split() == [f"{launcher}:0/1"] * 3, proc.stdout
    assert lines[1:] == (["0 0"] if args else []), proc.stdout + proc.stderr[-3000:]


_NEW_LAUNCH_AFTER_A_LONE_RUN = """
import os
from dist_clip import bootstrap
bootstrap.init_distributed("gloo")
bootstrap.shutdown()
os.environ.update(RANK="1", WORLD_SIZE="2")  # the user sets up rank 1 of a 2-rank job in the same process
got = bootstrap.detect_launch()
print(got.rank, got.world_size, got.local_rank, got.local_world_size, got.launcher)
"""


@pytest.mark.timeout(120)
def test_a_new_launch_after_a_lone_run_is_read_as_a_fresh_process_reads_it():
    """The LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 a lone process's group wrote stayed behind when the user then set
    RANK=1 WORLD_SIZE=2 for a real 2-rank job in the same process: it read local rank 0 of 1 where a fresh
    process with the same RANK/WORLD_SIZE reads local rank 1 of 2, and under hsdp (mesh: null) built a (2, 1)
    mesh beside its peer's (1, 2): the first FSDP collective failed after the whole collective timeout."""
    proc = subprocess.run([sys.executable, "-c", _NEW_LAUNCH_AFTER_A_LONE_RUN], capture_output=True, text=True,
                          timeout=100, env=_without_launch(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1", "2", "1", "2", "env"], proc.stdout


_NEW_LAUNCHES_AFTER_LONE_RUNS = """
import os
from dist_clip import bootstrap
said = []
for runs, launch in ((2, dict(RANK="1", WORLD_SIZE="2")), (1, dict(RANK="0", WORLD_SIZE="2"))):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(k, None)
    for _ in range(runs):
        bootstrap.init_distributed("gloo")
        bootstrap.shutdown()
    os.environ.update(launch)
    got = bootstrap.detect_launch()
    said.append(f"{got.rank},{got.world_size},{got.local_rank},{got.local_world_size},{got.launcher}")
print(*said)
"""


@pytest.mark.timeout(120)
def test_a_new_launch_after_lone_runs_is_read_as_a_fresh_process_reads_it():
    """As above, after two lone runs (the second must keep what stood before the first wrote: LOCAL_RANK and
    LOCAL_WORLD_SIZE unset, not the first run's 0 and 1), and for rank 0 of the new launch, whose RANK=0 is the
    value the lone run wrote: set again by the user, it is the new launch's, not one to take back."""
    proc = subprocess.run([sys.executable, "-c", _NEW_LAUNCHES_AFTER_LONE_RUNS], capture_output=True, text=True,
                          timeout=100, env=_without_launch(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1,2,1,2,env", "0,2,0,2,env"], proc.stdout


def test_only_rank_0_makes_the_run_folder_and_removes_a_previous_run(tmp_path, capsys, monkeypatch):
    """Every rank checks the run folder; only rank 0 makes it, and only rank 0 removes a previous run's log and
    plot when the config is refused (on a folder the ranks share, one rank's removal is the job's)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    new = tmp_path / "new" / "out"
    assert cli.main(["check", "--out", str(new), "--validate-only"]) == 0
    assert not new.exists()
    folder = tmp_path / "fsdp2"
    folder.mkdir()
    (folder / "log.jsonl").write_text('{"kind": "check", "passed": true}\n')
    assert cli.main(["train", "--steps", "-1", "--out", str(tmp_path)]) == 2
    assert (folder / "log.jsonl").exists()
    assert capsys.readouterr().err == ""  # rank 1 of one node: rank 0 says why
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["train", "--steps", "-1", "--out", str(tmp_path)]) == 2
    assert not (folder / "log.jsonl").exists()
    assert capsys.readouterr().err.endswith("steps: must be > 0, got -1\n")


def test_a_rank_that_cannot_start_without_mpi_says_why_and_exits_1(monkeypatch, capsys, tmp_path):
    """torch's rendezvous raising RuntimeError (MASTER_PORT taken on rank 0's host): one "error:" line and exit
    1, the job's failure, where a ValueError (a bad rendezvous variable, alike on every rank) is a config error."""
    from dist_clip import bootstrap

    cfg = write_config(tmp_path, "ddp", wrapper="ddp")
    for raised, code, line in ((RuntimeError("The server socket has failed to listen"), 1,
                                "error: The server socket has failed to listen\n"),
                               (ValueError("bad MASTER_ADDR"), 2,
                                "config error: rendezvous environment: bad MASTER_ADDR\n")):
        def fail(*args, error=raised, **kwargs):
            raise error

        monkeypatch.setattr(bootstrap, "init_distributed", fail)
        assert cli.main(["check", "--config", str(cfg), "--out", str(tmp_path)]) == code
        assert capsys.readouterr().err == line


def test_an_mpi_rank_that_fails_aborts_the_job_with_its_status(monkeypatch, capsys):
    """Under a running MPI job of 2 ranks: an exception ends every rank (MPI_Abort) with status 1, Ctrl-C with
    130; a SystemExit (a clean exit status every rank reaches) aborts nothing."""
    aborted = []

    class World:
        def Get_rank(self) -> int:  # noqa: N802 - mpi4py's name
            return 1

        def Abort(self, code: int) -> None:  # noqa: N802
            aborted.append(code)

    monkeypatch.setattr(cli, "_running_mpi_world", World)
    for error, want in ((SystemExit(2), []), (RuntimeError("boom"), [1]), (KeyboardInterrupt(), [130])):
        aborted.clear()
        try:
            raise error
        except BaseException as e:  # noqa: BLE001 - the traceback _abort_mpi_job prints is this one
            cli._abort_mpi_job(e)
        assert aborted == want, error
    assert "[rank1]: RuntimeError: boom" in capsys.readouterr().err


def test_an_empty_out_dir_is_a_config_error(capsys):
    """``--out ""`` wrote the run into the current folder, where ``data: ""`` was already refused."""
    assert cli.main(["check", "--out", "", "--validate-only"]) == 2
    assert "out_dir: expected the path of a folder, got ''" in capsys.readouterr().err


def test_an_empty_config_path_is_a_config_error(capsys):
    """``--config ""`` ran the built-in config silently (an unset variable in a script: ``--config "$CFG"``)."""
    assert cli.main(["train", "--config", "", "--validate-only"]) == 2
    err = capsys.readouterr().err
    assert err == "config error: --config: expected the path of a YAML file, got ''\n", err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("env", [{"RANK": "x", "WORLD_SIZE": "2"}, {"PMI_RANK": "x", "PMI_SIZE": "2"}],
                         ids=["RANK", "PMI_RANK"])
def test_a_malformed_launcher_variable_is_one_line_exit_2(tmp_path, env):
    """``RANK=x`` was an uncaught RuntimeError traceback from the rank-0 test of the error path itself."""
    import os

    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "PMI_RANK", "PMI_SIZE")}
    name = next(iter(env))
    for args in (["train", "--validate-only", "--out", str(tmp_path)], ["train", "--config", "missing.yaml"]):
        proc = subprocess.run([sys.executable, "-m", "dist_clip", *args], capture_output=True, text=True,
                              timeout=100, env={**clean, **env}, cwd=ROOT)
        assert proc.returncode == 2, proc
        assert proc.stderr == f"config error: environment variable {name}='x' is not an integer\n", proc.stderr
    proc = subprocess.run([sys.executable, "-m", "dist_clip", "train", "--stepz", "3"], capture_output=True,
                          text=True, timeout=100, env={**clean, **env}, cwd=ROOT)  # a usage error, printed
    assert proc.returncode == 2 and "unrecognized arguments: --stepz" in proc.stderr, proc
    assert "Traceback" not in proc.stderr, proc.stderr


def test_machine_errors_are_found_by_validate_only(tmp_path, capsys, monkeypatch):
    """A missing --data path and backend nccl without CUDA do not depend on the number of ranks: found before
    any rank starts (torchrun.sh's --validate-only passed them, and every started rank failed alone)."""
    missing = tmp_path / "nope"
    assert cli.main(["train", "--data", str(missing), "--out", str(tmp_path), "--validate-only"]) == 2
    err = capsys.readouterr().err
    assert err == f"config error: <built-in config> (with command-line overrides): data: no such file or folder: " \
                  f"{missing}\n", err
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = write_config(tmp_path, "nccl", backend="nccl")
    assert cli.main(["check", "--config", str(cfg), "--out", str(tmp_path), "--validate-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {cfg} (with command-line overrides): backend: nccl needs CUDA"), err
    assert err.count("\n") == 1, err


@pytest.mark.parametrize("abbrev", ["--val", "--no-rep", "--conf"])
def test_abbreviated_options_are_refused(capsys, abbrev):
    """argparse took ``train --val`` for the hidden ``--validate-only`` (exit 0, nothing trained)."""
    with pytest.raises(SystemExit) as e:
        cli.main(["train", abbrev, "x"] if abbrev == "--conf" else ["train", abbrev])
    assert e.value.code == 2
    assert f"unrecognized arguments: {abbrev}" in capsys.readouterr().err


@pytest.mark.parametrize("text,why", [
    ("lr: 1_0e-3\n", "lr: expected a number, got str '1_0e-3'"),  # float() took them all
    ("lr: 1_000\n", "lr: expected a number, got str '1_000'"),
    ("lr: 1:30.5\n", "lr: expected a number, got str '1:30.5'"),  # YAML 1.1 read 90.5
    ("weight_decay: 1_0.5\n", "weight_decay: expected a number, got str '1_0.5'"),
    ("lr: '3e-4'\n", "lr: expected a number, got str '3e-4'"),  # quoted: a string, as steps: '3' is
    ("clip: {norm_type: 1_0}\n", "clip.norm_type: expected a number >= 0 or inf, got '1_0'"),
    ("clip: {norm_type: nan}\n", "clip.norm_type: expected a number >= 0 or inf, got 'nan'"),
], ids=["underscore-exp", "underscore", "sexagesimal", "underscore-dot", "quoted", "norm-underscore", "norm-nan"])
def test_number_looking_strings_are_refused_where_a_number_is_expected(tmp_path, capsys, text, why):
    """The README says YAML 1.1's 1_000 and 1:30 are strings, refused where a number is expected: float fields
    took them through float() (1_0e-3 became 0.01), and YAML 1.1's float resolver read 1:30.5 as 90.5."""
    path = tmp_path / "floats.yaml"
    path.write_text(text)
    assert cli.main(["train", "--config", str(path), "--validate-only", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"config error: {path}: {why}\n", err


@pytest.mark.parametrize("text,expected", [
    ("steps: 010\n", ("steps", 10)),  # YAML 1.1 read a leading zero as octal: 8
    ("steps: 0o10\nseed: 0x1f\n", ("steps", 8)), ("seed: 0x1f\n", ("seed", 31)), ("steps: +7\n", ("steps", 7)),
    ("steps: 1_000\n", "steps: expected an integer, got str '1_000'"),  # YAML 1.1 forms, strings in 1.2
    ("steps: 1:30\n", "steps: expected an integer, got str '1:30'"),
    ("steps: 0b11\n", "steps: expected an integer, got str '0b11'"),
    ("steps: !!int abc\n", "invalid YAML: line 1, column 8: not an integer: 'abc'"),
    ("steps: 99999999999999999999999\n", "steps: must be at most 2147483647 (2**31 - 1), got 99999999999999999999999"),
    ("model: {d_model: 4294967296}\n", "model.d_model: must be at most 2147483647"),
    ("wrapper: hsdp\nmesh: [1, 4294967296]\n", "mesh: entries must be at most 2147483647"),
], ids=["leading-zero", "octal", "hex", "plus", "underscore", "sexagesimal", "binary", "tagged", "huge-steps",
        "huge-width", "huge-mesh"])
def test_yaml_integers_are_yaml_1_2_and_bounded(tmp_path, capsys, text, expected):
    path = tmp_path / "ints.yaml"
    path.write_text(text)
    if isinstance(expected, tuple):
        assert getattr(load_config(path), expected[0]) == expected[1]
        return
    assert cli.main(["train", "--config", str(path), "--validate-only", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {path}") and expected in err and err.count("\n") == 1, err


def test_absurd_steps_from_the_command_line_are_refused(capsys):
    assert cli.main(["check", "--steps", "99999999999999999999999", "--validate-only"]) == 2
    assert "steps: must be at most 2147483647" in capsys.readouterr().err


def test_yaml_merge_keys_are_read(tmp_path):
    """``<<: *anchor`` was refused: "could not determine a constructor for the tag 'tag:yaml.org,2002:merge'"."""
    path = tmp_path / "merge.yaml"
    path.write_text("model: &m {d_model: 64, n_heads: 2}\nclip: {<<: [{max_norm: 2.0, mode: 'off'}], max_norm: 3.0}\n")
    cfg = load_config(path)
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.clip.max_norm, cfg.clip.mode) == (64, 2, 3.0, "off")
    path.write_text("clip: {<<: {max_norm: 2.0}, mode: 'off', mode: native}\n")  # own keys twice: still refused
    with pytest.raises(ConfigError, match="key 'mode' given twice"):
        load_config(path)


@pytest.mark.parametrize("name", [" ", " lead", "trail ", "a\nb", "a\\b", "a/b", "a\tb", "..", "x\x7f",
                                  "a\x85b", "a\x9bb", "a\u202eb", "a\u200bb", "a\u2028b", "a\ud800b"])
def test_odd_run_names_are_refused(capsys, name):
    """The name is the run folder's: " ", a newline or a backslash made odd folders. Only ASCII controls were
    refused: U+0085 (next line), U+202E (right-to-left override) and a lone surrogate (UnicodeEncodeError when
    the folder was made) were taken."""
    with pytest.raises(ConfigError, match="name: must be a plain non-empty file name"):
        from_dict({"name": name})
    assert from_dict({"name": "run 1.b-c_d"}).name == "run 1.b-c_d"
    assert from_dict({"name": "essai é 日本"}).name == "essai é 日本"


def test_a_run_name_too_long_for_the_file_system_is_a_config_error(tmp_path, capsys):
    """A 300-character name: OSError "File name too long" from the out-dir check, a traceback and exit 1."""
    cfg = tmp_path / "long.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "name": "a" * 300}))
    assert cli.main(["check", "--config", str(cfg), "--out", str(tmp_path), "--validate-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {cfg} (with command-line overrides): out_dir: cannot hold the run folder "
                          f"{tmp_path / ('a' * 300)} (") and err.count("\n") == 1, err


def test_a_data_path_that_cannot_be_looked_up_is_a_config_error(tmp_path, capsys):
    """A --data name over the file system's limit (300 characters): OSError "File name too long" from the data
    check, a traceback and exit 1, from every rank; under mpirun with mpi4py a node where only its own path failed
    so left the other ranks waiting in the agreement on the config checks for good."""
    data = tmp_path / ("a" * 300)
    assert cli.main(["check", "--out", str(tmp_path), "--data", str(data), "--validate-only"]) == 2
    err = capsys.readouterr().err
    assert err == (f"config error: <built-in config> (with command-line overrides): data: cannot be looked up: "
                   f"{data} (File name too long)\n"), err


def test_a_tilde_in_out_dir_is_the_home_folder(tmp_path, capsys, monkeypatch):
    """``data: ~/x`` is read from the home folder; ``out_dir: ~/runs`` made a folder named "~" here."""
    home, here = tmp_path / "home", tmp_path / "here"
    here.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    cfg = write_config(tmp_path, "tilde", out_dir="~/runs")
    assert load_config(cfg).out_dir == str(home / "runs")
    assert cli.main(["check", "--config", str(cfg), "--validate-only"]) == 0
    assert (home / "runs").is_dir() and list(here.iterdir()) == [], capsys.readouterr()


@pytest.mark.parametrize(("wrapper", "module", "name"), [("zero2", "deepspeed", "DeepSpeed"),
                                                         ("fairscale-oss", "fairscale", "fairscale")])
def test_a_wrapper_whose_framework_is_not_installed_is_refused_up_front(tmp_path, capsys, monkeypatch, wrapper,
                                                                        module, name):
    """A ZeRO or fairscale config without the framework failed with a ModuleNotFoundError traceback and exit 1,
    after the process group and the data were set up (and --validate-only passed it)."""
    from dist_clip import bootstrap

    monkeypatch.setitem(sys.modules, module, None)  # `import deepspeed` now fails, as where it is not installed
    monkeypatch.setattr(bootstrap, "init_distributed", lambda *a, **k: pytest.fail("started the run"))
    cfg = write_config(tmp_path, wrapper, wrapper=wrapper)
    line = (f"config error: {cfg} (with command-line overrides): wrapper: {wrapper} needs {name}, which is not "
            f"installed: pip install 'dist_clip[{module}]'\n")
    for extra in (["--validate-only"], []):
        assert cli.main(["check", "--config", str(cfg), "--out", str(tmp_path), *extra]) == 2
        assert capsys.readouterr().err == line


def test_train_without_matplotlib_is_refused_up_front_unless_no_plot(tmp_path, capsys, monkeypatch):
    """``dist-clip train`` without the train extra failed on ``import matplotlib`` after training and replay."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["train", "--out", str(tmp_path), "--validate-only"]) == 2
    assert capsys.readouterr().err == ("config error: <built-in config> (with command-line overrides): the plot "
                                       "needs matplotlib, which is not installed: pip install 'dist_clip[train]', "
                                       "or pass --no-plot\n")
    assert cli.main(["train", "--out", str(tmp_path), "--no-plot", "--validate-only"]) == 0
    assert cli.main(["check", "--out", str(tmp_path), "--validate-only"]) == 0  # check draws no plot
    assert capsys.readouterr().err == ""


def test_progress_on_a_terminal_without_tqdm_prints_lines(monkeypatch, capsys):
    """The tqdm bar (train extra) on a terminal: without tqdm, the plain lines a pipe gets (an ImportError before)."""
    from dist_clip import train

    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with train._progress(True, 2, "train") as update:
        for step in (1, 2):
            update(train.StepRecord(step=step, loss=1.5, norm=2.0, norm_clipped=1.0, clip_coef=0.5, time_s=0.1))
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[:3] for line in lines] == [["train", "step", "1/2"], ["train", "step", "2/2"]], lines


def test_plain_progress_lines_show_the_first_and_last_step(capsys):
    """About ten lines per run on a pipe: every tenth of the steps, and always the first and the last (a run of
    25 steps printed every second step, so neither step 1 nor step 25 unless asked for)."""
    from dist_clip import train

    with train._progress(True, 25, "train") as update:
        for step in range(1, 26):
            update(train.StepRecord(step=step, loss=1.5, norm=2.0, norm_clipped=1.0, clip_coef=0.5, time_s=0.1))
    steps = [int(line.split()[2].split("/")[0]) for line in capsys.readouterr().err.splitlines()]
    assert steps == [1, *range(2, 25, 2), 25], steps
