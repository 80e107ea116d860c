"""Structure-consistency and detail metrics on constructed cases."""

import math

import numpy as np

from fam_demo import dataset as D
from fam_demo.metrics import consistency, detail_ratio, downsample_area, highband_energy, psnr, ssim, upsample_bicubic


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
