"""fam_demo.shapes: the shape classifier on rendered ground truth."""

import os

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


def test_eval_shapes_reads_a_save_images_folder(tmp_path):
    from PIL import Image

    from benchmarks import eval_shapes
    from fam_demo.dataset import caption
    from fam_demo.evaluation import EVAL_SCENES, _slug

    shape, color, background = EVAL_SCENES[0]
    base = f"{_slug(caption(shape, color, background))}_s0"
    scene = sample_scene(scene_rng(3, 0), shape=shape, color=color)
    Image.fromarray(render(scene, 64)).save(tmp_path / f"{base}_native.png")
    Image.fromarray(render(scene, 128)).save(tmp_path / f"{base}_fam_2x2.png")
    wrong = sample_scene(scene_rng(3, 1), shape="circle", color=color)
    Image.fromarray(render(wrong, (128, 256))).save(tmp_path / f"{base}_direct_2x4.png")
    rows = {(r["scale"], r["mode"]): r for r in eval_shapes.summarize(eval_shapes.classify(str(tmp_path)))}
    assert rows[("1x1", "native")]["one_object_shape_and_color_right"] == "1.00"
    assert rows[("2x2", "fam")]["shape_right"] == "1.00"
    assert rows[("2x4", "direct")]["shape_right"] == "0.00" and rows[("2x4", "direct")]["color_right"] == "1.00"
    assert eval_shapes.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["shapes.csv", "shapes.md"]
