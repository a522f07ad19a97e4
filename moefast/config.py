"""Frozen configuration dataclasses shared by data, models, training and the CLI."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["FeatureSpec", "Pooling"]


class Pooling(enum.Enum):
    """How a field's ids become one vector per sample.

    ``NONE`` is a single-valued field (exactly one id per sample, a plain gather); ``SUM`` and
    ``MEAN`` pool a multi-valued field's bag of ids (an empty bag gives a zero vector).
    """

    NONE = "none"
    SUM = "sum"
    MEAN = "mean"


@dataclass(frozen=True)
class FeatureSpec:
    """One categorical field: its name, vocabulary size, embedding dim and pooling.

    Ids are contiguous in ``[0, vocab_size)``; id 0 is reserved for unknown/padding where a
    source needs one.
    """

    name: str
    vocab_size: int
    dim: int
    pooling: Pooling = Pooling.NONE

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("FeatureSpec.name must be a non-empty string")
        if self.vocab_size < 1:
            raise ValueError(f"feature {self.name!r}: vocab_size must be >= 1, got {self.vocab_size}")
        if self.dim < 1:
            raise ValueError(f"feature {self.name!r}: dim must be >= 1, got {self.dim}")
        if not isinstance(self.pooling, Pooling):
            raise TypeError(f"feature {self.name!r}: pooling must be a Pooling, got {self.pooling!r}")

    @property
    def multi_valued(self) -> bool:
        return self.pooling is not Pooling.NONE
