"""The resolution hierarchy's policy as the library runs it (kvggml/csrc/tier-hierarchy.cpp): the
ladder step of every old block, from its age and the memory budget. `kvggml eval` applies it offline.

After each micro-batch the library first walks each block down the schedule by age, then, while
exact cells + blocks exceed the budget, gives the oldest block that can still coarsen its next
step. Blocks only grow older and new ones are younger, so the state after the last micro-batch
equals this one-shot computation on the final ages.
"""

from __future__ import annotations

import numpy as np

from kvggml.config import CompressionConfig, Step


def budget_bytes(config: CompressionConfig, f16_bytes_at_n_ctx: int) -> int:
    """OLLAMA_KV_COMPRESSION_BUDGET in bytes (0: none); a fraction is of the f16 cache at n_ctx."""
    nbytes, fraction = config.budget
    return nbytes or int(fraction * f16_bytes_at_n_ctx)


def block_steps(
    ladder: tuple[Step, ...], ages: np.ndarray, sizes: np.ndarray, fixed_bytes: int, budget: int
) -> np.ndarray:
    """Step of each block. ages: tokens newer than each block; sizes: (n_blocks, len(ladder) + 1) bytes
    of each block at each step, every layer's K and V; fixed_bytes: the exact cells; budget 0: none."""
    steps = np.array([sum(age >= step.age for step in ladder) for age in ages], dtype=np.int64)
    if budget:
        total = fixed_bytes + int(sizes[np.arange(len(steps)), steps].sum())
        for b in np.argsort(-ages, kind="stable"):  # oldest first; among equals, the first block
            while total > budget and steps[b] < len(ladder):
                total += int(sizes[b, steps[b] + 1] - sizes[b, steps[b]])
                steps[b] += 1
    return steps
