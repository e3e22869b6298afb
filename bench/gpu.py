"""``python -m bench gpu``: the CUDA tables of ``bench core`` alone (no CPU rows), for a GPU machine's short lease.

The same rows ``python -m bench core`` prints under "CUDA": every norm order and dtype against
``torch.nn.utils.clip_grad_norm_``, the local pass against a device copy's bandwidth, 1000 small tensors, the fused
optimizer step, host syncs on the default path. Without CUDA it says "not measured".
"""

from __future__ import annotations

from .common import fail_on


def main(quick: bool = False) -> str:
    from .core import _gpu_section

    problems: list[str] = []
    return fail_on("gpu", problems, _gpu_section(quick, problems))


if __name__ == "__main__":
    import sys

    print(main(quick="--quick" in sys.argv))
