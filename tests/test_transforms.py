import numpy as np
from conftest import smear
from PIL import Image

from wbc_spark.augment import hsv_to_rgb, rescale, rgb_to_hsv, stain_shift
from wbc_spark.transforms import cell_crop, dihedral, locate_cell


def test_locator_finds_the_purple_cell():
    box, mask, _ = locate_cell(smear(cell_xy=(60, 190), radius=25))
    assert box.found
    cx, cy = box.left + box.side / 2, box.top + box.side / 2
    assert abs(cx - 60) < 8 and abs(cy - 190) < 8


def test_crop_fixes_the_cell_scale():
    """The same cell at two zooms gives crops where the cell has the same size."""
    small, _, _ = cell_crop(smear(256, (128, 128), radius=20), 96)
    large, _, _ = cell_crop(smear(512, (256, 256), radius=40, seed=1), 96)

    def nucleus_fraction(crop):
        rgb = crop.astype(float)
        return (((rgb[..., 0] + rgb[..., 2]) / 2 - rgb[..., 1]) > 40).mean()

    assert abs(nucleus_fraction(small) - nucleus_fraction(large)) < 0.03


def test_no_cell_gives_centre_crop_flagged():
    blank = Image.fromarray(np.full((200, 300, 3), 200, np.uint8))
    crop, box, mask = cell_crop(blank, 32)
    assert not box.found and mask is None
    assert crop.shape == (32, 32, 3) and box.side == 200


def test_crop_off_the_edge_is_reflected_not_black():
    crop, box, _ = cell_crop(smear(256, (20, 20), radius=18), 64)
    assert box.left < 0
    assert crop.min() > 20  # no black padding


def test_dihedral_group():
    x = np.arange(2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
    views = {dihedral(x, k).tobytes() for k in range(8)}
    assert len(views) == 8
    assert np.array_equal(dihedral(x, 0), x)


def test_hsv_roundtrip_and_neutral_shift():
    rng = np.random.default_rng(0)
    rgb = rng.random((10, 10, 3))
    assert np.allclose(hsv_to_rgb(rgb_to_hsv(rgb)), rgb, atol=1e-6)
    img = (rgb * 255).astype(np.uint8)
    same = stain_shift(img, 0.0, 1.0, 1.0, 1.0)
    assert np.abs(same.astype(int) - img).max() <= 1


def test_rescale_keeps_size_and_zooms():
    img = np.asarray(smear(128, (64, 64), radius=16))
    for f in (0.8, 1.25):
        out = rescale(img, f)
        assert out.shape == img.shape
    # Zooming in makes the purple nucleus cover more of the frame.
    def purple(a):
        return ((a[..., 0].astype(int) + a[..., 2]) / 2 - a[..., 1] > 40).mean()
    assert purple(rescale(img, 1.25)) > purple(img) > purple(rescale(img, 0.8))
