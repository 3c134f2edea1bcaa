import numpy as np
import pytest
import torch

from wbc_spark.align import MAX_SCALE, ChannelMap, LabAlignment, Moments


def relu_features(n, seed, offset=0.0, spread=1.0, channels=6, side=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, side, side, generator=g) * spread + offset
    return x.clamp_min(0)


def test_moments_are_the_mean_and_spread_over_images_and_positions():
    x = relu_features(40, 0, offset=0.5, spread=2.0)
    m = Moments.of(x, chunk=7)
    flat = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1).double()
    np.testing.assert_allclose(m.mean, flat.mean(1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(m.sd, flat.std(1, unbiased=False).numpy(), rtol=1e-9)
    assert (m.count, m.images) == (40 * 9, 40)


def test_partial_moments_add_up_to_one_pass():
    x = relu_features(30, 1)
    whole = Moments.of(x)
    parts = Moments.of(x[:11]) + Moments.of(x[11:])
    np.testing.assert_allclose(parts.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(parts.sd, whole.sd, rtol=1e-9)
    assert parts.images == 30
    with pytest.raises(ValueError, match="channels"):
        whole + Moments.of(relu_features(3, 2, channels=4))
    with pytest.raises(ValueError, match="N x C x H x W"):
        Moments.of(x[0])


def test_a_lab_mapped_takes_the_reference_moments():
    reference = relu_features(200, 3, offset=1.0, spread=1.0)
    shifted = reference * 2.5 + 0.7  # the same cells, another lab's offset and scale
    alignment = LabAlignment(Moments.of(reference), {"new": Moments.of(shifted)})
    mapped = alignment.apply(shifted, np.array(["new"] * len(shifted)))
    np.testing.assert_allclose(mapped.numpy(), reference.numpy(), atol=1e-4)
    assert torch.equal(shifted, reference * 2.5 + 0.7)  # not overwritten


def test_the_scale_is_bounded_and_outputs_stay_non_negative():
    ref, flat = Moments.of(relu_features(50, 4, spread=3.0)), Moments.of(
        torch.full((50, 6, 3, 3), 0.2))  # a constant lab: zero spread
    m = ChannelMap.between(flat, ref)
    assert float(m.scale.max()) == pytest.approx(MAX_SCALE)
    low = ChannelMap.between(ref, Moments.of(torch.full((5, 6, 3, 3), 0.1)))
    assert float(low.scale.min()) == pytest.approx(1 / MAX_SCALE)
    assert float(low(relu_features(5, 5, spread=3.0)).min()) >= 0


def test_apply_maps_each_image_by_its_own_lab_views_too():
    a, b = relu_features(20, 6), relu_features(20, 7, offset=2.0, spread=0.5)
    x = torch.cat([a, b])
    labs = np.array(["a"] * 20 + ["b"] * 20)
    alignment = LabAlignment.fit(x, labs)
    out = alignment.apply(x, labs)
    np.testing.assert_allclose(out[:20].numpy(), alignment.map_for("a")(a).numpy())
    np.testing.assert_allclose(out[20:].numpy(), alignment.map_for("b")(b).numpy())
    views = torch.stack([x, x.flip(-1)])  # V x N x C x H x W
    mapped_views = alignment.apply(views, labs)
    np.testing.assert_allclose(mapped_views[1].numpy(), alignment.apply(x.flip(-1), labs).numpy())
    with pytest.raises(ValueError, match="labs for"):
        alignment.apply(x, labs[:3])
    mixed = np.random.default_rng(0).permutation(labs)  # chunks of 7 cut the labs' runs
    np.testing.assert_allclose(alignment.apply(x, mixed, chunk=7).numpy(),
                               alignment.apply(x, mixed, chunk=1000).numpy())
    in_place = x.clone()
    assert alignment.apply(in_place, mixed, inplace=True, chunk=7) is in_place


def test_an_unknown_lab_is_refused_unless_measured():
    x = relu_features(10, 8)
    alignment = LabAlignment.fit(x, np.array(["KRD-WBC"] * 10))
    with pytest.raises(KeyError, match="'elsewhere' has no moments: known labs are KRD-WBC"):
        alignment.map_for("elsewhere")
    measured = alignment.map_for("elsewhere", Moments.of(x * 3))
    np.testing.assert_allclose(measured(x * 3).numpy(), x.numpy(), atol=1e-4)


def test_state_round_trip():
    x = relu_features(12, 9)
    alignment = LabAlignment.fit(x, np.array(["p"] * 5 + ["q"] * 7))
    state = alignment.to_state()
    assert all(type(k) is str for k in state["labs"])  # an artifact loads with weights_only
    back = LabAlignment.from_state(state)
    assert sorted(back.labs) == ["p", "q"]
    for lab in ("p", "q"):
        assert torch.equal(back.map_for(lab).scale, alignment.map_for(lab).scale)
        assert torch.equal(back.map_for(lab).shift, alignment.map_for(lab).shift)
    assert back.reference.images == 12
