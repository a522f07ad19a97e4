"""The seeds' LoRA ``alpha`` per backbone and dataset (DESIGN.md section 2).

Rank per hidden layer is ``r = max(units // alpha, 1)``; for the tower (256, 128, 64):
alpha 4 -> (64, 32, 16), 16 -> (16, 8, 4), 32 -> (8, 4, 2), 128 -> (2, 1, 1), 256 -> (1, 1, 1).
"""

from __future__ import annotations

__all__ = ["ALPHA", "FAMILIES", "alpha_for", "dataset_family"]

FAMILIES = ("movielens", "taobao", "amazon")

# backbone -> (MovieLens, Taobao-10, Amazon-6)
ALPHA: dict[str, tuple[int, int, int]] = {
    "autoint": (4, 16, 16),
    "dcn": (16, 16, 128),
    "deepfm": (32, 256, 16),
    "fibinet": (32, 256, 16),
    "nfm": (4, 16, 256),
    "pnn": (16, 16, 16),
    "wdl": (16, 16, 16),
    "xdeepfm": (32, 16, 16),
}


def dataset_family(dataset_name: str) -> str:
    """The alpha-table column of a dataset.

    ``movielens*``, ``taobao*`` and ``amazon*`` map to their own column, and so do the synthetic
    presets that mirror them (``synthetic-taobao``, ``synthetic-movielens``). Everything else
    (``synthetic-paper``, ``synthetic-wide``) uses the MovieLens column: like MovieLens in the
    seeds, the ``paper`` preset has a few id fields of dim 8 and a handful of domains.
    """
    lowered = dataset_name.lower().removeprefix("synthetic-")
    for family in FAMILIES:
        if lowered.startswith(family):
            return family
    return "movielens"


def alpha_for(backbone: str, dataset_name: str) -> int:
    """``alpha`` for ``backbone`` on ``dataset_name``; ``ValueError`` for an unknown backbone."""
    try:
        row = ALPHA[backbone]
    except KeyError:
        raise ValueError(f"no alpha for backbone {backbone!r}; known: {', '.join(sorted(ALPHA))}") from None
    return row[FAMILIES.index(dataset_family(dataset_name))]
