"""Optimal contiguous block partition: split a sequence of costs into K parts, minimising the largest.

Design: pipeline throughput is bounded by the slowest stage, so the objective is the largest
part. Ties are broken by the largest part's length, which spreads cost-free layers (Dropout,
Flatten) instead of piling them on one stage. Cuts may be restricted to allowed positions
(where a single tensor crosses), so the same solver serves every balancing mode. Dynamic
programming over allowed cuts: O(K * P^2) for P allowed cut positions.
"""

from __future__ import annotations

from typing import Iterable, Sequence


def solve(costs: Sequence[float], parts: int, allowed_cuts: Iterable[int] | None = None) -> list[int]:
    """Splits `costs` into `parts` contiguous non-empty blocks minimising the largest block.

    Args:
        costs: cost of each item (layer), len n >= parts.
        parts: K >= 1.
        allowed_cuts: positions 1..n-1 where a block may start; None allows all.

    Returns:
        Block sizes `[n1, ..., nK]`, summing to n.

    Raises:
        ValueError: when fewer than K-1 allowed cuts exist (names them).

    Example:
        >>> solve([1, 1, 1, 1, 4], 2)
        [4, 1]
    """
    n = len(costs)
    cuts = sorted(set(range(1, n)) if allowed_cuts is None else {c for c in allowed_cuts if 0 < c < n})
    if parts < 1 or len(cuts) < parts - 1:
        raise ValueError(
            f"Cannot split {n} items into {parts} parts: only {len(cuts)} allowed cut "
            f"position(s) {cuts}."
        )
    points = [0] + cuts + [n]
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))

    def block(i: int, j: int) -> tuple[float, int]:
        a, b = points[i], points[j]
        return (prefix[b] - prefix[a], b - a)

    inf = (float("inf"), n + 1)
    last = len(points) - 1
    # best[k][j]: best key for splitting points[0]..points[j] into k blocks; arg for backtrack.
    best = [[inf] * (last + 1) for _ in range(parts + 1)]
    arg = [[-1] * (last + 1) for _ in range(parts + 1)]
    best[0][0] = (0.0, 0)
    for k in range(1, parts + 1):
        for j in range(k, last + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == inf:
                    continue
                key = max(best[k - 1][i], block(i, j))
                if key < best[k][j]:
                    best[k][j], arg[k][j] = key, i
    sizes = []
    j = last
    for k in range(parts, 0, -1):
        i = arg[k][j]
        sizes.append(points[j] - points[i])
        j = i
    return sizes[::-1]
