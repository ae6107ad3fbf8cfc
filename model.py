"""A model name to an nn.Module: our small-image nets, or any torchvision classification model.

    python train.py --list-models      # every name build_model accepts
"""
import difflib
from collections import OrderedDict
from functools import partial
from pathlib import Path

import torch
from torch import nn

from utils import first_line, unwrap_state_dict


# -----------------------------------------------------------------------------
# our own net for small images (32 to 64 px), trained as Keller Jordan's airbench94 (2024) trains his, itself a
# descendant of David Page's ResNet-9 for DAWNBench (2018): a 2x2 stem, then three groups of two 3x3
# convolutions with a max-pool inside each group, BatchNorm and GELU, global max-pool and a linear head.
# Few layers at low resolution: most of its work is large, dense convolutions, which is what both a CPU and a
# GPU run fastest. airbench's methods, which only work together: a fixed whitening stem computed from the data
# (whiten_stem); 3x3 filters that start as the identity (dirac) on their first channels; BatchNorm without a
# learned scale, with a short memory; a bias-free head on logits scaled down by the width, and
# learning rates per parameter (`lr_scale`, read by train.make_optimizer): 64x on BatchNorm biases, more on the head.
# Together with --opt muon (train.py's default for these nets) they buy the most accuracy per epoch.

def conv_norm(c_in, c_out, norm):
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:c_in])  # the first c_in outputs pass their input through at the start
        conv.weight *= c_out ** 0.5 / conv.weight.norm()  # airbench's filter norm; Muon keeps it all run
    return [conv, norm(c_out), nn.GELU()]


def batch_norm(channels):
    """BatchNorm with its scale fixed at 1 (the next conv's filter norm is fixed too: a scale would do nothing but
    drift), and running statistics that follow the last steps (torch's momentum is 1 - airbench's)."""
    # torch's eps, not airbench's 1e-12: a channel without variance (max-pooled black backgrounds of grayscale
    # digits) has its gradient multiplied by 1 / sqrt(eps), and at 1e6 a layer the run diverged at its first step
    norm = nn.BatchNorm2d(channels, eps=1e-5, momentum=0.4)
    norm.weight.requires_grad_(False)
    norm.bias.lr_scale = 64.0
    return norm


class ConvGroup(nn.Sequential):
    def __init__(self, c_in, c_out, norm):
        conv1, norm1, act1 = conv_norm(c_in, c_out, norm)
        # pool right after the first conv: the second conv and the norm run at a quarter of the pixels
        super().__init__(conv1, nn.MaxPool2d(2), norm1, act1, *conv_norm(c_out, c_out, norm))


class GlobalMaxPool(nn.Module):
    """[N, C, H, W] -> [N, C]. Not nn.AdaptiveMaxPool2d(1): its CUDA backward is not deterministic (it fails
    under --deterministic) and ONNX exporters lack it; amax is both."""

    def forward(self, x):
        return x.amax(dim=(2, 3))


class Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


# added to the variance of each direction the stem whitens, so that directions fainter than this stay fainter.
# airbench's value. 5e-3, which keeps down what JPEG's colour subsampling leaves of the faintest directions (5e-4
# scales it up 40-fold), measured no better on CIFAR-10's JPEGs (see the README's Results).
WHITEN_EPS = 5e-4


class SmallNet(nn.Sequential):
    """stem, group1..group3, pool, dropout, fc, scale: a flat sequence, so its stages are its children."""

    def __init__(self, num_classes, widths=(64, 256, 256), stem_width=24, dropout=0.0, norm=batch_norm):
        channels = [stem_width, *widths]
        layers = {"stem": nn.Sequential(nn.Conv2d(3, stem_width, 2, bias=False), nn.GELU())}
        layers.update({f"group{i}": ConvGroup(a, b, norm) for i, (a, b) in enumerate(zip(channels, channels[1:]), 1)})
        layers.update(pool=GlobalMaxPool(), dropout=nn.Dropout(dropout),
                      fc=nn.Linear(widths[-1], num_classes, bias=False), scale=Scale(1 / widths[-1]))
        super().__init__(OrderedDict(layers))
        with torch.no_grad():  # unit-variance weights on logits scaled down by the width: airbench's head
            self.fc.weight /= self.fc.weight.std()
        self.fc.weight.lr_scale = 64.0 * 12.6  # airbench's head learns 12.6x faster than its BatchNorm biases
        # fixed, set from the data by whiten_stem. Nothing before group1 trains, so backward stops there and
        # skips the gradient of its input: 8-10% faster steps on a CPU (airbench freezes its stem bias for this)
        self.stem.requires_grad_(False)

    @torch.no_grad()
    def whiten_stem(self, images, eps=WHITEN_EPS):
        """Sets the stem's filters from `images` (a normalised NCHW batch) to whiten their 2x2 patches."""
        # the eigenvectors of the patches' covariance, each scaled to unit variance (the outputs are decorrelated,
        # and faint high-frequency directions as loud as the bright ones) unless fainter than eps, each negated as
        # well, so that the GELU after it passes both signs. Narrower stems keep the largest directions.
        conv = self.stem[0]
        c, k = conv.in_channels, conv.kernel_size[0]
        covariance, count = 0, 0
        for chunk in images.split(64):  # all patches of 1,000 images of 146 px at once would take 2 GiB
            # float64 on the host, whatever the device: exact (a GPU's TF32 matmuls would blur the small eigenvalues
            # that matter most), and Macs' GPUs have no float64
            patches = chunk.to("cpu", torch.float64).unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
            patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)  # one row per patch, as the filters
            covariance, count = covariance + patches.T @ patches, count + len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance / count)  # ascending order
        filters = (eigenvectors / (eigenvalues + eps).sqrt()).T.flip(0).reshape(-1, c, k, k)  # largest first
        # directions in which the images do not vary (8 of the 12 for grayscale saved as RGB) hold rounding noise:
        # channels without variance, whose gradients BatchNorm multiplies (see batch_norm). Their places take the
        # directions that do vary, once more.
        varying = int((eigenvalues >= 1e-9 * eigenvalues.max()).sum())  # rounding: < 1e-12; CIFAR-10: > 1e-5
        filters = filters[torch.arange(len(filters)) % varying]
        half = conv.out_channels // 2
        if half > len(filters) or conv.out_channels % 2:
            raise ValueError(f"a whitening stem has an even width of at most {2 * len(filters)}, "
                             f"not {conv.out_channels}")
        conv.weight.copy_(torch.cat([filters[:half], -filters[:half]]).to(conv.weight.dtype))


OWN_MODELS = {
    "smallnet": partial(SmallNet, widths=(64, 256, 256)),  # airbench94's widths
    "smallnet_tiny": partial(SmallNet, widths=(32, 64, 128), stem_width=16),  # ~8x cheaper: demos and tests
    # GroupNorm instead of BatchNorm: no batch statistics, so results do not depend on the per-process batch
    "smallnet_tiny_gn": partial(SmallNet, widths=(32, 64, 128), stem_width=16, norm=partial(nn.GroupNorm, 8)),
}

# torchvision models whose defaults do not fit a plain classifier: no auxiliary heads, their own init, and inputs
# mapped from ImageNet's normalisation to the (x - 0.5) / 0.5 their ImageNet weights were trained on, as
# torchvision sets it with weights (from scratch the per-channel map is learnt around)
TORCHVISION_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": True, "transform_input": True},
    "inception_v3": {"aux_logits": False, "init_weights": True, "transform_input": True},
}
# torchvision draws these heads' weights in a range of 1/sqrt(num_classes), made for ImageNet's 1,000: for 2 classes
# 22x wider (a first epoch's train loss of 5 on 2 classes), which the first steps spend undoing, through the
# backbone too (a pretrained one). Their heads start as with 1,000 classes.
CLASS_SCALED_HEADS = ("efficientnet", "mnasnet")


def torchvision_models():
    """torchvision.models, imported when a torchvision model is asked for: the import takes 1.5 s."""
    import torchvision
    return torchvision.models


def list_models():
    models = torchvision_models()
    return sorted(OWN_MODELS) + models.list_models(module=models)


def check_model_name(name):
    """None if the name is known, else a message with the closest names."""
    names = [name] if name in OWN_MODELS else list_models()
    if name in names:
        return None
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"unknown model {name!r}{hint} (python train.py --list-models prints every name)"


def check_pretrained(name):
    """None if torchvision has weights for the model, else a message that says what to do."""
    return f"torchvision has no weights for our {name}; use --weights PATH" if name in OWN_MODELS else None


def build_model(name, num_classes, pretrained=False, weights=None, log=print, classes=None):
    """`pretrained`: torchvision's default weights (a download); `weights`: a local state dict or checkpoint.
    Either way tensors whose shape does not fit (the head, for other classes) are dropped, except that the head of
    one of our checkpoints keeps the rows of the class names it shares with `classes` (this run's)."""
    error = check_model_name(name)
    if error:
        raise ValueError(error)
    if name in OWN_MODELS:
        model = OWN_MODELS[name](num_classes=num_classes)
    else:
        model = torchvision_models().get_model(name, num_classes=num_classes, **TORCHVISION_KWARGS.get(name, {}))
        if name.startswith(CLASS_SCALED_HEADS):
            with torch.no_grad():
                model.get_submodule(head_name(model)).weight.mul_((num_classes / 1000) ** 0.5)
    if pretrained:
        load_matching(model, download_weights(name), "torchvision's default weights", log)
    if weights:
        try:
            state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SystemExit(f"error: --weights {weights}: not a state dict or checkpoint that torch.load reads "
                             f"with weights_only=True ({type(e).__name__})") from None
        if not isinstance(state_dict, dict):
            raise SystemExit(f"error: --weights {weights}: a {type(state_dict).__name__}, not a state dict")
        if isinstance(state_dict.get("state_dict"), dict):  # a checkpoint of Lightning, timm, mmcv...
            state_dict = state_dict["state_dict"]
        if isinstance(state_dict.get("model"), dict):  # one of our checkpoints (or torchvision's references')
            state_dict = head_by_class_name(model, trained_weights(state_dict), state_dict.get("classes"), classes,
                                            weights, log)
        load_matching(model, unwrap_state_dict(state_dict), weights, log)  # saved from DDP or torch.compile
    return model


def check_image_size(model, name, img_size):
    """An error, before training, when the model cannot take images of img_size (one image's forward pass)."""
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, img_size, img_size))
    except Exception as e:  # pooling down to nothing, a fixed size (ViT), ...
        raise SystemExit(f"error: --model {name} cannot take --img-size {img_size} images ({first_line(e)}); "
                         "choose another --img-size or --model") from None
    finally:
        model.train()


def download_weights(name):
    """torchvision's default ImageNet weights for `name`, from torch's hub folder or downloaded into it."""
    if check_pretrained(name):
        raise SystemExit(f"error: --pretrained: {check_pretrained(name)}")
    weights = torchvision_models().get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=True)
    except OSError as e:  # no internet, as on many compute nodes
        file = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
        raise SystemExit(f"error: --pretrained: could not download {weights.url} ({e}); on a machine without "
                         f"internet, download it elsewhere and put it at {file}, or give a file with --weights"
                         ) from None


def head_by_class_name(model, state_dict, saved, classes, source, log):
    """state_dict with its head's rows moved to where `classes` has the same names as `saved` (the checkpoint's);
    a class the checkpoint lacks keeps its freshly initialised row. Unchanged for the same classes in order."""
    own, head = model.state_dict(), head_name(model)
    keys = [key for key in (f"{head}.weight", f"{head}.bias") if key in state_dict and key in own]
    if (not saved or not classes or list(saved) == list(classes) or not keys
            or any(state_dict[key].shape != (len(saved), *own[key].shape[1:]) for key in keys)):
        return state_dict  # another architecture's head is dropped by its shape
    row = {name: i for i, name in enumerate(saved)}
    mapped = dict(state_dict)
    for key in keys:
        mapped[key] = own[key].clone()
        for i, name in enumerate(classes):
            if name in row:
                mapped[key][i] = state_dict[key][row[name]]
    kept = sum(name in row for name in classes)
    log(f"model: {kept} of this run's {len(classes)} classes keep their rows of the head of {source}, matched by "
        "name" + ("" if kept == len(classes) else "; the others start fresh"))
    return mapped


def load_matching(model, state_dict, source, log=print):
    """Loads the tensors of state_dict whose name and shape match; says what was left out."""
    own = model.state_dict()
    matching = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise SystemExit(f"error: no tensor of {source} fits this {type(model).__name__}: weights of another "
                         "architecture? Name theirs with --model (--list-models)")
    mismatched = sorted(k for k in state_dict if k in own and own[k].shape != state_dict[k].shape)
    model.load_state_dict(matching, strict=False)
    log(f"model: loaded {len(matching)}/{len(own)} tensors from {source}")
    if mismatched:
        log(f"model: dropped {len(mismatched)} tensor(s) of another shape, left freshly initialised "
            f"(a head for another number of classes): {', '.join(mismatched)}")


# -----------------------------------------------------------------------------
# fine-tuning: freezing stages, the head's dropout

def stages(model):
    """The model's top-level children that hold parameters, in order (resnet: conv1, bn1, layer1..layer4, fc)."""
    return [(name, child) for name, child in model.named_children() if any(True for _ in child.parameters())]


def freeze(model, count, log=print):
    """Freezes the first `count` stages (-1: all but the head) and returns them: no gradients, and their BatchNorm
    keeps its running statistics (keep_frozen_in_eval re-applies that after model.train())."""
    all_stages = stages(model)
    count = len(all_stages) - 1 if count < 0 else min(count, len(all_stages) - 1)
    frozen = [module for _, module in all_stages[:count]]
    for module in frozen:
        module.requires_grad_(False)
    if count:  # parameters of the model itself, in no stage (a ViT's class token): the embedding's, frozen with it
        for p in model.parameters(recurse=False):
            p.requires_grad_(False)
    log(f"model: froze {count} of {len(all_stages)} stages; training {', '.join(n for n, _ in all_stages[count:])}")
    return frozen


def keep_frozen_in_eval(frozen):
    for module in frozen:
        module.eval()  # BatchNorm in a frozen stage uses, and does not update, its running statistics


def head_name(model):
    """The name of the layer that outputs the logits: the last Linear, or squeezenet's 1x1 convolution."""
    return [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))][-1]


def set_head_dropout(model, p):
    """Dropout p on the input of the head, in place of the dropout that sits beside it."""
    # a hook, so that the state dict, and every checkpoint, keeps its usual keys
    name = head_name(model)
    parent, head = model.get_submodule(name.rpartition(".")[0]), model.get_submodule(name)
    for sibling in parent.children():
        if isinstance(sibling, nn.Dropout):
            sibling.p = 0.0
    head.register_forward_pre_hook(lambda module, inputs: (nn.functional.dropout(inputs[0], p, module.training),))


def model_from_checkpoint(checkpoint, path="the checkpoint"):
    """The trained model of one of our checkpoints, in eval mode."""
    model = build_model(checkpoint["model_name"], len(checkpoint["classes"]))
    load_weights(model, trained_weights(checkpoint), path)
    return model.eval()


def trained_weights(checkpoint):
    """The weights that were evaluated (and kept as best): the EMA's when the run kept one."""
    return checkpoint.get("model_ema") or checkpoint["model"]


def load_weights(model, state_dict, path):
    """model.load_state_dict, every tensor in place, or exit with what does not fit and what to do."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        what = " ".join(str(e).split())  # torch names the keys and shapes that differ
        raise SystemExit(f"error: the weights in {path} do not fit this code's {type(model).__name__}, so another "
                         f"version of model.py wrote them: use that version's scripts or train again ({what})"
                         ) from None
