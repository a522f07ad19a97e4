"""The C++ tower node's build stamp: a ``moefast._tower_ops`` built for another torch is never
loaded; the Python node runs instead and says so once.

A real second torch is a multi-GB CUDA build here, so the mismatch is simulated: the running
torch's version or C++11 ABI flag is changed before moefast is imported, in a fresh process (in
this one the module is loaded already, and a loaded extension cannot be unloaded).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from moefast import _ext

NATIVE_NODE = "torch::autograd::CppNode<moefast::TowerFunction>"
pytestmark = pytest.mark.skipif(not _ext.tower_op_available(), reason="moefast._tower_ops not built")

# Runs a MoE-MLoRA tower step through the public path (Tower under ``fast``), then reports.
_PROBE = """
import sys, warnings
import torch
{patch}
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from moefast import _ext
    from moefast.config import TowerConfig, TowerKind
    from moefast.nn.tower import Tower
    config = TowerConfig(kind=TowerKind.MOE_MLORA, hidden_units=(16, 8), ranks=(2, 2), experts_per_domain=2)
    tower = Tower(24, config, 2, backend="fast")
    x = torch.randn(16, 24, requires_grad=True)
    logits = tower(x, torch.randint(0, 2, (16,)))
    logits.sum().backward()
    ok = _ext.tower_op_available()
notices = [str(w.message) for w in caught if issubclass(w.category, _ext.TowerOpWarning)]
print("loaded", "moefast._tower_ops" in sys.modules, "available", ok, "grad", x.grad is not None)
print("node", logits.grad_fn.name())
print("notices", len(notices))
print(notices[0] if notices else "")
"""


def _probe(patch: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", _PROBE.format(patch=patch)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_matching_stamp_loads_the_cpp_node_silently() -> None:
    status, node, notices, _ = _probe("")
    assert status == "loaded True available True grad True" and notices == "notices 0"
    assert node == f"node {NATIVE_NODE}", node


@pytest.mark.parametrize(
    ("patch", "says"),
    [
        ("torch.__version__ = '2.99.0+cpu'", "and this is torch 2.99.0+cpu"),
        ("torch._C._GLIBCXX_USE_CXX11_ABI = not torch._C._GLIBCXX_USE_CXX11_ABI", "C++11 ABI"),
    ],
    ids=["version", "cxx11-abi"],
)
def test_another_torch_is_refused_before_loading(patch: str, says: str) -> None:
    status, node, notices, message = _probe(patch)
    # Not imported at all (no libtorch symbol bound), the step still ran (on the Python node),
    # and one notice named the reason and the fix.
    assert status == "loaded False available False grad True", status
    assert node == "node CpuTowerFunctionBackward", node
    assert notices == "notices 1", notices
    assert "was built for torch" in message and says in message and "no-build-isolation" in message, message
    assert "the Python node runs instead" in message


def test_a_missing_stamp_is_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ext, "_modules", {k: v for k, v in _ext._modules.items() if k != "_tower_ops"})
    monkeypatch.setattr(_ext, "STAMP", "no-such-stamp.json")
    refusal = _ext.tower_op_refusal()
    assert refusal is not None and "no readable build stamp" in refusal and "no-such-stamp.json" in refusal
    monkeypatch.setattr(_ext, "_tower_op", None)
    with pytest.raises(RuntimeError, match="no readable build stamp"):
        _ext.tower_op()
