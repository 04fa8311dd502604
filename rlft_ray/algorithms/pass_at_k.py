"""pass@k and maj@k: what a policy solves given k samples per problem.

RL fine-tuning is known to raise pass@1 while pass@k for large k stays or falls (Yue et al.
2025, arXiv 2504.13837; arXiv 2506.14245): reporting both shows whether a run sharpened
the distribution or taught the model something new.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased estimator of pass@k from n samples of which c are correct (Chen et al.
    2021, "Evaluating Large Language Models Trained on Code", eq. 1)::

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

    the chance that at least one of k samples drawn without replacement from the n is
    correct (the product form avoids huge binomials).

    Args:
        num_samples: n >= k.
        num_correct: c in [0, n].
        k: Samples allowed, >= 1.

    Returns:
        The estimate in [0, 1].

    Raises:
        ValueError: k < 1, k > n or c outside [0, n].
    """
    n, c = num_samples, num_correct
    if k < 1 or k > n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if not 0 <= c <= n:
        raise ValueError(f"num_correct must be in [0, {n}], got {c}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(correct: np.ndarray, k: int) -> float:
    """pass@k averaged over problems.

    Args:
        correct: ``[P, n]`` bool (or {0, 1}): sample j of problem p is correct.
        k: Samples allowed, 1 <= k <= n.

    Returns:
        The mean over the P problems (0 for none).
    """
    correct = np.asarray(correct, dtype=bool)
    if correct.size == 0:
        return 0.0
    n = correct.shape[1]
    return float(np.mean([pass_at_k(n, int(row.sum()), k) for row in correct]))


def majority_correct(answers: Sequence[Hashable], correct: Sequence[bool]) -> bool:
    """Whether the most frequent answer among these samples is a correct one (majority
    vote, "self-consistency", Wang et al. 2023). Ties go to the answer seen first."""
    if not answers:
        return False
    counts = Counter(answers)
    top = max(counts.values())
    winner = next(a for a in answers if counts[a] == top)
    return bool(correct[list(answers).index(winner)])


def maj_at_k(answers: Sequence[Sequence[Hashable]], correct: np.ndarray, k: int) -> float:
    """maj@k: the chance that a majority vote over k samples is correct, averaged over
    problems.

    Each problem's n samples are cut into ``n // k`` disjoint blocks of k (in order); the
    estimate is the mean over problems of the fraction of blocks whose vote is correct
    (unbiased for i.i.d. samples, lower variance than one block).

    Args:
        answers: ``P`` lists of n answers (e.g. the extracted final answers or the
            stripped completions); equal answers vote together.
        correct: ``[P, n]`` bool, whether each sample is correct.
        k: Voters per block, 1 <= k <= n.

    Returns:
        The mean over the P problems (0 for none).

    Raises:
        ValueError: k outside [1, n].
    """
    correct = np.asarray(correct, dtype=bool)
    if correct.size == 0:
        return 0.0
    n = correct.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    per_problem = []
    for votes, right in zip(answers, correct):
        blocks = [
            majority_correct(list(votes[s : s + k]), list(right[s : s + k]))
            for s in range(0, n - k + 1, k)
        ]
        per_problem.append(np.mean(blocks))
    return float(np.mean(per_problem))


def answer_ids(completions: Sequence[str], num_samples: int) -> np.ndarray:
    """``[P, n]`` int64 vote ids of ``P * n`` completions (the n of one problem contiguous):
    completions of one problem equal after stripping whitespace share an id."""
    ids = np.zeros((len(completions) // num_samples, num_samples), dtype=np.int64)
    for p in range(ids.shape[0]):
        seen: dict[str, int] = {}
        for j in range(num_samples):
            ids[p, j] = seen.setdefault(completions[p * num_samples + j].strip(), len(seen))
    return ids


def k_values(num_samples: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... up to n (n itself included)."""
    ks, k = [], 1
    while k < num_samples:
        ks.append(k)
        k *= 2
    return [*ks, num_samples] if num_samples >= 1 else []


def sample_metrics(
    answers: Sequence[Sequence[Hashable]], correct: np.ndarray, prefix: str = ""
) -> dict[str, float]:
    """``pass@k`` and ``maj@k`` for k in :func:`k_values` of n (keys ``{prefix}pass@k``)."""
    correct = np.asarray(correct, dtype=bool)
    n = correct.shape[1] if correct.ndim == 2 else 0
    out: dict[str, float] = {}
    for k in k_values(n):
        out[f"{prefix}pass@{k}"] = mean_pass_at_k(correct, k)
    for k in k_values(n):
        out[f"{prefix}maj@{k}"] = maj_at_k(answers, correct, k)
    return out
