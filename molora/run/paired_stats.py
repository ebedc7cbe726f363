"""Statistics for comparing runs scored on the same questions: t-intervals over seeds and paired bootstraps over
questions *and* seeds.

One accuracy on a few hundred questions carries a standard error of ~0.02-0.03 by itself, and seeds add their own
spread. Two adapters scored on the same questions are compared per question: ``d[s, q] = correct_A[s, q] -
correct_B[s, q]`` (each in {0, 1}) for every seed ``s`` both ran and every question ``q``. The difference of
accuracies is ``mean(d)``; its interval comes from a two-way bootstrap that resamples seeds and questions
independently (with replacement) and recomputes the mean -- seeds and questions are both samples. With one seed
it is a bootstrap over questions (the paired test McNemar's answers, with an interval).

The *smallest resolvable difference* (``mde``) is ``(z_0.975 + z_0.80) * SE`` with the bootstrap SE: the true
difference a study of this size detects with 80 % power at the 5 % level. A comparison whose interval contains 0
is inside the noise, whatever its mean.
"""
from __future__ import annotations

import math
import statistics
from typing import Mapping, Optional, Sequence

__all__ = ["t_interval", "paired_bootstrap", "correct_by_question", "MDE_FACTOR"]

#: t_{0.975, df} for df = 1..30 (two-sided 95 % intervals of a mean over few seeds)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]

#: z_{0.975} + z_{0.80}: a difference of MDE_FACTOR standard errors is detected with 80 % power at alpha = 0.05
MDE_FACTOR = 1.959964 + 0.841621


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, std, half-width of the 95 % t-interval); std and interval are nan for one value."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("nan"), float("nan")
    sd = statistics.stdev(values)
    t = _T975[min(n - 1, len(_T975)) - 1] if n - 1 <= len(_T975) else 1.96
    return mean, sd, t * sd / math.sqrt(n)


def correct_by_question(predictions: Sequence[Mapping], metric: str = "accuracy") -> dict[str, int]:
    """``{question id: 1 if right else 0}`` from :func:`molora.run.evaluation.evaluate_loglik`'s predictions;
    ``metric`` ``"accuracy"`` reads ``pred``, ``"accuracy_norm"`` reads ``pred_norm``."""
    key = {"accuracy": "pred", "accuracy_norm": "pred_norm"}.get(metric)
    if key is None:
        raise ValueError(f"metric={metric!r}; allowed: accuracy, accuracy_norm")
    return {str(p["id"]): int(p[key] == p["label"]) for p in predictions}


def paired_bootstrap(a: Mapping[int, Mapping[str, int]], b: Mapping[Optional[int], Mapping[str, int]],
                     n_boot: int = 4000, seed: int = 0) -> Optional[dict]:
    """Paired comparison of A and B over the seeds both have and the questions both scored.

    Args:
        a: ``{seed: {question id: 0/1}}`` of arm A.
        b: the same for arm B; a single entry under the key ``None`` is a seed-independent reference (the untuned
            model) paired with every seed of A.
        n_boot: bootstrap replicates.
        seed: the bootstrap's RNG seed (results are reproducible).

    Returns:
        ``{"diff", "lo", "hi", "se", "mde", "p", "n_seeds", "n_questions", "wins", "losses"}`` -- the mean
        difference A - B, its 95 % percentile interval, the bootstrap SE, the smallest resolvable difference, a
        two-sided bootstrap p-value, and the per-question wins/losses of A summed over seeds; None when nothing is
        shared.
    """
    import numpy as np

    if list(b) == [None]:
        b = {s: b[None] for s in a}
    seeds = sorted(s for s in a if s in b)
    if not seeds:
        return None
    qids = sorted(set.intersection(*[set(a[s]) & set(b[s]) for s in seeds]))
    if not qids:
        return None
    d = np.array([[a[s][q] - b[s][q] for q in qids] for s in seeds], dtype=np.float64)  # [S, Q]
    n_s, n_q = d.shape
    rng = np.random.default_rng(seed)
    ws = rng.multinomial(n_s, [1.0 / n_s] * n_s, size=n_boot).astype(np.float64) if n_s > 1 \
        else np.ones((n_boot, 1))
    wq = rng.multinomial(n_q, [1.0 / n_q] * n_q, size=n_boot).astype(np.float64)
    boot = ((ws @ d) * wq).sum(axis=1) / (n_s * n_q)
    diff = float(d.mean())
    se = float(boot.std(ddof=1))
    lo, hi = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    p = float(min(1.0, 2 * min((boot <= 0).mean(), (boot >= 0).mean()))) if se > 0 else (1.0 if diff == 0 else 0.0)
    return {"diff": diff, "lo": lo, "hi": hi, "se": se, "mde": MDE_FACTOR * se, "p": p, "n_seeds": n_s,
            "n_questions": n_q, "wins": int((d > 0).sum()), "losses": int((d < 0).sum())}
