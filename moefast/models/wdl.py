"""Wide & Deep: a wide (first-order) part + the DNN tower (Cheng et al., 2016)."""

from __future__ import annotations

from moefast.models.base import CTRModel, register

__all__ = ["WDL"]


@register("wdl")
class WDL(CTRModel):
    """``logit = wide + tower(e)``. As in the seeds' code, the wide part reads the same sparse
    fields as the deep part (no hand-made cross features). The wide part is the base class's
    first-order weights; there is no other interaction."""

    first_order = True
