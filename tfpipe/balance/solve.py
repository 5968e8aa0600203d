"""Optimal contiguous block partition: K parts of a cost sequence, minimising the largest.

Design: pipeline throughput is bounded by the slowest stage, so the objective is the largest
part. Ties are broken by the largest part's length, which spreads cost-free layers (Dropout,
Flatten) instead of piling them on one stage. The same solver serves every balancing mode
(parameters, profiled time, profiled memory). Dynamic programming: O(K * n^2) for n items.
"""

from __future__ import annotations

from collections.abc import Sequence


def solve(costs: Sequence[float], parts: int) -> list[int]:
    """Splits `costs` into `parts` contiguous non-empty blocks minimising the largest block.

    Args:
        costs: cost of each item (layer), len n >= parts.
        parts: K >= 1.

    Returns:
        Block sizes `[n1, ..., nK]`, summing to n.

    Raises:
        ValueError: when there are fewer items than parts.

    Example:
        >>> solve([1, 1, 1, 1, 4], 2)
        [4, 1]
    """
    n = len(costs)
    if parts < 1 or parts > n:
        raise ValueError(f"Cannot split {n} items into {parts} non-empty parts.")
    points = list(range(n + 1))
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
