"""fam_demo.shapes: the shape classifier on rendered ground truth."""

import numpy as np

from fam_demo.dataset import SHAPES, render, sample_scene, scene_rng
from fam_demo.segmentation import segment
from fam_demo.shapes import object_shape, shape_scores, validate_shapes


def test_every_shape_is_recognised_at_any_rotation_size_and_position():
    res = validate_shapes(n_per_shape=2, sizes=(64, 128), seed=11)
    assert res["overall"] == 1.0, {k: v for k, v in res.items() if v < 1}


def test_a_shape_fits_itself_far_better_than_its_nearest_rival():
    for i, shape in enumerate(SHAPES):
        img = render(sample_scene(scene_rng(5, i), shape=shape), 128)
        scores = shape_scores(segment(img).labels == 1)
        rival = max(v for k, v in scores.items() if k != shape)
        assert scores[shape] > 0.9 and scores[shape] - rival > 0.03, (shape, scores)


def test_no_object_has_no_shape():
    assert object_shape(np.full((64, 64, 3), 128, dtype=np.uint8)) is None
