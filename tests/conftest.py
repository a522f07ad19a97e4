"""Test-wide setup: Triton kernels run through the interpreter when there is no CUDA device.

The variable must be set before any module defining kernels is imported, so it is set here, at
collection start. On a machine with CUDA the same tests run compiled.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.use_deterministic_algorithms(False)


@pytest.fixture
def lookup_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the embedding op calls made by ``moefast.nn`` modules: one entry per call, the
    number of fields (tables) it looked up."""
    from moefast.nn import embedding as nn_embedding

    calls: list[int] = []
    real = nn_embedding.embedding_collection

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(nn_embedding, "embedding_collection", counting)
    return calls


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for a test (bitwise results hold at a fixed thread count), restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """One torch thread for a whole test module, restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
