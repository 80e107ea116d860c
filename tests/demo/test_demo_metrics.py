"""Structure-consistency, detail and local-quality metrics on constructed cases."""

import math

import numpy as np
import pytest

from fam_demo import dataset as D
from fam_demo.metrics import (
    CORRUPTIONS,
    GroundTruth,
    analyze,
    boundary_deviation,
    consistency,
    detail_ratio,
    downsample_area,
    highband_energy,
    hue,
    hue_distance,
    hue_error,
    local_quality,
    psnr,
    rotate_hue,
    speckle,
    ssim,
    summarize_validation,
    upsample_bicubic,
    validate_local_metrics,
    validation_scenes,
)


def _scene_image(size, seed=0):
    return D.render(D.sample_scene(D.scene_rng(seed, 0)), size)


def test_identical_images():
    img = _scene_image(64)
    assert math.isinf(psnr(img, img))
    assert abs(ssim(img, img) - 1.0) < 1e-9


def test_psnr_known_value():
    a = np.zeros((8, 8, 3), np.float32)
    b = np.full((8, 8, 3), 0.1, np.float32)
    assert abs(psnr(a, b) - 20.0) < 1e-4


def test_ssim_orders_degradations_and_is_symmetric():
    img = _scene_image(64).astype(np.float32) / 255
    rng = np.random.default_rng(0)
    s_small = ssim(img, np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1))
    s_big = ssim(img, np.clip(img + rng.normal(0, 0.2, img.shape), 0, 1))
    other = _scene_image(64, seed=5)
    assert 1.0 > s_small > s_big
    assert ssim(img, other) < 0.6
    assert abs(ssim(img, other) - ssim(other, img)) < 1e-9


def test_downsample_area_is_exact_block_mean():
    x = np.random.default_rng(1).random((12, 8, 3)).astype(np.float32)
    d = downsample_area(x, (3, 2))
    np.testing.assert_allclose(d, x.reshape(3, 4, 2, 4, 3).mean(axis=(1, 3)), atol=1e-6)


def test_bicubic_upscale_is_consistent_and_adds_no_detail():
    native = _scene_image(64)
    for size in [(128, 128), (256, 256), (128, 256)]:
        up = upsample_bicubic(native, size)
        p, s = consistency(up, native)
        assert p > 33 and s > 0.97
        assert abs(detail_ratio(up, native) - 1.0) < 0.02


def test_detail_ratio_sees_real_detail_and_blur():
    scene = D.sample_scene(D.scene_rng(2, 0))
    native, sharp = D.render(scene, 64), D.render(scene, 256)
    assert detail_ratio(sharp, native) > 3.0  # a true 256x256 rendering has edges beyond bicubic
    p, s = consistency(sharp, native)
    assert p > 35 and s > 0.98
    nearest = np.repeat(np.repeat(native, 4, axis=0), 4, axis=1)
    smooth = upsample_bicubic(upsample_bicubic(native, (32, 32)), (256, 256))
    assert detail_ratio(smooth, native) < 0.9  # blur removes energy
    assert detail_ratio(nearest, native) > 1.5  # blocky edges add some


def test_highband_energy_of_constant_is_zero():
    assert highband_energy(np.full((64, 64, 3), 0.5), (16, 16)) == 0.0


# ------------------------------------------------------------------ local-quality metrics

LOCAL_SIZES = [(128, 128), (192, 192), (128, 256)]


def _clean(scene, hw):
    img = D.render(scene, max(hw))
    return img if hw[0] == hw[1] else downsample_area(img, hw)


def test_hue_and_hue_distance_known_values():
    assert hue((1, 0, 0)) == 0.0 and abs(hue((0, 1, 0)) - 120) < 1e-9 and abs(hue((0, 0, 1)) - 240) < 1e-9
    assert math.isnan(hue((0.5, 0.5, 0.5)))
    assert hue_distance(350, 10) == 20 and hue_distance(0, 180) == 180 and math.isnan(hue_distance(math.nan, 3))
    # rotating about the grey axis by 120 degrees maps red to green exactly
    np.testing.assert_allclose(rotate_hue(np.array([1.0, 0, 0]), 120), [0, 1, 0], atol=1e-12)


@pytest.mark.parametrize("hw", LOCAL_SIZES)
def test_clean_renders_score_good_at_every_size(hw):
    for scene in validation_scenes(8)[::3]:  # a subset keeps it quick: circle, star, diamond
        native = D.render(scene, 64)
        q = local_quality(_clean(scene, hw), native, scene.objects[0].color)
        assert q.hue_error_prompt < 4 and q.hue_error_native < 2, (scene.caption, q)
        assert q.boundary < 0.5, (scene.caption, q)
        assert q.speckle == 0 and q.specks == 0, (scene.caption, q)


@pytest.mark.parametrize("hw", [(128, 128), (128, 256)])
def test_each_metric_grows_with_its_corruption_and_ignores_the_others(hw):
    scene = validation_scenes(8)[3]  # a star: concave outline
    native = D.render(scene, 64)
    truth = GroundTruth(scene, hw)
    color = scene.objects[0].color

    def measure(kind):
        return [local_quality(truth.corrupt(kind, s, seed=1), native, color) for s in CORRUPTIONS[kind]]

    hue_runs = measure("hue")
    assert np.all(np.diff([q.hue_error_prompt for q in hue_runs]) > 3)
    assert np.all(np.diff([q.hue_error_native for q in hue_runs]) > 3)
    assert all(q.boundary < 0.5 and q.speckle == 0 for q in hue_runs)
    for kind in ("jagged", "echo"):
        runs = measure(kind)
        assert np.all(np.diff([q.boundary for q in runs]) > 0.2), (kind, runs)
        assert all(q.hue_error_native < 2 and q.speckle == 0 for q in runs), (kind, runs)
    flecks = measure("flecks")
    assert np.all(np.diff([q.speckle for q in flecks]) > 0)
    assert [q.specks for q in flecks] == list(CORRUPTIONS["flecks"])
    assert all(q.boundary < 0.5 and q.hue_error_native < 2 for q in flecks)


def test_boundary_ignores_a_shifted_object_and_needs_objects():
    scene = validation_scenes(8)[1]
    native = D.render(scene, 64)
    scene.objects[0].cx += 0.05  # 3 native pixels to the right
    assert boundary_deviation(D.render(scene, 128), native) < 0.5
    bare = D.sample_scene(D.scene_rng(4, 0))
    bare.objects = []
    empty = D.render(bare, 128)
    assert math.isnan(boundary_deviation(empty, native)) and math.isnan(hue_error(empty, "red"))
    assert speckle(empty) == (0.0, 0)


def test_local_metrics_refuse_bad_input():
    img = _scene_image(64)
    with pytest.raises(ValueError, match="unknown color 'grey'"):
        hue_error(img, "grey")
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) image"):
        analyze(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="unknown corruption"):
        GroundTruth(validation_scenes(1)[0], (64, 64)).corrupt("blur", 1)


def test_validate_local_metrics_reports_every_case():
    res = validate_local_metrics(n_scenes=1, sizes=("2x2",), corruptions={"flecks": (0, 2)})
    assert set(res) == {("clean", 0), ("flecks", 0), ("flecks", 2)}
    assert res[("clean", 0)]["speckle"] == [0.0] and res[("flecks", 2)]["speckle"][0] > 0
    assert "| flecks | 2 | 1 |" in summarize_validation(res)
