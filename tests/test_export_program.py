"""The exported program: ``torch.export`` of the merged model, loaded where moefast cannot be
imported, at batch 1, 64 and 4096, gives the trained model's scores.

Three representative backbones: DeepFM (first-order weights and FM, on single-, sum- and
mean-pooled fields and two numeric fields), DCN (cross network) and AutoInt (attention). The subprocess blocks every
``moefast`` import before loading anything, so the program must stand on torch alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_export import _pooled_dataset, randomise, rel_diff

from moefast import models
from moefast.config import TowerConfig
from moefast.data import MultiDomainDataset, load
from moefast.export import export_program, merge

REL = 1e-5
BATCHES = (1, 64, 4096)

# Loads programs and inputs saved by the test, with every moefast import refused.
LOADER = r"""
import importlib.abc, sys

class NoMoefast(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "moefast" or name.startswith("moefast."):
            raise ImportError(f"moefast is not installed here ({name})")
        return None

sys.meta_path.insert(0, NoMoefast())
try:
    import moefast  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("moefast could be imported")
import torch

cases = torch.load(sys.argv[1], weights_only=True)
outputs = {}
for program_path, calls in cases.items():
    program = torch.export.load(program_path).module()
    outputs[program_path] = [program(*args) for args in calls]
    assert not any(m.startswith("moefast") for m in sys.modules)
torch.save(outputs, sys.argv[2])
"""

# Small shapes gain nothing from a second thread; on a loaded 2-core machine the hand-offs cost
# up to 30x the work (the fixture is in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread_module")


def _random_inputs(
    dataset: MultiDomainDataset, rows: int, bag: int, seed: int
) -> tuple[dict[str, torch.Tensor], tuple[object, ...], torch.Tensor]:
    """The model's ``features`` for ``rows`` rows of random valid ids (multi-valued fields
    ``bag`` wide, some padding) and numeric values, the program's arguments for the same, and
    the domains."""
    g = torch.Generator().manual_seed(seed)
    ids = {}
    for f in dataset.features:
        shape = (rows, bag) if f.multi_valued else (rows,)
        ids[f.name] = torch.randint(0, f.vocab_size, shape, generator=g)
    domain = torch.randint(0, dataset.num_domains, (rows,), generator=g)
    if not dataset.numeric:
        return ids, (ids, domain), domain
    numeric = torch.randn(rows, len(dataset.numeric), generator=g)  # [B, n]
    features = {**ids, **{s.name: numeric[:, k] for k, s in enumerate(dataset.numeric)}}
    return features, (ids, numeric, domain), domain


def test_the_program_serves_without_moefast(tmp_path: Path) -> None:
    paper = load("synthetic", preset="paper", rows=1500, num_domains=3, num_users=80, num_items=40)
    small = TowerConfig(hidden_units=(64, 32, 16))
    cases = [("deepfm", _pooled_dataset(), "moe-mlora", 2), ("dcn", paper, "mlora", 1),
             ("autoint", paper, "moe-mlora", 1)]
    saved: dict[str, list[tuple[object, ...]]] = {}
    expected: dict[str, list[torch.Tensor]] = {}
    for k, (name, dataset, kind, experts) in enumerate(cases):
        model = randomise(models.build(name, dataset, kind, experts_per_domain=experts, seed=k,
                                       tower_config=small))
        path = tmp_path / f"{name}.pt2"
        payload = export_program(merge(model, backend="reference"), path)
        meta = json.loads((tmp_path / f"{name}.pt2.json").read_text())
        assert meta == json.loads(json.dumps(payload))
        assert meta["torch_version"] == torch.__version__
        assert [i["name"] for i in meta["inputs"]] == ["ids", *(["numeric"] if dataset.numeric else []), "domain"]
        assert meta["output"]["name"] == "logit"
        saved[str(path)], expected[str(path)] = [], []
        for rows in BATCHES:
            # The bag width changes between calls too (a dynamic dimension of its own).
            features, args, domain = _random_inputs(dataset, rows, bag=3 + rows % 5, seed=rows)
            saved[str(path)].append(args)
            with torch.no_grad():
                expected[str(path)].append(model(features, domain))
    torch.save(saved, tmp_path / "inputs.pt")
    done = subprocess.run([sys.executable, "-I", "-c", LOADER, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = torch.load(tmp_path / "out.pt", weights_only=True)
    for path, wanted in expected.items():
        for rows, got, want in zip(BATCHES, outputs[path], wanted, strict=True):
            assert got.shape == (rows,) and got.dtype == torch.float32
            assert rel_diff(got, want) <= REL, (path, rows)


def test_export_refuses_a_wrong_suffix(tmp_path: Path) -> None:
    dataset = _pooled_dataset()
    merged = merge(models.build("wdl", dataset, "mlora", tower_config=TowerConfig(hidden_units=(8,))))
    with pytest.raises(ValueError, match=r"\.pt2"):
        export_program(merged, tmp_path / "model.onnx")


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_a_program_keeps_half_tables_and_computes_in_float32(tmp_path: Path, name: str) -> None:
    """``moefast export --table-precision fp16|bf16``: the program stores the run's half tables,
    converts each looked-up row to float32 and scores as the model does (every backbone, so that
    no interaction part receives half-precision inputs; the two half types alternate). Once the
    lookups passed half rows on: the export, or the program, failed on a dtype mismatch."""
    from moefast.config import TablePrecision
    from moefast.nn.embedding import EmbeddingCollection

    odd = sorted(models.MODELS).index(name) % 2 == 1
    precision = TablePrecision.BF16 if odd else TablePrecision.FP16
    # Pooled bags with numeric fields, or single-valued fields alone (where nothing numeric is
    # concatenated to the lookups that could promote them to float32).
    dataset = _pooled_dataset() if odd else load("synthetic", preset="paper", rows=300, num_domains=3,
                                                  num_users=80, num_items=40)
    model = randomise(models.build(name, dataset, "mlora", tower_config=TowerConfig(hidden_units=(16,))))
    for module in model.modules():
        if isinstance(module, EmbeddingCollection):
            module.set_precision(precision)
    path = tmp_path / f"{name}.pt2"
    payload = export_program(merge(model, backend="reference"), path)
    assert payload["table_precision"] == precision.value
    program = torch.export.load(str(path)).module()
    tables = [t for k, t in program.state_dict().items() if ".tables." in k]
    assert tables and all(t.dtype == precision.dtype for t in tables)
    features, args, domain = _random_inputs(dataset, 64, bag=4, seed=1)
    with torch.no_grad():
        got, want = program(*args), model(features, domain)
    assert got.dtype == torch.float32 and rel_diff(got, want) <= REL
