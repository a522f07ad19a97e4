"""The three-method experiment ``moefast train`` runs, as a Python function: one backbone trained
as base, MLoRA and MoE-MLoRA on the same data, each into its own subdirectory of the run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from moefast.config import GateInit, RunConfig, TowerKind, load_options
from moefast.data.dataset import MultiDomainDataset
from moefast.data.stream import StreamedDataset
from moefast.log import say
from moefast.train.loop import FitResult

__all__ = ["check_methods", "method_dir", "run_methods"]


def method_dir(out: Path, config: RunConfig, kind: TowerKind) -> Path:
    """Where method ``kind`` of a run in ``out`` trains: ``out/<method>`` when the run has several
    methods, else ``out`` itself."""
    return out / kind.value if len(config.methods) > 1 else out


def check_methods(config: RunConfig, dataset: MultiDomainDataset | StreamedDataset) -> None:
    """What :func:`run_methods` checks before any method trains (``ValueError`` otherwise): the
    MoE-MLoRA gate's own-expert start must suit the data's domains, and a streamed log must be
    partitioned by domain where a method reads one domain's rows (MoE-MLoRA's expert stages,
    single-domain batches), not found out after a backbone stage."""
    from moefast.config import BatchMode
    from moefast.nn.tower import check_specialist_start

    if isinstance(dataset, StreamedDataset):
        if config.train.batches is BatchMode.SINGLE_DOMAIN:
            dataset.check_domain_reads("single-domain batches")
        if TowerKind.MOE_MLORA in config.methods and dataset.num_domains > 1:  # one domain: no filter
            dataset.check_domain_reads("MoE-MLoRA's expert stages")
    tower = config.tower_config()
    if TowerKind.MOE_MLORA in config.methods and tower.gate_init is GateInit.SPECIALIST:
        check_specialist_start(dataset.num_domains, tower.gate_dim, tower.gate_own_weight)


def run_methods(
    config: RunConfig,
    dataset: MultiDomainDataset | StreamedDataset | None = None,
    *,
    resume: bool = False,
    after: Callable[[TowerKind, Path | None, FitResult], None] | None = None,
) -> dict[str, FitResult]:
    """Train ``config.model`` once per method of ``config.methods`` on the same data; a line per
    method on the logging channel (:mod:`moefast.log`).

    Args:
        config: the run; ``config.out`` is the run directory (``None``: no directory, the
            checkpoints live in a temporary folder), one subdirectory per method when there are
            several (:func:`method_dir`).
        dataset: the data (``None``: ``config.data`` loaded through
            :func:`moefast.config.load_options`, as the command line and the grid load it).
        resume: continue each method from its resume snapshot (``fit(resume=True)``).
        after: called with each method's kind, directory and result as soon as it finishes
            (the command line records the method's own ``config.toml`` there).

    Returns:
        Each method's :class:`~moefast.train.FitResult`, keyed by its name, in ``config.methods``'s
        order.

    Raises:
        Preempted: naming the whole run (``config.out``), not the method's subdirectory.
    """
    from moefast import models
    from moefast.runs.snapshot import Preempted
    from moefast.train.loop import fit

    if dataset is None:
        from moefast import data

        dataset = data.load(config.data.dataset, **load_options(config.data))
    check_methods(config, dataset)  # before any method trains
    tower = config.tower_config()
    out = None if config.out is None else Path(config.out)
    results: dict[str, FitResult] = {}
    for kind in config.methods:
        run_dir = None if out is None else method_dir(out, config, kind)
        model = models.build(config.model, dataset, kind, experts_per_domain=config.experts_per_domain,
                             tower_config=tower, seed=config.train.seed)
        say(f"training {config.model} / {kind.value} -> {run_dir}")
        try:
            result = fit(model, dataset, config.train, backend=config.backend, out_dir=run_dir, resume=resume)
        except Preempted as exc:
            if out is None or run_dir == out:
                raise
            # The command continues the whole run (out), not the method's subdirectory, which
            # has no config.toml of its own until the method finishes.
            raise Preempted(out, f"{exc.where} of method {kind.value}") from None
        if "distributed" in result.metrics:
            sent = result.metrics["distributed"]["bytes_per_step"]
            say(f"data-parallel on {result.metrics['distributed']['world_size']} ranks: {_size(sent['total'])} "
                f"per step per rank (dense all-reduce {_size(sent['dense'])}, embedding rows {_size(sent['sparse'])})")
        if after is not None:
            after(kind, run_dir, result)
        results[kind.value] = result
    return results


def _size(count: float) -> str:
    """Bytes as a short readable figure."""
    return f"{count / 1e6:.2f} MB" if count >= 1e5 else f"{count / 1e3:.1f} kB"
