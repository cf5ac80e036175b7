"""Statistics of evaluation figures: bootstrap intervals and Bradley-Terry (Elo) ratings.

    from cai.stats import estimate, elo_estimates
    estimate([1, 0, 1, 1], n_resamples=1000, seed=0)     # mean, 95% percentile interval, n

Pure numerics (numpy imported lazily): no prompts, no models. `cai.evaluate` turns judge
readings into per-item scores and asks this module for figures with intervals; the judge gate
(`cai.gate`) uses the same bootstrap for its agreement interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from statistics import fmean, mean
from typing import TYPE_CHECKING

from cai.records import MetricRow

if TYPE_CHECKING:
    import numpy as np

ELO_SCALE = 400 / math.log(10)  # rating points per unit of Bradley-Terry log-strength
ELO_CENTRE = 1000.0


# --------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class Estimate:
    """A figure, its percentile-bootstrap interval (nan when there is none) and its item count."""

    value: float
    ci_low: float
    ci_high: float
    n: int

    def row(
        self, metric: str, policy: str, note: str | None = None, no_verdict: int | None = None
    ) -> MetricRow:
        def finite(x: float) -> float | None:
            return x if math.isfinite(x) else None  # nan is not valid JSON; None is

        return MetricRow(
            metric=metric,
            policy=policy,
            value=self.value,
            ci_low=finite(self.ci_low),
            ci_high=finite(self.ci_high),
            n=self.n,
            note=note,
            no_verdict=no_verdict,
        )


def _resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    import numpy as np

    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))  # (R, n)


def _percentiles(stats: Sequence[float] | np.ndarray, alpha: float) -> tuple[float, float]:
    import numpy as np

    low, high = np.quantile(np.asarray(stats, dtype=float), [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(
    values: Sequence[float],
    stat: Callable[[Sequence[float]], float] = fmean,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` over `values`; the same seed gives the same interval.

    Percentile rather than BCa: the figures here are shares and means of bounded scores, the
    samples are small, and a method a reader can redo by hand is worth more than a tighter one.
    """
    data = [float(v) for v in values]
    if not data or n_resamples < 1:
        return math.nan, math.nan
    if len(data) == 1:
        only = float(stat(data))
        return only, only
    import numpy as np

    resampled = np.asarray(data)[_resample_indices(len(data), n_resamples, seed)]  # (R, n)
    if stat in (fmean, mean, np.mean):
        stats = resampled.mean(axis=1)
    else:
        stats = np.array([stat(row.tolist()) for row in resampled])
    return _percentiles(stats, alpha)


def estimate(
    values: Sequence[float], n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> Estimate:
    """The mean of per-item scores with its bootstrap interval."""
    data = [float(v) for v in values]
    value = fmean(data) if data else math.nan
    return Estimate(value, *bootstrap_ci(data, fmean, n_resamples, alpha, seed), len(data))


# --------------------------------------------------------------------------- Elo


Comparison = tuple[str, str, float]  # (first model, second model, score of the first in [0, 1])


def _win_matrix(
    models: Sequence[str], comparisons: Sequence[Comparison], weights: Sequence[float] | None = None
):
    """Soft wins W[i, j] of model i over model j; games between i and j are W[i, j] + W[j, i]."""
    import numpy as np

    index = {m: k for k, m in enumerate(models)}
    first = np.array([index[c[0]] for c in comparisons], dtype=int)
    second = np.array([index[c[1]] for c in comparisons], dtype=int)
    score = np.array([float(c[2]) for c in comparisons])
    w = np.ones(len(comparisons)) if weights is None else np.asarray(weights, dtype=float)
    wins = np.zeros((len(models), len(models)))  # (M, M)
    np.add.at(wins, (first, second), w * score)
    np.add.at(wins, (second, first), w * (1 - score))
    return wins


def _strongly_connected(wins: np.ndarray) -> bool:
    """The MLE exists iff every model beats, through some chain, every other (Zermelo 1929)."""
    beats = wins > 0

    def reach(adjacency: np.ndarray) -> set[int]:
        seen, todo = {0}, [0]
        while todo:
            node = todo.pop()
            for nxt in adjacency[node].nonzero()[0].tolist():
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    n = len(wins)
    return len(reach(beats)) == n and len(reach(beats.T)) == n


def _fit_strengths(wins: np.ndarray, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """Bradley-Terry log-strengths (first model fixed at 0) by damped Newton on the log-likelihood.

    Newton, because the log-likelihood is concave and smooth, so a handful of steps reach
    machine precision (the bootstrap refits a thousand times); the step is halved until the
    likelihood does not drop, which makes every iteration an ascent step.
    """
    import numpy as np

    games = wins + wins.T  # (M, M)

    def loglik(theta: np.ndarray) -> float:
        diff = theta[:, None] - theta[None, :]
        return float(-(wins * np.logaddexp(0.0, -diff)).sum())

    theta = np.zeros(len(wins))
    current = loglik(theta)
    for _ in range(max_iter):
        p = 0.5 * (1.0 + np.tanh((theta[:, None] - theta[None, :]) / 2))  # P(i beats j), (M, M); no overflow
        grad = wins.sum(axis=1) - (games * p).sum(axis=1)
        if np.abs(grad[1:]).max(initial=0.0) < tol * max(1.0, games.sum()):
            break
        curvature = games * p * p.T
        hessian = curvature - np.diag(curvature.sum(axis=1))
        step = np.zeros_like(theta)
        step[1:] = np.linalg.solve(hessian[1:, 1:], -grad[1:])
        scale = 1.0
        while scale > 1e-8:
            candidate = theta + scale * step
            value = loglik(candidate)
            if value >= current - 1e-12:
                break
            scale /= 2
        theta, current = candidate, value
        if np.abs(scale * step).max(initial=0.0) < 1e-13:
            break
    return theta


def elo_ratings(
    comparisons: Sequence[Comparison], anchor: str | None = "base", prior: float = 0.0
) -> dict[str, float]:
    """Bradley-Terry maximum-likelihood ratings on the Elo scale, from soft outcomes.

    P(i beats j) = 1 / (1 + 10 ** ((R_j - R_i) / 400)). `anchor` is set to 1000 when it took part,
    else the mean rating is 1000. `prior` adds that many virtual ties between every pair of
    models: without it a model that never wins has no finite maximum-likelihood rating (raises).
    """
    models = sorted({c[0] for c in comparisons} | {c[1] for c in comparisons})
    if not models:
        return {}
    for c in comparisons:
        if not 0.0 <= c[2] <= 1.0 or c[0] == c[1]:
            raise ValueError(f"a comparison needs two different models and a score in [0, 1], got {c}")
    return _ratings(models, _win_matrix(models, comparisons), anchor, prior)


def _ratings(models: Sequence[str], wins: np.ndarray, anchor: str | None, prior: float) -> dict[str, float]:
    import numpy as np

    if len(models) == 1:
        return {models[0]: ELO_CENTRE}
    wins = wins + (prior / 2) * (1 - np.eye(len(models)))
    if not _strongly_connected(wins):
        raise ValueError(
            "Bradley-Terry ratings are unbounded: some model wins (or loses) every game it plays; "
            "use prior > 0"
        )
    ratings = ELO_SCALE * _fit_strengths(wins)
    centre = ratings[list(models).index(anchor)] if anchor in models else ratings.mean()
    return {m: float(ELO_CENTRE + r - centre) for m, r in zip(models, ratings, strict=True)}


def elo_estimates(
    comparisons: Sequence[Comparison],
    clusters: Sequence[Hashable] | None = None,
    anchor: str | None = "base",
    prior: float = 0.0,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Estimate]:
    """Elo ratings with bootstrap intervals; n is the number of games each model played.

    Comparisons are resampled with replacement; comparisons sharing a cluster id (the prompt)
    are resampled together, because every game on one prompt shares that prompt's difficulty.
    Resamples in which a rating is unbounded (possible with prior 0) are left out.
    """
    import numpy as np

    point = elo_ratings(comparisons, anchor, prior)
    models = sorted(point)
    keys = list(range(len(comparisons))) if clusters is None else list(clusters)
    if len(keys) != len(comparisons):
        raise ValueError(f"{len(keys)} cluster ids for {len(comparisons)} comparisons")
    groups = {key: k for k, key in enumerate(dict.fromkeys(keys))}
    member = np.array([groups[key] for key in keys], dtype=int)
    draws: list[list[float]] = []
    if len(groups) > 1:
        for row in _resample_indices(len(groups), n_resamples, seed):
            counts = np.bincount(row, minlength=len(groups))[member]  # weight of each comparison
            try:
                fitted = _ratings(models, _win_matrix(models, comparisons, counts), anchor, prior)
            except (ValueError, np.linalg.LinAlgError):
                continue
            draws.append([fitted[m] for m in models])
    games = {m: sum(m in c[:2] for c in comparisons) for m in models}
    result = {}
    for k, model in enumerate(models):
        low, high = _percentiles([d[k] for d in draws], alpha) if draws else (math.nan, math.nan)
        result[model] = Estimate(point[model], low, high, games[model])
    return result
