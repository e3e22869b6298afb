"""README's runnable python blocks, run as a user copies them, so that a stale snippet fails here.

A block is runnable where an HTML comment (invisible on GitHub) right before it says
``<!-- tests/test_readme.py runs the block below, given: a, b, c -->``: the names the block takes from the user's
program (a model, its loss, an optimizer, imports the section's prose assumes). Each block runs in a namespace of
those names alone, built afresh here: a block using a name its comment does not list fails with ``NameError``.
``model`` has gradients already (a first backward), and ``loss`` is a second forward's, not yet backward'ed.

Run: ``.venv/bin/python -m pytest tests/test_readme.py``.
"""

from __future__ import annotations

import pathlib
import re
import warnings

import pytest
import torch
from torch import nn

import dist_clip

_README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
_MARKED = re.compile(
    r"<!-- tests/test_readme\.py runs the block below, given: ([\w,\s]*?) -->\n```python\n(.*?)```", re.S
)


def _blocks() -> list[tuple[str, list[str], str]]:
    """(the heading above, the given names, the code) of every marked block, in README order."""
    text = _README.read_text(encoding="utf-8")
    out = []
    for m in _MARKED.finditer(text):
        heading = re.findall(r"^#+ (.*)$", text[: m.start()], re.M)[-1]
        names = [n.strip() for n in m.group(1).split(",") if n.strip()]
        out.append((heading, names, m.group(2)))
    return out


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq = nn.Linear(8, 8)


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attn()


class _Model(nn.Module):
    """Named as README's report example names parameters: ``layers.0.attn.wq.weight``..., and a ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Layer(), _Layer()])
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer.attn.wq(x)
        return self.head(x)


def _given(tmp_path: pathlib.Path) -> dict[str, object]:
    """Every name a marked block may be given, as a user's program would hold it."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = _Model()
    x = torch.randn(4, 8)
    (model(x).pow(2).sum() * 10).backward()  # gradient norms well above 1: the clip scales
    logged: list[tuple] = []
    return {
        "dist_clip": dist_clip,
        "torch": torch,
        "dcp": dcp,
        "model": model,
        "loss": model(x).pow(2).sum() * 10,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "clipper": dist_clip.GradClipper(max_norm=1.0),
        "body": list(model.layers.parameters()),
        "head": list(model.head.parameters()),
        "log": lambda *values: logged.append(values),
        "wandb": type("wandb", (), {"log": staticmethod(lambda *values: logged.append(values))}),
        "path": str(tmp_path / "ckpt.pt"),
        "ckpt_dir": str(tmp_path / "dcp"),
    }


def _grad_norm(model: nn.Module) -> float:
    return torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in model.parameters()])).item()


def _check_quickstart(ns: dict) -> None:
    """"total: 0-dim float32 (float64 grads: float64)", and the gradients clipped to max_norm=1.0."""
    total = ns["total"]
    assert isinstance(total, torch.Tensor) and total.dim() == 0 and total.dtype == torch.float32, total
    assert total.item() > 1.0 and _grad_norm(ns["model"]) == pytest.approx(1.0, rel=1e-5)


def _check_report(ns: dict) -> None:
    """The report's names are the model's own (README's example: ``layers.0.attn.wq.weight``)."""
    assert set(ns["result"].norms) == {n for n, _ in ns["model"].named_parameters()}
    assert "layers.0.attn.wq.weight" in ns["result"].norms


def _check_state(ns: dict) -> None:
    """"clipper.load_state_dict(...) resumes identically": from the torch.save file and from the DCP directory."""
    import torch.distributed.checkpoint as dcp

    want = ns["clipper"].state_dict()
    assert want["step"] == 1 and int(want["num_clipped"]) == 1, want
    from_file = dist_clip.GradClipper(max_norm=1.0, on_nonfinite="skip")
    from_file.load_state_dict(torch.load(ns["path"])["clipper"])
    from_dcp = dist_clip.GradClipper(max_norm=1.0, on_nonfinite="skip")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load({"clipper": from_dcp}, checkpoint_id=ns["ckpt_dir"])
    for got in (from_file.state_dict(), from_dcp.state_dict()):
        assert got.keys() == want.keys() and all(
            torch.equal(got[k], want[k]) if isinstance(want[k], torch.Tensor) else got[k] == want[k] for k in want
        ), (got, want)


_CHECKS = {"Quickstart": _check_quickstart, "A clipper with state": _check_state, "A norm report": _check_report}


def test_readme_marks_its_runnable_blocks():
    """The marker comments are found (a changed marker would leave the parametrized test below with nothing)."""
    headings = [h for h, _, _ in _blocks()]
    assert set(_CHECKS) <= set(headings), headings
    assert {"Per-parameter and per-group clipping", "Adaptive thresholds and AGC"} <= set(headings), headings


@pytest.mark.parametrize("heading,names,code", _blocks(), ids=[h for h, _, _ in _blocks()])
def test_readme_block_runs_as_written(heading, names, code, tmp_path):
    """The block runs with only the names its marker lists, then what README says of its result holds."""
    given = _given(tmp_path)
    unknown = [n for n in names if n not in given]
    assert not unknown, f"README's block under {heading!r} is given names this test does not make: {unknown}"
    ns = {n: given[n] for n in names}
    with warnings.catch_warnings():
        # DCP in one process says it assumes a single process: expected here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        exec(compile(code, f"<README.md: {heading}>", "exec"), ns)  # noqa: S102
    if heading in _CHECKS:
        _CHECKS[heading](ns)
