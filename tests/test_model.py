from unittest import mock

import pytest
import torch

from wbc_spark.model.googlenet import BVLCGoogLeNet
from wbc_spark.model.transfer import WBCNet, build_classifier, parameter_summary
from wbc_spark.model.weights import (
    CAFFE_CONVENTION,
    WeightsError,
    load_bvlc,
    load_torchvision,
    resolve_bvlc_dir,
)


def test_bvlc_shapes():
    net = BVLCGoogLeNet(num_classes=7).eval()
    with torch.no_grad():
        out = net(torch.zeros(2, 3, 224, 224))
    assert out.shape == (2, 7)
    assert sum(p.numel() for p in net.parameters()) == 6_998_552 - 1000 * 1025 + 7 * 1025


def test_loader_fills_every_tensor(fake_weights):
    pm = load_bvlc(fake_weights)
    assert pm.source == "bvlc" and pm.convention.channel_order == "BGR"
    # The 5x5 branch really is 5x5 (torchvision uses 3x3 there).
    assert pm.model.inception3a.branch3[1][0].weight.shape == (32, 16, 5, 5)
    assert pm.provenance["sha256sums_digest"]


def test_corrupt_blob_is_refused(fake_weights, tmp_path):
    import shutil

    bad = tmp_path / "bvlc"
    shutil.copytree(fake_weights, bad)
    blob = bad / "weights" / "inception_4a" / "1x1_filter.bin"
    blob.write_bytes(blob.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(WeightsError, match="1x1_filter.bin: SHA-256 mismatch"):
        load_bvlc(bad)


def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("WBC_SPARK_WEIGHTS_DIR", str(tmp_path / "nothing"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with mock.patch("wbc_spark.model.weights.default_weight_dirs",
                    return_value=[tmp_path / "nothing", tmp_path / "cache"]):
        with pytest.raises(WeightsError, match="WBC_SPARK_WEIGHTS_DIR"):
            resolve_bvlc_dir()
    with pytest.raises(WeightsError, match="no SHA256SUMS"):
        resolve_bvlc_dir(tmp_path)


def test_env_var_is_in_the_lookup_order(fake_weights, monkeypatch):
    monkeypatch.setenv("WBC_SPARK_WEIGHTS_DIR", str(fake_weights))
    assert resolve_bvlc_dir() == fake_weights


def test_failed_torchvision_download_explains_offline_use():
    with mock.patch("torchvision.models.googlenet", side_effect=OSError("network down")):
        with pytest.raises(WeightsError, match="model.source=bvlc"):
            load_torchvision()


@pytest.mark.parametrize("freeze_until, frozen_last, trained_first", [
    ("inception4e", "inception4e", "inception5a"),
    ("inception3b", "inception3b", "inception4a"),
    ("none", None, "conv1"),
])
def test_frozen_get_no_gradient_and_trainable_do(freeze_until, frozen_last, trained_first):
    torch.manual_seed(0)
    net = WBCNet(BVLCGoogLeNet(), CAFFE_CONVENTION, 3, freeze_until=freeze_until)
    net.train()
    images = torch.randint(0, 255, (2, 96, 96, 3), dtype=torch.uint8)
    loss = net(images).logsumexp(1).sum()
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in net.named_parameters():
        if name.startswith("frozen."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), name
    names = list(net.frozen._modules) + ["|"] + list(net.trainable._modules)
    if frozen_last:
        assert names[names.index("|") - 1] in (frozen_last, "pool3", "pool4")
    assert names[names.index("|") + 1] == trained_first


def test_summary_counts_and_head(fake_weights, caplog):
    pm = load_bvlc(fake_weights)
    with caplog.at_level("INFO"):
        net = build_classifier(pm, 7, freeze_until="inception4e")
    s = parameter_summary(net)
    assert net.fc.out_features == 7
    assert s["trainable_stages"] == ["inception5a", "inception5b", "fc"]
    assert s["frozen_parameters"] + s["trainable_parameters"] == sum(
        p.numel() for p in net.parameters())
    assert "frozen: conv1" in caplog.text and "1000 -> 7 classes" in caplog.text


def test_invalid_freeze_point():
    with pytest.raises(ValueError, match="choose none or one of"):
        WBCNet(BVLCGoogLeNet(), CAFFE_CONVENTION, 3, freeze_until="layer4")


@pytest.mark.parametrize("batch", [1, 3, 4])
def test_fast_lrn_matches_torch(batch):
    from torch import nn

    from wbc_spark.model.googlenet import LocalResponseNorm

    x = torch.relu(torch.randn(batch, 12, 9, 9) * 60)
    ours = LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
    stock = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
    with torch.inference_mode():
        assert torch.allclose(ours(x), stock(x), rtol=1e-5, atol=1e-5)
        assert ours(x.bfloat16()).dtype == torch.bfloat16
    y = x.clone().requires_grad_(True)  # with gradients: the stock path, same values
    assert torch.allclose(ours(y), stock(x), rtol=1e-5, atol=1e-5)


def test_bf16_forward_close_to_fp32():
    from wbc_spark.model.transfer import inference_precision

    torch.manual_seed(0)
    net = WBCNet(BVLCGoogLeNet(), CAFFE_CONVENTION, 5).eval()
    images = torch.randint(0, 255, (2, 224, 224, 3), dtype=torch.uint8)
    with torch.inference_mode():
        full = net(images).softmax(1)
        with inference_precision("bf16"):
            half = net(images).float().softmax(1)
    assert (full - half).abs().max() < 0.05
    with pytest.raises(ValueError, match="choose one of auto, fp32, bf16"):
        inference_precision("int4")


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(tmp_path):
    from wbc_spark.model.transfer import cpu_flags, resolve_precision

    amd_avx2 = tmp_path / "cpuinfo"  # this project's machine in session 12: no bf16 units
    amd_avx2.write_text("processor\t: 0\nmodel name\t: AMD EPYC\n"
                        "flags\t\t: fpu sse sse2 avx avx2 fma\n\nprocessor\t: 1\n")
    flags = cpu_flags(str(amd_avx2))
    assert "avx2" in flags and "avx512_bf16" not in flags
    assert resolve_precision("auto", flags) == "fp32"
    assert resolve_precision("auto", flags | {"avx512_bf16"}) == "bf16"
    assert resolve_precision("auto", frozenset({"avx512f", "amx_bf16", "amx_tile"})) == "bf16"
    assert resolve_precision("auto", frozenset()) == "fp32"  # flags not listed: fp32
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()
    # An explicit choice is kept whatever the CPU.
    assert resolve_precision("bf16", flags) == "bf16"
    assert resolve_precision("fp32", frozenset({"amx_bf16"})) == "fp32"


def test_a_gpu_is_used_only_where_torch_sees_one(monkeypatch):
    from wbc_spark.model import transfer

    monkeypatch.setattr(transfer.torch.cuda, "is_available", lambda: False)
    transfer.resolve_device.cache_clear()
    assert transfer.resolve_device("cpu") == "cpu"
    assert transfer.resolve_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="score.device=cuda: torch .* sees no CUDA device"):
        transfer.resolve_device("cuda")
    with pytest.raises(ValueError, match="choose one of cpu, cuda, auto"):
        transfer.resolve_device("gpu")
    monkeypatch.setattr(transfer.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transfer.torch.cuda, "get_device_name", lambda device: "a test GPU")
    transfer.resolve_device.cache_clear()
    monkeypatch.setattr(transfer.torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(transfer.torch.backends.cuda.matmul, "allow_tf32", True)
    assert transfer.resolve_device("auto") == "cuda"
    assert transfer.resolve_device("cuda", "3") == "cuda:3"  # the GPU Spark assigned
    # fp32 on the GPU is fp32, not TF32
    assert not transfer.torch.backends.cudnn.allow_tf32
    assert not transfer.torch.backends.cuda.matmul.allow_tf32
    transfer.resolve_device.cache_clear()


def test_on_a_gpu_auto_precision_is_fp32_and_int8_is_refused():
    from wbc_spark.model.transfer import resolve_precision

    amx = frozenset({"amx_bf16", "avx512_bf16"})
    assert resolve_precision("auto", amx) == "bf16"  # this CPU would take bf16
    assert resolve_precision("auto", amx, device="cuda") == "fp32"
    assert resolve_precision("bf16", amx, device="cuda:1") == "bf16"
    with pytest.raises(ValueError, match="int8 on cuda:0: int8 is the CPU's"):
        resolve_precision("int8", amx, device="cuda:0")


def test_use_torch_lrn_swaps_every_lrn_and_keeps_the_output():
    from torch import nn

    from wbc_spark.model.googlenet import LocalResponseNorm, use_torch_lrn

    torch.manual_seed(0)
    net = BVLCGoogLeNet(num_classes=3).eval()
    x = torch.rand(1, 3, 224, 224) * 100
    with torch.inference_mode():
        before = net(x)
        use_torch_lrn(net)
        after = net(x)
    kinds = [type(m) for m in net.modules() if isinstance(m, nn.LocalResponseNorm)]
    assert kinds == [nn.LocalResponseNorm, nn.LocalResponseNorm]
    assert not any(isinstance(m, LocalResponseNorm) for m in net.modules())
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)


def test_frozen_layers_in_chunks_give_the_whole_batch_s_output(monkeypatch):
    torch.manual_seed(0)
    net = WBCNet(BVLCGoogLeNet(), CAFFE_CONVENTION, 5, freeze_until="conv2").eval()
    images = torch.randint(0, 255, (5, 96, 96, 3), dtype=torch.uint8)
    calls = []
    net.frozen.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    with torch.inference_mode():
        net.chunk_per_thread = 2
        chunked = net.embed_frozen(images)
        assert calls == [2, 2, 1]
        net.chunk_per_thread = 8
        whole = net.embed_frozen(images)
        assert calls[3:] == [5]
    assert chunked.shape == whole.shape and torch.allclose(chunked, whole, atol=1e-4)
    assert net.embed_frozen(images[:0]).shape[0] == 0


def test_int8_frozen_layers_quantise_every_convolution_and_stay_close_to_fp32():
    from torch.ao.nn.intrinsic.quantized import ConvReLU2d

    from wbc_spark.model.quantize import quantize_frozen

    torch.manual_seed(0)
    net = WBCNet(BVLCGoogLeNet(), CAFFE_CONVENTION, 5, freeze_until="inception3b").eval()
    calibration = torch.randint(0, 255, (4, 96, 96, 3), dtype=torch.uint8)
    int8 = quantize_frozen(net, calibration)
    convs = [m for m in int8.modules() if isinstance(m, ConvReLU2d)]
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in net.frozen.modules()) == 15
    images = torch.randint(0, 255, (3, 96, 96, 3), dtype=torch.uint8)
    with torch.inference_mode():
        full, low = net.embed_frozen(images), int8(images)
    assert low.shape == full.shape and low.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(full.flatten(1), low.flatten(1))
    assert cosine.min() > 0.98
    # The fp32 model is left as it was (the int8 network is a copy).
    assert all(isinstance(m, torch.nn.Conv2d) for m in net.frozen.modules()
               if "Conv" in type(m).__name__)
    with pytest.raises(ValueError, match="at least one image"):
        quantize_frozen(net, calibration[:0])


def test_int8_calibration_stored_as_plain_tensors_rebuilds_the_same_network():
    import io

    from wbc_spark.model.quantize import calibration_state, from_calibration, quantize_frozen

    torch.manual_seed(1)
    net = WBCNet(BVLCGoogLeNet(), CAFFE_CONVENTION, 5, freeze_until="inception3b").eval()
    calibration = torch.randint(0, 255, (4, 96, 96, 3), dtype=torch.uint8)
    state = calibration_state(net, calibration)
    assert state["images"] == 4 and state["observers"]
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    rebuilt = from_calibration(net, torch.load(buf, weights_only=True))
    direct = quantize_frozen(net, calibration)
    images = torch.randint(0, 255, (3, 96, 96, 3), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.equal(rebuilt.embed_frozen(images), direct(images))
    other = WBCNet(BVLCGoogLeNet(), CAFFE_CONVENTION, 5, freeze_until="inception4a").eval()
    with pytest.raises(ValueError, match="does not fit this model"):
        from_calibration(other, state)
