"""stdet: faster training of learned image compression models (STDET embedding + SMA averaging).

The fused ops live in `stdet_kernels`; this package holds everything above them.
"""

from .config import STDETConfig
from .modes import ModeFit, OnlineRefit, fit_modes
from .parametrize import attach, embeddable_parameters, embedding_state, export_state_dict
from .schedule import STDET
from .sma import SMA
from .trajectory import TrajectoryRecorder

__version__ = "0.1.0"

__all__ = [
    "SMA",
    "STDET",
    "ModeFit",
    "OnlineRefit",
    "STDETConfig",
    "TrajectoryRecorder",
    "attach",
    "embeddable_parameters",
    "embedding_state",
    "export_state_dict",
    "fit_modes",
]
