"""Which of the grammar's shapes is the main object? Template matching on the object
mask, validated on rendered ground truth (:func:`validate_shapes`).

The main object (the largest component of :func:`fam_demo.segmentation.segment`) is
compared with every shape of :data:`fam_demo.SHAPES` drawn by the dataset's own
``shape_mask``, at the object's area (circumradius from the area) and centroid, over
rotations in :data:`ANGLE_STEP_DEG` steps; the shape whose best rotation overlaps the
mask most (intersection over union) wins. Size and position do not matter; rotation
is searched.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Dict, Optional, Tuple

import numpy as np

from .dataset import SHAPES, shape_mask
from .segmentation import MIN_AREA, segment

ANGLE_STEP_DEG = 5


@lru_cache(maxsize=None)
def _unit_area(shape: str) -> float:
    """Area of ``shape`` at circumradius 1 (Monte-Carlo free: a fine grid)."""
    t = (np.arange(800) + 0.5) / 400 - 1.0
    x, y = np.meshgrid(t, t)
    return float(shape_mask(shape, x, y).mean() * 4.0)


def _template(shape: str, angle: float, radius: float, cy: float, cx: float, Y: np.ndarray,
              X: np.ndarray) -> np.ndarray:
    dx, dy = (X - cx) / radius, (Y - cy) / radius
    c, s = math.cos(angle), math.sin(angle)
    return shape_mask(shape, dx * c + dy * s, -dx * s + dy * c)


def shape_scores(mask: np.ndarray) -> Dict[str, float]:
    """Best IoU of every shape with the boolean ``mask`` (one object), over rotations."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return {s: 0.0 for s in SHAPES}
    area = float(len(ys))
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    pad = int(math.ceil(0.5 * max(np.ptp(ys), np.ptp(xs)))) + 2
    y0, y1 = max(0, ys.min() - pad), min(mask.shape[0], ys.max() + pad + 1)
    x0, x1 = max(0, xs.min() - pad), min(mask.shape[1], xs.max() + pad + 1)
    window = mask[y0:y1, x0:x1]
    X, Y = np.meshgrid(np.arange(x0, x1) + 0.5, np.arange(y0, y1) + 0.5)
    scores = {}
    for shape in SHAPES:
        radius = math.sqrt(area / _unit_area(shape))
        best = 0.0
        for k in range(0, 360, ANGLE_STEP_DEG):
            angle = math.radians(k)
            t = _template(shape, angle, radius, cy, cx, Y, X)
            if t.any():  # align the template's centroid with the mask's (the triangle's is off-centre)
                ty, tx = np.nonzero(t)
                t = _template(shape, angle, radius, 2 * cy - (ty.mean() + y0 + 0.5), 2 * cx - (tx.mean() + x0 + 0.5),
                              Y, X)
            inter = np.logical_and(t, window).sum()
            best = max(best, float(inter / max(1, np.logical_or(t, window).sum())))
        scores[shape] = best
    return scores


def object_shape(image, min_area: float = MIN_AREA) -> Optional[str]:
    """The shape (from ``fam_demo.SHAPES``) of the largest object, or None without one."""
    seg = segment(image, min_area)
    if seg.count == 0:
        return None
    scores = shape_scores(seg.labels == 1)
    return max(scores, key=scores.get)


def validate_shapes(n_per_shape: int = 12, sizes: Tuple[int, ...] = (64, 128, 256), seed: int = 777) -> dict:
    """Accuracy of :func:`object_shape` on rendered one-object scenes of every shape at
    random rotation, size, position, colour and background: ``{(size, shape): share,
    "overall": share}``."""
    from .dataset import render, sample_scene, scene_rng

    results: dict = {}
    i = 0
    for size in sizes:
        for shape in SHAPES:
            correct = 0
            for _ in range(n_per_shape):
                scene = sample_scene(scene_rng(seed, i), shape=shape)
                i += 1
                correct += int(object_shape(render(scene, size)) == shape)
            results[(size, shape)] = correct / n_per_shape
    results["overall"] = float(np.mean([v for k, v in results.items() if k != "overall"]))
    return results
