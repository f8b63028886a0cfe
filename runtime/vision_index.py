"""Index data the vision graph takes as inputs: pure arithmetic of the patch grid, computed on the host.

Patches are numbered in merge-block order (block row, block col, row in block, col in block), the order in
which the preprocessor emits them, so that every `merge**2` consecutive patches form one LLM token.
"""

import numpy as np


def patch_rows_cols(grid_h: int, grid_w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch of one temporal patch, in merge-block order."""
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    block = (grid_h // merge, merge, grid_w // merge, merge)
    return (rows.reshape(block).transpose(0, 2, 1, 3).ravel(),
            cols.reshape(block).transpose(0, 2, 1, 3).ravel())


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    # Bilinear, align_corners=True: target index i samples source coordinate i * (side-1) / (size-1).
    # float32 throughout, as transformers computes it, so taps and weights match bit for bit.
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)), 0, None)
    return taps, weights.astype(np.float32)


def position_taps(grid_h: int, grid_w: int, merge: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear resampling of the learned side x side position table onto the grid.

    Returns pos_taps int64 [P, 4] (indices into the flattened table) and pos_weights float32 [P, 4].
    """
    rows, cols = patch_rows_cols(grid_h, grid_w, merge)
    h_taps, h_w = _axis_taps(rows, grid_h, side)
    w_taps, w_w = _axis_taps(cols, grid_w, side)
    taps = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    return taps.astype(np.int64), weights


def rotary_positions(grid_h: int, grid_w: int, merge: int) -> np.ndarray:
    """(row, col) of each patch for the vision tower's 2-D rotary embedding: int64 [P, 2]."""
    rows, cols = patch_rows_cols(grid_h, grid_w, merge)
    return np.stack([rows, cols], axis=-1).astype(np.int64)


def vision_inputs(grid_h: int, grid_w: int, merge: int, side: int) -> dict[str, np.ndarray]:
    """Every index input of the vision graph for one patch grid (shared by all its temporal patches)."""
    taps, weights = position_taps(grid_h, grid_w, merge, side)
    return {"pos_taps": taps, "pos_weights": weights, "rotary_pos": rotary_positions(grid_h, grid_w, merge)}
