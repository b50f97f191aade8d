"""clipped_optim: gradient clipping as an optimizer wrapper.

``ClippedOptimizer(torch.optim.AdamW(model.parameters()), max_norm=1.0)`` clips every step
(global norm, per parameter or by value), under AMP on the unscaled gradients, and records the
pre-clip norm and clip statistics in ``optimizer.state["clip"]``.
"""

from .amp_scaler import ClipGradScaler
from .config import MODES, NONFINITE_POLICIES, ClipConfig
from .diagnostics import plot_history
from .modes import ClipResult, clip_grad_norm, clip_grad_norm_per_param, clip_grad_value
from .optimizer import ClippedOptimizer

__all__ = [
    "ClippedOptimizer",
    "ClipGradScaler",
    "ClipConfig",
    "ClipResult",
    "MODES",
    "NONFINITE_POLICIES",
    "clip_grad_norm",
    "clip_grad_norm_per_param",
    "clip_grad_value",
    "plot_history",
]

__version__ = "0.1.0"
