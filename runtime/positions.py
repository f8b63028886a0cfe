"""Multimodal RoPE positions (t, h, w) of a token sequence, as Qwen3-VL's `get_rope_index` assigns them.

Text tokens count up on all three rows. A vision block of one temporal patch with a merged grid of H' x W'
tokens starting at position s gives its token in row a, column b the position (s, s + a, s + b); the next
token starts at s + max(H', W'). The streaming runtime calls this over the whole retained sequence after
every eviction, so positions are always contiguous.
"""

from collections.abc import Iterable

import numpy as np

Span = int | tuple[int, int]  # a run of n text tokens, or one vision block's merged grid (H', W')


def rope_positions(spans: Iterable[Span], start: int = 0) -> tuple[np.ndarray, int]:
    """Positions int64 [3, n] of the spans laid end to end from `start`, and the position that comes next."""
    parts, pos = [], start
    for span in spans:
        if isinstance(span, int):
            parts.append(np.broadcast_to(np.arange(pos, pos + span), (3, span)))
            pos += span
        else:
            h, w = span
            rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            parts.append(np.stack([np.full(h * w, pos), pos + rows.ravel(), pos + cols.ravel()]))
            pos += max(h, w)
    out = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
    return out.astype(np.int64), pos


def spans_of(token_ids: Iterable[int], vision_token_id: int, grids: Iterable[tuple[int, int]]) -> list[Span]:
    """Split a token sequence into text runs and vision blocks; `grids` gives each block's merged (H', W')."""
    spans: list[Span] = []
    grids = iter(grids)
    run, vision_left = 0, 0
    for tok in token_ids:
        if vision_left:
            if tok != vision_token_id:
                raise ValueError("a vision block is shorter than its grid")
            vision_left -= 1
            continue
        if tok == vision_token_id:
            if run:
                spans.append(run)
                run = 0
            grid = next(grids)
            spans.append(grid)
            vision_left = grid[0] * grid[1] - 1
        else:
            run += 1
    if vision_left:
        raise ValueError("a vision block is shorter than its grid")
    if run:
        spans.append(run)
    return spans
