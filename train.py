"""Train an image classifier on a folder of images.

    python train.py                                     # demo: generated shapes, about 1 minute on a 2-core CPU
    python train.py --data DATA --epochs 20             # DATA/train/<class>/*.jpg and DATA/val/<class>/*.jpg
    python train.py --data DATA --model resnet50 --pretrained --lr 0.01
    python train.py --train-csv train.csv --val-csv val.csv     # columns image,label; paths relative to the CSV
    torchrun --nproc_per_node 4 train.py --data DATA    # one process per GPU (or CPU processes with gloo)
    python train.py --resume runs/exp/last.pt           # continue a stopped run where it stopped

Writes to --output-dir (default runs/<data folder name>-<date>-<time>): train_batch.jpg (the first batch, as the
model sees it), last.pt (every epoch), best.pt (best val top-1 so far), results.csv (a row per epoch), args.json,
train.log, and at the end results.png (curves) and confusion_matrix.png (of best.pt).
"""
import argparse
import csv
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.transforms import v2

import data
import utils
from evaluate import EVALUATE
from model import build_model, check_model_name, freeze, keep_frozen_in_eval, list_models, set_head_dropout

# defaults that depend on the optimizer: SGD and AdamW want learning rates 100x apart
OPTIMIZER_DEFAULTS = {"sgd": {"lr": 0.05, "wd": 5e-4}, "adamw": {"lr": 1e-3, "wd": 0.05}}
RESULTS_COLUMNS = {  # results.csv; train_top1 is, for multilabel, the share of images with every label right
    "single": ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "seconds",
               "images_per_s"],
    "multilabel": ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_f1", "val_macro_f1", "val_map",
                   "seconds", "images_per_s"],
}
SHAPES_DIR = "datasets/shapes"  # where `python train.py` without --data writes its demo dataset
MAX_BAD_STEPS = 20  # consecutive steps with a non-finite loss after which a run has diverged: stop it
WHITEN_IMAGES = 1000  # images whose patch statistics set a whitening stem (smallnet): ~1M patches, a second
CHECK_EVERY = 10  # steps between reads of the stop and divergence flags (a sync point; an all-reduce with DDP)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bool_flag = argparse.BooleanOptionalAction
    # data
    p.add_argument("--data", default=None, help=f"dataset folder (default: generate a shapes demo in {SHAPES_DIR})")
    p.add_argument("--train-csv", default=None, help="instead of --data: a CSV of image paths (relative to it), labels")
    p.add_argument("--val-csv", default=None, help="the validation CSV (default: --val-fraction of --train-csv)")
    p.add_argument("--image-column", default="image", help="CSV column of the image paths (default: image)")
    p.add_argument("--label-column", default="label",
                   help="CSV column of the labels: names or integer ids (default: label)")
    p.add_argument("--label-delimiter", default=None,
                   help="separator of several labels in one CSV cell (default: none)")
    p.add_argument("--task", default="single", choices=["single", "multilabel"],
                   help="one class per image (softmax), or any number (sigmoid; CSV only) (default: single)")
    p.add_argument("--classes", default=None,
                   help="the classes in index order: a,b,c or a file (default: sorted names)")
    p.add_argument("--ignore-classes", default=None, help="classes to leave out of the data: a,b or a file")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of train/ held out without val/ (default: 0.1)")
    p.add_argument("--img-size", type=int, default=None,
                   help="training crop size (default: from the images, at most 224)")
    p.add_argument("--crop-pct", type=float, default=None,
                   help="eval crop / resized side (default: 1 to 64 px, else 0.875)")
    p.add_argument("--train-crop", default=None, choices=["resized", "padded"],
                   help="RandomResizedCrop or a crop of the padded image (default: padded to 64 px, else resized)")
    p.add_argument("--crop-padding", type=int, default=None,
                   help="padded crop: largest shift in px (default: size / 8)")
    p.add_argument("--min-scale", type=float, default=0.25,
                   help="smallest area share of a resized crop (default: 0.25)")
    p.add_argument("--auto-augment", default=None, choices=list(data.AUTO_AUGMENT),
                   help="auto-augment policy (default: none)")
    p.add_argument("--random-erase", type=float, default=0.0, help="random erasing probability (default: 0)")
    p.add_argument("--mixup-alpha", type=float, default=0.0, help="MixUp alpha, 0 is off (default: 0)")
    p.add_argument("--cutmix-alpha", type=float, default=0.0, help="CutMix alpha, 0 is off (default: 0)")
    p.add_argument("--strict", action="store_true", help="stop on unusable image files instead of skipping them")
    p.add_argument("--cache", action=bool_flag, default=None,
                   help="decode every image once, augment batches on the device (default: on for small sets)")
    p.add_argument("-j", "--workers", type=int, default=None,
                   help="loader processes per process (default: from the cores)")
    # model
    p.add_argument("--model", default=None, help="a name of --list-models (default: smallnet to 64 px, else resnet18)")
    p.add_argument("--list-models", action="store_true", help="print the model names and exit")
    p.add_argument("--pretrained", action="store_true", help="start from torchvision's default weights (a download)")
    p.add_argument("--weights", default=None,
                   help="start from a local state dict or checkpoint (heads that differ: new)")
    p.add_argument("--freeze", type=int, default=0,
                   help="freeze the first N stages, BatchNorm statistics too (default: 0)")
    p.add_argument("--freeze-backbone", action="store_true", help="train only the head (the last stage)")
    p.add_argument("--dropout", type=float, default=None, help="dropout before the head (default: the model's own)")
    # optimisation
    p.add_argument("--epochs", type=int, default=10, help="number of epochs (default: 10)")
    p.add_argument("-b", "--batch-size", type=int, default=64, help="images per process per step (default: 64)")
    p.add_argument("--accum-steps", type=int, default=1, help="steps per optimizer update (default: 1)")
    p.add_argument("--opt", default="sgd", choices=list(OPTIMIZER_DEFAULTS),
                   help="Nesterov SGD or AdamW (default: sgd)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 0.05 for sgd, 1e-3 for adamw)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    p.add_argument("--wd", "--weight-decay", dest="wd", type=float, default=None,
                   help="weight decay, none on norms and biases (default: 5e-4 for sgd, 0.05 for adamw)")
    p.add_argument("--lr-warmup-epochs", type=float, default=1.0, help="linear warmup from 0, in epochs (default: 1)")
    p.add_argument("--lr-min", type=float, default=0.0, help="learning rate at the last step (default: 0)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing (default: 0.1)")
    p.add_argument("--clip-grad-norm", type=float, default=None, help="clip the gradient norm to this (default: off)")
    p.add_argument("--tta", action="store_true", help="evaluate with flips (and shifts) each epoch; best.pt follows it")
    p.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights: evaluated and saved for use")
    p.add_argument("--model-ema-decay", type=float, default=0.999, help="EMA decay per optimizer step (default: 0.999)")
    # speed and numerics
    p.add_argument("--amp", default="bf16", choices=list(utils.AMP_DTYPES), help="autocast dtype (default: bf16)")
    p.add_argument("--channels-last", action=bool_flag, default=True, help="NHWC memory format (default: on)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    p.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across GPUs")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random (default: 0)")
    p.add_argument("--deterministic", action="store_true", help="bitwise repeatable runs (slower kernels on GPU)")
    p.add_argument("--patience", type=int, default=0,
                   help="stop when val top-1 stalls for N epochs (default: 0, never)")
    p.add_argument("--time", type=float, default=None,
                   help="hours to train: --epochs is refitted after the first epoch")
    # output
    p.add_argument("--save-period", type=int, default=0,
                   help="also keep epoch<N>.pt every N epochs (default: 0, never)")
    p.add_argument("--output-dir", default=None, help="where files go (default: runs/<data name>-<date>-<time>)")
    p.add_argument("--save-every-steps", type=int, default=0,
                   help="also write last.pt every N steps (default: 0, never)")
    p.add_argument("--resume", default=None, help="continue from this last.pt, with the arguments it was started with")
    return p


def parse_args(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.list_models:
        print("\n".join(list_models()))
        sys.exit(0)
    if args.resume:
        if not Path(args.resume).is_file():
            parser.error(f"--resume: {args.resume} does not exist")
        return args
    for name in ("epochs", "batch_size", "accum_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("workers", "freeze", "patience", "save_period", "save_every_steps"):
        if (getattr(args, name) or 0) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 or more")
    if args.data and args.train_csv:
        parser.error("give --data (a folder) or --train-csv (a CSV file), not both")
    if args.task == "multilabel" and (not args.train_csv or args.mixup_alpha or args.cutmix_alpha):
        parser.error("--task multilabel needs --train-csv, and does not take --mixup-alpha or --cutmix-alpha")
    if args.val_csv and not args.train_csv:
        parser.error("--val-csv goes with --train-csv")
    if args.time is not None and args.time <= 0:
        parser.error("--time must be a positive number of hours")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        parser.error("--dropout must be in [0, 1)")
    if not 0 < args.val_fraction < 1:
        parser.error("--val-fraction must be between 0 and 1")
    if args.model and check_model_name(args.model):
        parser.error(f"--model: {check_model_name(args.model)}")
    for name, value in OPTIMIZER_DEFAULTS[args.opt].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def resume_args(args):
    """A resumed run takes its arguments from the checkpoint; only how it runs may change."""
    checkpoint = utils.load_checkpoint(args.resume)
    saved = {**vars(get_args_parser().parse_args([])), **checkpoint["args"]}  # flags newer than the run: defaults
    saved.update(resume=args.resume, workers=args.workers, device=args.device,
                 output_dir=str(Path(args.resume).parent))
    return argparse.Namespace(**saved), checkpoint


def default_workers(world_size, device):
    """On a GPU, loader processes take every core but one per training process (at most 16 each). On the CPU
    they compete with the model for cores: leave about half the cores to compute; with 2 cores or fewer per
    process the model's threads use them all and a loader process can only take from them, so loading in the
    training process itself is faster (resnet18, 128 px: 73.7 images/s with 0 workers, 67.9 with 1, bare
    compute 81.6)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if device.type == "cuda":  # the GPU computes: every core but the training process's own can load
        return max(1, min(16, cores // world_size - 1))
    if cores // world_size <= 2:
        return 0
    return max(1, min(8, cores // (2 * world_size)))


def new_output_dir(data_name):
    """Creates runs/<data name>-<date>-<time>: creating it claims it, so two runs started in the same second
    (or by two launches at once) get two folders."""
    base = Path("runs") / f"{data_name}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = base, 2
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            path, n = Path(f"{base}-{n}"), n + 1


# -----------------------------------------------------------------------------
# data

def load_data(args, rank, local_rank, world_size, device, output_dir, log):
    """Classes, eval preprocessing and the train and val loaders; fills in the defaults that depend on the images."""
    if args.data is None and args.train_csv is None:
        if local_rank == 0:
            log(f"data: no --data given: training on generated shapes in {SHAPES_DIR} (written once)")
            data.make_shapes_dataset(SHAPES_DIR)
        if world_size > 1:
            torch.distributed.barrier()  # the other processes wait for the files
        args.data = SHAPES_DIR
    wanted, ignore = data.parse_class_list(args.classes), data.parse_class_list(args.ignore_classes) or []
    if args.train_csv:
        classes, train_samples, val_samples = data.load_csv_samples(
            args.train_csv, args.val_csv, (args.image_column, args.label_column, args.label_delimiter),
            args.val_fraction, args.seed, log, args.strict, wanted, ignore, args.task == "multilabel")
    else:
        classes, train_samples, val_samples = data.load_samples(args.data, args.val_fraction, args.seed, log,
                                                                args.strict, wanted, ignore)
    if args.img_size is None:
        args.img_size = data.infer_img_size([path for path, _ in train_samples])
        log(f"data: image size {args.img_size} px, from the median short side of the training images (--img-size)")
    if args.model is None:
        args.model = "smallnet" if args.img_size <= 64 else "resnet18"
        log(f"model: {args.model}, the default for {args.img_size} px images (--model)")
    if args.train_crop is None:
        args.train_crop = "padded" if args.img_size <= 64 else "resized"
    preprocess = data.eval_preprocess(args.img_size, args.crop_pct)
    if decide_cache(args, len(train_samples) + len(val_samples), preprocess["resize_size"], log):
        train_loader, val_loader = cached_loaders(args, train_samples, val_samples, preprocess, rank, local_rank,
                                                  world_size, device, output_dir, log)
    else:
        train_set = data.ImageDataset(train_samples, data.train_transform(
            args.img_size, args.train_crop, args.min_scale, args.auto_augment, args.random_erase,
            padding=args.crop_padding),
        args.seed, args.strict)
        val_set = data.ImageDataset(val_samples, data.eval_transform(preprocess), strict=args.strict)
        train_loader = data.make_train_loader(train_set, args.batch_size, args.workers, device, args.seed, rank,
                                              world_size)
        val_loader = data.make_eval_loader(val_set, args.batch_size, args.workers, device, rank, world_size)
    if len(train_loader) < args.accum_steps:
        raise SystemExit(f"error: --accum-steps {args.accum_steps} is more than the {len(train_loader)} batch(es) of "
                         f"-b {args.batch_size} in an epoch of {len(train_loader.sampler)} training images per "
                         "process: lower --accum-steps or --batch-size")
    log(f"batch: {args.batch_size} per process x {world_size} process(es) x {args.accum_steps} accumulation "
        f"step(s) = {args.batch_size * world_size * args.accum_steps} images per update; "
        f"{0 if args.cache else args.workers} loader worker(s) per process; device {device}")
    return classes, preprocess, train_loader, val_loader


def spread_sample(loader, n):
    """n training images spread evenly over the dataset (whatever the process: the same in all of them), as
    the loader gives them (uint8 NCHW; cropped and flipped at random on the per-image path)."""
    size = len(loader.rows) if isinstance(loader, data.CachedLoader) else len(loader.dataset)
    picks = np.linspace(0, size - 1, min(n, size)).astype(int)
    if isinstance(loader, data.CachedLoader):
        return loader.images[loader.rows[picks]].permute(0, 3, 1, 2)
    return torch.stack([image for image, _, _ in (loader.dataset[i] for i in picks) if image is not None])


def decide_cache(args, n_images, side, log):
    """--cache on or off as asked; by default on when the decoded images are small and only crops and flips are
    asked for (what the batched device augmentation does)."""
    per_image_augmentation = args.auto_augment or args.random_erase > 0
    if args.cache and per_image_augmentation:
        raise SystemExit("error: --cache augments whole batches (crop and flip only); --auto-augment and "
                         "--random-erase need the per-image path: drop --cache, or drop them")
    size_gib = n_images * side * side * 3 / 2**30
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    if args.cache is None:
        args.cache = not per_image_augmentation and size_gib <= memory_gib / 4
        log(f"data: --cache {'on' if args.cache else 'off'}: the decoded images take {size_gib:.2f} GiB; the cache is "
            f"on by default when that is at most a quarter of the memory ({memory_gib / 4:.1f} GiB) and neither "
            "--auto-augment nor --random-erase is asked (--cache / --no-cache)")
    return args.cache


def cached_loaders(args, train_samples, val_samples, preprocess, rank, local_rank, world_size, device, output_dir, log):
    """Decodes the images once into memory-mapped files (local rank 0 decodes, the other processes wait and
    share its files), then batches from them, augmented on the device."""
    source = Path(args.data) if args.data else Path(args.train_csv).parent
    folder = source / ".cache"
    if not os.access(source, os.W_OK):
        folder = Path(output_dir) / "cache"  # every process knows the output folder
    padded = args.train_crop == "padded"
    side = args.img_size if padded else preprocess["resize_size"]  # resized crops zoom into a margin
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    def build():
        val_side = preprocess["resize_size"], args.img_size
        return (data.build_cache(train_samples, side, side, folder, workers, log, args.strict),
                data.build_cache(val_samples, *val_side, folder, workers, log, args.strict))
    if local_rank == 0:  # decodes; the others wait in agree_on_failure, then map its files
        try:
            built = build()
        except BaseException:
            utils.agree_on_failure(True)
            raise
    if utils.agree_on_failure(False):
        raise SystemExit(f"error: process {rank}: the process that decodes the images into the cache failed; "
                         "its error is in its output")
    (train_array, train_rows), (val_array, val_rows) = built if local_rank == 0 else build()
    log(f"data: decoded images cached in {folder} ({train_array.nbytes / 2**20:.0f} + {val_array.nbytes / 2**20:.0f}"
        f" MiB, reused while the files are unchanged); augmented in batches on {device}")
    if padded:
        pad = args.img_size // 8 if args.crop_padding is None else args.crop_padding
        augment = partial(data.translate_flip, pad=pad)
    else:
        augment = partial(data.resized_crop_flip, size=args.img_size, min_scale=args.min_scale)
    train_targets = [target for _, target in train_samples]
    sampler = data.make_epoch_sampler(len(train_rows), args.batch_size, args.seed, rank, world_size)
    train_loader = data.CachedLoader(train_array, train_rows, train_targets, sampler, args.batch_size, device,
                                     augment, args.seed, drop_last=True)
    val_loader = data.CachedLoader(val_array, val_rows, [target for _, target in val_samples],
                                   range(rank, len(val_rows), world_size), args.batch_size, device)
    return train_loader, val_loader


def make_model(args, num_classes, world_size, log):
    """The model to train and its frozen stages. SyncBatchNorm replaces BatchNorm modules, so it comes before the
    freezing, which must hold the modules that stay in the model."""
    model = build_model(args.model, num_classes, args.pretrained, args.weights, log)
    if args.dropout is not None:
        set_head_dropout(model, args.dropout)
    if args.sync_bn and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    frozen = []
    if args.freeze or args.freeze_backbone:
        frozen = freeze(model, -1 if args.freeze_backbone else args.freeze, log)
    return model, frozen


# -----------------------------------------------------------------------------
# optimisation: the learning rate is a pure function of the step

def lr_at(step, total_steps, warmup_steps, base_lr, min_lr):
    """Linear warmup from 0 to base_lr at step warmup_steps - 1, then cosine decay to min_lr at the last step,
    total_steps - 1."""
    peak = max(warmup_steps - 1, 0)
    if step < peak:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - peak) / max(1, total_steps - 1 - peak)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, args, device):
    """No weight decay on norm weights and biases (every 0- or 1-dimensional parameter)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}]
    # fused kernels (one launch for all parameters, and the GradScaler's skip decided on the device) on CUDA,
    # foreach (vectorised) elsewhere
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if args.opt == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, **fast)
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True, **fast)
    # momentum buffers start at zero, which gives the same first step as torch's own start (buffer = gradient);
    # fused SGD would otherwise leave them uninitialised when the first step is skipped
    for p in decay + no_decay:
        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return optimizer


def make_scaler(amp, device):
    """fp16 needs a dynamic loss scale (its small gradients underflow). bf16 and fp32 do not, but the scaler also
    skips every step whose gradients hold inf or NaN, so it runs for them too, at a fixed scale of 1 (multiplying
    by 1 changes nothing). The scaler halves its scale at every skipped step: optimizer_step sets it back to 1."""
    if amp == "fp16":
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**31 - 1)


def optimizer_step(model, optimizer, scaler, clip_grad_norm=None, fixed_scale=True):
    """Unscale, clip, step (skipped if a gradient is not finite), zero the gradients. With a fused optimizer the
    skip is decided on the device; with a foreach one the scaler reads a flag: a sync point (free on the CPU)."""
    if clip_grad_norm:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    scaler.step(optimizer)
    scaler.update(1.0 if fixed_scale else None)
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def update_ema(ema_model, model, decay):
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)  # BatchNorm statistics: take the model's own


def make_mix(args, num_classes):
    mixes = [v2.MixUp(alpha=args.mixup_alpha, num_classes=num_classes)] if args.mixup_alpha > 0 else []
    mixes += [v2.CutMix(alpha=args.cutmix_alpha, num_classes=num_classes)] if args.cutmix_alpha > 0 else []
    return v2.RandomChoice(mixes) if mixes else None


# -----------------------------------------------------------------------------
# one epoch

def train_one_epoch(model, ema_model, loader, optimizer, scaler, criterion, mix, epoch, step, run):
    """Trains epoch `epoch` from optimizer step `step` (mid-epoch after a resume) to its end, or until a
    stop is asked for. Returns the step reached and the stats of the steps it ran (None if stopped).

    Losses and hits are summed on the device and read only when the progress line is redrawn:
    the loop itself never waits for the device."""
    args, device, log = run["args"], run["device"], run["log"]
    model.train()
    keep_frozen_in_eval(run["frozen"])
    steps_per_epoch = len(loader) // args.accum_steps
    done = step - epoch * steps_per_epoch  # steps of this epoch already taken before a resume
    # the order is a function of (seed, epoch): skipping the batches already seen gives the remaining ones
    loader.sampler.set_epoch(epoch, skip=done * args.accum_steps * args.batch_size)
    loss_sum = torch.zeros((), device=device)
    hits = torch.zeros((), dtype=torch.int64, device=device)
    bad_steps = torch.zeros((), dtype=torch.int64, device=device)  # micro-steps with a non-finite loss
    bad_run = torch.zeros((), dtype=torch.int64, device=device)  # the latest ones in a row
    seen, data_wait, start = 0, 0.0, time.perf_counter()
    progress = Progress(epoch, args.epochs, steps_per_epoch, done, log)
    batches = iter(loader)
    for micro_step in range(done * args.accum_steps, steps_per_epoch * args.accum_steps):
        wait = time.perf_counter()
        images, targets = next(batches)
        data_wait += time.perf_counter() - wait
        # every random draw of this step (dropout, MixUp) is a function of (seed, epoch, step, rank)
        utils.seed_draws(utils.seed_from(args.seed, epoch, micro_step, run["rank"]), device.type)
        images = run["normalize"](images.to(device, non_blocking=True))
        targets = targets.to(device, non_blocking=True)
        labels = targets
        if mix is not None:
            images, targets = mix(images, targets)
        update = (micro_step + 1) % args.accum_steps == 0
        if update:
            lr = lr_at(step, run["total_steps"], run["warmup_steps"], args.lr, args.lr_min)
            for group in optimizer.param_groups:
                group["lr"] = lr
        # DDP all-reduces gradients in backward; between accumulation steps there is nothing to reduce yet
        sync = nullcontext() if (update or run["ddp_model"] is None) else run["ddp_model"].no_sync()
        with sync:
            with utils.autocast(device, args.amp):
                logits = model(images)
                loss = criterion(logits.float(), targets)
            scaler.scale(loss / args.accum_steps).backward()
        # a non-finite loss is counted here, on the device; the scaler skips its step in optimizer_step
        finite = torch.isfinite(loss.detach())
        bad_steps += ~finite
        bad_run = (bad_run + 1) * ~finite
        loss_sum += torch.where(finite, loss.detach(), 0.0) * len(labels)
        hits += count_hits(logits.detach(), labels)
        seen += len(labels)
        if update:
            optimizer_step(model, optimizer, scaler, args.clip_grad_norm, fixed_scale=args.amp != "fp16")
            step += 1
            if ema_model is not None:
                update_ema(ema_model, run["raw_model"], min(args.model_ema_decay, (1 + step) / (10 + step)))
            progress.update(step - epoch * steps_per_epoch, loss_sum, seen, lr, data_wait, start)
            end = step == (epoch + 1) * steps_per_epoch
            stop = check_flags(run, step, bad_run, force=end)
            if end:
                break  # the epoch's end: evaluation and the epoch's checkpoint come next, in main()
            if stop or (args.save_every_steps and step % args.save_every_steps == 0):
                run["save_last"](epoch, step)
            if stop:
                progress.finish(step - epoch * steps_per_epoch, loss_sum, seen, lr, data_wait, start)
                return step, None
    progress.finish(step - epoch * steps_per_epoch, loss_sum, seen, lr, data_wait, start)
    # totals over all processes: a sync point, once per epoch
    totals = utils.all_reduce_sum(torch.stack([loss_sum.double(), hits.double(), bad_steps.double(),
                                               torch.tensor(seen, device=device, dtype=torch.float64)]))
    loss_total, hits_total, bad_total, seen_total = totals.tolist()
    if bad_total:
        log(f"warning: {bad_total:.0f} step(s) of epoch {epoch + 1} had a non-finite loss and were skipped")
    seconds = time.perf_counter() - start
    return step, {"lr": lr, "train_loss": loss_total / max(seen_total - bad_total * args.batch_size, 1),
                  "train_top1": 100 * hits_total / seen_total, "seconds": seconds, "images_per_s": seen_total / seconds}


def count_hits(logits, labels):
    """Right answers: the top-1 class; for multilabel (multi-hot labels), every label decision of an image."""
    if labels.ndim == 1:
        return (logits.argmax(1) == labels).sum()
    return ((logits > 0) == (labels > 0.5)).all(1).sum()


def check_flags(run, step, bad_run, force=False):
    """True once SIGTERM or Ctrl-C came; stops the run with an error once the loss has not been finite for
    MAX_BAD_STEPS steps in a row. All processes must agree on the step they stop at, so every CHECK_EVERY
    steps the flags are all-reduced on the device and copied to the host without waiting. On a GPU what is
    read is the copy started CHECK_EVERY steps earlier, finished long since, so the loop never waits for the
    GPU; `force` (an epoch's end) reads the current flags there: a sync point."""
    if step % CHECK_EVERY and not force:
        return run["world_size"] == 1 and run["stop"].is_set()
    flags = torch.stack([torch.full((), float(run["stop"].is_set()), device=run["device"]), bad_run.float()])
    pending, earlier = read_later(utils.all_reduce_max(flags)), run.get("pending_flags")
    run["pending_flags"] = pending
    use_earlier = earlier is not None and not force and run["device"].type == "cuda"  # elsewhere reading is free
    stop, bad = (earlier if use_earlier else pending)()
    if bad >= MAX_BAD_STEPS:
        args = run["args"]
        where = f"epoch {(step - 1) // run['steps_per_epoch'] + 1} step {(step - 1) % run['steps_per_epoch'] + 1}"
        raise SystemExit(f"error: the loss was inf or NaN for the last {bad:.0f} steps (at {where}; each was skipped): "
                         f"the run diverged and stops without saving, so last.pt keeps the last good epoch. Try a "
                         f"lower --lr (now {args.lr:g}), --clip-grad-norm 1, or --amp off (now {args.amp})")
    return stop > 0


def read_later(tensor):
    """Starts copying a device tensor to the host; returns a function that gives its values as a list,
    waiting only if the copy has not finished yet. On the CPU there is nothing to wait for."""
    if tensor.device.type != "cuda":
        values = tensor.tolist()
        return lambda: values
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read():
        copied.synchronize()
        return host.tolist()
    return read


def epochs_for_time(hours, train_seconds, steps_run, steps_per_epoch, eval_seconds, device, log):
    """--time: the number of epochs that fit in `hours`, from the first epoch: its training time, measured per step
    (a run resumed inside the epoch ran only some of them), and its evaluation time. The slowest process's time
    decides, so that every process fits the same number and follows the same schedule."""
    epoch_seconds = train_seconds / steps_run * steps_per_epoch + eval_seconds
    epoch_seconds = utils.all_reduce_max(torch.tensor(epoch_seconds, dtype=torch.float64, device=device)).item()
    epochs = max(1, int(hours * 3600 / epoch_seconds))
    log(f"--time {hours:g} h: {epoch_seconds:.2f} s per epoch (training measured over {steps_run} of {steps_per_epoch} "
        f"steps), so {epochs} epochs; the schedule follows")
    return epochs


def exit_for_resume(where, output_dir, log):
    log(f"stopped {where}; continue with: python train.py --resume {Path(output_dir or '.') / 'last.pt'}")
    utils.cleanup_distributed()
    sys.exit(128 + signal.SIGTERM)


class Progress:
    """One live line per epoch, redrawn in place about once a second on a terminal (each redraw reads
    the loss from the device: a sync point); only its final state goes to the log."""

    def __init__(self, epoch, epochs, steps, first_step, log):
        self.head, self.steps, self.first_step, self.log = f"epoch {epoch + 1}/{epochs}", steps, first_step, log
        self.live = sys.stdout.isatty()
        self.last_draw = time.perf_counter()

    def line(self, step, loss_sum, seen, lr, data_wait, start):
        elapsed = time.perf_counter() - start
        eta = elapsed / max(step - self.first_step, 1) * (self.steps - step)
        return (f"{self.head}  step {step}/{self.steps}  loss {loss_sum.item() / max(seen, 1):.4f}  lr {lr:.4g}  "
                f"{seen / elapsed:.0f} img/s  data wait {100 * data_wait / elapsed:.0f}%  "
                f"eta {timedelta(seconds=round(eta))}")

    def update(self, *state):
        if self.live and time.perf_counter() - self.last_draw > 1.0:
            self.last_draw = time.perf_counter()
            print("\r" + self.line(*state), end="", flush=True)

    def finish(self, *state):
        if self.live:
            print("\r", end="")
        self.log(self.line(*state))


# -----------------------------------------------------------------------------
# checkpoints and results

def make_checkpoint(run, optimizer, scaler, ema_model, epoch, step, best_score, metrics):
    """Everything needed to continue the run or to use the model alone. No RNG state is needed:
    every random draw is seeded from (seed, epoch, step, rank) or (seed, epoch, sample index)."""
    return {
        "model": utils.unwrap_state_dict(run["raw_model"].state_dict()),
        "model_ema": utils.unwrap_state_dict(ema_model.state_dict()) if ema_model is not None else None,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,  # epochs completed
        "step": step,  # optimizer steps completed
        "best_score": best_score,
        "metrics": metrics,
        "world_size": run["world_size"],
        "args": vars(run["args"]),
        "model_name": run["args"].model,
        "classes": run["classes"],
        "preprocess": run["preprocess"],
    }


def save_first_batch(loader, mix, classes, args, device, path, count=32):
    """train_batch.jpg: the first images the model trains on, after augmentation and MixUp/CutMix (drawn as the
    first step draws them: MixUp and CutMix are linear, so mixing before normalising gives the same pixels), each
    with its label; a mixed label names its two largest shares."""
    loader.sampler.set_epoch(0)
    images, targets = next(iter(loader))
    images, targets = images.to(device).float(), targets.to(device)
    utils.seed_draws(utils.seed_from(args.seed, 0, 0, 0), device.type)
    if mix is not None:
        images, targets = mix(images, targets)
    captions = []
    for target in targets[:count].cpu():
        if target.ndim == 0:
            captions.append(classes[target])
        elif args.task == "multilabel":
            captions.append("+".join(classes[i] for i in target.nonzero().flatten()))
        else:
            shares, indices = target.topk(min(2, len(classes)))
            captions.append("\n".join(f"{classes[i]} {p:.2f}" for p, i in zip(shares, indices) if p > 0))
    utils.save_image_grid(images[:count].clamp(0, 255).round().byte().cpu(), captions, path)


def trim_results(path, epochs, columns):
    """Keeps the rows of the first `epochs` epochs: a resumed run rewrites what came after its checkpoint."""
    if path.exists():
        with open(path, newline="") as f:
            rows = [row for row in csv.DictReader(f) if int(row["epoch"]) <= epochs]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)


def append_results(path, row, columns):
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, columns)
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


# -----------------------------------------------------------------------------

@contextmanager
def stop_on_signals():
    """SIGTERM (a cluster preempting the job) and Ctrl-C set the event it gives: the loop finishes its step, saves,
    then stops. The previous handlers come back at the end (train.main may run inside another program)."""
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv=None):
    args = parse_args(argv)
    with stop_on_signals() as stop, utils.deterministic_mode(args.deterministic):
        train(args, stop)


def train(args, stop):
    checkpoint = None
    if args.resume:
        args, checkpoint = resume_args(args)
    rank, local_rank, world_size, device = utils.setup_distributed(args.device)
    if args.amp == "fp16" and device.type == "mps":
        raise SystemExit("error: --amp fp16 is not supported on mps; use bf16 or off")
    if args.sync_bn and world_size > 1 and device.type != "cuda":
        raise SystemExit("error: --sync-bn needs CUDA: torch's SyncBatchNorm does not run on the CPU; drop the flag")
    if args.workers is None:
        args.workers = default_workers(world_size, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores: ~same accuracy, much faster matmuls
        torch.backends.cudnn.allow_tf32 = True

    # output folder and log: rank 0 makes the folder and writes, every process knows the folder, the others stay quiet
    if rank == 0 and args.output_dir is None:
        name = Path(args.train_csv).stem if args.train_csv else Path(args.data or SHAPES_DIR).resolve().name
        args.output_dir = str(new_output_dir(name))
    args.output_dir = utils.broadcast_object(args.output_dir)
    output_dir = Path(args.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
    log = utils.make_logger(output_dir / "train.log" if rank == 0 else None, enabled=rank == 0)
    log(f"{'resuming ' + args.resume if args.resume else 'training'}: {' '.join(sys.argv)}")
    if checkpoint is not None and checkpoint["world_size"] != world_size:
        raise SystemExit(f"error: {args.resume} was trained by {checkpoint['world_size']} process(es); resume it "
                         f"with the same number (this run has {world_size}), so the batch and schedule stay the same")
    if checkpoint is not None and checkpoint["epoch"] >= args.epochs:
        log(f"{args.resume} is a finished run ({checkpoint['epoch']}/{args.epochs} epochs): nothing to do. "
            "To train further, start a new run with --weights " + args.resume)
        utils.cleanup_distributed()
        return

    # data
    classes, preprocess, train_loader, val_loader = load_data(args, rank, local_rank, world_size, device, output_dir,
                                                              log)

    # model
    utils.seed_everything(args.seed)  # the same initial weights in every process
    model, frozen = make_model(args, len(classes), world_size, log)
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    normalize = data.make_normalize(preprocess, device, args.channels_last)
    if hasattr(model, "whiten_stem") and not args.weights and checkpoint is None:
        sample = spread_sample(train_loader, WHITEN_IMAGES)
        model.whiten_stem(normalize(sample.to(device)))
        log(f"model: the stem's filters whiten the 2x2 patches of {len(sample)} training images (fixed, not trained)")
    ema_model = None
    if args.model_ema:
        ema_model = build_model(args.model, len(classes), log=lambda *_: None).to(device)
        ema_model.load_state_dict(model.state_dict())
        ema_model.eval().requires_grad_(False)
    raw_model = model  # the module whose state_dict we save, whatever wraps it below
    optimizer = make_optimizer(raw_model, args, device)
    scaler = make_scaler(args.amp, device)
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    ddp_model = model if world_size > 1 else None  # whose no_sync skips the all-reduce between accumulation steps
    if args.compile:
        model = torch.compile(model)
    criterion = (nn.CrossEntropyLoss(label_smoothing=args.label_smoothing) if args.task == "single"
                 else nn.BCEWithLogitsLoss())
    mix = make_mix(args, len(classes))

    start_epoch, step, best_score, best_epoch = 0, 0, -1.0, 0
    if checkpoint is not None:
        raw_model.load_state_dict(checkpoint["model"])
        if ema_model is not None:
            ema_model.load_state_dict(checkpoint["model_ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        step, best_score, best_epoch = checkpoint["step"], checkpoint["best_score"], checkpoint.get("best_epoch", 0)
    steps_per_epoch = len(train_loader) // args.accum_steps
    start_epoch = step // steps_per_epoch  # a run stopped mid-epoch goes on inside that epoch
    if checkpoint is not None:
        log(f"resumed at epoch {start_epoch}/{args.epochs} step {step - start_epoch * steps_per_epoch}/"
            f"{steps_per_epoch}, best val score so far {best_score:.2f}%")

    def save_last(epochs_done, step, metrics=None, is_best=False):
        if rank == 0:
            ckpt = make_checkpoint(run, optimizer, scaler, ema_model, epochs_done, step, best_score, metrics)
            ckpt["best_epoch"] = best_epoch
            if is_best:  # best.pt before last.pt: last.pt never records a best that best.pt lacks
                utils.save_checkpoint(ckpt, output_dir / "best.pt")
            if metrics is not None and args.save_period and epochs_done % args.save_period == 0:
                utils.save_checkpoint(ckpt, output_dir / f"epoch{epochs_done}.pt")
            utils.save_checkpoint(ckpt, output_dir / "last.pt")

    run = {"args": args, "device": device, "log": log, "rank": rank, "world_size": world_size, "raw_model": raw_model,
           "classes": classes, "preprocess": preprocess, "total_steps": args.epochs * steps_per_epoch,
           "warmup_steps": round(args.lr_warmup_epochs * steps_per_epoch), "steps_per_epoch": steps_per_epoch,
           "normalize": normalize, "frozen": frozen, "stop": stop, "save_last": save_last, "ddp_model": ddp_model}
    if rank == 0:
        (output_dir / "args.json").write_text(json.dumps(vars(args), indent=1))
        if checkpoint is None:  # what the model sees, for a look before the run goes far
            save_first_batch(train_loader, mix, classes, args, device, output_dir / "train_batch.jpg")
        trim_results(output_dir / "results.csv", start_epoch, RESULTS_COLUMNS[args.task])

    # the loop (`while`, not `for`: --time and --patience change args.epochs on the way)
    epoch = start_epoch
    while epoch < args.epochs:
        epoch_start_step = step
        step, stats = train_one_epoch(model, ema_model, train_loader, optimizer, scaler, criterion, mix, epoch, step,
                                      run)
        if stats is None:
            exit_for_resume(f"at epoch {epoch + 1} step {step - epoch * steps_per_epoch}/{steps_per_epoch}",
                            output_dir, log)
        # the unwrapped model (a DDP model would sync its buffers in its first forward, a collective that a process
        # without validation images never makes), with rank 0's BatchNorm statistics: the model that is saved
        eval_start, eval_model = time.perf_counter(), ema_model if ema_model is not None else raw_model
        utils.broadcast_buffers(eval_model)
        metrics = EVALUATE[args.task](eval_model, val_loader, device, len(classes), preprocess, args.amp,
                                      args.channels_last, tta=args.tta)
        eval_seconds = time.perf_counter() - eval_start
        # best.pt: by val top-1, or micro F1 for multilabel; strictly better, so a tie never replaces the best
        is_best = metrics["score"] > best_score
        best_score, best_epoch = (metrics["score"], epoch + 1) if is_best else (best_score, best_epoch)
        log(f"epoch {epoch + 1}/{args.epochs}  train loss {stats['train_loss']:.4f} top-1 {stats['train_top1']:.2f}%  "
            f"val loss {metrics['loss']:.4f} {metrics['summary']}  "
            f"{stats['seconds']:.1f}s  {stats['images_per_s']:.0f} img/s" + ("  * best" if is_best else ""))
        if rank == 0:  # the row first: a resume from the previous last.pt trims it away again
            append_results(output_dir / "results.csv", {
                "epoch": epoch + 1, "lr": stats["lr"], "train_loss": stats["train_loss"],
                "train_top1": stats["train_top1"],
                "val_loss": metrics["loss"], **metrics["columns"], "seconds": stats["seconds"],
                "images_per_s": stats["images_per_s"]}, RESULTS_COLUMNS[args.task])
        if args.time and epoch == 0:
            # the new args.epochs is saved in the checkpoint: a resumed run ends where this one would
            args.epochs = epochs_for_time(args.time, stats["seconds"], step - epoch_start_step, steps_per_epoch,
                                          eval_seconds, device, log)
            run["total_steps"] = args.epochs * steps_per_epoch
        if args.patience and epoch + 1 - best_epoch >= args.patience and epoch + 1 < args.epochs:
            log(f"stopping early: val top-1 has not improved for {args.patience} epochs (best at epoch {best_epoch}, "
                "--patience)")
            args.epochs = epoch + 1
        save_last(epoch + 1, step, metrics, is_best)
        if epoch + 1 < args.epochs and check_flags(run, 0, torch.zeros((), device=device), force=True):
            exit_for_resume(f"after epoch {epoch + 1}", output_dir, log)
        epoch += 1
    if rank == 0:
        with open(output_dir / "results.csv", newline="") as f:
            utils.plot_results(list(csv.DictReader(f)), output_dir / "results.png",
                               "val_top1" if args.task == "single" else "val_f1")
        if args.task == "single":
            utils.plot_confusion(utils.load_checkpoint(output_dir / "best.pt")["metrics"]["confusion"], classes,
                                 output_dir / "confusion_matrix.png")
    log(f"done: best val {'top-1' if args.task == 'single' else 'F1'} {best_score:.2f}% (epoch {best_epoch}); "
        "checkpoints, results.csv, results.png, "
        f"confusion_matrix.png and train.log in {output_dir}")
    utils.cleanup_distributed()


if __name__ == "__main__":
    main()
