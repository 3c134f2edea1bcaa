import numpy as np
import pytest
from conftest import smear
from PIL import Image
from scipy import ndimage

from wbc_spark.augment import (
    AugmentSettings,
    augment,
    frame_edges,
    grey,
    reflect_beyond,
    rescale,
    stain_shift,
)
from wbc_spark.colour import hsv_to_rgb, rgb_to_hsv
from wbc_spark.transforms import (
    CellBox,
    cell_crop,
    cell_mask,
    dihedral,
    fill_holes,
    frame_box,
    locate_cell,
)


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
    crop, box, _ = cell_crop(smear(256, (20, 20), radius=18), 64, framing="reflect")
    assert box.left < 0
    assert crop.min() > 20  # no black padding


def test_a_crop_off_the_edge_is_moved_inside_the_frame():
    """framing="fit": the box keeps its side and moves inside, so the crop is the field as
    imaged (nothing reflected), and the cell is still in it, whole."""
    field = smear(256, (20, 20), radius=18)
    located, _, _ = locate_cell(field)
    crop, box, _ = cell_crop(field, 64, framing="fit")
    assert located.left < 0 and (box.left, box.top, box.side) == (0, 0, located.side)
    want = np.asarray(field.resize((64, 64), Image.BILINEAR, box=box.as_tuple()))
    assert np.array_equal(crop, want)
    nucleus = (crop[..., 2].astype(int) - crop[..., 1]) > 60
    assert nucleus.sum() > 0.9 * np.pi * (18 * 64 / box.side) ** 2


@pytest.mark.parametrize("box, want", [
    (CellBox(10, 20, 50, True), CellBox(10, 20, 50, True)),  # inside: unchanged
    (CellBox(-15, 90, 50, True), CellBox(0, 70, 50, True)),  # off two edges: moved in
    (CellBox(-30, 40, 140, True), CellBox(0, 20, 100, True)),  # larger: the shorter side
    (CellBox(-5, -5, 130, False), CellBox(0, 10, 100, False)),  # centred where it fits
])
def test_frame_box_fits_the_box_inside_a_100_by_120_image(box, want):
    assert frame_box(box, 100, 120, "fit") == want
    assert frame_box(box, 100, 120, "reflect") == box
    with pytest.raises(ValueError, match="framing='pad'"):
        frame_box(box, 100, 120, "pad")


@pytest.mark.parametrize("density", [0.2, 0.45, 0.6, 0.8])
def test_fill_holes_is_scipys(density):
    """The one-labelling fill gives ``ndimage.binary_fill_holes``'s mask exactly, with holes
    of every size, blobs touching the border and (at 0.8) background only in pockets."""
    rng = np.random.default_rng(int(density * 100))
    for _ in range(20):
        mask = ndimage.uniform_filter(rng.random((64, 48)), 3) < density
        assert np.array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
    for mask in (np.zeros((9, 9), bool), np.ones((9, 9), bool)):
        assert np.array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))


def test_the_locator_prefers_the_larger_central_blob():
    """Of two purple cells, the larger one near the centre is chosen (blob sizes and centres
    from counts), not a smaller one in a corner."""
    yy, xx = np.mgrid[:128, :128]
    field = np.zeros((128, 128, 3), np.uint8) + np.array([225, 205, 200], np.uint8)
    field[(xx - 70) ** 2 + (yy - 60) ** 2 < 18 ** 2] = (100, 40, 150)
    field[(xx - 15) ** 2 + (yy - 110) ** 2 < 9 ** 2] = (100, 40, 150)
    mask = cell_mask(field)
    ys, xs = np.nonzero(mask)
    assert abs(xs.mean() - 70) < 2 and abs(ys.mean() - 60) < 2
    assert not mask[110, 15]


def test_dihedral_group():
    x = np.arange(2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
    views = {dihedral(x, k).tobytes() for k in range(8)}
    assert len(views) == 8
    assert np.array_equal(dihedral(x, 0), x)


def test_rgb_to_hsv_matches_colorsys():
    import colorsys

    rng = np.random.default_rng(3)
    rgb = rng.random((200, 3)).astype(np.float32)
    rgb[:20] = rgb[:20, :1]  # greys: hue and saturation 0
    rgb[20:40, 1] = rgb[20:40, 0]  # ties between the largest channels
    ours = rgb_to_hsv(rgb)
    ref = np.array([colorsys.rgb_to_hsv(*px) for px in rgb.astype(np.float64)])
    assert np.allclose(ours, ref, atol=1e-5)


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


def _reflected_width(image, side):
    """Width of the mirrored strip on one side of a crop (0 when there is none)."""
    turned = np.rot90(image, side)
    w = turned.shape[1]
    for width in range(w // 2 - 1, 0, -1):
        inside = turned[:, w - width - 2:w - 2 * width - 2:-1]
        if np.array_equal(turned[:, w - width:], inside):
            return width
    return 0


def test_reflect_beyond_mirrors_one_side_like_crop_padding():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for side in range(4):
        out = reflect_beyond(img, side, 9)
        assert out.shape == img.shape
        assert _reflected_width(out, side) == 9
        # Everything on the frame's side of the edge is untouched.
        assert np.array_equal(np.rot90(out, side)[:, :31], np.rot90(img, side)[:, :31])
        assert all(_reflected_width(out, other) == 0 for other in range(4) if other != side)
    # The same reflection crop_box uses: np.pad's "reflect" of the part inside the frame.
    assert np.array_equal(reflect_beyond(img, 0, 9),
                          np.pad(img[:, :31], ((0, 0), (0, 9), (0, 0)), mode="reflect"))
    with pytest.raises(ValueError, match="frame edge width"):
        reflect_beyond(img, 0, 20)


def test_frame_edges_cut_one_or_two_sides_within_the_width():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)
    counts = []
    for _ in range(40):
        out = frame_edges(img, rng, 0.3, 2)
        widths = [_reflected_width(out, s) for s in range(4)]
        cut = [w for w in widths if w]
        assert cut and all(w <= 30 for w in cut)
        counts.append(len(cut))
    assert set(counts) == {1, 2}
    views = [frame_edges(img, rng, 0.3, 4) for _ in range(60)]
    four = [sum(_reflected_width(v, s) > 0 for s in range(4)) for v in views]
    assert set(four) == {1, 2, 3, 4}


def test_frame_edge_probability_zero_keeps_the_earlier_views():
    """frame_edge=0 and resolution=0 draw nothing extra from the generator: the views of a
    seed are the ones earlier versions made, so older cross-validation figures can be
    reproduced."""
    img = np.asarray(smear(64, (32, 32), radius=10))
    off = augment(img, np.random.default_rng(5), AugmentSettings(frame_edge=0.0,
                                                                 resolution=0.0))
    on = augment(img, np.random.default_rng(5), AugmentSettings(frame_edge=1.0,
                                                                resolution=0.0))
    # With frame edges off, the first draw is the flip/rotation: the same image, turned.
    k = int(np.random.default_rng(5).integers(8))
    turned = np.rot90(img, k % 4)
    turned = turned[:, ::-1] if k >= 4 else turned
    first = augment(img, np.random.default_rng(5), AugmentSettings(
        frame_edge=0.0, resolution=0.0, scale=1e-9, hue=0.0, saturation=0.0, brightness=0.0, contrast=0.0))
    assert np.abs(first.astype(int) - turned).max() <= 1
    assert off.shape == on.shape == img.shape and not np.array_equal(off, on)


def lobed_smear(size: int, scale: float) -> Image.Image:
    """A neutrophil seen at ``scale``: three nuclear lobes with gaps between them."""
    yy, xx = np.mgrid[:size, :size]
    img = np.zeros((size, size, 3), np.float32) + (225, 205, 200)
    c = size / 2
    cyto = (xx - c) ** 2 + (yy - c) ** 2 < (60 * scale) ** 2
    img[cyto] = (200, 180, 205)
    for dx, dy in ((-32, 0), (0, -24), (32, 0)):
        lobe = (xx - c - dx * scale) ** 2 + (yy - c - dy * scale) ** 2 < (15 * scale) ** 2
        img[lobe] = (110, 50, 150)
    return Image.fromarray(img.astype(np.uint8))


def test_a_lobed_nucleus_at_high_zoom_sets_the_crop_as_a_whole():
    """Lobes far apart on the locator's grid are one nucleus: the crop spans all of them
    (one lobe alone would give a crop a third as wide)."""
    box, _, _ = locate_cell(lobed_smear(360, 2.0))
    assert box.found
    assert box.side > 1.5 * (64 + 30) * 2.0 * 0.85


def test_a_platelet_beside_the_cell_does_not_stretch_its_box():
    """A speck of the cell's colour just outside it (a platelet) is not another lobe: the box
    stays that of the cell alone, so the cell fills its crop as it does without the speck.
    The cell's cytoplasm is stained as deeply as PBC-dev's, so the whole cell is one blob."""
    yy, xx = np.mgrid[:360, :360]
    alone = np.zeros((360, 360, 3), np.uint8) + np.array([225, 205, 200], np.uint8)
    alone[(xx - 180) ** 2 + (yy - 180) ** 2 < 60 ** 2] = (150, 90, 180)
    alone[(xx - 180) ** 2 + (yy - 180) ** 2 < 35 ** 2] = (100, 40, 150)
    with_platelet = alone.copy()
    with_platelet[(xx - 180) ** 2 + (yy - 180 - 90) ** 2 < 6 ** 2] = (100, 40, 150)
    box_alone, _, _ = locate_cell(Image.fromarray(alone))
    box_platelet, _, _ = locate_cell(Image.fromarray(with_platelet))
    assert box_alone.found and box_platelet.found
    assert abs(box_platelet.side - box_alone.side) <= 0.05 * box_alone.side


def test_white_balance_makes_the_background_neutral():
    from wbc_spark.stain import WHITE, background_white, white_balance

    field = np.asarray(smear(128))
    tinted = np.clip(field * np.array([1.0, 0.85, 0.7]), 0, 255).astype(np.uint8)
    for img in (field, tinted):
        out = white_balance(img, background_white(img)).astype(float)
        bg = np.percentile(out.reshape(-1, 3), 95, axis=0)
        assert np.abs(bg - WHITE).max() <= 3
    # Both fields end up alike: the tint is gone, not just the brightness.
    a = white_balance(field, background_white(field)).astype(int)
    b = white_balance(tinted, background_white(tinted)).astype(int)
    assert np.median(np.abs(a - b)) <= 4


def test_resolution_augmentation_blurs_but_keeps_the_size():
    from wbc_spark.augment import resample

    crop, _, _ = cell_crop(smear(256), 96)
    low = resample(crop, 0.35)
    assert low.shape == crop.shape and low.dtype == np.uint8

    def sharpness(a):
        return np.abs(np.diff(a.astype(float), axis=1)).mean()

    assert sharpness(low) < 0.8 * sharpness(crop)
    assert abs(low.astype(float).mean() - crop.astype(float).mean()) < 3


def test_surround_balance_takes_out_the_red_cells_tint_and_keeps_the_cell():
    from wbc_spark.stain import SURROUND, surround_balance, surround_mean

    crop, _, _ = cell_crop(smear(256, radius=30), 96)
    bluish = np.clip(crop * np.array([0.9, 0.95, 1.1]), 0, 255).astype(np.uint8)
    a, b = surround_balance(crop), surround_balance(bluish)
    assert np.abs(surround_mean(a) - SURROUND).max() < 2
    assert np.abs(surround_mean(b) - SURROUND).max() < 2
    assert np.median(np.abs(a.astype(int) - b.astype(int))) <= 3
    # The nucleus stays purple (red and blue above green) after the balance.
    centre = a[40:56, 40:56].reshape(-1, 3).astype(float).mean(0)
    assert (centre[0] + centre[2]) / 2 - centre[1] > 30


def test_cell_crop_applies_the_surround_mode():
    from wbc_spark.stain import SURROUND, surround_mean

    crop, _, _ = cell_crop(smear(256, radius=30), 96, stain="surround")
    assert np.abs(surround_mean(crop) - SURROUND).max() < 2


def test_stain_density_darkens_the_cell_and_keeps_its_surroundings():
    from wbc_spark.augment import stain_density
    from wbc_spark.stain import surround_mean

    crop, _, _ = cell_crop(smear(256, radius=30), 96, stain="surround")
    same = stain_density(crop, 1.0)
    assert np.abs(same.astype(int) - crop).max() <= 1
    darker, lighter = stain_density(crop, 2.0), stain_density(crop, 0.5)
    for out in (darker, lighter):
        assert np.abs(surround_mean(out) - surround_mean(crop)).max() < 2
    centre = (slice(40, 56), slice(40, 56))
    # The cell against its surroundings: darker with more stain, paler with less.
    assert darker[centre].mean() < crop[centre].mean() - 10
    assert lighter[centre].mean() > crop[centre].mean() + 10


def test_stain_density_is_drawn_only_when_on():
    img = np.asarray(smear(64, (32, 32), radius=10))
    base = augment(img, np.random.default_rng(3), AugmentSettings())
    again = augment(img, np.random.default_rng(3), AugmentSettings(density=0.0))
    dense = augment(img, np.random.default_rng(3), AugmentSettings(density=0.7))
    assert np.array_equal(base, again) and not np.array_equal(base, dense)


class FixedDraws:
    """An rng whose uniform draws are fixed values (what ``hed_jitter`` multiplies by)."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def uniform(self, low, high, size):
        return np.asarray(self.draws.pop(0), np.float32)


def test_hed_jitter_changes_the_stains_balance_in_the_cell_not_the_surroundings():
    from wbc_spark.augment import hed_jitter
    from wbc_spark.stain import surround_mean

    crop, _, _ = cell_crop(smear(256, radius=30), 96, stain="surround")
    same = hed_jitter(crop, FixedDraws([0, 0, 0], [0, 0, 0]), scale=0.6)
    assert np.abs(same.astype(int) - crop).max() <= 2
    # More haematoxylin, less eosin: the nucleus bluer against red, surroundings as they were.
    out = hed_jitter(crop, FixedDraws([0.6, -0.6, 0], [0, 0, 0]), scale=0.6)
    assert np.abs(surround_mean(out) - surround_mean(crop)).max() < 2
    centre = (slice(40, 56), slice(40, 56))
    before, after = crop[centre].astype(float).mean((0, 1)), out[centre].astype(float).mean((0, 1))
    assert after[2] / after[0] > before[2] / before[0] + 0.1


def test_grey_views_are_luminance_and_drawn_only_when_on():
    img = np.asarray(smear(64, (32, 32), radius=10))
    g = grey(img)
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    assert grey(np.full((2, 2, 3), (255, 0, 0), np.uint8))[0, 0, 0] == 76  # 0.299 of red
    base = augment(img, np.random.default_rng(3), AugmentSettings())
    off = augment(img, np.random.default_rng(3), AugmentSettings(hed=0.0, grey=0.0))
    assert np.array_equal(base, off)
    always = augment(img, np.random.default_rng(3), AugmentSettings(grey=1.0))
    assert (always[..., 0] == always[..., 2]).all()
    stained = augment(img, np.random.default_rng(3), AugmentSettings(hed=0.6))
    assert not np.array_equal(base, stained) and not (stained[..., 0] == stained[..., 2]).all()
