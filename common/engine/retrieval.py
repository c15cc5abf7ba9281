"""Query-aware selection of context-tree nodes (docs/method.md §3).

Each chunk is walked down on its own: at every level the query is compared with the two
children *of that chunk's own expanded node* (the public reference code paired halves of
different chunks). The better child is expanded; the other is kept at its level's
granularity; at the last level both leaves are kept. A chunk thus contributes D + 1 nodes.
"""

from __future__ import annotations

import torch

from sharedllm.common.config import node_index


def leaf_start(level: int, position, depth: int):
    """First leaf (in level-D units) a node covers; orders nodes of mixed levels by text."""
    return position * 2 ** (depth - level)


def node_similarity(retrieval_keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Cosine of the query with every node's retrieval key [B, N]; empty nodes are -inf."""
    keys = torch.nn.functional.normalize(retrieval_keys.float(), dim=-1)
    sims = keys @ torch.nn.functional.normalize(query.float().to(keys.device), dim=0)
    # Empty nodes (a short tail chunk) have zero keys; never spend detail on them.
    return sims.masked_fill(retrieval_keys.abs().sum(-1) == 0, float("-inf"))


def select_nodes(
    retrieval_keys: torch.Tensor,
    query: torch.Tensor | None,
    depth: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Node indices [B, D + 1] per chunk, in document order.

    retrieval_keys: [B, N, hidden] RMS-normalised node keys; query: [hidden] or None. With no
    query (retrieval off) the right, most recent, child is always expanded. bias: [B, N] added
    to the similarities (the evidence ranking's score of the text under each node), so the
    chunks the ranking points into expand where it points.
    """
    n_chunks = retrieval_keys.shape[0]
    sims = None if query is None else node_similarity(retrieval_keys, query)
    if sims is not None and bias is not None:
        sims = sims + bias.to(sims)
    position = torch.zeros(n_chunks, dtype=torch.long)
    kept: list[torch.Tensor] = []  # per level: node index kept at that level
    starts: list[torch.Tensor] = []
    for level in range(1, depth + 1):
        left_pos = 2 * position
        left = node_index(level, 0) + left_pos
        right = left + 1
        if sims is None:
            go_right = torch.ones(n_chunks, dtype=torch.bool)
        else:
            rows = torch.arange(n_chunks)
            # Ties go right: the most recent text, the choice retrieval-off makes.
            go_right = (sims[rows, right.to(sims.device)] >= sims[rows, left.to(sims.device)]).cpu()
        if level < depth:
            other_pos = torch.where(go_right, left_pos, left_pos + 1)
            kept.append(node_index(level, 0) + other_pos)
            starts.append(leaf_start(level, other_pos, depth))
            position = torch.where(go_right, left_pos + 1, left_pos)
        else:
            kept += [left, right]
            starts += [leaf_start(level, left_pos, depth), leaf_start(level, left_pos + 1, depth)]
    nodes = torch.stack(kept, dim=1)
    order = torch.stack(starts, dim=1).argsort(dim=1)
    return nodes.gather(1, order)
