"""Retrieval accuracy: is each query nearest to its own target among all candidates (top-k)?"""

from collections.abc import Sequence
from typing import Literal

import torch


def retrieval_accuracy(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    targets: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = (1, 5),
    metric: Literal["cosine", "euclidean"] = "cosine",
) -> dict[int, float]:
    """Top-k retrieval accuracy: the share of queries whose own candidate is among their k nearest.

    Args:
        queries: `(n, d)`, e.g. features of generated images.
        candidates: `(m, d)`, e.g. of the true images of all test emoji; or `(m, v, d)`: v views of each candidate
            (e.g. its name in every language), a query being as close to a candidate as to its closest view, so an
            answer in any one language can find it.
        targets: `targets[i]` is the index of query i's true candidate.
        ks: the k of each accuracy.
        metric: rank by cosine similarity, or by (smallest) euclidean distance, e.g. of raw pixels.

    Returns:
        `{k: accuracy}`.
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}.")
    if queries.ndim != 2 or candidates.ndim not in (2, 3) or queries.shape[1] != candidates.shape[-1]:
        raise ValueError(
            f"Expected (n, d) queries and (m, d) or (m, views, d) candidates, got {tuple(queries.shape)} and "
            f"{tuple(candidates.shape)}."
        )
    targets = torch.as_tensor(targets, device=queries.device)
    if len(targets) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(targets)} targets.")
    views = candidates.float().reshape(-1, candidates.shape[-1])
    if metric == "cosine":
        similarity = torch.nn.functional.normalize(queries.float(), dim=1) @ torch.nn.functional.normalize(views, dim=1).T
    else:
        similarity = -torch.cdist(queries.float(), views)
    similarity = similarity.reshape(len(queries), candidates.shape[0], -1).amax(dim=2)
    ranking = similarity.argsort(dim=1, descending=True)
    hits = ranking == targets[:, None]
    return {k: hits[:, : min(k, candidates.shape[0])].any(1).float().mean().item() for k in ks}
