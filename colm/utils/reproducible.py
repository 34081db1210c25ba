"""Environment that makes CPU runs give the same numbers on every x86 machine of a kind.

PyTorch and MKL pick their kernels by the processor's instruction set (AVX-512 on one machine, AVX2 on
another), and the kernels sum in different orders, so a routing decision or a greedy token can flip between
machines. Pinning both to AVX2 (which every x86-64 machine of this decade has) and to one thread gives
bit-identical runs across them. The variables are read when torch loads: set them before importing it.
"""

import os

REPRODUCIBLE_CPU_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's own vectorised kernels
    "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility (BLAS)
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN kernels
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def set_reproducible_cpu_env(environ=os.environ):
    """Sets every variable the user has not set themselves; returns the environment."""
    for key, value in REPRODUCIBLE_CPU_ENV.items():
        environ.setdefault(key, value)
    return environ
