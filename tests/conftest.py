"""Test-wide setup: Triton kernels run through the interpreter when there is no CUDA device.

The variable must be set before any module defining kernels is imported, so it is set here, at
collection start. On a machine with CUDA the same tests run compiled.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.use_deterministic_algorithms(False)
