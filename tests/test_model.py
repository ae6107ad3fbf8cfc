"""model.py: names to modules, heads sized to the classes, local and 'pretrained' weights."""
import pytest
import torch
import torchvision
from torch import nn

import data
import model as model_lib
import utils
from conftest import eval_transform


@pytest.mark.parametrize("name", ["smallnet", "smallnet_tiny", "resnet18", "mobilenet_v3_small", "squeezenet1_0",
                                  "googlenet"])
def test_models_output_one_logit_per_class(name):
    net = model_lib.build_model(name, 7).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize("name", ["efficientnet_b0", "mnasnet0_5", "resnet18"])
def test_a_fresh_heads_scale_does_not_grow_as_classes_are_fewer(name):
    """torchvision's EfficientNets and MNASNets draw their head in a range of 1/sqrt(num_classes): for 2 classes
    their initial logits were 22x those for 1,000 (train loss 5 on 2 classes; AdamW from scratch on 244 photos:
    53-59% val top-1 after 5 epochs, 84-86% with the 1,000-class scale)."""
    def head_std(num_classes):
        net = model_lib.build_model(name, num_classes, log=lambda *_: None)
        return net.get_submodule(model_lib.head_name(net)).weight.std().item()
    assert head_std(2) == pytest.approx(head_std(1000), rel=0.2)


def test_list_and_unknown_names():
    names = model_lib.list_models()
    assert {"smallnet", "resnet18", "vit_b_16"} <= set(names)
    assert model_lib.check_model_name("resnet18") is None
    message = model_lib.check_model_name("resnet19")
    assert "resnet18" in message and "--list-models" in message
    with pytest.raises(ValueError, match="unknown model"):
        model_lib.build_model("nonet", 3)


def test_local_weights_drop_a_mismatched_head(tmp_path):
    source = torchvision.models.resnet18(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "imagenet.pth")
    messages = []
    net = model_lib.build_model("resnet18", 3, weights=tmp_path / "imagenet.pth", log=messages.append)
    assert torch.equal(net.conv1.weight, source.conv1.weight)
    assert net.fc.weight.shape == (3, 512)
    assert any("fc.weight" in m and "dropped" in m for m in messages)


def test_weights_saved_by_other_training_code_load(tmp_path):
    """A training checkpoint of another codebase: the weights under "state_dict" (Lightning's, timm's, mmcv's), their
    names prefixed by DDP's "module." or torch.compile's "_orig_mod."."""
    source = torchvision.models.resnet18(num_classes=3)
    for prefix in ("module.", "_orig_mod."):
        weights = {f"{prefix}{name}": tensor for name, tensor in source.state_dict().items()}
        torch.save({"state_dict": weights, "epoch": 90}, tmp_path / "other.pth")
        messages = []
        net = model_lib.build_model("resnet18", 3, weights=tmp_path / "other.pth", log=messages.append)
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), source.state_dict().values()))
        assert messages == [f"model: loaded 122/122 tensors from {tmp_path / 'other.pth'}"]
    torch.save([source.fc.weight], tmp_path / "list.pth")
    with pytest.raises(SystemExit, match="a list, not a state dict"):
        model_lib.build_model("resnet18", 3, weights=tmp_path / "list.pth")


def test_pretrained_uses_torchvision_weights(tmp_path, monkeypatch):
    # torchvision looks in $TORCH_HOME/hub/checkpoints before downloading: put a file there
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    source = torchvision.models.resnet18(num_classes=1000)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(source.state_dict(), cache / weights.url.rsplit("/", 1)[-1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    net = model_lib.build_model("resnet18", 5, pretrained=True, log=lambda *_: None)
    assert torch.equal(net.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert net.fc.out_features == 5


@pytest.mark.parametrize("name, size", [("googlenet", 96), ("inception_v3", 299)])
def test_pretrained_inception_nets_compute_what_torchvisions_do(tmp_path, monkeypatch, name, size):
    """Their ImageNet weights take inputs normalised by 0.5: torchvision maps ImageNet's normalisation to it."""
    torch.manual_seed(0)
    images = torch.randn(4, 3, size, size)
    source = torchvision.models.get_model(name, aux_logits=True, init_weights=True, transform_input=True)
    for norm in source.modules():
        if isinstance(norm, nn.BatchNorm2d):
            norm.momentum = None  # the running statistics become those of the batch: eval mode passes a signal
    with torch.no_grad():
        source(images)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(source.state_dict(), tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ours = model_lib.build_model(name, 1000, pretrained=True, log=lambda *_: None).eval()
    theirs = torchvision.models.get_model(name, weights="DEFAULT").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images))


def test_pretrained_without_internet_says_where_to_put_the_file(tmp_path, monkeypatch):
    # a compute node without internet: the download fails (here: through a proxy nobody listens on)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for name in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    file = torchvision.models.get_model_weights("resnet18").DEFAULT.url.rsplit("/", 1)[-1]
    with pytest.raises(SystemExit, match=rf"--pretrained: .*download.* {tmp_path / 'hub' / 'checkpoints' / file}"):
        model_lib.build_model("resnet18", 5, pretrained=True, log=lambda *_: None)


def test_weights_of_another_architecture_or_no_weights_are_refused(tmp_path):
    torch.save(torchvision.models.squeezenet1_0().state_dict(), tmp_path / "other.pth")
    with pytest.raises(SystemExit, match=r"fits this SmallNet: weights of another architecture\? Name theirs with"):
        model_lib.build_model("smallnet_tiny", 3, weights=tmp_path / "other.pth")
    (tmp_path / "notes.pt").write_text("not weights")
    with pytest.raises(SystemExit, match=rf"--weights {tmp_path / 'notes.pt'}: not a state dict or checkpoint"):
        model_lib.build_model("smallnet_tiny", 3, weights=tmp_path / "notes.pt")
    with pytest.raises(SystemExit, match="--pretrained: torchvision has no weights for our smallnet"):
        model_lib.build_model("smallnet", 3, pretrained=True)


def test_whitened_stem_decorrelates_patches():
    # images whose neighbouring pixels and channels are strongly correlated, as in photographs
    base = torch.randn(64, 1, 17, 17).repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, :32, :32]
    images = base.repeat(1, 3, 1, 1) + 0.1 * torch.randn(64, 3, 32, 32)
    net = model_lib.build_model("smallnet", 10)
    assert not any(p.requires_grad for p in net.stem.parameters())  # fixed filters
    net.whiten_stem(images)
    with torch.no_grad():
        out = torch.nn.functional.conv2d(images, net.stem[0].weight)  # the stem's filters, without bias
    channels = out.permute(1, 0, 2, 3).reshape(24, -1)
    covariance = channels[:12] @ channels[:12].T / channels.shape[1]
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    eigenvalues = torch.linalg.eigvalsh(patches.T @ patches / len(patches)).flip(0)  # largest first, as the filters
    unit_unless_faint = eigenvalues / (eigenvalues + model_lib.WHITEN_EPS)  # ~1 but for the faintest
    assert torch.allclose(covariance, torch.diag(unit_unless_faint), atol=0.01)  # uncorrelated
    assert torch.allclose(out[:, 12:], -out[:, :12])  # each filter with its negative
    tiny = model_lib.build_model("smallnet_tiny", 10)
    tiny.whiten_stem(images)  # a narrower stem keeps the 8 largest directions
    assert tiny.stem[0].weight.shape == (16, 3, 2, 2)
    gray = images.mean(1, keepdim=True).repeat(1, 3, 1, 1)  # 4 directions of 12 vary: the rest is rounding noise
    net.whiten_stem(gray)
    with torch.no_grad():
        out = torch.nn.functional.conv2d(gray, net.stem[0].weight)
    assert out.var(dim=(0, 2, 3)).min() > 0.5  # every channel one of the 4, none of noise (1e-13)


class OnMPS(torch.Tensor):
    """A tensor on a Mac's GPU, as far as float64 goes: MPS has none ("Cannot convert a MPS Tensor to float64"),
    so a float64 result is an error until the tensor is moved to the host (.cpu(), .to("cpu"))."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = super().__torch_function__(func, types, args, kwargs)
        to_host = func is torch.Tensor.cpu or func is torch.Tensor.to and "cpu" in map(str, [*args, *kwargs.values()])
        if isinstance(result, OnMPS) and to_host:
            return result.as_subclass(torch.Tensor)
        if isinstance(result, OnMPS) and result.dtype == torch.float64:
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64")
        return result


def test_sums_and_the_whitening_stem_avoid_float64_on_a_mac():
    """MPS has no float64: a run's sums are float32 there, and the stem's statistics are gathered on the host."""
    assert [utils.sum_dtype(torch.device(d)) for d in ("mps", "cuda", "cpu")] == [torch.float32, *[torch.float64] * 2]
    images = torch.randn(8, 3, 32, 32)
    on_host, on_mps = model_lib.build_model("smallnet", 10), model_lib.build_model("smallnet", 10)
    on_host.whiten_stem(images)
    on_mps.whiten_stem(images.as_subclass(OnMPS))
    assert torch.equal(on_host.stem[0].weight, on_mps.stem[0].weight)


def test_training_starts_from_a_stem_whitened_on_its_images(trained_run, image_folder):
    run_dir, result = trained_run
    assert "stem's filters whiten the 2x2 patches of 48 training images" in result.stdout
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True, map_location="cpu")
    preprocess = checkpoint["preprocess"]
    transform = eval_transform(preprocess)
    images = torch.stack([transform(p) for p in sorted((image_folder / "train").rglob("*.*"))])
    normalized = data.make_normalize(preprocess, torch.device("cpu"))(images)
    out = torch.nn.functional.conv2d(normalized, checkpoint["model"]["stem.0.weight"].float())
    channels = out.permute(1, 0, 2, 3).reshape(out.shape[1], -1)[: out.shape[1] // 2]
    covariance = channels @ channels.T / channels.shape[1]
    assert torch.allclose(covariance, torch.eye(len(covariance)), atol=0.1)  # what whiten_stem set, not trained away


def test_fresh_conv_groups_pass_their_input_through():
    """airbench's dirac init: each group's first conv gives back its input on its first channels (times the
    filter norm's factor), so after BatchNorm those channels are the input, normalised."""
    net = model_lib.build_model("smallnet", 10).train()
    for group in (net.group1, net.group2, net.group3):
        conv, _, norm = list(group)[:3]
        x = torch.randn(8, conv.in_channels, 8, 8)
        with torch.no_grad():
            passed = norm(conv(x))[:, :conv.in_channels]  # BatchNorm takes the filter norm's factor away
            expected = torch.nn.functional.batch_norm(x, None, None, training=True, eps=norm.eps)
        assert torch.allclose(passed, expected, atol=1e-4)
        assert conv.weight.norm().item() == pytest.approx(conv.out_channels ** 0.5)
