"""The synthetic multi-domain CTR generator: the embedded default dataset (no download).

Generative model
----------------
Everything is drawn from ``numpy.random.Generator`` streams spawned from one ``seed``: the
*truth* (latent parameters) from one stream, the *rows* from another, so the same seed gives
the same truth whatever the number of rows. With ``D`` domains, ``U`` users, ``I`` items and a
latent dimension ``k``:

- truth: user factors ``p_u ~ N(0, I_k)``, item factors ``q_i ~ N(0, I_k)``, user and item
  biases ``b_u, b_i ~ N(0, bias_scale^2)``, domain biases ``b_d ~ N(0, domain_bias_scale^2)``, and
  per domain ``r = domain_rank`` pairs of taste directions ``a_dj, b_dj ~ N(0, I_k / k)``;
- a row: its domain ``d ~ Categorical(pi)`` with ``pi_d ∝ (d + 1)^-imbalance`` (``imbalance=0``
  gives equal domains, larger values a long tail of small domains), its user and item drawn
  with Zipf popularity ``P(rank r) ∝ r^-popularity`` over a random permutation of the ids;
- the click logit

      z = mu + b_d + b_u + b_i + s * (sqrt(1 - λ²) * p_u·q_i / sqrt(k) + λ * g_d(u, i)) + context
      g_d(u, i) = sum_j (|x_dj| - sqrt(2/π)) / sqrt(r (1 - 2/π)),  x_dj = (a_dj·p_u + b_dj·q_i) / sqrt(2)

  with ``λ = diversity`` in [0, 1] and ``s = interaction_scale``; the label is
  ``y ~ Bernoulli(sigmoid(z))``, so even the true logit has a bounded AUC.

Both interaction terms have unit variance, so ``diversity`` changes *how the click function is
shared*, not how much signal there is: a domain's interaction correlates with the shared one by
``sqrt(1 - λ²)``. At ``λ = 0`` all domains share one click function (up to the bias ``b_d``,
which a domain embedding captures), so domain-specific adapters have nothing to add. As ``λ``
grows, each domain rewards users and items that sit far out along its own taste directions of
the same shared factors. ``|x|`` has no linear part, so no sum of pairwise terms (user-item,
user-domain, item-domain: what a factorisation machine models) reproduces ``g_d``; a model needs
a domain-specific projection of the user and item vectors followed by a non-linearity, which a
per-domain low-rank adapter on a ReLU tower provides directly and a shared tower must emulate.
Users and items are shared by all domains.

Pretrained tables (the ``taobao`` preset; ``pretrained_noise`` not ``None``): like Taobao's
shipped vectors, each user's and item's table row is a noisy fixed random projection of what
the generator knows about it, ``e_u = [p_u, b_u / bias_scale] P_user + ε``,
``e_i = [q_i, b_i / bias_scale] P_item + ε``, with ``P ~ N(0, 1 / (k + 1))`` of shape
``[k + 1, embedding_dim]`` (so each coordinate has about unit variance) and
``ε ~ N(0, pretrained_noise²)`` per coordinate. They are drawn from a third stream of the seed,
so they change neither the truth nor the rows. The noise level is the knob: 0 gives a perfect
(linear) encoding of the factors, larger values bury it.

``context`` (the ``wide`` preset only): every extra field ``f`` has per-id effects
``w_f[id] ~ N(0, context_scale^2 / F)``; a single-valued field adds ``w_f[id]``, a multi-valued
field the mean of its bag's effects (an empty bag adds 0). Context ids are Zipf distributed and
independent of the user, item and domain.

Numeric fields (``numeric_fields = F_x``, 0 in every preset): ``x1 .. x{F_x}``, float32 values
``x_f ~ N(0, 1)`` per row, with true weights ``w_f ~ N(0, numeric_scale^2 / F_x)`` adding
``sum_f w_f x_f`` to the logit: real signal, which a model that ignores them cannot recover.
Their weights are drawn after every other part of the truth and their values after every other
column of the rows, so ``numeric_fields = 0`` gives exactly the dataset it always gave.

Related domains (``clusters = K``, ``cluster_spread = rho``; off by default): without them every
domain's taste directions are an independent draw, so once the shared part is removed two
domains' effects are unrelated and a gate has nothing to share. With them, domain ``d`` belongs
to cluster ``c(d) = d % K`` (:func:`domain_clusters`) and its directions are

    a_dj = sqrt(1 - rho²) * A_c(d)j + rho * a°_dj,    b_dj = sqrt(1 - rho²) * B_c(d)j + rho * b°_dj

where ``a°, b°`` are the independent draws above (unchanged) and the prototypes ``A_cj, B_cj ~
N(0, I_k / k)`` come from a fourth stream of the seed. Prototype and own draw are independent
with the same law, so each domain's directions keep their law ``N(0, I_k / k)``: ``g_d`` keeps
its unit variance, its rank ``r`` and its form, ``diversity`` keeps its meaning, and a domain
alone is indistinguishable from today's. Only the dependence between domains changes: two
domains of one cluster have directions correlated by ``1 - rho²`` (0 at ``rho = 1``, identical
at ``rho → 0``), domains of different clusters stay independent. The mixture is of the
directions, not of the functions ``g``: a mixture of two ``g`` would need ``2r`` directions and
change the family a rank-``r`` adapter models. Because ``|x|`` is even, ``g``'s correlation
grows slower than the directions' (about ``(sqrt(1 - c²) + c arcsin c - 1) / (π/2 - 1)`` for
directions correlated by ``c``); :func:`domain_effect_correlations` measures it. With
``clusters`` unset or ``cluster_spread = 1`` nothing is drawn from the fourth stream, and the
data and the truth are bit-identical to the generator without the knobs.

Presets
-------
``paper``: features ``uid``, ``item``, ``domain`` (the domain id is also an input, like the
seeds'), embedding dim 8, 200,000 rows, 10 domains, 300 users, 150 items: vocabularies small
enough that the signal is learnable from ids within a few epochs (see ``num_users``). ``wide``: the throughput workload: 26 fields
(uid 2,000,000, item 1,000,000, domain, 20 single-valued context fields with vocabularies
log-spaced from 10 to 1,000,000, 3 multi-valued fields of up to 8 ids), embedding dim 16,
1,000,000 rows.

The presets that mirror the paper's datasets (DESIGN.md section 9; their choices were fixed
before any claims result, ``docs/results/claims.md``):

- ``taobao`` (Taobao-10/20/30): pretrained, frozen user and item tables (noise 0.3), 20 domains
  by default (10 and 30 via ``num_domains``), high diversity (0.8), 2,000 users and 1,000 items
  (too many to learn from ids within the epoch cap, which is why Taobao ships vectors),
  imbalance 0.5 (the smallest of 20 domains holds about 2.9% of the rows, about 2,900 of
  100,000), 100,000 rows (200,000 in the claims), embedding dim 8 (the paper's is 128; 8 keeps the claims grid within 2 CPU cores),
  ranks from the alpha table's Taobao column.
- ``movielens`` (MovieLens-1M by gender, age, occupation: 2, 7 or 21 domains): learned tables,
  low diversity (0.2), 7 domains by default, otherwise the ``paper`` preset.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
import torch

from moefast.config import FeatureSpec, NumericSpec, Pooling
from moefast.data.dataset import MultiDomainDataset
from moefast.data.splits import SPLIT_SEED, make_splits

__all__ = ["MAX_COUNT", "PRESETS", "EffectCorrelations", "SyntheticConfig", "SyntheticTruth", "domain_clusters",
           "domain_effect_correlations", "generate", "ground_truth", "preset", "pretrained_tables"]

# The largest row, domain, user or item count the generator takes (2^31 - 1).
MAX_COUNT = 2**31 - 1


@dataclass(frozen=True)
class SyntheticConfig:
    """Every knob of the generator (see the module docstring for the model)."""

    name: str = "paper"
    seed: int = 123
    split_seed: int = SPLIT_SEED
    rows: int = 200_000
    num_domains: int = 10
    # Small on purpose: the models learn users and items from their ids alone, at Adam lr 1e-3,
    # batch 1024 and embeddings initialised at std 1e-4. Measured with DeepFM on 200,000 rows:
    # with 2,000 users and 1,000 items no tower learned the interaction within 10 epochs (test
    # WAUC 0.626 for base, MLoRA and MoE-MLoRA alike at diversity 0, oracle 0.84); with 300 and
    # 150, base reached 0.763 in 15 epochs at diversity 0 (oracle 0.81).
    num_users: int = 300
    num_items: int = 150
    embedding_dim: int = 8
    latent_dim: int = 4
    # r: the number of domain-specific taste directions per domain.
    domain_rank: int = 2
    # λ: how far each domain's click function departs from the shared one (0 = identical).
    diversity: float = 0.8
    # Exponent of the domain-size power law (0 = equal domain sizes).
    imbalance: float = 1.0
    # Zipf exponent of id popularity (users, items, context fields).
    popularity: float = 0.8
    interaction_scale: float = 1.5
    bias_scale: float = 0.5
    domain_bias_scale: float = 0.5
    # mu: sets the overall click rate (sigmoid(-1.2) ≈ 0.23 before the other terms).
    global_bias: float = -1.2
    # wide preset: extra single-valued and multi-valued context fields.
    context_fields: int = 0
    context_vocab_min: int = 10
    context_vocab_max: int = 1_000_000
    multi_fields: int = 0
    multi_vocab_min: int = 1_000
    multi_vocab_max: int = 100_000
    multi_length: int = 8
    context_scale: float = 0.5
    # Numeric (dense) fields x1..xF with a linear effect on the logit of total std numeric_scale.
    numeric_fields: int = 0
    numeric_scale: float = 1.0
    # Std of the noise on the pretrained user and item tables; None: no pretrained tables.
    pretrained_noise: float | None = None
    # Related domains (see the module docstring): K, the number of clusters the domains' taste
    # directions are drawn around (None: no clusters), and rho, how far each domain sits from
    # its cluster's prototype (1 = independent of it: today's data; smaller = closer).
    clusters: int | None = None
    cluster_spread: float = 1.0

    def __post_init__(self) -> None:
        positive = ("rows", "num_domains", "num_users", "num_items", "embedding_dim", "latent_dim",
                    "domain_rank")
        for knob in positive:
            value = getattr(self, knob)
            # The cap: the generator draws with int32-sized counts, and a row count past it is
            # terabytes in memory (a number past int64 once ended in an OverflowError traceback).
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_COUNT:
                raise ValueError(f"synthetic knob {knob} must be a positive int at most {MAX_COUNT:,}, got {value!r}")
        for knob in ("context_fields", "multi_fields", "numeric_fields"):
            value = getattr(self, knob)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"synthetic knob {knob} must be a non-negative int, got {value!r}")
        if isinstance(self.diversity, bool) or not isinstance(self.diversity, int | float) \
                or not 0.0 <= self.diversity <= 1.0:
            raise ValueError(f"synthetic knob diversity must be in [0, 1], got {self.diversity!r}")
        for knob in ("imbalance", "popularity", "interaction_scale", "bias_scale",
                     "domain_bias_scale", "context_scale", "numeric_scale"):
            value = getattr(self, knob)
            # NaN passes "value < 0"; inf would make every logit infinite.
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"synthetic knob {knob} must be a finite non-negative number, got {value!r}")
        if self.pretrained_noise is not None and (
            isinstance(self.pretrained_noise, bool) or not isinstance(self.pretrained_noise, int | float)
            or not 0 <= self.pretrained_noise < math.inf
        ):
            raise ValueError(
                f"synthetic knob pretrained_noise must be None or a finite number >= 0, got {self.pretrained_noise!r}"
            )
        if self.clusters is not None and (
            not isinstance(self.clusters, int) or isinstance(self.clusters, bool)
            or not 1 <= self.clusters <= self.num_domains
        ):
            raise ValueError(f"synthetic knob clusters must be None or a whole number from 1 to num_domains "
                             f"({self.num_domains}), got {self.clusters!r}")
        if isinstance(self.cluster_spread, bool) or not isinstance(self.cluster_spread, int | float) \
                or not 0.0 < self.cluster_spread <= 1.0:
            raise ValueError(f"synthetic knob cluster_spread must be in (0, 1], got {self.cluster_spread!r}")
        if self.cluster_spread < 1.0 and self.clusters is None:
            raise ValueError(f"synthetic knob cluster_spread {self.cluster_spread!r} needs clusters (the number "
                             "of prototypes the domains are drawn around)")
        if self.context_fields and not 2 <= self.context_vocab_min <= self.context_vocab_max:
            raise ValueError(
                f"synthetic context vocabularies must satisfy 2 <= min <= max, got "
                f"{self.context_vocab_min}..{self.context_vocab_max}"
            )
        if self.multi_fields and (not 2 <= self.multi_vocab_min <= self.multi_vocab_max or self.multi_length < 1):
            raise ValueError(
                f"synthetic multi-valued fields need 2 <= vocab min <= max and length >= 1, got "
                f"{self.multi_vocab_min}..{self.multi_vocab_max}, length {self.multi_length}"
            )

    def context_vocabs(self) -> list[int]:
        """Vocabulary sizes of the single-valued context fields, log-spaced min..max."""
        return _log_spaced(self.context_vocab_min, self.context_vocab_max, self.context_fields)

    def multi_vocabs(self) -> list[int]:
        """Vocabulary sizes (id 0 = padding included) of the multi-valued fields."""
        return _log_spaced(self.multi_vocab_min, self.multi_vocab_max, self.multi_fields)


PRESETS: dict[str, SyntheticConfig] = {
    "paper": SyntheticConfig(),
    "wide": SyntheticConfig(
        name="wide",
        rows=1_000_000,
        num_users=2_000_000,
        num_items=1_000_000,
        embedding_dim=16,
        context_fields=20,
        multi_fields=3,
    ),
    "taobao": SyntheticConfig(
        name="taobao",
        # Half of the other presets' rows: the default `moefast train` (this preset, three methods
        # with converged stages) then ends in about 2 minutes on 2 cores (issue 24); the claims
        # run it at 200,000 (CLAIMS_ROWS in moefast.experiments.claims).
        rows=100_000,
        num_domains=20,
        num_users=2000,
        num_items=1000,
        diversity=0.8,
        imbalance=0.5,
        pretrained_noise=0.3,
    ),
    "movielens": SyntheticConfig(name="movielens", num_domains=7, diversity=0.2),
}


def preset(name: str, **overrides: object) -> SyntheticConfig:
    """The preset ``name`` with knobs replaced by ``overrides``; unknown names raise ``ValueError``."""
    if name not in PRESETS:
        raise ValueError(f"unknown synthetic preset {name!r}; choose one of {sorted(PRESETS)}")
    known = {f.name for f in dataclasses.fields(SyntheticConfig)} - {"name"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown synthetic option(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(PRESETS[name], **overrides)  # type: ignore[arg-type]


def _log_spaced(lo: int, hi: int, count: int) -> list[int]:
    if count == 0:
        return []
    if count == 1:
        return [hi]
    return [round(float(v)) for v in np.geomspace(lo, hi, count)]


def _zipf_ids(rng: np.random.Generator, vocab: int, exponent: float, size: int | tuple[int, ...],
              perm: np.ndarray) -> np.ndarray:
    """Ids with ``P(rank r) ∝ r^-exponent`` over ranks 1..vocab, mapped through ``perm``.

    Inverse-CDF sampling of the continuous bounded power law, floored to a rank: O(1) per
    sample (no table search), so millions of ids take milliseconds.
    """
    u = rng.random(size)
    if abs(exponent - 1.0) < 1e-9:
        ranks = np.floor(np.exp(u * math.log(vocab + 1.0)))
    else:
        e = 1.0 - exponent
        ranks = np.floor((1.0 + u * ((vocab + 1.0) ** e - 1.0)) ** (1.0 / e))
    idx = np.clip(ranks.astype(np.int64) - 1, 0, vocab - 1)
    out: np.ndarray = perm[idx]
    return out


@dataclass(frozen=True)
class SyntheticTruth:
    """The latent parameters of one configuration; ``logits`` gives the true click logits."""

    config: SyntheticConfig
    user_factors: np.ndarray  # float64 [U, k]
    item_factors: np.ndarray  # float64 [I, k]
    user_bias: np.ndarray  # float64 [U]
    item_bias: np.ndarray  # float64 [I]
    domain_bias: np.ndarray  # float64 [D]
    domain_user_directions: np.ndarray  # float64 [D, r, k]
    domain_item_directions: np.ndarray  # float64 [D, r, k]
    context_effects: tuple[np.ndarray, ...]  # float64 [V_f] per context field, then multi field
    numeric_weights: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))  # float64 [F_x]

    def logits(self, features: Mapping[str, torch.Tensor | np.ndarray], domain: torch.Tensor | np.ndarray,
               *, diversity: float | None = None) -> np.ndarray:
        """True logits ``z`` (float64 ``[n]``) of rows given their feature ids and domains.

        ``diversity`` overrides ``λ`` (``0.0`` gives the shared click function of the same truth),
        which is how the tests measure how far the domains' functions depart from the shared one.
        """
        cfg = self.config
        lam = cfg.diversity if diversity is None else diversity
        uid = np.asarray(features["uid"], dtype=np.int64)
        item = np.asarray(features["item"], dtype=np.int64)
        dom = np.asarray(domain, dtype=np.int64)
        p = self.user_factors[uid]  # [n, k]
        q = self.item_factors[item]  # [n, k]
        shared = np.einsum("nk,nk->n", p, q)
        specific = np.zeros_like(shared)
        if lam > 0:
            specific = self.domain_term(uid, item, dom)
        interaction = math.sqrt(1.0 - lam * lam) * shared / math.sqrt(cfg.latent_dim) + lam * specific
        z = (cfg.global_bias + self.domain_bias[dom] + self.user_bias[uid] + self.item_bias[item]
             + cfg.interaction_scale * interaction)
        for f, effects in enumerate(self.context_effects[: cfg.context_fields]):
            z = z + effects[np.asarray(features[f"c{f + 1:02d}"], dtype=np.int64)]
        for f, effects in enumerate(self.context_effects[cfg.context_fields:]):
            bag = np.asarray(features[f"m{f + 1}"], dtype=np.int64)  # [n, L], 0 = padding
            filled = bag > 0
            total = np.where(filled, effects[bag], 0.0).sum(axis=1)
            z = z + total / np.maximum(filled.sum(axis=1), 1)
        for f, weight in enumerate(self.numeric_weights.tolist()):
            z = z + weight * np.asarray(features[f"x{f + 1}"], dtype=np.float64)
        out: np.ndarray = z
        return out


    def domain_term(self, uid: np.ndarray, item: np.ndarray, domain: np.ndarray) -> np.ndarray:
        """The domain-specific interaction ``g_d(u, i)`` (float64 ``[n]``, unit variance).

        ``g_d(u, i) = sum_j (|x_dj| - sqrt(2/π)) / sqrt(r (1 - 2/π))`` with
        ``x_dj = (a_dj·p_u + b_dj·q_i) / sqrt(2)``: each domain rewards users and items far from
        zero along its own ``r`` taste directions. ``|x|`` has no linear part, so no sum of
        pairwise (user-domain, item-domain) terms reproduces it: a model must compute a
        domain-specific projection of the user and item vectors and then a non-linearity, which
        is what a per-domain adapter on the first tower layer followed by ReLU provides.
        """
        cfg = self.config
        a = self.domain_user_directions[domain]  # [n, r, k]
        b = self.domain_item_directions[domain]  # [n, r, k]
        x = (np.einsum("nrk,nk->nr", a, self.user_factors[uid])
             + np.einsum("nrk,nk->nr", b, self.item_factors[item])) / math.sqrt(2.0)
        mean_abs, var_abs = math.sqrt(2.0 / math.pi), 1.0 - 2.0 / math.pi
        out: np.ndarray = (np.abs(x) - mean_abs).sum(axis=1) / math.sqrt(cfg.domain_rank * var_abs)
        return out


def ground_truth(config: SyntheticConfig) -> SyntheticTruth:
    """The latent parameters ``generate(config)`` draws its labels from (same seed, same truth)."""
    truth_rng, _ = _streams(config.seed)
    k = config.latent_dim
    num_context = config.context_fields + config.multi_fields
    context_sd = config.context_scale / math.sqrt(max(num_context, 1))
    vocabs = config.context_vocabs() + config.multi_vocabs()
    truth = SyntheticTruth(
        config=config,
        user_factors=truth_rng.standard_normal((config.num_users, k)),
        item_factors=truth_rng.standard_normal((config.num_items, k)),
        user_bias=truth_rng.normal(0.0, config.bias_scale, config.num_users),
        item_bias=truth_rng.normal(0.0, config.bias_scale, config.num_items),
        domain_bias=truth_rng.normal(0.0, config.domain_bias_scale, config.num_domains),
        domain_user_directions=truth_rng.normal(0.0, 1.0 / math.sqrt(k), (config.num_domains, config.domain_rank, k)),
        domain_item_directions=truth_rng.normal(0.0, 1.0 / math.sqrt(k), (config.num_domains, config.domain_rank, k)),
        context_effects=tuple(truth_rng.normal(0.0, context_sd, v) for v in vocabs),
    )
    # Drawn last, so the rest of the truth does not depend on numeric_fields.
    numeric_sd = config.numeric_scale / math.sqrt(max(config.numeric_fields, 1))
    weights = truth_rng.normal(0.0, numeric_sd, config.numeric_fields)
    truth = dataclasses.replace(truth, numeric_weights=weights)
    if config.clusters is not None and config.cluster_spread < 1.0:
        # Only when the clusters change something: off, no extra draw and not one bit moves.
        user, item = _cluster_directions(config, truth.domain_user_directions, truth.domain_item_directions)
        truth = dataclasses.replace(truth, domain_user_directions=user, domain_item_directions=item)
    return truth


def domain_clusters(config: SyntheticConfig) -> np.ndarray:
    """The cluster of each domain, int64 ``[D]``: ``d % clusters`` (``arange(D)``, every domain in
    a cluster of its own, when ``clusters`` is ``None``).

    Round-robin rather than a random draw: the assignment does not depend on the seed, each
    cluster holds ``D / K`` domains (give or take one), and since domain sizes fall with the
    index (``imbalance``), every cluster mixes large and small domains, so a small domain always
    has larger relatives to borrow from.
    """
    d = np.arange(config.num_domains, dtype=np.int64)
    return d if config.clusters is None else d % config.clusters


def _cluster_directions(config: SyntheticConfig, user: np.ndarray, item: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each domain's taste directions moved towards its cluster's prototype (module docstring):
    ``sqrt(1 - rho²) * prototype + rho * own``, float64 ``[D, r, k]`` each. The prototypes come
    from the fourth child of the seed, so they shift no other draw, and depend only on ``seed``,
    ``clusters``, ``domain_rank`` and ``latent_dim``: a sweep of ``cluster_spread`` moves the same
    domains between the same prototypes and today's independent directions."""
    k, rho = config.latent_dim, config.cluster_spread
    assert config.clusters is not None
    rng = np.random.default_rng(np.random.SeedSequence(config.seed).spawn(4)[3])
    shape = (config.clusters, config.domain_rank, k)
    proto_user = rng.normal(0.0, 1.0 / math.sqrt(k), shape)
    proto_item = rng.normal(0.0, 1.0 / math.sqrt(k), shape)
    c = domain_clusters(config)
    pull = math.sqrt(1.0 - rho * rho)
    return pull * proto_user[c] + rho * user, pull * proto_item[c] + rho * item


class EffectCorrelations(TypedDict):
    """What :func:`domain_effect_correlations` returns."""

    within: float  # mean correlation over pairs of distinct domains in one cluster (NaN: no such pair)
    across: float  # mean correlation over pairs of domains in different clusters (NaN: no such pair)
    matrix: np.ndarray  # float64 [D, D], the correlation of every pair of domains (1 on the diagonal)
    clusters: np.ndarray  # int64 [D], each domain's cluster (domain_clusters)


def domain_effect_correlations(config: SyntheticConfig, pairs: int = 4096, seed: int = 0) -> EffectCorrelations:
    """How related the domains' click functions are once the part they share is removed.

    On ``pairs`` (user, item) pairs drawn uniformly from ``numpy.random.default_rng(seed)``
    (independent of the generator's streams, so the sample is the same for every config with
    the same users and items), each domain's *effect* is ``e_d(u, i) = g_d(u, i) - mean_e g_e(u, i)``,
    the domain term minus its mean over the domains. This is ``(z_d - mean_e z_e) / (s λ)`` up to
    a constant per domain (the bias ``b_d``): the true logit of ``(u, i)`` in domain ``d`` minus its
    mean over the domains, so its correlations are those of the logits' effects whenever
    ``diversity > 0``, and stay defined (those of the truth's directions) at ``diversity = 0``.

    Independent domains (``clusters`` unset or ``cluster_spread = 1``) correlate at about
    ``-1 / (D - 1)`` (the centring), both within and across; clusters raise ``within`` and
    lower ``across``. Needs at least 2 domains and 2 pairs.
    """
    if config.num_domains < 2:
        raise ValueError(f"domain effect correlations need at least 2 domains, got {config.num_domains}")
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 2:
        raise ValueError(f"pairs must be an int >= 2, got {pairs!r}")
    truth = ground_truth(config)
    rng = np.random.default_rng(seed)
    uid = rng.integers(0, config.num_users, pairs)
    item = rng.integers(0, config.num_items, pairs)
    g = np.stack([truth.domain_term(uid, item, np.full(pairs, d)) for d in range(config.num_domains)])  # [D, n]
    matrix = np.corrcoef(g - g.mean(axis=0))  # [D, D]
    clusters = domain_clusters(config)
    same = clusters[:, None] == clusters[None, :]
    distinct = ~np.eye(config.num_domains, dtype=bool)
    within, across = matrix[same & distinct], matrix[~same]
    return EffectCorrelations(
        within=float(within.mean()) if within.size else math.nan,
        across=float(across.mean()) if across.size else math.nan,
        matrix=matrix,
        clusters=clusters,
    )


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    truth_seq, rows_seq = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(truth_seq), np.random.default_rng(rows_seq)


def pretrained_tables(truth: SyntheticTruth) -> dict[str, torch.Tensor]:
    """The ``uid`` and ``item`` tables of the ``taobao`` preset (see the module docstring):
    float32 ``[vocab, embedding_dim]``, a noisy fixed projection of the true factors and biases."""
    cfg = truth.config
    if cfg.pretrained_noise is None:
        return {}
    # The third child of the seed (the first two are the truth and the rows: unchanged).
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed).spawn(3)[2])
    k = cfg.latent_dim
    scale = cfg.bias_scale if cfg.bias_scale > 0 else 1.0
    out = {}
    for name, factors, bias in (("uid", truth.user_factors, truth.user_bias),
                                ("item", truth.item_factors, truth.item_bias)):
        known = np.concatenate([factors, bias[:, None] / scale], axis=1)  # [V, k + 1]
        projection = rng.normal(0.0, 1.0 / math.sqrt(k + 1), (k + 1, cfg.embedding_dim))
        noise = rng.normal(0.0, cfg.pretrained_noise, (known.shape[0], cfg.embedding_dim))
        out[name] = torch.from_numpy((known @ projection + noise).astype(np.float32))
    return out


def generate(config: SyntheticConfig) -> MultiDomainDataset:
    """Draw ``config.rows`` rows from the generative model and split them 60/20/20 per domain.

    Returns a :class:`MultiDomainDataset` named ``synthetic-<preset>`` whose ``info`` holds the
    knobs and each domain's row count and click rate.
    """
    cfg = config
    truth = ground_truth(cfg)
    _, rng = _streams(cfg.seed)
    n = cfg.rows
    weights = (np.arange(1, cfg.num_domains + 1, dtype=np.float64)) ** -cfg.imbalance
    domain = rng.choice(cfg.num_domains, size=n, p=weights / weights.sum()).astype(np.int64)
    columns: dict[str, np.ndarray] = {
        "uid": _zipf_ids(rng, cfg.num_users, cfg.popularity, n, rng.permutation(cfg.num_users)),
        "item": _zipf_ids(rng, cfg.num_items, cfg.popularity, n, rng.permutation(cfg.num_items)),
        "domain": domain,
    }
    specs = [
        FeatureSpec("uid", cfg.num_users, cfg.embedding_dim),
        FeatureSpec("item", cfg.num_items, cfg.embedding_dim),
        FeatureSpec("domain", cfg.num_domains, cfg.embedding_dim),
    ]
    for f, vocab in enumerate(cfg.context_vocabs()):
        name = f"c{f + 1:02d}"
        columns[name] = _zipf_ids(rng, vocab, cfg.popularity, n, rng.permutation(vocab))
        specs.append(FeatureSpec(name, vocab, cfg.embedding_dim))
    for f, vocab in enumerate(cfg.multi_vocabs()):
        name = f"m{f + 1}"
        # Ids 1..vocab-1 (0 pads); bag lengths uniform in 0..L, so some bags are empty.
        ids = _zipf_ids(rng, vocab - 1, cfg.popularity, (n, cfg.multi_length), rng.permutation(vocab - 1) + 1)
        length = rng.integers(0, cfg.multi_length + 1, n)
        ids[np.arange(cfg.multi_length)[None, :] >= length[:, None]] = 0
        columns[name] = ids
        specs.append(FeatureSpec(name, vocab, cfg.embedding_dim, Pooling.MEAN))
    numeric = tuple(NumericSpec(f"x{f + 1}") for f in range(cfg.numeric_fields))
    for spec in numeric:
        columns[spec.name] = rng.standard_normal(n).astype(np.float32)
    z = truth.logits(columns, domain)
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    train, val, test = make_splits(columns, domain, label, seed=cfg.split_seed)
    counts = np.bincount(domain, minlength=cfg.num_domains)
    clicks = np.bincount(domain, weights=label, minlength=cfg.num_domains)
    info: dict[str, object] = {
        "source": "synthetic",
        "config": dataclasses.asdict(cfg),
        "domain_rows": counts.tolist(),
        "domain_ctr": [float(c / max(m, 1)) for c, m in zip(clicks, counts, strict=True)],
    }
    return MultiDomainDataset(
        name=f"synthetic-{cfg.name}",
        features=tuple(specs),
        domain_names=tuple(f"domain{d}" for d in range(cfg.num_domains)),
        train=train,
        val=val,
        test=test,
        info=info,
        pretrained=pretrained_tables(truth),
        numeric=numeric,
    )
