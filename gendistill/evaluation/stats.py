"""The report's statistics: intervals, paired tests and multiple-comparison control, as small pure functions.

Per-item outcomes are 0/1 arrays over the same items in the same order (one array per model and mode). Every
bootstrap here is a percentile bootstrap over items -- or over clusters of items when several items ask about one
fact (`clusters`: one label per item; a resample draws whole clusters) -- with a fixed seed, so two calls with the
same number of clusters and the same seed draw the same resamples: quantities computed in separate calls (a student's
accuracy, its teacher's, their difference) are paired by construction.

Methods (named in the report through METHODS):
- accuracy: percentile bootstrap 95 % interval; `wilson` is the closed-form cross-check for independent items.
- difference of two models on the same items: paired percentile bootstrap interval; the test is McNemar's exact
  (binomial) test on the discordant items when items are independent, the paired bootstrap's two-sided p otherwise.
- several tests (one per task): Holm-Bonferroni step-down adjusted p-values.
- retention (student / teacher) and chance-corrected retention ((student - c) / (teacher - c)): the ratio recomputed
  on each paired resample.
- Kendall's tau-b between two rankings of >= 3 models: recomputed on each resample of the items.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

ITERS = 10_000
SEED = 0
LEVEL = 0.95
ALPHA = 0.05
METHODS = {
    "interval": f"{LEVEL:.0%} percentile bootstrap over items ({ITERS:,} resamples, seed fixed per task, so all "
                "models of a task share the resamples and differences and ratios are paired); items that share "
                "meta.cluster (one fact asked several ways) are resampled together; Wilson's interval where every "
                "item has the same outcome (the bootstrap would collapse to a point)",
    "paired_test": "McNemar's exact test (two-sided binomial on the discordant items); paired bootstrap p-value when "
                   "items come in clusters",
    "multiple_comparisons": f"Holm-Bonferroni across tasks, family-wise level {ALPHA:g}",
    "reversal": "both orderings significant (intersection-union test: p = the larger of the two paired tests' p), "
                "then Holm across tasks",
    "kendall_tau": "Kendall's tau-b over >= 3 models of one group, bootstrap interval over items",
}
_CHUNK_CELLS = 4_000_000  # values gathered per block of resamples (rows x resamples x clusters): ~32 MB


def _cluster_index(n: int, clusters: Sequence | None) -> tuple[np.ndarray, int]:
    """Each item's cluster number (0..C-1) and C; no clusters: every item is its own."""
    if clusters is None:
        return np.arange(n), n
    if len(clusters) != n:
        raise ValueError(f"{len(clusters)} cluster labels for {n} items")
    _, inverse = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    return inverse, int(inverse.max()) + 1 if n else 0


def resampled_sums(values, clusters: Sequence | None = None, iters: int = ITERS,
                   seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap of item sums: `values` (k, n) -> (sums (k, iters), item counts (iters,)). Clusters are drawn with
    replacement, as many as there are; the same (number of clusters, seed) always draws the same resamples."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    k, n = values.shape
    if n == 0:
        raise ValueError("no items to resample")
    inverse, n_clusters = _cluster_index(n, clusters)
    sums = np.stack([np.bincount(inverse, weights=row, minlength=n_clusters) for row in values])
    counts = np.bincount(inverse, minlength=n_clusters).astype(np.float64)
    rng = np.random.default_rng(seed)
    out, out_counts = np.empty((k, iters)), np.empty(iters)
    # Blocks of resamples bound the memory of the gather (rows x block x clusters); numpy's Generator draws the
    # same integers in any block sizes, so the resamples do not depend on the number of rows.
    step = max(1, _CHUNK_CELLS // (n_clusters * k))
    for start in range(0, iters, step):
        idx = rng.integers(0, n_clusters, size=(min(step, iters - start), n_clusters))
        out[:, start:start + len(idx)] = sums[:, idx].sum(-1)
        out_counts[start:start + len(idx)] = counts[idx].sum(-1)
    return out, out_counts


def bootstrap_means(values, clusters: Sequence | None = None, iters: int = ITERS, seed: int = SEED) -> np.ndarray:
    """Resampled means, (k, n) -> (k, iters) (a 1-D `values` gives (1, iters))."""
    sums, counts = resampled_sums(values, clusters, iters, seed)
    return sums / counts


def percentile_interval(samples, level: float = LEVEL) -> tuple[float, float] | None:
    """The percentile interval of bootstrap samples, ignoring undefined (NaN) ones; None when none is defined."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[~np.isnan(samples)]
    if not samples.size:
        return None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def estimate(value: float | None, samples=None, level: float = LEVEL, **extra) -> dict:
    """{"value", "low", "high"} (+ extra fields): a point estimate and its percentile interval."""
    interval = percentile_interval(samples, level) if samples is not None and value is not None else None
    return {"value": value, "low": interval[0] if interval else None, "high": interval[1] if interval else None,
            **extra}


def mean_ci(values, clusters: Sequence | None = None, iters: int = ITERS, seed: int = SEED,
            level: float = LEVEL) -> dict:
    """Accuracy (mean of 0/1 outcomes) with its percentile bootstrap interval over items (or clusters)."""
    values = np.asarray(values, dtype=np.float64)
    return estimate(float(values.mean()), bootstrap_means(values, clusters, iters, seed)[0], level)


def wilson(successes: int, n: int, level: float = LEVEL) -> tuple[float, float] | None:
    """Wilson score interval for a binomial proportion (independent items): the closed-form cross-check of the
    bootstrap, better than it near 0 % and 100 % where the percentile bootstrap collapses to a point."""
    if n <= 0:
        return None
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(a, b) -> dict:
    """McNemar's exact test for two models' 0/1 outcomes on the same items: under H0 the discordant items split
    Binomial(n01 + n10, 1/2); two-sided p = min(1, 2 P(X <= min(n01, n10))). Returns {"p", "a_only", "b_only"}."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    n = a_only + b_only
    if n == 0:
        return {"p": 1.0, "a_only": 0, "b_only": 0}
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1))
    return {"p": min(1.0, 2 * tail / 2 ** n), "a_only": a_only, "b_only": b_only}


def bootstrap_p(samples) -> float:
    """Two-sided bootstrap p-value of "the quantity is 0": twice the smaller share of resamples on either side of 0
    (resamples exactly at 0 count for both sides), never below 1 / (resamples + 1)."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[~np.isnan(samples)]
    if not samples.size:
        return 1.0
    side = min((samples <= 0).sum(), (samples >= 0).sum())
    return float(min(1.0, max(2 * side, 1) / (samples.size + 1)))


def paired_difference(a, b, clusters: Sequence | None = None, iters: int = ITERS, seed: int = SEED,
                      level: float = LEVEL) -> dict:
    """mean(a) - mean(b) over the same items, its paired bootstrap interval and a two-sided test: McNemar's exact p
    for 0/1 outcomes of independent items, the paired bootstrap p when items come in clusters ("test" names it)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    means = bootstrap_means(np.stack([a, b]), clusters, iters, seed)
    out = difference_from(float(a.mean()), float(b.mean()), means[0], means[1], level)
    if clusters is None and np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all():
        out.update(p=mcnemar_exact(a, b)["p"], test="mcnemar_exact")
    return out


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values, in the input order: the i-th smallest p times (m - i + 1), made
    monotone, capped at 1. Reject where adjusted p <= alpha; controls the family-wise error rate."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def chance_corrected(student: float | None, teacher: float | None, chance: float) -> float | None:
    """(student - chance) / (teacher - chance): 0 = chance, 1 = the teacher's skill above chance; None when the
    teacher is not above chance (no skill to retain)."""
    if student is None or teacher is None or teacher - chance <= 0:
        return None
    return (student - chance) / (teacher - chance)


def retention_from(student: float, teacher: float, student_samples, teacher_samples, chance: float = 0.0,
                   level: float = LEVEL) -> dict:
    """Retention (student - chance) / (teacher - chance) from point estimates and paired bootstrap samples of the two
    accuracies; chance = 0 gives the raw retention student / teacher. Resamples where the teacher is not above chance
    are undefined and left out ("undefined_share" says how many). Value None, with "why", when the teacher is not
    above chance on the items themselves."""
    value = chance_corrected(student, teacher, chance)
    if value is None:
        return estimate(None, why=f"the teacher scores {teacher:.1%}, not above chance ({chance:.1%})")
    s, t = np.asarray(student_samples, dtype=np.float64), np.asarray(teacher_samples, dtype=np.float64)
    above = t - chance > 0
    ratios = np.where(above, (s - chance) / np.where(above, t - chance, 1.0), np.nan)
    return estimate(value, ratios, level, undefined_share=float(1 - above.mean()))


def retention_ci(student, teacher, chance: float = 0.0, clusters: Sequence | None = None, iters: int = ITERS,
                 seed: int = SEED, level: float = LEVEL) -> dict:
    """`retention_from` on 0/1 outcomes over the same items (the ratio recomputed on each paired resample)."""
    student, teacher = np.asarray(student, dtype=np.float64), np.asarray(teacher, dtype=np.float64)
    means = bootstrap_means(np.stack([student, teacher]), clusters, iters, seed)
    return retention_from(float(student.mean()), float(teacher.mean()), means[0], means[1], chance, level)


def difference_from(a: float, b: float, a_samples, b_samples, level: float = LEVEL) -> dict:
    """a - b from point estimates and paired bootstrap samples: interval and two-sided bootstrap p."""
    diff = np.asarray(a_samples, dtype=np.float64) - np.asarray(b_samples, dtype=np.float64)
    return estimate(a - b, diff, level, p=bootstrap_p(diff), test="paired_bootstrap")


def gap_difference(teacher_ll, student_ll, teacher_gen, student_gen, clusters: Sequence | None = None,
                   iters: int = ITERS, seed: int = SEED, level: float = LEVEL) -> dict:
    """The paper's comparison on one task: (teacher - student) under generation minus (teacher - student) under LL,
    in points, with its paired bootstrap interval and two-sided bootstrap p. Positive: generation shows a larger gap
    than LL ("LL hides the gap")."""
    stacked = np.stack([np.asarray(x, dtype=np.float64) for x in (teacher_ll, student_ll, teacher_gen, student_gen)])
    means = bootstrap_means(stacked, clusters, iters, seed)
    m = stacked.mean(axis=1)
    return difference_from(float(m[2] - m[3]), float(m[0] - m[1]), means[2] - means[3], means[0] - means[1], level)


def ratio_samples(numerator, denominator) -> np.ndarray:
    """numerator / denominator on each resample, NaN (undefined, left out of intervals) where the denominator is 0."""
    numerator, denominator = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def answer_stats(answered, correct, clusters: Sequence | None = None, iters: int = ITERS, seed: int = SEED,
                 level: float = LEVEL) -> dict:
    """Answer rate (share of items with an extracted answer) and accuracy when answered (correct / answered), each
    with its bootstrap interval, so abstaining and answering wrongly are told apart."""
    answered, correct = np.asarray(answered, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    sums, counts = resampled_sums(np.stack([answered, answered * correct]), clusters, iters, seed)
    when = ratio_samples(sums[1], sums[0])
    n_answered = answered.sum()
    return {"answer_rate": estimate(float(answered.mean()), sums[0] / counts, level),
            "acc_when_answered": estimate(float((answered * correct).sum() / n_answered) if n_answered else None,
                                          when, level, n_answered=int(n_answered))}


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b of two rankings (ties in either handled); None when either ranking is all ties."""
    tau = kendall_tau_rows(np.asarray(x, dtype=np.float64)[:, None], np.asarray(y, dtype=np.float64)[:, None])[0]
    return None if np.isnan(tau) else float(tau)


def kendall_tau_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b for each column of (m models, r) score matrices, vectorised over the r columns (NaN where
    either ranking is all ties)."""
    m = x.shape[0]
    concordant = np.zeros(x.shape[1])
    discordant = np.zeros(x.shape[1])
    tied_x = np.zeros(x.shape[1])
    tied_y = np.zeros(x.shape[1])
    for i in range(m):
        for j in range(i + 1, m):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            tied_x += dx == 0
            tied_y += dy == 0
            concordant += dx * dy > 0
            discordant += dx * dy < 0
    pairs = m * (m - 1) / 2
    denominator = np.sqrt((pairs - tied_x) * (pairs - tied_y))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (concordant - discordant) / np.where(denominator > 0, denominator, 1), np.nan)


def kendall_tau_from(x: Sequence[float], y: Sequence[float], x_samples, y_samples, level: float = LEVEL) -> dict | None:
    """Kendall's tau-b between the ranking of m models by x and by y, with the interval of its value on each paired
    resample ((m, iters) samples). None for fewer than 3 models: over two, tau is always +-1 and says nothing beyond
    the one pair's order."""
    if len(x) < 3:
        return None
    return estimate(kendall_tau(x, y), kendall_tau_rows(np.asarray(x_samples), np.asarray(y_samples)), level)


def kendall_tau_ci(x_items, y_items, clusters: Sequence | None = None, iters: int = ITERS, seed: int = SEED,
                   level: float = LEVEL) -> dict | None:
    """`kendall_tau_from` on (m models, n items) outcome matrices under the two modes (each resample of the items
    re-ranks every model)."""
    x_items, y_items = np.asarray(x_items, dtype=np.float64), np.asarray(y_items, dtype=np.float64)
    means = bootstrap_means(np.concatenate([x_items, y_items]), clusters, iters, seed)
    m = x_items.shape[0]
    return kendall_tau_from(x_items.mean(1), y_items.mean(1), means[:m], means[m:], level)


def task_seed(name: str) -> int:
    """The resampling seed of one task: fixed per task name, so every model's resamples of that task are the same
    draws (paired), and different tasks draw independently (an average over tasks is a stratified bootstrap)."""
    return SEED + zlib.crc32(name.encode())
