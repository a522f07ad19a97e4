"""The in-memory form every data source produces (DESIGN.md section 3).

A :class:`MultiDomainDataset` holds train/val/test :class:`Split` s of the same columns:

- one integer column per categorical feature, ids in ``[0, vocab_size)``:
  single-valued fields are ``int64 [n]``; multi-valued fields are ``int64 [n, L]`` padded on
  the right with id 0, which is reserved for padding in multi-valued fields and never pooled;
- one float32 column ``[n]`` per numeric feature (``MultiDomainDataset.numeric``), finite
  (transformed and filled by the source), in the same ``features`` mapping;
- ``domain``: ``int64 [n]`` in ``[0, num_domains)``;
- ``label``: ``float32 [n]`` in ``{0, 1}``.

A dataset may also carry **pretrained tables** for some fields (``pretrained[name]``, float32
``[vocab_size, dim]``, row ``i`` the vector of id ``i``): the Taobao loader reads the vectors
shipped with the dataset, the synthetic ``taobao`` preset derives them from its latent factors.
:func:`moefast.models.build` loads them into the model's embedding tables.

All tensors live on the CPU; batches are moved to the training device by the loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from moefast.config import FeatureSpec, NumericSpec

__all__ = ["Batch", "MultiDomainDataset", "Split", "check_pretrained_table"]


@dataclass(frozen=True)
class Batch:
    """One mini-batch: ``features[name]`` is ``[B]`` or ``[B, L]`` (float32 ``[B]`` for a numeric
    field), ``domain`` ``[B]``, ``label`` ``[B]``."""

    features: Mapping[str, torch.Tensor]
    domain: torch.Tensor
    label: torch.Tensor

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            {k: v.to(device, non_blocking=True) for k, v in self.features.items()},
            self.domain.to(device, non_blocking=True),
            self.label.to(device, non_blocking=True),
        )


@dataclass(frozen=True)
class Split:
    """The rows of one split (train, val or test)."""

    features: Mapping[str, torch.Tensor]
    domain: torch.Tensor
    label: torch.Tensor

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def rows(self, index: torch.Tensor) -> Batch:
        """Gather the rows ``index`` (``int64 [B]``) into a :class:`Batch`."""
        return Batch(
            {k: v[index] for k, v in self.features.items()}, self.domain[index], self.label[index]
        )

    def domain_counts(self, num_domains: int) -> torch.Tensor:
        """``int64 [num_domains]``: rows per domain."""
        return torch.bincount(self.domain, minlength=num_domains)


def check_pretrained_table(spec: FeatureSpec | None, name: str, table: object, where: str) -> None:
    """Refuse a pretrained table that does not fit its field: ``ValueError`` naming the field,
    the expected ``[vocab_size, dim]`` and what was given (or ``TypeError`` for a non-tensor)."""
    if spec is None:
        raise ValueError(f"{where}: pretrained table for {name!r}, which is not a feature")
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"{where}: pretrained table {name!r} must be a tensor, got {type(table).__name__}")
    want = (spec.vocab_size, spec.dim)
    if table.dtype != torch.float32 or tuple(table.shape) != want:
        raise ValueError(
            f"{where}: pretrained table {name!r} must be float32 {list(want)} (vocabulary x dim), "
            f"got {table.dtype} {list(table.shape)}"
        )
    if table.numel() and not bool(torch.isfinite(table).all()):
        row = int(torch.nonzero(~torch.isfinite(table).all(dim=1))[0, 0])
        raise ValueError(f"{where}: pretrained table {name!r} has a non-finite value in row {row}")


@dataclass(frozen=True)
class MultiDomainDataset:
    """Features, domains and the three splits of one multi-domain CTR dataset."""

    name: str
    features: tuple[FeatureSpec, ...]
    domain_names: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    # Free-form provenance: generator knobs, source files, fingerprint.
    info: Mapping[str, object] = field(default_factory=dict)
    # Pretrained tables by field name: float32 [vocab_size, dim], finite.
    pretrained: Mapping[str, torch.Tensor] = field(default_factory=dict)
    # Numeric fields: float32 [n] columns in each split's features, fed to the tower (and to
    # the first-order part) of every backbone.
    numeric: tuple[NumericSpec, ...] = ()

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    def feature(self, name: str) -> FeatureSpec:
        for spec in self.features:
            if spec.name == name:
                return spec
        raise KeyError(f"dataset {self.name!r} has no feature {name!r}")

    def validate(self) -> None:
        """Check the column contract; raise ``ValueError`` naming the split, column and value."""
        if not self.domain_names:
            raise ValueError(f"dataset {self.name!r}: no domains")
        names = [f.name for f in self.features]
        numeric = [s.name for s in self.numeric]
        if len(set(names + numeric)) != len(names) + len(numeric):
            raise ValueError(f"dataset {self.name!r}: duplicate feature names {names + numeric}")
        for name, table in self.pretrained.items():
            check_pretrained_table(self.feature(name) if name in names else None, name, table,
                                   f"dataset {self.name!r}")
        for split_name, split in (("train", self.train), ("val", self.val), ("test", self.test)):
            n = len(split)
            where = f"dataset {self.name!r}, split {split_name!r}"
            if split.label.dtype != torch.float32 or split.label.dim() != 1:
                raise ValueError(f"{where}: label must be float32 [n], got {split.label.dtype} {tuple(split.label.shape)}")
            if split.domain.dtype != torch.int64 or tuple(split.domain.shape) != (n,):
                raise ValueError(f"{where}: domain must be int64 [{n}], got {split.domain.dtype} {tuple(split.domain.shape)}")
            if set(split.features) != set(names + numeric):
                raise ValueError(f"{where}: columns {sorted(split.features)} != features {sorted(names + numeric)}")
            for name in numeric:
                col = split.features[name]
                if col.dtype != torch.float32 or tuple(col.shape) != (n,):
                    raise ValueError(f"{where}: numeric feature {name!r} must be float32 [{n}], "
                                     f"got {col.dtype} {tuple(col.shape)}")
                if n and not bool(torch.isfinite(col).all()):
                    row = int(torch.nonzero(~torch.isfinite(col))[0, 0])
                    raise ValueError(f"{where}: numeric feature {name!r} is not finite in row {row}: {col[row].item()}")
            if n == 0:
                continue
            bad = split.label[(split.label != 0) & (split.label != 1)]
            if bad.numel():
                raise ValueError(f"{where}: label {bad[0].item()} outside {{0, 1}}")
            lo, hi = int(split.domain.min()), int(split.domain.max())
            if lo < 0 or hi >= self.num_domains:
                raise ValueError(f"{where}: domain id {lo if lo < 0 else hi} outside [0, {self.num_domains})")
            for spec in self.features:
                col = split.features[spec.name]
                want_dim = 2 if spec.multi_valued else 1
                if col.dtype != torch.int64 or col.dim() != want_dim or col.shape[0] != n:
                    raise ValueError(
                        f"{where}: feature {spec.name!r} must be int64 with {want_dim} dims and {n} rows, "
                        f"got {col.dtype} {tuple(col.shape)}"
                    )
                if col.numel():
                    cmin, cmax = int(col.min()), int(col.max())
                    if cmin < 0 or cmax >= spec.vocab_size:
                        raise ValueError(
                            f"{where}: feature {spec.name!r} id {cmin if cmin < 0 else cmax} "
                            f"outside [0, {spec.vocab_size})"
                        )
