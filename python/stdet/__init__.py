"""stdet: faster training of learned image compression models (STDET embedding + SMA averaging).

The fused ops live in `stdet_kernels`; this package holds everything above them.
"""

__version__ = "0.1.0"
