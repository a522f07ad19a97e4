"""Backend resolution order and errors (DESIGN.md section 4)."""

from __future__ import annotations

import re

import pytest

from moefast.ops._backend import (
    ENV_VAR,
    Backend,
    BackendUnavailableError,
    parse_backend,
    resolve_backend,
)


def test_order_explicit_then_module_then_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "reference")
    assert resolve_backend("op", None) is Backend.REFERENCE  # env beats auto
    assert resolve_backend("op", None, module_default="fast") is Backend.FAST
    assert resolve_backend("op", None, explicit="reference", module_default="fast") is Backend.REFERENCE
    monkeypatch.delenv(ENV_VAR)
    assert resolve_backend("op", None) is Backend.FAST  # auto, fast applies
    assert resolve_backend("op", "no CUDA") is Backend.REFERENCE  # auto, fast does not apply


def test_explicit_fast_never_falls_back() -> None:
    with pytest.raises(BackendUnavailableError, match=r"my_op.*no CUDA"):
        resolve_backend("my_op", "no CUDA", explicit=Backend.FAST)


@pytest.mark.parametrize("bad", ["gpu", "", "Fastest"])
def test_bad_names(bad: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        parse_backend(bad)
    monkeypatch.setenv(ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_backend("op", None)
