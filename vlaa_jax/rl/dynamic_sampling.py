"""Dynamic sampling (DAPO): drop prompt groups whose rewards all agree before the update.

A group whose n rewards are equal has advantage 0 for every sample under GRPO, so it contributes no
policy gradient, only dilutes the token/sequence normaliser. Host-side NumPy, run between the reward
and the advantage computation.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class GroupFilterResult:
    kept_indices: np.ndarray   # int64 [K], indices into the flat sample axis, in original order
    num_groups: int            # groups seen
    num_kept_groups: int       # groups with non-zero reward spread
    num_dropped_groups: int    # zero-variance groups dropped (groups of one included)


def filter_zero_variance_groups(rewards: np.ndarray, group_ids: np.ndarray | None = None,
                                atol: float = 0.0) -> GroupFilterResult:
    """rewards [num_prompts, n] (flat index = row * n + col) or [B] with group_ids [B].

    A group is dropped when max - min of its rewards <= atol (groups of one are always dropped).
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim == 2:
        ids = np.repeat(np.arange(r.shape[0]), r.shape[1])
        r = r.reshape(-1)
    elif r.ndim == 1:
        if group_ids is None:
            raise ValueError("1-D rewards need group_ids (or pass rewards as [num_prompts, n])")
        ids = np.asarray(group_ids).reshape(-1)
        if ids.shape != r.shape:
            raise ValueError(f"group_ids shape {ids.shape} != rewards shape {r.shape}")
    else:
        raise ValueError(f"rewards must be [B] or [num_prompts, n], got shape {r.shape}")
    if r.size == 0:
        return GroupFilterResult(np.zeros(0, np.int64), 0, 0, 0)
    _, inv, counts = np.unique(ids, return_inverse=True, return_counts=True)
    num_groups = counts.size
    gmax = np.full(num_groups, -np.inf)
    gmin = np.full(num_groups, np.inf)
    np.maximum.at(gmax, inv, r)
    np.minimum.at(gmin, inv, r)
    keep_group = ((gmax - gmin) > atol) & (counts > 1)
    kept = np.nonzero(keep_group[inv])[0].astype(np.int64)
    n_kept = int(keep_group.sum())
    return GroupFilterResult(kept, num_groups, n_kept, num_groups - n_kept)
