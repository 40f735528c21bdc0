"""stdet_kernels: the op layer of stdet.

Fused STDET reconstruction (``w = value | b | a * refs[code] + b``), its backward, the reconstruction
fused with the SMA moving-average update, and a multi-tensor moving average, each with four backends
(cuda, triton, cpp, torch) behind `torch.library` ops. See METHOD.md, "Notation", for the contract.
"""

from . import reference
from .backends import (
    BACKENDS,
    available_backends,
    last_backend,
    record_calls,
    unavailable_reasons,
    use_backend,
)
from .compact import (
    COMPACT_BLOCK,
    compact_offsets,
    pack,
    reconstruct_compact,
    reconstruct_compact_backward_sensitivity_,
    reconstruct_compact_pieces,
    reconstruct_compact_sma_,
    sensitivity_update_,
    unpack,
)
from .ops import RefitSnapshot, lerp_, reconstruct, reconstruct_sma_, refit_update_
from .reference import DUMMY, FREE

__all__ = [
    "BACKENDS",
    "COMPACT_BLOCK",
    "DUMMY",
    "FREE",
    "RefitSnapshot",
    "available_backends",
    "compact_offsets",
    "last_backend",
    "lerp_",
    "pack",
    "reconstruct",
    "reconstruct_compact",
    "reconstruct_compact_backward_sensitivity_",
    "reconstruct_compact_pieces",
    "reconstruct_compact_sma_",
    "reconstruct_sma_",
    "record_calls",
    "reference",
    "refit_update_",
    "sensitivity_update_",
    "unavailable_reasons",
    "unpack",
    "use_backend",
]
