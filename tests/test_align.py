from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wbc_spark.align import MAX_SCALE, ChannelMap, LabAlignment, LabSampler, Moments


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


def test_a_map_leaves_its_input_alone_and_a_one_lab_chunk_is_mapped_where_it_lies():
    """The map works on its own fp32 copy (an fp32 input is not overwritten), and ``apply``
    maps a chunk holding one lab's rows in place of its index copy: both give exactly
    ``(x * scale + shift).clamp(0)`` in fp32, cast back to the cache's fp16, channels-last."""
    a, b = relu_features(16, 8), relu_features(16, 9, offset=1.5)
    x = torch.cat([a, b])
    labs = np.array(["a"] * 16 + ["b"] * 16)
    alignment = LabAlignment.fit(x, labs)
    kept = x.clone()
    alignment.map_for("b")(x)
    assert torch.equal(x, kept)
    cache = x.half().contiguous(memory_format=torch.channels_last)
    expected = torch.cat([
        (cache[labs == lab].float() * m.scale.view(-1, 1, 1) + m.shift.view(-1, 1, 1))
        .clamp_min(0).half() for lab, m in (("a", alignment.map_for("a")),
                                            ("b", alignment.map_for("b")))])
    for chunk in (16, 8, 5):  # one lab per chunk, then chunks across the labs' boundary
        out = alignment.apply(cache.clone(), labs, inplace=True, chunk=chunk)
        assert torch.equal(out, expected)
        assert out.is_contiguous(memory_format=torch.channels_last)


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


def test_the_sampler_measures_each_lab_on_its_first_images_across_batches():
    """Batch by batch, only the images a lab still needs are taken; each lab's moments are
    those of its first ``per_lab`` images, and the reference weighs the labs by their samples."""
    feats = relu_features(60, 9)
    labs = np.array(["big"] * 50 + ["small"] * 10)
    np.random.default_rng(0).shuffle(labs)
    sampler = LabSampler(per_lab=12)
    measured = []
    for start in range(0, 60, 16):
        batch_labs = labs[start:start + 16]
        take = sampler.wanted(batch_labs)
        assert all(sampler.count(lab) < 12 for lab in batch_labs[take])
        sampler.add(feats[start:start + 16][torch.from_numpy(take)], batch_labs[take])
        measured.extend(start + take)
    assert sampler.full({"big"}) and not sampler.full({"big", "small"})
    assert (sampler.count("big"), sampler.count("small")) == (12, 10)
    first_big = np.flatnonzero(labs == "big")[:12]
    np.testing.assert_array_equal(sorted(measured),
                                  sorted([*first_big, *np.flatnonzero(labs == "small")]))
    alignment = sampler.alignment()
    np.testing.assert_allclose(alignment.labs["big"].mean,
                               Moments.of(feats[torch.from_numpy(first_big)]).mean, rtol=1e-12)
    assert alignment.reference.images == 22
    assert sampler.wanted(np.array(["big", "small", "new"])).tolist() == [1, 2]
    with pytest.raises(ValueError, match="no lab"):
        LabSampler().alignment()


class _FrozenStub(torch.nn.Module):
    """Frozen layers stand-in: a 3 x 2 x 2 output per image, its value the image's mean."""

    def embed_frozen(self, images):
        self.seen += len(images)
        return images.float().mean((1, 2, 3)).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone()


def test_training_measures_each_lab_beyond_the_plain_sample_and_refuses_a_missing_lab(
        monkeypatch):
    """``lab_alignment`` tops up a lab short in the plain sample from the rest of the training
    crops, passing only the crops still needed through the frozen layers."""
    from wbc_spark import training_worker

    monkeypatch.setattr(training_worker, "LAB_SAMPLE", 5)
    sources = ["big"] * 8 + ["big", "small"] * 6 + ["big"] * 4  # rows 0-23
    images = torch.arange(24, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 4, 4)
    rows: list[int] = list(range(8))  # the plain sample: rows 0-7, all "big"

    def stream():
        for start in range(8, 24, 4):
            rows.extend(range(start, start + 4))
            yield images[start:start + 4], torch.zeros(4, dtype=torch.long)

    model = _FrozenStub()
    model.seen = 0
    plain = model.embed_frozen(images[:8])
    job = SimpleNamespace(sources=sources, trained_on={"big": {"N": 14}, "small": {"N": 6}})
    alignment = training_worker.lab_alignment(model, job, "fp32", plain,
                                              np.array(sources[:8]), stream(), rows)
    assert {lab: m.images for lab, m in alignment.labs.items()} == {"big": 5, "small": 5}
    # "big" from the plain sample's rows 0-4; "small" from rows 9, 11, ..., 17.
    assert alignment.labs["big"].mean[0] == pytest.approx(2.0)
    assert alignment.labs["small"].mean[0] == pytest.approx(13.0)
    assert model.seen == 8 + 5  # the plain sample, then only the five "small" crops
    job.trained_on["elsewhere"] = {"N": 3}
    rows[:] = list(range(8))
    with pytest.raises(RuntimeError, match=r"lab\(s\) \['elsewhere'\]"):
        training_worker.lab_alignment(model, job, "fp32", plain, np.array(sources[:8]),
                                      stream(), rows)
