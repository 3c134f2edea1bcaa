import numpy as np
import pytest
from conftest import smear

from wbc_spark.augment import stain_shift
from wbc_spark.stain import REFERENCE, FieldStain, field_stain, standardise
from wbc_spark.transforms import cell_crop


def test_field_stain_measures_a_global_shift():
    field = np.asarray(smear(128, radius=12))
    before = field_stain(field)
    after = field_stain(stain_shift(field, 0.05, 0.7, 1.0, 1.0))
    assert abs((after.hue - before.hue) % 1.0 - 0.05) < 0.01
    assert after.saturation / before.saturation == pytest.approx(0.7, abs=0.05)


def test_standardise_undoes_a_global_stain_shift():
    field = np.asarray(smear(128, radius=12))
    shifted = stain_shift(field, 0.05, 0.7, 1.08, 0.9)
    a = standardise(field, field_stain(field)).astype(int)
    b = standardise(shifted, field_stain(shifted)).astype(int)
    assert np.abs(shifted.astype(int) - field.astype(int)).mean() > 8  # the shift is visible
    assert np.abs(a - b).mean() < 3  # and standardising takes it away


def test_standardise_to_own_stain_is_identity():
    field = np.asarray(smear(96, radius=10))
    stain = field_stain(field)
    assert np.abs(standardise(field, stain, stain).astype(int) - field).max() <= 2


def test_the_cell_is_left_out_of_the_field_measure():
    """A big purple cell must not pull the field's hue towards purple."""
    field = np.asarray(smear(128, radius=40))
    rgb = field.astype(float)
    cell = ((rgb[..., 0] + rgb[..., 2]) / 2 - rgb[..., 1]) > 15
    without = field_stain(field, cell)
    with_cell = field_stain(field)
    background = field_stain(np.asarray(smear(128, radius=1)))
    hue_gap = lambda a, b: abs((a.hue - b.hue + 0.5) % 1.0 - 0.5)  # noqa: E731
    assert hue_gap(without, background) < hue_gap(with_cell, background)


def test_field_crops_agree_across_stains():
    img = smear(256, radius=20)
    shifted = stain_shift(np.asarray(img), 0.05, 0.7, 1.08, 0.9)
    from PIL import Image

    a, _, _ = cell_crop(img, 64, stain="field")
    b, _, _ = cell_crop(Image.fromarray(shifted), 64, stain="field")
    raw, _, _ = cell_crop(Image.fromarray(shifted), 64, stain="none")
    assert np.abs(a.astype(int) - b).mean() < np.abs(a.astype(int) - raw).mean() / 3


def test_unknown_stain_mode_is_refused():
    with pytest.raises(ValueError, match="stain='macenko'"):
        cell_crop(smear(64, radius=8), 32, stain="macenko")


def test_reference_is_a_valid_stain():
    assert isinstance(REFERENCE, FieldStain)
    assert 0 <= REFERENCE.hue < 1 and 0 < REFERENCE.saturation < 1
    assert 0 <= REFERENCE.v_low < REFERENCE.v_high <= 1


def test_corrections_beyond_any_lab_difference_are_capped():
    from wbc_spark.stain import MAX_HUE_SHIFT

    purple = np.zeros((8, 8, 3), np.uint8) + (120, 60, 150)
    odd = FieldStain(hue=(REFERENCE.hue + 0.4) % 1.0, saturation=0.01, v_low=0.5, v_high=0.52)
    out = standardise(purple, odd)
    from wbc_spark.colour import rgb_to_hsv

    before, after = rgb_to_hsv(purple[:1, :1] / 255.0)[0, 0], rgb_to_hsv(out[:1, :1] / 255.0)[0, 0]
    turned = abs((after[0] - before[0] + 0.5) % 1.0 - 0.5)
    assert turned <= MAX_HUE_SHIFT + 0.01  # not the 0.4 turn the odd field asked for
    assert after[1] <= min(1.0, before[1] * 2.0) + 0.02


def test_a_cell_the_standardised_colours_hide_is_still_found(monkeypatch):
    """If nothing stands out after standardising, the raw field's cell is kept."""
    import wbc_spark.transforms as transforms

    img = smear(256, cell_xy=(80, 170), radius=20)
    monkeypatch.setattr(transforms, "standardise",
                        lambda rgb, stain: np.full_like(rgb, 128))  # every colour gone
    _, box, mask = cell_crop(img, 64, stain="field")
    assert box.found and mask is not None
    cx, cy = box.left + box.side / 2, box.top + box.side / 2
    assert abs(cx - 80) < 10 and abs(cy - 170) < 10


def test_lab_conversion_agrees_with_scikit_image_and_round_trips():
    from skimage.color import rgb2lab

    from wbc_spark.colour import lab_to_rgb, rgb_to_lab

    rgb = np.random.default_rng(0).random((40, 40, 3))
    assert np.abs(rgb_to_lab(rgb) - rgb2lab(rgb)).max() < 0.01
    assert np.abs(lab_to_rgb(rgb_to_lab(rgb)) - rgb).max() < 1e-9


def test_uint8_lab_paths_agree_with_the_float64_ones_within_one_level():
    from wbc_spark.colour import lab_to_rgb, lab_to_u8, rgb_to_lab, u8_to_lab

    rgb = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    exact = rgb_to_lab(rgb / 255.0)
    assert u8_to_lab(rgb).dtype == np.float32
    assert np.abs(u8_to_lab(rgb) - exact).max() < 1e-3
    assert np.array_equal(lab_to_u8(u8_to_lab(rgb)), rgb)  # round trip, every level kept
    moved = exact + np.array([5.0, -20.0, 30.0])  # some of it outside the gamut
    want = np.clip(lab_to_rgb(moved) * 255 + 0.5, 0, 255).astype(np.uint8)
    got = lab_to_u8(moved.astype(np.float32))
    assert np.abs(got.astype(int) - want).max() <= 1
    assert (got != want).mean() < 0.01


def test_reinhard_gives_every_crop_the_reference_statistics_and_undoes_a_shift():
    from wbc_spark.stain import REINHARD_MEAN, REINHARD_STD, crop_lab, reinhard

    crop = np.asarray(smear(128, radius=40))
    shifted = stain_shift(crop, 0.03, 0.8, 1.1, 0.85)
    assert np.abs(shifted.astype(int) - crop).mean() > 8  # the shift is visible
    a, b = reinhard(crop), reinhard(shifted)
    for out in (a, b):
        mean, std = crop_lab(out)
        assert np.abs(mean - REINHARD_MEAN).max() < 2 and np.abs(std - REINHARD_STD).max() < 2
    assert np.abs(a.astype(int) - b).mean() < np.abs(shifted.astype(int) - crop).mean() / 3


def test_reinhard_caps_the_stretch_of_a_nearly_uniform_crop():
    from wbc_spark.stain import REINHARD_FACTORS, REINHARD_STD, crop_lab, reinhard

    flat = np.full((64, 64, 3), 200, np.uint8)
    flat[::8, ::8] = 190  # a faint speckle: a spread far below the reference's
    _, before = crop_lab(flat)
    _, after = crop_lab(reinhard(flat))
    assert np.all(after < REINHARD_STD / 2)  # not blown up to the reference spread
    assert np.all(after <= before * REINHARD_FACTORS[1] + 0.5)


def test_reinhard_crops_through_cell_crop():
    a, _, _ = cell_crop(smear(256, radius=20), 64, stain="reinhard")
    raw, _, _ = cell_crop(smear(256, radius=20), 64, stain="none")
    assert a.shape == raw.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - raw).mean() > 1  # it changed the colours


def test_lightness_matches_l_and_keeps_the_surround_balanced_hues():
    from wbc_spark.colour import rgb_to_lab
    from wbc_spark.stain import LIGHTNESS_MEAN, LIGHTNESS_STD, crop_lab, lightness, surround_balance

    crop = stain_shift(np.asarray(smear(128, radius=40)), 0.0, 1.0, 0.85, 1.2)
    out = lightness(crop)
    mean, std = crop_lab(out)
    assert abs(mean[0] - LIGHTNESS_MEAN[0]) < 2 and abs(std[0] - LIGHTNESS_STD[0]) < 2
    balanced = rgb_to_lab(surround_balance(crop) / 255.0)
    after = rgb_to_lab(out / 255.0)
    assert np.abs(after[..., 0] - balanced[..., 0]).mean() > 2  # L moved
    assert np.abs(after[..., 1:] - balanced[..., 1:]).mean() < 1.5  # a and b kept
