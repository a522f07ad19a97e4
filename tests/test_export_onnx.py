"""ONNX export (optional: moefast does not depend on onnx / onnxscript / onnxruntime).

Skipped unless all three are importable; where they are, the ONNX model run by onnxruntime gives
the trained model's logits at batch 1, 64 and 4096 (pooled and numeric fields included).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from test_export import _pooled_dataset, randomise, rel_diff

from moefast import models
from moefast.config import TowerConfig
from moefast.export import export_onnx, merge

needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="onnx, onnxscript and onnxruntime are optional and not installed",
)


@needs_onnx
def test_onnx_matches_the_model(tmp_path: Path) -> None:
    import onnxruntime

    dataset = _pooled_dataset()
    model = randomise(models.build("deepfm", dataset, "moe-mlora", seed=3,
                                   tower_config=TowerConfig(hidden_units=(32, 16))))
    path = export_onnx(merge(model, backend="reference"), tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(path))
    names = [i.name for i in session.get_inputs()]
    assert names == ["ids_user", "ids_tags", "ids_genres", "numeric", "domain"]
    for rows in (1, 64, 4096):
        g = torch.Generator().manual_seed(rows)
        ids = {f.name: torch.randint(0, f.vocab_size, (rows, 4) if f.multi_valued else (rows,), generator=g)
               for f in dataset.features}
        numeric = torch.randn(rows, 2, generator=g)
        domain = torch.randint(0, dataset.num_domains, (rows,), generator=g)
        feed = {f"ids_{k}": v.numpy() for k, v in ids.items()} | {"numeric": numeric.numpy(), "domain": domain.numpy()}
        got = torch.from_numpy(session.run(None, feed)[0])
        with torch.no_grad():
            want = model({**ids, "price": numeric[:, 0], "age": numeric[:, 1]}, domain)
        assert rel_diff(got, want) <= 1e-5


def test_a_wrong_suffix_is_refused(tmp_path: Path) -> None:
    merged = merge(models.build("wdl", _pooled_dataset(), "mlora", tower_config=TowerConfig(hidden_units=(8,))))
    with pytest.raises(ValueError, match=r"\.onnx file"):
        export_onnx(merged, tmp_path / "model.pt2")
