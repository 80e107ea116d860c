"""The object-count segmentation, validated on rendered ground truth."""

import copy

import numpy as np
import pytest

from fam_demo import dataset as D
from fam_demo.segmentation import connected_components, count_objects, object_color, segment, validate_segmentation


@pytest.mark.parametrize("size", [64, 128, 256])
@pytest.mark.parametrize("n_objects", [1, 2, 3])
def test_counts_rendered_objects(size, n_objects):
    for i in range(6):
        scene = D.sample_scene(D.scene_rng(100 + size, 10 * n_objects + i), n_objects=n_objects)
        assert count_objects(D.render(scene, size, supersample=2)) == n_objects, scene


@pytest.mark.parametrize("pattern", D.PATTERNS)
def test_one_object_of_every_shape_on_every_pattern(pattern):
    for j, shape in enumerate(D.SHAPES):
        tone = D.TONES[j % len(D.TONES)]
        color = D.COLORS[j % len(D.COLORS)]
        scene = D.sample_scene(D.scene_rng(5, j), shape=shape, color=color, pattern=pattern, tone=tone)
        assert count_objects(D.render(scene, 64)) == 1, (shape, color, pattern, tone)


@pytest.mark.parametrize("color", D.COLORS)
def test_object_color_names_the_rendered_colour(color):
    for j, pattern in enumerate(D.PATTERNS):
        scene = D.sample_scene(D.scene_rng(6, j), shape=D.SHAPES[j], color=color, pattern=pattern,
                               tone=D.TONES[j % len(D.TONES)])
        assert object_color(D.render(scene, 64)) == color, (color, pattern)


def test_object_color_is_none_without_object():
    scene = D.sample_scene(D.scene_rng(4, 0))
    scene.objects = []
    assert object_color(D.render(scene, 64)) is None


def test_duplicated_object_counts_two():
    scene = D.sample_scene(D.scene_rng(3, 0), shape="star", color="red", pattern="striped", tone="grey")
    obj = scene.objects[0]
    obj.radius, obj.cx, obj.cy = 0.15, 0.25, 0.5
    twin = copy.deepcopy(obj)
    twin.cx = 0.75
    scene.objects.append(twin)
    assert count_objects(D.render(scene, 128)) == 2
    scene.objects.pop()
    assert count_objects(D.render(scene, 128)) == 1


def test_background_only_counts_zero_and_specks_are_ignored():
    scene = D.sample_scene(D.scene_rng(4, 0))
    scene.objects = []
    img = D.render(scene, 128)
    assert count_objects(img) == 0
    img = img.copy()
    img[10:12, 10:12] = (255, 0, 0)  # 4 px << 0.15% of 128^2
    assert count_objects(img) == 0


def test_segment_reports_areas_and_labels():
    scene = D.sample_scene(D.scene_rng(9, 1), n_objects=2)
    seg = segment(D.render(scene, 96))
    assert seg.count == 2 and len(seg.areas) == 2 and seg.areas[0] >= seg.areas[1]
    assert set(np.unique(seg.labels)) == {0, 1, 2}
    assert (seg.labels == 1).sum() == seg.areas[0]


def test_connected_components_is_4_connected():
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: two components
    mask[3, 1:4] = True
    _, n = connected_components(mask)
    assert n == 3


def test_validation_accuracy_is_perfect_on_ground_truth():
    res = validate_segmentation(n_per_count=5, sizes=(64, 192))
    assert res["overall"] == 1.0, res
