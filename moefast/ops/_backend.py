"""Backend resolution shared by every op (DESIGN.md section 4).

Order: explicit argument > module attribute > ``MOEFAST_BACKEND`` environment variable > auto.
``auto`` picks the fast implementation only where it applies; an explicit ``fast`` request that
cannot be served raises :class:`BackendUnavailableError` saying why. Nothing falls back silently.
"""

from __future__ import annotations

import enum
import os

__all__ = ["ENV_VAR", "Backend", "BackendUnavailableError", "parse_backend", "resolve_backend"]

ENV_VAR = "MOEFAST_BACKEND"


class Backend(enum.Enum):
    REFERENCE = "reference"
    FAST = "fast"
    AUTO = "auto"


class BackendUnavailableError(RuntimeError):
    """An explicit ``fast`` request that this op cannot serve for these inputs."""


BackendLike = Backend | str | None


def parse_backend(value: Backend | str) -> Backend:
    """``Backend`` from an enum member or its name; ``ValueError`` naming a bad value."""
    if isinstance(value, Backend):
        return value
    if isinstance(value, str):
        try:
            return Backend(value.strip().lower())
        except ValueError:
            pass
    choices = ", ".join(b.value for b in Backend)
    raise ValueError(f"unknown backend {value!r}; choose one of {choices}")


def requested_backend(explicit: BackendLike = None, module_default: BackendLike = None) -> Backend:
    """The backend asked for, before checking what applies."""
    for value in (explicit, module_default):
        if value is not None:
            return parse_backend(value)
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return parse_backend(env)
        except ValueError as exc:
            raise ValueError(f"{ENV_VAR}: {exc}") from None
    return Backend.AUTO


def resolve_backend(
    op: str,
    why_not_fast: str | None,
    explicit: BackendLike = None,
    module_default: BackendLike = None,
) -> Backend:
    """Resolve to ``REFERENCE`` or ``FAST`` for one call of ``op``.

    ``why_not_fast`` is ``None`` when the fast implementation can serve these inputs, else the
    reason it cannot (shown to the user on an explicit ``fast`` request).
    """
    wanted = requested_backend(explicit, module_default)
    if wanted is Backend.REFERENCE:
        return Backend.REFERENCE
    if why_not_fast is None:
        return Backend.FAST
    if wanted is Backend.FAST:
        raise BackendUnavailableError(f"{op}: the fast backend cannot serve this call: {why_not_fast}")
    return Backend.REFERENCE
