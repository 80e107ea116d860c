"""Count objects in images of the demo dataset.

Objects are saturated; backgrounds are dull (HSV saturation <= ~0.3, chroma
max-min <= ~0.2 even on their darkest pattern). A pixel is foreground when its
chroma and saturation are both high and its colour is far from the background
estimate (median colour of the image border). The mask is closed (dilate then
erode, ~2% of the image side) so that anti-aliased or slightly broken outlines stay
one region, then 4-connected components are labelled and those smaller than
``min_area`` (a fraction of the image area) are dropped.

The thresholds are validated on rendered ground truth with 1-3 objects
(tests/demo/test_demo_segmentation.py, ``validate_segmentation``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import to_float

# A duplicated object generated at 4x the native size by direct inference keeps
# its native pixel size: ~0.3-0.5% of the high-res image area; noise specks are
# far smaller. 0.15% separates the two.
MIN_AREA = 0.0015
CHROMA_MIN = 0.30
SATURATION_MIN = 0.45
BG_DISTANCE_MIN = 0.25


@dataclass
class Segmentation:
    count: int
    areas: List[int]  # pixel areas of the kept components, largest first
    mask: np.ndarray  # (H, W) bool foreground after closing
    labels: np.ndarray  # (H, W) int32, 0 = background, 1..count = kept components
    foreground: np.ndarray | None = None  # (H, W) bool foreground before closing


def background_color(img: np.ndarray) -> np.ndarray:
    h, w, _ = img.shape
    b = max(1, round(0.04 * min(h, w)))
    border = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3),
                             img[:, :b].reshape(-1, 3), img[:, -b:].reshape(-1, 3)])
    return np.median(border, axis=0)


def foreground_mask(image) -> np.ndarray:
    img = to_float(image)
    mx, mn = img.max(axis=-1), img.min(axis=-1)
    chroma = mx - mn
    sat = chroma / np.maximum(mx, 1e-6)
    dist = np.linalg.norm(img - background_color(img)[None, None, :], axis=-1)
    return (chroma > CHROMA_MIN) & (sat > SATURATION_MIN) & (dist > BG_DISTANCE_MIN)


def _close(mask: np.ndarray, k: int) -> np.ndarray:
    if k <= 1:
        return mask
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    pad = k // 2
    dil = F.max_pool2d(F.pad(t, (pad,) * 4, value=0.0), k, stride=1)
    ero = -F.max_pool2d(F.pad(-dil, (pad,) * 4, value=-1.0), k, stride=1)
    return ero[0, 0].numpy() > 0.5


def closing_kernel(h: int, w: int) -> int:
    """Odd side of the closing kernel: ~2% of the image side."""
    return max(1, int(round(0.02 * min(h, w)))) | 1


def connected_components(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """4-connected labelling by breadth-first search (labels 1..n)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = n
                    queue.append((yy, xx))
    return labels, n


def segment(image, min_area: float = MIN_AREA) -> Segmentation:
    """Segment the saturated objects of ``image`` (HxWx3 uint8/float, or 3xHxW)."""
    raw = foreground_mask(image)
    h, w = raw.shape
    mask = _close(raw, closing_kernel(h, w))
    labels, n = connected_components(mask)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    keep = [i + 1 for i in np.argsort(-areas) if areas[i] >= max(min_area * h * w, 4)]
    relabel = np.zeros(n + 1, dtype=np.int32)
    for new, old in enumerate(keep, start=1):
        relabel[old] = new
    return Segmentation(count=len(keep), areas=[int(areas[i - 1]) for i in keep], mask=mask, labels=relabel[labels],
                        foreground=raw)


def count_objects(image, min_area: float = MIN_AREA) -> int:
    return segment(image, min_area).count


def object_color(image, min_area: float = MIN_AREA) -> str | None:
    """Name (from ``fam_demo.COLORS``) of the colour nearest to the mean colour of the
    largest object, or None when there is no object."""
    from .dataset import COLOR_RGB

    seg = segment(image, min_area)
    if seg.count == 0:
        return None
    mean = to_float(image)[seg.labels == 1].mean(axis=0)
    return min(COLOR_RGB, key=lambda name: float(np.linalg.norm(mean - np.asarray(COLOR_RGB[name]))))


def validate_segmentation(n_per_count: int = 30, sizes=(64, 128, 256), seed: int = 1234) -> dict:
    """Accuracy of :func:`count_objects` on rendered scenes with 1, 2 and 3 objects."""
    from .dataset import render, sample_scene, scene_rng

    results = {}
    i = 0
    for size in sizes:
        for k in (1, 2, 3):
            correct = 0
            for _ in range(n_per_count):
                scene = sample_scene(scene_rng(seed, i), n_objects=k)
                i += 1
                correct += int(count_objects(render(scene, size, supersample=2)) == k)
            results[(size, k)] = correct / n_per_count
    results["overall"] = float(np.mean([v for v in results.values()]))
    return results
