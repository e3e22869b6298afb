"""dist_clip: exact gradient-norm clipping for sharded and replicated gradients, in one collective."""

from __future__ import annotations

from .adaptive import AGC, AutoClip, ZClip
from .clip import clip_grad_norm_, clip_grads_with_norm_, get_total_norm
from .clipper import ClipperConfig, ClipResult, GradClipper, skip_next_step_
from .compose import ParallelPlan, Rule
from .shards import Shards

__version__ = "0.1.0"

__all__ = ["Shards", "__version__", "clip_grad_norm_", "clip_grads_with_norm_", "get_total_norm",
           "AGC", "AutoClip", "ClipResult", "ClipperConfig", "GradClipper", "ParallelPlan", "Rule", "ZClip",
           "skip_next_step_"]
