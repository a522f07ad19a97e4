"""EmbeddingCollection: every categorical field of a model in one module, one lookup call.

A drop-in for a collection of ``torch.nn.Embedding`` / ``torch.nn.EmbeddingBag``: one
``[vocab_size, dim]`` table per feature under ``tables.<name>`` (the same parameters and the same
``state_dict`` under every backend), initialised as ``torch.nn.Embedding`` does, stored in float32
or, with ``precision``, in float16 / bfloat16 (:class:`moefast.config.TablePrecision`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from moefast.config import FeatureSpec, Pooling, TablePrecision
from moefast.nn._torch_embedding import check_collection_padding, check_torch_embedding
from moefast.ops._backend import BackendLike, parse_backend
from moefast.ops.embedding import embedding_collection
from moefast.reference.embedding_optim import FusedOptimizer

__all__ = ["EmbeddingCollection", "embed_together"]


class EmbeddingCollection(nn.Module):
    """Look up all fields of a batch and concatenate them: float32 ``[B, sum of dims]``.

    Args:
        features: one :class:`FeatureSpec` per field, in output order.
        init_std: ``None`` initialises tables like ``torch.nn.Embedding`` (N(0, 1)); a float
            draws N(0, init_std) (CTR models use 1e-4, as DeepCTR-Torch does).
        backend: ``"reference"``, ``"fast"`` or ``"auto"`` (``None``: ``MOEFAST_BACKEND``, then auto).
        optimizer: a fused sparse optimizer (:class:`~moefast.ops.embedding.RowwiseAdagrad` or
            :class:`~moefast.ops.embedding.LazyAdam`) applied inside backward to the rows of the
            batch; the tables then get no ``.grad`` and must be left out of any torch optimizer.
            Its state lives in buffers ``optimizer_state.<name>.<slot>`` (saved in the state_dict).
        sparse: without a fused optimizer, give the tables sparse COO gradients (for
            ``torch.optim.SparseAdam``) instead of dense ones (for ``torch.optim.Adam``).
        precision: how the tables are stored (:class:`~moefast.config.TablePrecision`; default
            float32). Half tables are initialised in float32 and rounded to nearest once; they
            are pooled in float32, and a fused optimizer keeps float32 state and rounds updated
            rows back stochastically. Train them with a fused optimizer (a dense optimizer would
            round every row to nearest each step). :meth:`set_precision` converts later;
            ``load_state_dict`` refuses tables of another precision.

    Input of :meth:`forward`: a mapping from feature name to ids. A single-valued field is int64
    (or int32) ``[B]``; a multi-valued one is ``[B, L]`` padded on the right with id 0, which is
    never pooled (the dataset contract). Keys that are not features are ignored.
    """

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        *,
        init_std: float | None = None,
        backend: BackendLike = None,
        optimizer: FusedOptimizer | None = None,
        sparse: bool = False,
        precision: TablePrecision = TablePrecision.FP32,
    ) -> None:
        super().__init__()
        if not isinstance(precision, TablePrecision):
            raise TypeError(f"precision must be a TablePrecision, got {precision!r}")
        features = tuple(features)
        if not features:
            raise ValueError("EmbeddingCollection needs at least one feature")
        names = [f.name for f in features]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate feature names: {names}")
        if init_std is not None and (isinstance(init_std, bool) or not isinstance(init_std, int | float)
                                     or not 0 < init_std < math.inf):
            raise ValueError(f"init_std must be a finite number > 0 or None, got {init_std!r}")
        if optimizer is not None and sparse:
            raise ValueError("sparse=True asks for a gradient, but a fused optimizer consumes it")
        self._features = features
        self.backend = parse_backend(backend) if backend is not None else None
        self.optimizer = optimizer
        self.sparse = sparse
        # Data-parallel training (moefast.train.parallel.data_parallel) splits the fused call: backward
        # hands the batch's rows out as coalesced sparse gradients, the ranks exchange them,
        # and the same fused update is applied on every rank (apply_row_updates).
        self.defer_update = False
        self.tables = nn.ParameterDict()
        for spec in features:
            weight = torch.empty(spec.vocab_size, spec.dim)
            nn.init.normal_(weight, 0.0, 1.0 if init_std is None else init_std)
            self.tables[spec.name] = nn.Parameter(weight)
        self.set_precision(precision)  # a weight past fp16's range: refused, not inf
        self.optimizer_state = nn.ModuleDict()
        if optimizer is not None:
            for spec in features:
                holder = nn.Module()
                for slot, value in optimizer.init_state(self.tables[spec.name]).items():
                    holder.register_buffer(slot, value)
                self.optimizer_state[spec.name] = holder

    def set_optimizer(self, optimizer: FusedOptimizer | None) -> None:
        """Fuse ``optimizer`` into backward from now on (``None``: ordinary gradients again).

        Its state starts at zero, in buffers ``optimizer_state.<name>.<slot>``.
        """
        if optimizer is not None and self.sparse:
            raise ValueError("sparse=True asks for a gradient, but a fused optimizer consumes it")
        self.optimizer = optimizer
        self.optimizer_state = nn.ModuleDict()
        if optimizer is not None:
            for spec in self._features:
                holder = nn.Module()
                for slot, value in optimizer.init_state(self.tables[spec.name]).items():
                    holder.register_buffer(slot, value)
                self.optimizer_state[spec.name] = holder

    @property
    def precision(self) -> TablePrecision:
        """How the tables are stored (all of a collection's tables share it)."""
        dtype = next(iter(self.tables.values())).dtype
        for precision in TablePrecision:
            if precision.dtype == dtype:
                return precision
        raise ValueError(f"the tables are {dtype}, not one of the table precisions "
                         f"({', '.join(p.value for p in TablePrecision)})")

    def set_precision(self, precision: TablePrecision) -> None:
        """Convert every table to ``precision`` explicitly (round to nearest; new parameters with
        the same ``requires_grad``, so build any torch optimizer afterwards). The fused
        optimizer's float32 state is kept. A no-op when the tables already have it."""
        if not isinstance(precision, TablePrecision):
            raise TypeError(f"precision must be a TablePrecision, got {precision!r}")
        converted = {}
        for name, table in self.tables.items():
            if table.dtype != precision.dtype:
                with torch.no_grad():
                    stored = table.to(precision.dtype)
                    overflow = torch.isfinite(table) & ~torch.isfinite(stored)
                if bool(overflow.any()):
                    # fp16 ends at 65504: a finite weight past it would become inf, and training
                    # would stop at a NaN loss that names neither the table nor the value.
                    row, col = (int(i) for i in overflow.nonzero()[0])
                    raise ValueError(
                        f"table {name!r} row {row} column {col} holds {float(table.detach()[row, col])!r}, past "
                        f"{precision.value}'s largest finite value {torch.finfo(precision.dtype).max:g}: "
                        f"{int(overflow.sum())} weight(s) of it would become infinite; keep the tables in "
                        f"{'fp32 or bf16' if precision is TablePrecision.FP16 else 'fp32'} or scale the weights"
                    )
                converted[name] = nn.Parameter(stored, requires_grad=table.requires_grad)
        for name, table in converted.items():  # all or nothing: a refusal leaves every table as it was
            self.tables[name] = table

    def _load_from_state_dict(
        self, state_dict: Mapping[str, object], prefix: str, local_metadata: dict[str, object], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        # torch would copy a float32 table into a half one (or back) converting silently.
        for name, table in self.tables.items():
            theirs = state_dict.get(f"{prefix}tables.{name}")
            if isinstance(theirs, torch.Tensor) and theirs.dtype != table.dtype:
                raise ValueError(
                    f"table {prefix}tables.{name} is {theirs.dtype} in the state dict but {table.dtype} in the "
                    "model: tables load only into their own precision; convert one explicitly first "
                    "(EmbeddingCollection.set_precision, or TrainConfig.table_precision)"
                )
        # ... and an optimizer state (a float step count would be truncated, a float64 moment rounded).
        for name, holder in self.optimizer_state.items():
            for slot, buffer in holder._buffers.items():
                theirs = state_dict.get(f"{prefix}optimizer_state.{name}.{slot}")
                if isinstance(theirs, torch.Tensor) and buffer is not None and theirs.dtype != buffer.dtype:
                    raise ValueError(f"optimizer state {prefix}optimizer_state.{name}.{slot} is {theirs.dtype} in the "
                                     f"state dict but {buffer.dtype} in the model (optimizer.init_state makes it)")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def apply_row_updates(self, updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Apply the fused optimizer to tables ``name -> (rows, grads)``: unique ``rows`` (int64
        ``[U]``, ascending) with their summed gradients ``grads`` (float32 ``[U, D]``).

        One call of the same op (and so the same update code) as a fused backward: a lookup in
        which field ``t`` has ``max U`` bags, bag ``b < U_t`` holding the single id
        ``rows_t[b]`` (sum pooling; the other bags empty), whose output gradient holds
        ``grads_t`` in those bags' rows. Each row then appears once and gets ``grads_t`` as its
        summed gradient."""
        if self.optimizer is None:
            raise ValueError("apply_row_updates needs a fused optimizer (set_optimizer)")
        states = self._states()
        assert states is not None
        position = {f.name: k for k, f in enumerate(self._features)}
        self._check_row_updates(updates, position)
        chosen = [(name, rows, grads) for name, (rows, grads) in updates.items() if rows.numel() > 0]
        if not chosen:
            return
        bags = max(int(rows.numel()) for _, rows, _ in chosen)
        weights, indices, offsets, names, picked_states, blocks = [], [], [], [], [], []
        for name, rows, grads in chosen:
            count = int(rows.numel())
            weights.append(self.tables[name])
            indices.append(rows)
            offsets.append(torch.cat([torch.arange(count + 1, dtype=torch.int64, device=rows.device),
                                      torch.full((bags - count,), count, dtype=torch.int64, device=rows.device)]))
            names.append(name)
            picked_states.append(states[position[name]])
            blocks.append(torch.nn.functional.pad(grads, (0, 0, 0, bags - count)))  # [bags, D]
        with torch.enable_grad():
            out = embedding_collection(
                weights, indices, offsets, [Pooling.SUM] * len(weights), names=names,
                optimizer=self.optimizer, optimizer_states=picked_states, backend=self.backend,
            )
            out.backward(torch.cat(blocks, dim=1))

    def _check_row_updates(self, updates: object, position: Mapping[str, int]) -> None:
        """Each entry of :meth:`apply_row_updates`' ``updates`` names a table and holds int64 rows
        ``[U]`` with finite float32 gradients ``[U, dim]`` (the blocks are concatenated for one
        call of the op, which checks only their total width: a block of another width would hand
        one field's gradient columns to another). ``TypeError`` / ``ValueError`` naming the field."""
        if not isinstance(updates, Mapping):
            raise TypeError(f"apply_row_updates takes a mapping name -> (rows, grads), got {type(updates).__name__}")
        for name, pair in updates.items():
            if name not in position:
                raise ValueError(f"apply_row_updates: no table {name!r}; the tables are {sorted(position)}")
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise TypeError(f"apply_row_updates: table {name!r} takes (rows, grads), got {type(pair).__name__}")
            rows, grads = pair
            if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype != torch.int64:
                got = f"{rows.dtype} {tuple(rows.shape)}" if isinstance(rows, torch.Tensor) else type(rows).__name__
                raise TypeError(f"apply_row_updates: table {name!r}: rows must be a 1-D int64 tensor, got {got}")
            dim = self.tables[name].shape[1]
            if not isinstance(grads, torch.Tensor) or grads.dtype != torch.float32 \
                    or tuple(grads.shape) != (rows.numel(), dim):
                got = f"{grads.dtype} {tuple(grads.shape)}" if isinstance(grads, torch.Tensor) else type(grads).__name__
                raise ValueError(f"apply_row_updates: table {name!r}: grads must be float32 of shape "
                                 f"({rows.numel()}, {dim}) for its {rows.numel()} rows, got {got}")
            if not self.tables[name].requires_grad:
                raise ValueError(f"apply_row_updates: table {name!r} is frozen (requires_grad is False)")
            finite = torch.isfinite(grads).all(dim=1)
            if not bool(finite.all()):
                k = int((~finite).nonzero()[0])
                raise ValueError(f"apply_row_updates: table {name!r}: the gradient of row {int(rows[k])} is not "
                                 "finite; no table was updated")

    @property
    def features(self) -> tuple[FeatureSpec, ...]:
        return self._features

    @property
    def output_dims(self) -> list[int]:
        """The dim of each field's slice of the output, in feature order."""
        return [f.dim for f in self._features]

    def _states(self) -> list[dict[str, torch.Tensor]] | None:
        if self.optimizer is None:
            return None
        # Each holder's own buffer dict: named_buffers() (a recursive generator with a memo)
        # cost 60 us per call for 26 fields, a fifth of a 1024-row lookup.
        holders = self.optimizer_state
        return [{k: v for k, v in holders[f.name]._buffers.items() if v is not None} for f in self._features]

    def _tables(self) -> list[torch.Tensor]:
        # The ParameterDict's own dict: its __getitem__ goes through Module.__getattr__.
        params = self.tables._parameters
        return [p for p in (params[f.name] for f in self._features) if p is not None]

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """float32 ``[B, sum of dims]`` from ``features[name]`` (``[B]`` or ``[B, L]`` ids)."""
        return embed_together([self], features)[0]

    @classmethod
    def from_torch(
        cls,
        modules: Sequence[nn.Module] | Mapping[str, nn.Module],
        *,
        backend: BackendLike = None,
        optimizer: FusedOptimizer | None = None,
        sparse: bool = False,
        precision: TablePrecision = TablePrecision.FP32,
    ) -> EmbeddingCollection:
        """Convert ``torch.nn.Embedding`` / ``EmbeddingBag`` (sum or mean) modules, keeping weights.

        A mapping gives the feature names; a sequence names them ``f0, f1, ...``. The result
        takes moefast's input contract (``[B]`` ids, or ``[B, L]`` padded with id 0 for a bag)
        and computes exactly what the modules compute on it, forward and gradient: the tables
        are copies of the weights, on their device, frozen where a weight does not require grad.

        Refused, naming the module and the option (the check is shared with
        :func:`moefast.convert`): ``max_norm``, ``scale_grad_by_freq``, ``include_last_offset``,
        bag mode ``max``, a weight that is not float32, a subclass with its own ``forward``, a
        module whose ``sparse`` differs from ``sparse`` (unless a fused ``optimizer`` takes the
        gradients), an ``nn.Embedding`` with a ``padding_idx`` and an ``nn.EmbeddingBag`` whose
        ``padding_idx`` is not 0 (the contract's padding), modules on different devices.
        ``per_sample_weights`` are not part of the collection's input (use
        :class:`moefast.nn.convert.EmbeddingBag` for them). ``precision`` stores the copies in
        float16 / bfloat16 (rounded to nearest once); the result then computes what the modules
        compute on those rounded weights.
        """
        items = list(modules.items()) if isinstance(modules, Mapping) else [
            (f"f{i}", m) for i, m in enumerate(modules)
        ]
        specs: list[FeatureSpec] = []
        checked: list[tuple[str, nn.Embedding | nn.EmbeddingBag]] = []
        for name, module in items:
            label = f"EmbeddingCollection.from_torch: {name!r}"
            pooling = check_torch_embedding(module, label, sparse=None if optimizer is not None else sparse)
            assert isinstance(module, nn.Embedding | nn.EmbeddingBag)  # else check_torch_embedding raised
            check_collection_padding(module, label)
            specs.append(FeatureSpec(name, module.num_embeddings, module.embedding_dim, pooling))
            checked.append((name, module))
        devices = {module.weight.device for _, module in checked}
        if len(devices) > 1:
            raise ValueError(f"EmbeddingCollection.from_torch: the modules' weights are on several devices "
                             f"{sorted(str(d) for d in devices)}")
        out = cls(specs, backend=backend, optimizer=optimizer, sparse=sparse)
        if devices:
            out = out.to(devices.pop())
        with torch.no_grad():
            for name, module in checked:
                out.tables[name].copy_(module.weight)
                out.tables[name].requires_grad_(module.weight.requires_grad)
        out.set_precision(precision)
        return out


_FieldIds = tuple[torch.Tensor, torch.Tensor | None, int | None]


def _field_ids(spec: FeatureSpec, features: Mapping[str, torch.Tensor]) -> _FieldIds:
    """One field's flat ids, bag offsets (None for a single-valued field) and padding id, after
    checking ``features[spec.name]`` against the dataset contract."""
    if spec.name not in features:
        raise ValueError(f"missing feature {spec.name!r}; got keys {sorted(features)}")
    ids = features[spec.name]
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"feature {spec.name!r} must be a tensor, got {type(ids).__name__}")
    if not spec.multi_valued:
        if ids.dim() != 1:
            raise ValueError(f"single-valued feature {spec.name!r} must be [B], got {tuple(ids.shape)}")
        return ids, None, None
    if ids.dim() != 2:
        raise ValueError(f"multi-valued feature {spec.name!r} must be [B, L], got {tuple(ids.shape)}")
    if not ids.is_contiguous():
        raise TypeError(f"feature {spec.name!r} must be contiguous (it is never copied silently)")
    rows, width = ids.shape
    # Fixed-width bags; the padding id 0 is skipped by the op.
    offsets = (torch.arange(0, rows * width + 1, max(width, 1), dtype=ids.dtype, device=ids.device)
               if width > 0 else torch.zeros(rows + 1, dtype=ids.dtype, device=ids.device))
    return ids.view(-1), offsets, 0


def _can_share_a_call(collections: Sequence[EmbeddingCollection]) -> bool:
    first = collections[0]
    return all(
        c.backend == first.backend and c.sparse == first.sparse and c.optimizer == first.optimizer
        and c.defer_update == first.defer_update
        for c in collections[1:]
    )


def embed_together(
    collections: Sequence[EmbeddingCollection], features: Mapping[str, torch.Tensor]
) -> list[torch.Tensor]:
    """Each collection's output for the same ``features``, as ``collection(features)`` gives it.

    Collections with the same backend, sparse mode and fused optimizer are looked up in one op
    call: one pass of the engine over every table, one autograd node, each field's ids checked
    (and its bag offsets built) once. DeepFM's embeddings and first-order weights read the same ids, and a second call
    for the dim-1 weights cost as much as the first (``bench/test_bench_train.py``, ``wide``).
    """
    if not collections:
        return []
    if len(collections) > 1 and not _can_share_a_call(collections):
        return [c(features) for c in collections]
    weights: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    offsets: list[torch.Tensor | None] = []
    padding: list[int | None] = []
    poolings: list[Pooling] = []
    names: list[str] = []
    states: list[dict[str, torch.Tensor]] | None = [] if collections[0].optimizer is not None else None
    widths: list[int] = []
    # Collections over the same fields (DeepFM's embeddings and first-order weights) share
    # each field's checked ids and bag offsets: built once, passed to the op for both.
    seen: dict[tuple[str, bool], _FieldIds] = {}
    for k, collection in enumerate(collections):
        for spec in collection.features:
            key = (spec.name, spec.multi_valued)
            if key not in seen:
                seen[key] = _field_ids(spec, features)
            ids, offs, pad = seen[key]
            indices.append(ids)
            offsets.append(offs)
            padding.append(pad)
        weights += collection._tables()
        poolings += [f.pooling for f in collection.features]
        # Field names reach error messages; a second collection's are numbered to stay unique.
        names += [f.name if k == 0 else f"{f.name}#{k}" for f in collection.features]
        if states is not None:
            states += collection._states() or []
        widths.append(sum(collection.output_dims))
    first = collections[0]
    deferred = first.optimizer is not None and first.defer_update
    out = embedding_collection(
        weights,
        indices,
        offsets,
        poolings,
        padding_idx=padding,
        names=names,
        sparse=first.sparse or deferred,
        optimizer=None if deferred else first.optimizer,
        optimizer_states=None if deferred else states,
        backend=first.backend,
    )
    return list(out.split(widths, dim=1)) if len(collections) > 1 else [out]
