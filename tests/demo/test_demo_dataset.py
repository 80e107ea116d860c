"""The procedural dataset: grammar, determinism, resolution independence, tokenizer."""

import numpy as np
import pytest

import fam_demo as demo
from fam_demo import dataset as D
from fam_demo.model import train_bpe


def test_word_lists_and_caption_grammar():
    assert len(demo.SHAPES) >= 6 and len(demo.COLORS) >= 6 and len(demo.BACKGROUNDS) >= 6
    assert demo.caption("star", "red", "striped grey") == "a red star on a striped grey background"
    for b in demo.BACKGROUNDS:
        pattern, tone = b.split(" ")
        assert pattern in demo.PATTERNS and tone in demo.TONES
    with pytest.raises(ValueError):
        demo.caption("dragon", "red", "striped grey")
    with pytest.raises(ValueError):
        demo.caption("star", "grey", "striped grey")
    with pytest.raises(ValueError):
        demo.caption("star", "red", "striped")


def test_colors_are_saturated_and_backgrounds_are_not():
    for rgb in D.COLOR_RGB.values():
        mx, mn = max(rgb), min(rgb)
        assert (mx - mn) / mx > 0.8
    for rgb in D.TONE_RGB.values():
        mx, mn = max(rgb), min(rgb)
        assert (mx - mn) / mx < 0.3


def test_dataset_is_deterministic_and_seeded():
    a, ca = D.generate_dataset(6, 32, seed=3)
    b, cb = D.generate_dataset(6, 32, seed=3)
    c, cc = D.generate_dataset(6, 32, seed=4)
    assert a.dtype == np.uint8 and a.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert ca == cb
    assert not np.array_equal(a, c)
    # item i does not depend on how many items are generated around it
    tail, ctail = D.generate_dataset(2, 32, seed=3, start=4)
    np.testing.assert_array_equal(tail, a[4:])
    assert ctail == ca[4:]


def test_captions_match_the_scene():
    for i in range(20):
        scene = D.sample_scene(D.scene_rng(7, i))
        obj = scene.objects[0]
        assert scene.caption == demo.caption(obj.shape, obj.color, scene.background.name)


@pytest.mark.parametrize("shape", D.SHAPES)
def test_every_shape_renders_inside_the_image(shape):
    scene = D.sample_scene(D.scene_rng(0, 0), shape=shape, color="red", pattern="plain", tone="grey")
    img = D.render(scene, 64).astype(int)
    red = (img[..., 0] - img[..., 1] > 100)
    assert 0.03 < red.mean() < 0.45
    assert not red[0].any() and not red[-1].any() and not red[:, 0].any() and not red[:, -1].any()


def test_render_any_size_is_consistent():
    scene = D.sample_scene(D.scene_rng(1, 2))
    small = D.render(scene, 32).astype(float)
    big = D.render(scene, (96, 96)).astype(float)
    down = big.reshape(32, 3, 32, 3, 3).mean(axis=(1, 3))
    assert np.abs(down - small).mean() < 6  # same picture, up to anti-aliasing
    assert D.render(scene, (40, 72)).shape == (40, 72, 3)


def test_bpe_makes_every_grammar_word_one_token():
    merges, vocab = train_bpe(D.vocabulary_words())
    tokens = set(vocab)
    for w in D.vocabulary_words():
        assert w + "</w>" in tokens
    assert len(set(merges)) == len(merges)


def test_parse_caption_inverts_caption():
    assert D.parse_caption("a red star on a striped grey background") == ("star", "red", "striped grey")
    for text in ["a red dragon on a striped grey background", "a red star on a grey background", "red star", ""]:
        with pytest.raises(ValueError, match="not a caption of the grammar"):
            D.parse_caption(text)
