"""Warnings attributed to the user's line rather than to a frame inside dist_clip, torch or a wrapper library."""

from __future__ import annotations

import os
import sys
import warnings

import torch


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the user's line: the first frame outside dist_clip, torch and the wrapper
    libraries (DeepSpeed, fairscale: a warning from inside ``engine.step()`` names the line calling it). A fixed
    ``stacklevel`` pointed into torch (the entry points' ``torch.compiler.disable`` and ``no_grad`` wrappers
    stand between), so Python's default filter showed the warning once per process for every call site."""
    internal = _INTERNAL_DIRS + tuple(
        os.path.dirname(module.__file__) + os.sep
        for module in map(sys.modules.get, _WRAPPER_PACKAGES) if getattr(module, "__file__", None)
    )
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


_INTERNAL_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules[__package__]))
_WRAPPER_PACKAGES = ("deepspeed", "fairscale")  # skipped once imported (never imported for this)
