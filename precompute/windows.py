"""The crop grid of prototype mining (Herdt & Otero Baguer): the feature map average-pooled over
windows of ``cells`` x ``cells`` cells with stride ``cells`` (7x7 -> a 3x3 grid for cells = 2), each
window a crop of the view the model saw, with a margin."""
from __future__ import annotations

import numpy as np


def grid_shape(h: int, w: int, cells: int) -> tuple[int, int, int]:
    """(cells used, windows down, windows across) of an h x w feature map."""
    cells = max(1, min(cells, h, w))
    return cells, h // cells, w // cells


def window_means(feats: np.ndarray, cells: int) -> np.ndarray:
    """Mean activation of each window: feats (n, C, H, W) -> (n, G, C) float32, G = windows per map."""
    n, c, h, w = feats.shape
    cells, gh, gw = grid_shape(h, w, cells)
    f = np.asarray(feats[:, :, :gh * cells, :gw * cells], np.float32)
    win = f.reshape(n, c, gh, cells, gw, cells).mean(axis=(3, 5))
    return np.ascontiguousarray(win.transpose(0, 2, 3, 1).reshape(n, gh * gw, c))


def window_boxes(h: int, w: int, cells: int, view_size: int, margin: float = 0.15) -> np.ndarray:
    """(G, 4) x0, y0, x1, y1 in view pixels of each window, widened by ``margin`` on each side."""
    cells, gh, gw = grid_shape(h, w, cells)
    sy, sx = view_size / h, view_size / w
    boxes = []
    for gy in range(gh):
        for gx in range(gw):
            y0, x0 = gy * cells * sy, gx * cells * sx
            y1, x1 = y0 + cells * sy, x0 + cells * sx
            my, mx = (y1 - y0) * margin, (x1 - x0) * margin
            boxes.append([max(0, round(x0 - mx)), max(0, round(y0 - my)),
                          min(view_size, round(x1 + mx)), min(view_size, round(y1 + my))])
    return np.asarray(boxes, int)
