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
    return np.asarray([cells_box((gy * cells, gx * cells, (gy + 1) * cells, (gx + 1) * cells), h, w, view_size,
                                 margin) for gy in range(gh) for gx in range(gw)], int)


def fitted_cells(code_map: np.ndarray, window: int, cells: int, frac: float = 0.5, max_cells: int | None = None
                 ) -> tuple[int, int, int, int]:
    """The cells (y0, x0, y1, x1), end-exclusive, a crop should cover to show one concept: its code
    map (H, W) >= 0 over the source image's feature cells, from the mined ``window`` (index into the
    :func:`grid_shape` grid). The concept's blob is the 4-connected region of cells whose code is at
    least ``frac`` x the peak within the window, grown from that peak; the crop is the blob's bounding
    box, never smaller than the window (``cells`` a side, centred on the blob, inside the map) nor
    larger than ``max_cells`` a side (default: twice the window), centred on the peak."""
    h, w = code_map.shape
    cells, gh, gw = grid_shape(h, w, cells)
    max_cells = min(max_cells or 2 * cells, h, w)
    gy, gx = divmod(int(window), gw)
    y0, x0 = gy * cells, gx * cells
    inside = code_map[y0:y0 + cells, x0:x0 + cells]
    py, px = np.unravel_index(int(np.argmax(inside)), inside.shape)
    py, px = py + y0, px + x0
    peak = float(code_map[py, px])
    if peak <= 0:
        return y0, x0, y0 + cells, x0 + cells
    on = code_map >= frac * peak
    seen, todo = {(py, px)}, [(py, px)]
    while todo:
        y, x = todo.pop()
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= ny < h and 0 <= nx < w and on[ny, nx] and (ny, nx) not in seen:
                seen.add((ny, nx))
                todo.append((ny, nx))
    ys, xs = [p[0] for p in seen], [p[1] for p in seen]

    def side(lo: int, hi: int, centre: int, size: int) -> tuple[int, int]:
        n = hi - lo
        if n < cells:  # grow to the window's size around the blob
            lo -= (cells - n) // 2
            n = cells
        elif n > max_cells:  # shrink to the largest size around the peak
            lo, n = centre - max_cells // 2, max_cells
        lo = max(0, min(lo, size - n))
        return lo, lo + n

    (ya, yb), (xa, xb) = side(min(ys), max(ys) + 1, py, h), side(min(xs), max(xs) + 1, px, w)
    return ya, xa, yb, xb


def cells_box(box: tuple[int, int, int, int], h: int, w: int, view_size: int, margin: float = 0.15) -> list[int]:
    """Cells (y0, x0, y1, x1) of an h x w feature map -> x0, y0, x1, y1 in view pixels, widened by
    ``margin`` on each side (as :func:`window_boxes`)."""
    y0, x0, y1, x1 = box
    sy, sx = view_size / h, view_size / w
    py0, px0, py1, px1 = y0 * sy, x0 * sx, y1 * sy, x1 * sx
    my, mx = (py1 - py0) * margin, (px1 - px0) * margin
    return [max(0, round(px0 - mx)), max(0, round(py0 - my)), min(view_size, round(px1 + mx)),
            min(view_size, round(py1 + my))]
