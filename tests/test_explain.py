import io

import numpy as np
import torch
from PIL import Image

from wbc_spark.evaluation.activation_maps import area_on_cell, crop_mask, mass_on_cell
from wbc_spark.explain import class_activation_maps
from wbc_spark.model.googlenet import BVLCGoogLeNet
from wbc_spark.model.transfer import WBCNet
from wbc_spark.model.weights import CAFFE_CONVENTION


def png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def test_crop_mask_follows_the_box_and_leaves_outside_empty():
    mask = np.zeros((100, 100), bool)
    mask[40:60, 40:60] = True
    inside = crop_mask(png(mask), [30, 30, 40], 40)  # box fully inside the frame
    assert inside[10:30, 10:30].all() and not inside[:10].any()
    edge = crop_mask(png(mask), [-50, -50, 100], 100)  # half the box is off the frame
    assert edge[90:, 90:].all() and not edge[:50].any()


def test_mass_on_cell_scores_maps_on_and_off_the_cell():
    masks = np.zeros((2, 32, 32), bool)
    masks[:, 8:24, 8:24] = True
    on = np.zeros((1, 4, 4))
    on[0, 1:3, 1:3] = 1
    off = np.zeros((1, 4, 4))
    off[0, 0, 0] = 1
    frac, hit = mass_on_cell(np.concatenate([on, off]), masks)
    assert frac[0] > 0.6 and frac[1] < 0.2  # the cell covers 25% of the crop
    assert hit.tolist() == [True, False]
    assert area_on_cell(masks) == __import__("pytest").approx([0.25, 0.25])


def test_maps_explain_the_predicted_class():
    torch.manual_seed(0)
    model = WBCNet(BVLCGoogLeNet(), CAFFE_CONVENTION, 3).eval()
    feats = torch.relu(torch.randn(2, 512, 14, 14))  # inception4c's output, the default cut
    maps, preds = class_activation_maps(model, feats)
    assert maps.shape == (2, 7, 7) and (maps >= 0).all()
    with torch.no_grad():
        assert preds.tolist() == model.head(feats).argmax(1).tolist()
