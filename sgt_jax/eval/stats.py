"""Statistics that make the evaluation able to tell: intervals, chance rates and paired tests.

Why one module: every score the report prints sits next to its 95% interval and every comparison
between two models ends in a verdict ("significant at 95%" / "not distinguishable"), computed the
same way everywhere.

* `wilson`: score interval for a binomial proportion (better than the normal interval near 0 and 1,
  and at small n).
* `bootstrap_mean`: percentile bootstrap of a mean (for non-binary scores such as per-image IoU),
  resampling whole units (`groups`) when the statistic pools over sub-units.
* `mcnemar`: exact McNemar test of two scorers on the same items (two-sided binomial test on the
  discordant pairs; exact at every size, so no chi-square approximation is needed).
* `paired_bootstrap`: interval of a paired mean difference (for non-binary paired scores).
* `seed_interval` / `paired_t`: across-seed mean with a t interval, and the paired t-test across
  seeds (the training-noise view of a comparison).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import stats as sps

Z95 = 1.959963984540054
ALPHA = 0.05
SIGNIFICANT = "significant at 95%"
NOT_DISTINGUISHABLE = "not distinguishable"


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (lo, hi) for successes / n; (nan, nan) when n == 0."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson: successes must be in [0, {n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(correct: Sequence[bool] | np.ndarray) -> dict[str, float]:
    """{acc, lo, hi, n} of a 0/1 vector with its Wilson 95% interval."""
    x = np.asarray(correct, bool)
    lo, hi = wilson(int(x.sum()), int(x.size))
    return {"acc": float(x.mean()) if x.size else float("nan"), "lo": lo, "hi": hi, "n": int(x.size)}


def half_width(n: int, p: float = 0.5) -> float:
    """Half-width of the 95% normal interval of a proportion p at sample size n (planning number)."""
    return Z95 * math.sqrt(p * (1 - p) / n) if n > 0 else float("inf")


def bootstrap_mean(values: Sequence[float] | Sequence[Sequence[float]], *, n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95) -> dict[str, float]:
    """Percentile bootstrap of a mean: {mean, lo, hi, n}. `values` may be a list of groups (e.g. per-
    image lists of instance IoUs): groups are resampled whole and the statistic pools their members."""
    groups = [np.atleast_1d(np.asarray(v, float)) for v in values]
    groups = [g for g in groups if g.size]
    if not groups:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    sums = np.array([g.sum() for g in groups])
    counts = np.array([g.size for g in groups], float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(groups), size=(int(n_boot), len(groups)))
    boots = sums[idx].sum(1) / counts[idx].sum(1)
    a = (1 - level) / 2
    return {"mean": float(sums.sum() / counts.sum()), "lo": float(np.quantile(boots, a)),
            "hi": float(np.quantile(boots, 1 - a)), "n": len(groups)}


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict[str, Any]:
    """Exact McNemar test of scorers a and b on the same items.

    Returns {n, a_only (a right, b wrong), b_only, delta (acc_a - acc_b), p, verdict}. p is the two-
    sided exact binomial test of a_only vs b_only at 1/2; no discordant pairs gives p = 1."""
    a, b = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    if a.shape != b.shape:
        raise ValueError(f"mcnemar: paired scores differ in length ({a.size} vs {b.size}); "
                         "the two runs must be scored on the same items")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if a_only + b_only == 0 else float(sps.binomtest(a_only, a_only + b_only, 0.5).pvalue)
    return {"n": int(a.size), "a_only": a_only, "b_only": b_only,
            "delta": float(a.mean() - b.mean()) if a.size else float("nan"), "p": p, "verdict": verdict(p)}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, Any]:
    """Interval of mean(a - b) over paired units; significant when the interval excludes 0."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap: paired scores differ in length ({a.size} vs {b.size})")
    d = a - b
    if not d.size:
        return {"delta": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0, "verdict": NOT_DISTINGUISHABLE}
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, d.size, size=(int(n_boot), d.size))].mean(1)
    q = (1 - level) / 2
    lo, hi = float(np.quantile(boots, q)), float(np.quantile(boots, 1 - q))
    sig = lo > 0 or hi < 0
    return {"delta": float(d.mean()), "lo": lo, "hi": hi, "n": int(d.size),
            "verdict": SIGNIFICANT if sig else NOT_DISTINGUISHABLE}


def verdict(p: float, alpha: float = ALPHA) -> str:
    return SIGNIFICANT if math.isfinite(p) and p < alpha else NOT_DISTINGUISHABLE


def seed_interval(values: Iterable[float], level: float = 0.95,
                  bounds: tuple[float, float] | None = (0.0, 1.0)) -> dict[str, float]:
    """Mean across seeds with a Student-t interval (nan interval with one seed), clipped to `bounds`
    (scores are rates in [0, 1])."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], float)
    if not v.size:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    if v.size == 1:
        return {"mean": float(v[0]), "lo": float("nan"), "hi": float("nan"), "n": 1}
    half = float(sps.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    lo, hi = float(v.mean() - half), float(v.mean() + half)
    if bounds is not None:
        lo, hi = max(bounds[0], lo), min(bounds[1], hi)
    return {"mean": float(v.mean()), "lo": lo, "hi": hi, "n": int(v.size)}


def paired_t(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Paired t-test across seeds (seed s of a against seed s of b): {delta, p, n, verdict}."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        raise ValueError(f"paired_t: {a.size} vs {b.size} seeds")
    d = a - b
    if d.size < 2 or not np.any(d != d[0]):  # no seed variance: equal rows are p = 1, otherwise undefined
        p = 1.0 if d.size >= 2 and d[0] == 0 else float("nan")
    else:
        p = float(sps.ttest_rel(a, b).pvalue)
    return {"delta": float(d.mean()) if d.size else float("nan"), "p": p, "n": int(d.size), "verdict": verdict(p)}


def letter_distribution(picks: Sequence[int | None], num_choices: Sequence[int]) -> dict[str, float]:
    """Share of each picked letter ("A", "B", ...; "none" for unparsed answers) over items."""
    letters = "ABCDEFGH"
    n = max(1, len(picks))
    width = max(num_choices) if len(num_choices) else 0
    out = {letters[i]: 0 for i in range(width)}
    for p in picks:
        key = "none" if p is None else letters[int(p)]
        out[key] = out.get(key, 0) + 1
    return {k: v / n for k, v in out.items()}
