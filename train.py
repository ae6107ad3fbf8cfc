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
import signal
import sys
import threading
import time
from contextlib import ExitStack, contextmanager, nullcontext
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.distributed import ReduceOp
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import utils
from evaluate import EVALUATE
from model import (OWN_MODELS, build_model, check_image_size, check_model_name, check_pretrained, freeze, head_name,
                   keep_frozen_in_eval, list_models, load_weights, set_head_dropout)

# the defaults of each optimizer's recipe, for the flags not given. Muon's is airbench94's (at batch 1024: its
# learning rates for our mean loss, 0.7x those of its batch 2000, and its momentum 0.7), for our smallnet; its wd,
# 3e-6 x the head's lr scale (806.4), acts on the head alone (Muon keeps each filter's norm).
# Learning rates are for `batch` images per update; other batch sizes scale them by (batch / that), or its square
# root for the optimizers whose step size does not follow the gradient's (timm's rule).
RECIPES = {
    "sgd": dict(lr=0.05, wd=5e-4, momentum=0.9, batch=64, lr_scaling="linear", lr_scheduler="cosine",
                lr_warmup_epochs=1.0, label_smoothing=0.1),
    "adamw": dict(lr=1e-3, wd=0.05, batch=64, lr_scaling="sqrt", lr_scheduler="cosine", lr_warmup_epochs=1.0,
                  label_smoothing=0.1),
    "muon": dict(lr=0.6, wd=2.4192e-3, momentum=0.85, muon_lr=0.168, muon_momentum=0.7, batch=1024, lr_scaling="sqrt",
                 lr_scheduler="linear", lr_warmup_epochs=0.0, label_smoothing=0.2),
}
FLAG_RANGES = {  # the values a numeric flag takes: another is an error, not a run that does something odd
    **dict.fromkeys(["epochs", "batch_size", "accum_steps", "img_size"], "[1, inf)"),
    **dict.fromkeys(["workers", "freeze", "patience", "save_period", "save_every_steps", "crop_padding",
                     "mixup_alpha", "cutmix_alpha", "muon_lr", "lr_min", "wd", "lr_warmup_epochs"], "[0, inf)"),
    **dict.fromkeys(["dropout", "momentum", "muon_momentum", "label_smoothing", "model_ema_decay"], "[0, 1)"),
    **dict.fromkeys(["min_scale", "crop_pct"], "(0, 1]"),
    "random_erase": "[0, 1]", "val_fraction": "(0, 1)", "clip_grad_norm": "(0, inf)", "time": "(0, inf)",
    "lr": "(0, inf)",  # an lr of 0 trains nothing, and Muon's filters' lr is set as a multiple of it
}
NO_EFFECT = {  # flags that other settings ignore: given with them, a warning says so
    "val_fraction": (lambda a: a.val_csv or not a.train_csv and data.find_val_dir(a.data),
                     "with a val/ folder or --val-csv"),
    **dict.fromkeys(["image_column", "label_column", "label_delimiter"],
                    (lambda a: not a.train_csv, "without --train-csv")),
    "momentum": (lambda a: a.opt == "adamw", "with --opt adamw"),
    "muon_lr": (lambda a: a.opt != "muon", "without --opt muon"),
    "muon_momentum": (lambda a: a.opt != "muon", "without --opt muon"),
    "label_smoothing": (lambda a: a.task == "multilabel", "with --task multilabel"),
    "crop_padding": (lambda a: a.train_crop == "resized", "with --train-crop resized"),
    "min_scale": (lambda a: a.train_crop == "padded", "with --train-crop padded"),
    "model_ema_decay": (lambda a: not a.model_ema, "without --model-ema"),
}
SMALL_SET = 10_000  # fewer training images than this: suggest --pretrained for a torchvision model
MIN_STEPS_PER_EPOCH = 16  # the default batch size shrinks (to a power of 2) to give small datasets this many
RESULTS_COLUMNS = {  # results.csv; train_top1 is, for multilabel, the share of images with every label right;
    # seconds: the epoch's training; time: the run's wall time at the epoch's end (time to accuracy)
    "single": ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "seconds",
               "images_per_s", "time"],
    "multilabel": ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_f1", "val_macro_f1", "val_map",
                   "seconds", "images_per_s", "time"],
}
SHAPES_DIR = "datasets/shapes"  # where `python train.py` without --data writes its demo dataset
MAX_BAD_STEPS = 20  # consecutive steps with a non-finite loss after which a run has diverged: stop it
WHITEN_IMAGES = 1000  # images whose patch statistics set a whitening stem (smallnet): ~1M patches, a second
PRECISE_BN_IMAGES = 1024  # training images that set BatchNorm statistics before each evaluation: a forward pass
CHECK_EVERY = 10  # steps between reads of the stop and divergence flags (a sync point; an all-reduce with DDP)
PROGRESS_LOG_SECONDS = 60  # where stdout is no terminal (a cluster job's log file): seconds between progress lines


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bool_flag = argparse.BooleanOptionalAction
    # data
    p.add_argument("--data", help=f"dataset folder (default: generate a shapes demo in {SHAPES_DIR})")
    p.add_argument("--train-csv", help="instead of --data: a CSV of image paths (relative to it), labels")
    p.add_argument("--val-csv", help="the validation CSV (default: --val-fraction of --train-csv)")
    p.add_argument("--image-column", default="image", help="CSV column of the image paths (default: image)")
    p.add_argument("--label-column", default="label", help="CSV column of the labels, names or ids (default: label)")
    p.add_argument("--label-delimiter", help="separator of several labels in one CSV cell (default: none)")
    p.add_argument("--task", default="single", choices=["single", "multilabel"],
                   help="one class per image, or any number (CSV only) (default: single)")
    p.add_argument("--classes", help="the classes in index order: a,b,c or a file (default: sorted names)")
    p.add_argument("--ignore-classes", help="classes to leave out of the data: a,b or a file")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of train/ held out if no val/ (default: 0.1)")
    p.add_argument("--img-size", type=int, help="training crop size (default: from the images, at most 224)")
    p.add_argument("--crop-pct", type=float, help="eval crop / resized side (default: 1 to 64 px, else 0.875)")
    p.add_argument("--train-crop", choices=["resized", "padded"],
                   help="random crop (default: padded to 64 px, else resized)")
    p.add_argument("--crop-padding", type=int, help="padded crop: largest shift in px (default: size / 16)")
    p.add_argument("--min-scale", type=float, default=0.25, help="least area share of a resized crop (default: 0.25)")
    p.add_argument("--auto-augment", choices=list(data.AUTO_AUGMENT), help="auto-augment policy (default: none)")
    p.add_argument("--random-erase", type=float, default=0.0, help="random erasing probability (default: 0)")
    p.add_argument("--mixup-alpha", type=float, default=0.0, help="MixUp alpha, 0 is off (default: 0)")
    p.add_argument("--cutmix-alpha", type=float, default=0.0, help="CutMix alpha, 0 is off (default: 0)")
    p.add_argument("--strict", action="store_true", help="stop on unusable image files instead of skipping them")
    p.add_argument("--cache", action=bool_flag, help="decode every image once (default: on for small sets)")
    p.add_argument("-j", "--workers", type=int, help="loader processes per process (default: from the cores)")
    # model
    p.add_argument("--model", help="a name of --list-models (default: smallnet to 64 px, else resnet18)")
    p.add_argument("--list-models", action="store_true", help="print the model names and exit")
    p.add_argument("--pretrained", action="store_true", help="start from torchvision's default weights (a download)")
    p.add_argument("--weights", help="start from a local state dict or checkpoint (heads that differ: new)")
    p.add_argument("--freeze", type=int, default=0, help="freeze the first N stages, BatchNorm too (default: 0)")
    p.add_argument("--freeze-backbone", action="store_true", help="train only the head (the last stage)")
    p.add_argument("--dropout", type=float, help="dropout before the head (default: the model's own)")
    # optimisation
    p.add_argument("--epochs", type=int, default=10, help="number of epochs (default: 10)")
    p.add_argument("-b", "--batch-size", type=int,
                   help=f"images per process per step (default: the recipe's, <= 1/{MIN_STEPS_PER_EPOCH} of the set)")
    p.add_argument("--accum-steps", type=int, default=1, help="steps per optimizer update (default: 1)")
    p.add_argument("--opt", choices=list(RECIPES),
                   help="Nesterov SGD, AdamW, or Muon on filters and SGD on the rest (default: muon for smallnet, "
                        "else sgd); its recipe (RECIPES) sets the defaults of the flags below")
    p.add_argument("--muon-lr", type=float, help="--opt muon: peak lr of the filters (default: 0.168 at b1024)")
    p.add_argument("--muon-momentum", type=float, help="--opt muon: the filters' momentum (default: 0.7)")
    p.add_argument("--lr", type=float, help="peak lr (default: sgd 0.05 at batch 64, adamw 1e-3, muon 0.6 at 1024)")
    p.add_argument("--momentum", type=float, help="SGD momentum (default: 0.9, muon's SGD 0.85)")
    p.add_argument("--wd", "--weight-decay", dest="wd", type=float,
                   help="weight decay of linear maps' weights (default: sgd 5e-4, adamw 0.05, muon 2.42e-3)")
    p.add_argument("--lr-warmup-epochs", type=float, help="linear warmup from 0, in epochs (default: 1, muon 0)")
    p.add_argument("--lr-min", type=float, default=0.0, help="learning rate at the last step (default: 0)")
    p.add_argument("--lr-scheduler", choices=["cosine", "linear"],
                   help="decay after the warmup (default: cosine, muon: linear)")
    p.add_argument("--label-smoothing", type=float, help="label smoothing (default: 0.1, muon 0.2)")
    p.add_argument("--clip-grad-norm", type=float, help="clip the gradient norm to this (default: off)")
    p.add_argument("--tta", action="store_true", help="evaluate with flips (and shifts) each epoch; best.pt follows it")
    p.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights: evaluated and saved for use")
    p.add_argument("--model-ema-decay", type=float, default=0.999, help="EMA decay per optimizer step (default: 0.999)")
    # speed and numerics
    p.add_argument("--amp", choices=list(utils.AMP_DTYPES),
                   help="autocast dtype (default: bf16 where the device has bf16 units, else GPU fp16, CPU off)")
    p.add_argument("--channels-last", action=bool_flag, default=True, help="NHWC memory format (default: on)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    p.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across GPUs")
    p.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: the best available)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random (default: 0)")
    p.add_argument("--deterministic", action="store_true", help="bitwise repeatable runs (slower kernels on GPU)")
    p.add_argument("--patience", type=int, default=0, help="stop when val top-1 stalls N epochs (default: 0, never)")
    p.add_argument("--time", type=float, help="hours to train: --epochs is refitted after the first epoch")
    # output
    p.add_argument("--save-period", type=int, default=0, help="also keep epoch<N>.pt every N epochs (default: 0: no)")
    p.add_argument("--output-dir", help="where files go (default: runs/<data name>-<date>-<time>)")
    p.add_argument("--save-every-steps", type=int, default=0, help="also write last.pt every N steps (default: 0: no)")
    p.add_argument("--resume", help="continue from this last.pt, with the arguments it was started with")
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
    utils.check_ranges(parser, args, FLAG_RANGES)
    if args.data and args.train_csv:
        parser.error("give --data (a folder) or --train-csv (a CSV file), not both")
    if args.task == "multilabel" and (not args.train_csv or args.mixup_alpha or args.cutmix_alpha):
        parser.error("--task multilabel needs --train-csv, and does not take --mixup-alpha or --cutmix-alpha")
    if args.val_csv and not args.train_csv:
        parser.error("--val-csv goes with --train-csv")
    if args.model and check_model_name(args.model):
        parser.error(f"--model: {check_model_name(args.model)}")
    if args.pretrained and args.model and check_pretrained(args.model):
        parser.error(f"--pretrained: {check_pretrained(args.model)}")
    if args.weights and not Path(args.weights).is_file():
        parser.error(f"--weights: {args.weights} does not exist")
    return args


DATA_FLAGS = ("data", "train_csv", "val_csv")  # where the data is: a resume may find it elsewhere


def resume_args(args):
    """A resumed run takes its arguments from the checkpoint; only how it runs (--workers, --device, --cache) and
    where its data is (check_same_data then compares the files) may change. A flag given with another value than
    the run's is an error, not silently ignored."""
    checkpoint = utils.load_checkpoint(args.resume)
    check_is_newest(checkpoint, args.resume)
    defaults = vars(get_args_parser().parse_args([]))
    saved = {**defaults, **checkpoint["args"]}  # flags newer than the run: their defaults
    removed = [f"--{name.replace('_', '-')}" for name, value in checkpoint["args"].items()
               if name not in defaults and value]
    if removed:  # the run would go on without them: not the run it was
        raise SystemExit(f"error: {args.resume} was trained with {', '.join(removed)}, which this train.py no longer "
                         "has: resume it with the code it was started with")
    moved = {name: getattr(args, name) for name in DATA_FLAGS if getattr(args, name) and saved[name]}
    saved.update(moved, resume=args.resume, workers=args.workers, device=args.device,
                 cache=saved["cache"] if args.cache is None else args.cache, output_dir=str(Path(args.resume).parent))
    changed = [f"--{name.replace('_', '-')}" + ("" if value is True else f" {value}") + f" (the run's: {saved[name]})"
               for name, value in vars(args).items() if value != defaults[name] and not same(value, saved[name])]
    if changed:
        raise SystemExit(f"error: --resume continues a run with the arguments it was started with, and these differ "
                         f"from the run's: {', '.join(changed)}. Only --workers, --device, --cache and where the "
                         f"data is may change; to train on with other settings, start a new run with --weights "
                         f"{args.resume}")
    for flag, path in ((f"--{name.replace('_', '-')}", saved[name]) for name in DATA_FLAGS if saved[name]):
        if not Path(path).exists():  # a job requeued on a node with its own copy of the data
            raise SystemExit(f"error: the run's {flag} {path} does not exist: if the data moved, give its new place "
                             f"with {flag} (its files must be the run's)")
    return argparse.Namespace(**saved), checkpoint


def check_is_newest(checkpoint, path):
    """An error for a checkpoint behind the last.pt beside it (best.pt, epoch<N>.pt): resumed, it would replace
    last.pt and the rows of results.csv after it."""
    last = Path(path).parent / "last.pt"
    if last.is_file() and not last.samefile(path) and checkpoint["step"] < utils.load_checkpoint(last)["step"]:
        raise SystemExit(f"error: {path} is at epoch {checkpoint['epoch']}, behind {last}: resuming it would replace "
                         f"{last.name} and the rows of results.csv after it. Continue the run with --resume {last}, "
                         f"or start a new run from these weights with --weights {path}")


def same(given, saved):
    """Whether a flag's value is the run's: equal, or paths to the same file or folder."""
    paths = isinstance(given, str) and isinstance(saved, str)
    return given == saved or paths and Path(given).resolve() == Path(saved).resolve()


def new_output_dir(data_name):
    """Creates runs/<data name>-<date>-<time>: creating it claims it, so two runs started in the same second get
    two folders."""
    base = Path("runs") / f"{data_name}-{datetime.now():%Y%m%d-%H%M%S}"
    path, n = base, 2
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            path, n = Path(f"{base}-{n}"), n + 1


def claim_output_dir(args, rank, run_files):
    """The run's folder, the same in every process (--output-dir, or a new one that rank 0 creates), and in rank 0
    its train.log, open and locked until the run ends: no other run writes into the folder meanwhile."""
    output_dir, log_file, error = args.output_dir, None, None
    if output_dir and rank == 0 and not args.resume and any(Path(output_dir).glob("*.pt")):
        error = (f"error: --output-dir {output_dir} already holds a run's checkpoints, which a new run would "
                 f"replace: continue that run with --resume {Path(output_dir) / 'last.pt'}, or give another "
                 "--output-dir")
    if output_dir is None and rank == 0:
        try:
            output_dir = str(new_output_dir(Path(args.train_csv).stem if args.train_csv
                                            else Path(args.data or SHAPES_DIR).resolve().name))
        except OSError as e:  # a read-only working folder
            error = f"error: cannot create a run folder in {Path('runs').resolve()} ({e.strerror}); give --output-dir"
    if rank == 0 and not error:
        error = utils.create_folder(output_dir, "--output-dir")
    if rank == 0 and not error:
        log_file = run_files.enter_context(open(Path(output_dir) / "train.log", "a"))
        if not utils.lock(log_file):
            error = f"error: another run is writing into {output_dir}: wait for it to end" + (
                "" if args.resume else ", or give another --output-dir")
    output_dir, error = utils.broadcast_object((output_dir, error))  # rank 0's folder (and files) decide
    if error:
        raise SystemExit(error)  # in every process: none is left waiting at a collective
    return Path(output_dir), log_file


def check_device(args, device, world_size):
    if args.amp == "fp16" and device.type == "mps":
        raise SystemExit("error: --amp fp16 is not supported on mps; use bf16 or off")
    if args.sync_bn and world_size > 1 and device.type != "cuda":
        raise SystemExit("error: --sync-bn needs CUDA: torch's SyncBatchNorm does not run on the CPU; drop the flag")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores: ~same accuracy, much faster matmuls
        torch.backends.cudnn.allow_tf32 = True


def is_finished(checkpoint, args, world_size, log):
    """Whether a checkpoint to resume has nothing left to do; an error if it cannot be resumed here."""
    if checkpoint["world_size"] != world_size:
        raise SystemExit(f"error: {args.resume} was trained by {checkpoint['world_size']} process(es); resume it "
                         f"with the same number (this run has {world_size}), so the batch and schedule stay the same")
    if checkpoint["epoch"] >= args.epochs:
        log(f"{args.resume} is a finished run ({checkpoint['epoch']}/{args.epochs} epochs): nothing to do. "
            "To train further, start a new run with --weights " + args.resume)
    return checkpoint["epoch"] >= args.epochs


# -----------------------------------------------------------------------------
# data

def load_data(args, output_dir, local_rank, world_size, device, log):
    """(args settled, classes, train and val samples): a new namespace with the flags whose defaults depend on the
    data or the device (--data for the demo, --img-size, --model, --train-crop, --amp) settled once."""
    settled = {"output_dir": str(output_dir)}
    if args.amp is None:  # rank 0's: DDP averages the gradients of every process, scaled up in fp16 and not in bf16
        settled["amp"] = utils.broadcast_object(utils.native_amp(device))
        log(f"amp: {settled['amp']}, what this {device.type} computes fast (--amp)")
    else:
        utils.warn_if_emulated(args.amp, device, log)
    if args.data is None and args.train_csv is None:
        if local_rank == 0:
            log(f"data: no --data given: training on generated shapes in {SHAPES_DIR} (written once)")
            data.make_shapes_dataset(SHAPES_DIR)
        if world_size > 1:
            torch.distributed.barrier()  # the other processes wait for the files
        settled["data"] = SHAPES_DIR
    wanted, ignore = data.parse_class_list(args.classes), data.parse_class_list(args.ignore_classes) or []
    if args.train_csv:
        classes, train_samples, val_samples = data.load_csv_samples(
            args.train_csv, args.val_csv, (args.image_column, args.label_column, args.label_delimiter),
            args.val_fraction, args.seed, log, args.strict, wanted, ignore, args.task == "multilabel")
    else:
        classes, train_samples, val_samples = data.load_samples(settled.get("data", args.data), args.val_fraction,
                                                                args.seed, log, args.strict, wanted, ignore)
    if len(classes) < 2 and args.task == "single":  # it would score 100% with nothing learnt
        where = args.train_csv or Path(settled.get("data", args.data)) / "train"
        raise SystemExit(f"error: {where} has one class ({', '.join(classes)}): a classifier needs two or more; "
                         "for a yes/no question, add the images without the thing as a second class")
    img_size = args.img_size or data.infer_img_size([path for path, _ in train_samples])
    if args.img_size is None:
        log(f"data: image size {img_size} px, from the median short side of the training images (--img-size)")
    if args.model is None:
        settled["model"] = "smallnet" if img_size <= 64 and not args.pretrained else "resnet18"  # has weights
        log(f"model: {settled['model']}, the default for {img_size} px images"
            f"{' with --pretrained' if args.pretrained else ''} (--model)")
    settled.update(img_size=img_size, train_crop=args.train_crop or ("padded" if img_size <= 64 else "resized"))
    model_name = settled.get("model", args.model)
    if model_name not in OWN_MODELS and not (args.pretrained or args.weights) and len(train_samples) < SMALL_SET:
        log(f"hint: {len(train_samples)} training images are few to train {model_name} from scratch; on photos, "
            "--pretrained (torchvision's ImageNet weights) is what helps most")
    settled.update(recipe_defaults(args, model_name, len(train_samples), world_size, log))
    settled_args = argparse.Namespace(**{**vars(args), **settled})
    if settled_args.lr_min > settled_args.lr:  # the recipe's lr shrinks with the batch, which small sets shrink
        raise SystemExit(f"error: --lr-min {args.lr_min:g} is above the peak lr, {settled_args.lr:.3g} here: the lr "
                         "would rise instead of decay; lower --lr-min (or give --lr)")
    if not args.resume:  # a resumed run said so when it started
        warn_of_ignored_flags(args, settled_args, log)
    return settled_args, classes, train_samples, val_samples


def check_same_data(checkpoint, path, classes, files):
    """A resumed run reads the data it stopped on: other classes would re-index the labels, and other files would
    change the epoch's order (a resume inside an epoch would skip other images than those seen) and its steps, or
    the images that best.pt is chosen on."""
    if classes != checkpoint["classes"]:
        raise SystemExit(f"error: the classes of the data ({', '.join(classes)}) are not the run's "
                         f"({', '.join(checkpoint['classes'])}); resume on the run's data, or start a new run")
    for split, name in (("train", "training"), ("val", "validation")):
        if checkpoint.get("files", files)[split] != files[split]:  # older runs kept no digests
            raise SystemExit(f"error: the {name} images are not the run's: files were added, removed, renamed or "
                             "became unreadable since it started; resume on the run's data, or start a new run with "
                             f"--weights {path}")


def warn_of_ignored_flags(given, settled, log):
    """A warning for each flag given that the other settings ignore (NO_EFFECT)."""
    defaults = get_args_parser()
    for name, (ignored, why) in NO_EFFECT.items():
        if getattr(given, name) != defaults.get_default(name) and ignored(settled):
            log(f"warning: --{name.replace('_', '-')} does nothing {why}")


def recipe_defaults(args, model_name, train_images, world_size, log):
    """The optimizer's recipe for the flags not given: the batch size, at most 1/MIN_STEPS_PER_EPOCH of the
    training set, and the learning rates, scaled to the images per update."""
    opt = args.opt or ("muon" if model_name in OWN_MODELS else "sgd")
    recipe = RECIPES[opt]
    settled = {"opt": opt, **{name: value for name, value in recipe.items() if getattr(args, name, 0) is None}}
    if args.batch_size is None:
        largest = train_images // (MIN_STEPS_PER_EPOCH * world_size * args.accum_steps)
        # 2 or more: BatchNorm cannot train on one image where a layer's output is 1x1 (resnet18 at 32 px)
        settled["batch_size"] = max(2, min(recipe["batch"], 2 ** int(math.log2(max(largest, 1)))))
    images_per_update = settled.get("batch_size", args.batch_size) * world_size * args.accum_steps
    lr_factor = (images_per_update / recipe["batch"]) ** {"linear": 1.0, "sqrt": 0.5}[recipe["lr_scaling"]]
    for name in ("lr", "muon_lr"):
        if name in settled:
            settled[name] *= lr_factor
    flags = [f"--{name.replace('_', '-')} " + (f"{value:.3g}" if isinstance(value, float) else str(value))
             for name, value in settled.items()]
    log(f"recipe: {' '.join(flags)} (the defaults of --opt {opt} for this data; a flag given overrides its default)")
    return settled


def count_steps(train_loader, args, world_size, log):
    """Optimizer steps per epoch."""
    if len(train_loader) < args.accum_steps:
        raise SystemExit(f"error: --accum-steps {args.accum_steps} is more than the {len(train_loader)} batch(es) of "
                         f"-b {args.batch_size} in an epoch of {len(train_loader.sampler)} training images per "
                         "process: lower --accum-steps or --batch-size")
    log(f"batch: {args.batch_size} per process x {world_size} process(es) x {args.accum_steps} accumulation "
        f"step(s) = {args.batch_size * world_size * args.accum_steps} images per update")
    return len(train_loader) // args.accum_steps


def make_model(args, classes, world_size, device, log):
    """The model to train, on `device`, and its frozen stages."""
    # SyncBatchNorm replaces BatchNorm modules, so it comes before the freezing, which holds the modules it froze
    utils.seed_everything(args.seed)  # the same initial weights in every process
    model = build_model(args.model, len(classes), args.pretrained, args.weights, log, classes)
    check_image_size(model, args.model, args.img_size)
    if args.dropout is not None:
        set_head_dropout(model, args.dropout)
    if args.sync_bn and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    frozen = []
    if args.freeze or args.freeze_backbone:
        frozen = freeze(model, -1 if args.freeze_backbone else args.freeze, log)
        if not (args.pretrained or args.weights):
            log("warning: --freeze without --pretrained or --weights: the frozen stages keep their random weights")
    model.train()
    keep_frozen_in_eval(frozen)  # as training runs it: the BatchNorm layers in training mode are those that train
    if args.batch_size == 1 and not (args.sync_bn and world_size > 1) and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
        raise SystemExit("error: -b 1: the model's BatchNorm layers need 2 or more images a batch in each process to "
                         "train; give -b 2 or more (--accum-steps adds images to an update, not to a batch)")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    return model.to(device, memory_format=memory_format), frozen


def whiten_stem(model, train_loader, normalize, log):
    """Sets a whitening stem (smallnet's) from WHITEN_IMAGES training images spread over the set, not augmented."""
    sample = train_loader.sample(WHITEN_IMAGES)
    model.whiten_stem(normalize(sample))
    log(f"model: the stem's filters whiten the 2x2 patches of {len(sample)} training images (fixed, not trained)")


def make_criterion(task, label_smoothing):
    """The training loss of a batch's logits: cross-entropy, or for multilabel binary cross-entropy summed over an
    image's labels (averaged over them too, every label's gradient, and SGD's step, would shrink as labels are
    added), both averaged over the images."""
    if task == "single":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    summed = nn.BCEWithLogitsLoss(reduction="sum")
    return lambda logits, targets: summed(logits, targets) / len(logits)


# -----------------------------------------------------------------------------
# optimisation: the learning rate is a pure function of the step

def lr_at(step, total_steps, warmup_steps, base_lr, min_lr, decay="cosine"):
    """Linear warmup to base_lr at step warmup_steps - 1, then cosine (or linear) decay to min_lr at step
    total_steps - 1."""
    peak = max(warmup_steps - 1, 0)
    if step < peak:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - peak) / max(1, total_steps - 1 - peak))
    remaining = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    return min_lr + (base_lr - min_lr) * remaining


def linear_map_weights(model):
    """The filters of convolutions and the matrices of linear layers, attention's projections included: what weight
    decay and Muon take. Not class tokens, position embeddings or layer scales, which have 2 dimensions or more but
    map nothing (Muon keeps a matrix's norm: it would make a class token of zeros NaN, and a layer scale as large
    as the lr; decay would pull them to 0)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            yield module.weight
        elif isinstance(module, nn.MultiheadAttention):
            yield from (w for w in (module.in_proj_weight, module.q_proj_weight, module.k_proj_weight,
                                    module.v_proj_weight) if w is not None)


def make_optimizer(model, args, device):
    """Nesterov SGD, AdamW, or Muon on the filters of convolutions and hidden linear layers with Nesterov SGD on
    the rest. Weight decay on the weights of linear maps alone (linear_map_weights): not on norms, biases, class
    tokens, position embeddings or layer scales (timm's choice). A parameter's `lr_scale` attribute (our smallnet
    sets some) multiplies its learning rate, not its weight decay."""
    head = model.get_submodule(head_name(model)).weight  # the last layer is no filter
    maps = {id(p) for p in linear_map_weights(model)}  # weight decay's; Muon's too, but the head's
    filters = maps - {id(head)} if args.opt == "muon" else set()
    groups = {}
    for p in (p for p in model.parameters() if p.requires_grad):
        is_filter = id(p) in filters
        # the multipliers are for SGD steps, which grow with the gradient; AdamW's steps are about lr in size
        own_scale = getattr(p, "lr_scale", 1.0) if args.opt != "adamw" else 1.0
        lr_scale = args.muon_lr / args.lr if is_filter else own_scale
        key = (id(p) in maps and not is_filter, is_filter, lr_scale)  # Muon keeps a filter's norm: no decay
        groups.setdefault(key, []).append(p)
    # set_lr sets a group's lr to the schedule's x lr_scale; its weight decay is divided by lr_scale (airbench's
    # rule), so that every parameter loses the same lr x wd share of itself a step, whatever its scale
    groups = [{"params": params, "weight_decay": args.wd / lr_scale if decay else 0.0, "lr_scale": lr_scale}
              | ({"orthogonalize": True, "momentum": args.muon_momentum} if is_filter else {})
              for (decay, is_filter, lr_scale), params in groups.items()]
    if args.opt == "muon":
        return Muon(groups, lr=args.lr, momentum=args.momentum)
    # fused kernels (one launch for all parameters, and the GradScaler's skip decided on the device) on CUDA,
    # foreach (vectorised) elsewhere
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if args.opt == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, **fast)
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True, **fast)
    # momentum buffers start at zero, which gives the same first step as torch's own start (buffer = gradient);
    # fused SGD would otherwise leave them uninitialised when the first step is skipped
    for group in groups:
        for p in group["params"]:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return optimizer


NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # a, b, c of p(g) = a + b g + c g^2: raise small singular values fastest


def orthogonalize(matrix, steps=(3, 2)):
    """About the nearest semi-orthogonal matrix (singular values near 1), by 5 steps of a quintic Newton-Schulz
    iteration, x <- p(x x^T) x, run on the small Gram matrix g = x x^T: g <- p(g) g p(g), and x <- P x with P the
    product of the p(g). The wide x takes part in 4 matrix products instead of 10 (benchmarks/bench_muon.py)."""
    # x is formed again after the first 3 steps: P magnifies the rounding of g as much as it magnifies the small
    # singular values (up to 500x), and formed once midway the result is as close to exact as x stepped itself.
    # float32, not the bfloat16 of Muon's authors: 2 processes must reach what 1 does
    a, b, c = NEWTON_SCHULZ
    x = matrix.float() / (matrix.norm() + 1e-7)  # every singular value in [0, 1]
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T
    eye = torch.eye(len(x), device=x.device)

    def poly(gram):
        return a * eye + b * gram + c * gram @ gram
    for count in steps:
        gram = x @ x.T
        product = step = poly(gram)
        for _ in range(count - 1):
            gram = step @ gram @ step
            step = poly(gram)
            product = step @ product
        x = product @ x
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Nesterov SGD; in the groups marked "orthogonalize" (Muon, Keller Jordan 2024) each matrix's update is
    orthogonalised (a 4-D filter as its [out, in*k*k] matrix) and the matrix keeps the norm it started with."""
    # our own few lines rather than torch.optim.Muon: that takes 2-D parameters only, and filters stay 4-D here (in
    # the model, its checkpoints and its EMA). The fixed norm is airbench's weight normalisation: before a norm
    # layer a filter's scale does nothing, and its step stays the same share of it all run.
    _step_supports_amp_scaling = True  # the GradScaler hands over grad_scale and found_inf: no host sync per step

    def __init__(self, groups, lr, momentum):
        super().__init__(groups, {"lr": lr, "momentum": momentum, "weight_decay": 0.0, "orthogonalize": False})

    @torch.no_grad()
    def step(self):
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad if grad_scale is None else p.grad / grad_scale for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            buffers = [self.state[p].get("momentum_buffer", torch.zeros_like(p)) for p in params]
            buffers = torch._foreach_add(torch._foreach_mul(buffers, group["momentum"]), grads)
            updates = torch._foreach_add(grads, buffers, alpha=group["momentum"])  # Nesterov
            start = params
            if group["orthogonalize"]:
                updates = [orthogonalize(u.flatten(1)).view_as(u) * max(1, len(u) / u[0].numel()) ** 0.5
                           for u in updates]
                # each matrix back to the norm it started with, then the step: airbench's order
                norms = [p.norm() for p in params]
                start = [p * (self.state[p].setdefault("norm", norm) / norm) for p, norm in zip(params, norms)]
            stepped = torch._foreach_add(start, updates, alpha=-group["lr"])
            for p, buffer, new in zip(params, buffers, stepped):
                if found_inf is not None:  # the GradScaler found an inf or NaN gradient: skip, on the device
                    buffer = torch.where(found_inf > 0, self.state[p].get("momentum_buffer", 0.0), buffer)
                    new = torch.where(found_inf > 0, p, new)
                self.state[p]["momentum_buffer"] = buffer
                p.copy_(new)


def make_scaler(amp, device):
    """A dynamic loss scale for fp16 (its small gradients underflow), else a fixed scale of 1."""
    # bf16 and fp32 need no scale, but the scaler also skips every step whose gradients hold inf or NaN; multiplying
    # by 1 changes nothing. It halves the scale at a skipped step: optimizer_step sets it back to 1.
    if amp == "fp16":
        return torch.amp.GradScaler(device.type)
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**31 - 1)


def optimizer_step(model, optimizer, scaler, clip_grad_norm=None, fixed_scale=True):
    """Unscale, clip, step (skipped if a gradient is not finite), zero the gradients."""
    # with a fused optimizer the skip is decided on the device; with a foreach one the scaler reads a flag: a sync
    # point (free on the CPU)
    if clip_grad_norm:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    scaler.step(optimizer)
    scaler.update(1.0 if fixed_scale else None)
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def update_ema(ema_model, model, decay, step):
    """The EMA of the weights; its decay grows from 0.1 to `decay` in the first steps, so early weights fade fast."""
    decay = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)  # BatchNorm statistics: take the model's own


def make_ema(model, args, num_classes, device):
    if not args.model_ema:
        return None
    ema_model = build_model(args.model, num_classes, log=lambda *_: None).to(device)
    ema_model.load_state_dict(model.state_dict())
    return ema_model.eval().requires_grad_(False)


def restore(checkpoint, path, model, ema_model, optimizer, scaler):
    """Loads a checkpoint's state into the run's objects; returns its step and (best score, best epoch)."""
    load_weights(model, checkpoint["model"], path)
    if ema_model is not None:
        ema_model.load_state_dict(checkpoint["model_ema"])
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as e:  # the code that groups the parameters changed since the run started
        raise SystemExit(f"error: {path}: its optimizer state does not fit this code's parameter groups ({e}); "
                         f"resume with the code that started the run, or start a new one with --weights {path}")
    scaler.load_state_dict(checkpoint["scaler"])
    return checkpoint["step"], (checkpoint["best_score"], checkpoint.get("best_epoch", 0))


@torch.no_grad()
def recompute_batch_norm(evaluated, model, loader, normalize, epoch, device, amp, images=PRECISE_BN_IMAGES):
    """Sets the running statistics of the BatchNorm layers that train to their average over the epoch's first
    `images` training images, at the weights that are evaluated (pycls's precise BN); frozen layers keep theirs."""
    # the running averages that training keeps lag the weights by tens of steps: early on, or with few steps per
    # epoch, they are far from what the weights compute (see Train in the README), and so are the val scores
    norms = [norm for norm, trained in zip(evaluated.modules(), model.modules())
             if isinstance(norm, nn.modules.batchnorm._BatchNorm) and trained.training]
    if not norms:
        return
    evaluated.eval()  # dropout off: the statistics of what evaluation computes
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # an equal-weight average over the batches
        norm.train()
    loader.sampler.set_epoch(epoch)  # the epoch's first batches, as trained on: the same after a resume
    seen = 0
    for batch, _ in loader:
        with utils.autocast(device, amp):
            evaluated(normalize(batch))
        seen += len(batch)
        if seen >= images:
            break
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
        norm.eval()


def evaluate_model(model, val_loader, args, device, classes, preprocess):
    """The metrics of the model that is saved, with rank 0's BatchNorm statistics in every process."""
    # the unwrapped model: a DDP one would sync its buffers in its first forward, a collective that a process
    # without validation images never makes
    utils.broadcast_buffers(model)
    return EVALUATE[args.task](model, val_loader, device, len(classes), preprocess, args.amp, args.channels_last,
                               tta=args.tta)


def log_epoch(epoch, epochs, stats, metrics, is_best, output_dir, task, log):
    """The epoch's line in the log, and its row of results.csv if output_dir is given (rank 0)."""
    # the row comes before the checkpoint: a resume from the previous last.pt trims it away again
    log(f"epoch {epoch + 1}/{epochs}  train loss {stats['train_loss']:.4f} top-1 {stats['train_top1']:.2f}%  "
        f"val loss {metrics['loss']:.4f} {metrics['summary']}  "
        f"{stats['seconds']:.1f}s  {stats['images_per_s']:.0f} img/s" + ("  * best" if is_best else ""))
    if output_dir is not None:
        append_results(output_dir / "results.csv", {
            "epoch": epoch + 1, "val_loss": metrics["loss"], **metrics["columns"],
            **{k: stats[k] for k in ("lr", "train_loss", "train_top1", "seconds", "images_per_s", "time")}},
            RESULTS_COLUMNS[task])


# -----------------------------------------------------------------------------
# one epoch

def train_one_epoch(model, criterion, optimizer, scaler, loader, epoch, step, args, device, *, epochs, normalize, mix,
                    lr_of_step, after_step, no_sync, flags, save, log):
    """Trains epoch `epoch` from optimizer step `step` (mid-epoch after a resume) to its end, or until a stop is
    asked for. Returns the step reached and the epoch's stats (None if stopped)."""
    # losses and hits are summed on the device and read only when the progress line is redrawn: the loop itself
    # never waits for the device
    steps_per_epoch = len(loader) // args.accum_steps
    done = step - epoch * steps_per_epoch  # steps of this epoch already taken before a resume
    # the order is a function of (seed, epoch): skipping the batches already seen gives the remaining ones
    loader.sampler.set_epoch(epoch, skip=done * args.accum_steps * args.batch_size)
    # loss, right answers, micro-steps with a non-finite loss
    sums = torch.zeros(3, dtype=utils.sum_dtype(device), device=device)
    bad_run = torch.zeros((), dtype=torch.int64, device=device)  # the latest non-finite ones in a row
    progress = Progress(epoch, epochs, steps_per_epoch, done, log)
    batches = iter(loader)
    for micro_step in range(done * args.accum_steps, steps_per_epoch * args.accum_steps):
        images, targets = progress.timed(next, batches)
        # every random draw of this step (dropout, MixUp) is a function of (seed, epoch, step, rank)
        utils.seed_draws(utils.seed_from(args.seed, epoch, micro_step, utils.get_rank()), device.type)
        images, labels = normalize(images), targets
        if mix is not None:
            images, targets = mix(images, targets)
        update = (micro_step + 1) % args.accum_steps == 0
        # DDP all-reduces gradients in backward; between accumulation steps there is nothing to reduce yet
        with nullcontext() if update else no_sync():
            with utils.autocast(device, args.amp):
                logits = model(images)
                loss = criterion(logits.float(), targets)
            scaler.scale(loss / args.accum_steps).backward()
        # a non-finite loss is counted here, on the device; the scaler skips its step in optimizer_step
        loss, finite = loss.detach(), torch.isfinite(loss.detach())
        bad_run = (bad_run + 1) * ~finite
        sums += torch.stack([torch.where(finite, loss, 0.0) * len(labels), count_hits(logits, labels), ~finite])
        progress.seen += len(labels)
        if not update:
            continue
        lr = set_lr(optimizer, lr_of_step(step))
        optimizer_step(model, optimizer, scaler, args.clip_grad_norm, fixed_scale=args.amp != "fp16")
        step += 1
        after_step(step)
        progress.update(step - epoch * steps_per_epoch, sums[0], lr)
        end = step == (epoch + 1) * steps_per_epoch
        stop = flags.check(step, bad_run, force=end)
        if end or stop:
            break  # at the epoch's end, evaluation and the epoch's checkpoint come next, in train()
        if args.save_every_steps and step % args.save_every_steps == 0:
            save(epoch, step)
    if not end:  # stopped inside the epoch
        progress.finish(step - epoch * steps_per_epoch, sums[0].item() / max(progress.seen, 1), lr)
        save(epoch, step)
        return step, None
    stats = epoch_stats(sums, progress, lr, args.batch_size, epoch, log)
    progress.finish(steps_per_epoch, stats["train_loss"], lr)  # the loss of every process, as the epoch line's
    return step, stats


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def count_hits(logits, labels):
    """Right answers: the top-1 class; for multilabel (multi-hot labels), every label decision of an image."""
    logits = logits.detach()
    if labels.ndim == 1:
        return (logits.argmax(1) == labels).sum()
    return ((logits > 0) == (labels > 0.5)).all(1).sum()


def epoch_stats(sums, progress, lr, batch_size, epoch, log):
    """The epoch's loss, top-1 and speed, over all processes: a sync point, once per epoch."""
    seen = torch.tensor([progress.seen], dtype=sums.dtype, device=sums.device)
    loss_sum, hits, bad, seen = utils.all_reduce(torch.cat([sums, seen])).tolist()
    if bad:
        log(f"warning: {bad:.0f} step(s) of epoch {epoch + 1} had a non-finite loss and were skipped")
    seconds = time.perf_counter() - progress.start
    return {"lr": lr, "train_loss": loss_sum / max(seen - bad * batch_size, 1), "train_top1": 100 * hits / seen,
            "seconds": seconds, "images_per_s": seen / seconds}


class StopFlags:
    """Whether to stop: SIGTERM or Ctrl-C came (`stop`, an event), or the loss has not been finite for
    MAX_BAD_STEPS steps in a row (an error)."""
    # all processes must stop at the same step, so every CHECK_EVERY steps the flags are all-reduced on the device
    # and copied to the host without waiting. On a GPU what is read is the copy started CHECK_EVERY steps earlier,
    # finished long since; `force` (an epoch's end) reads the current flags there: a sync point.

    def __init__(self, stop, device, steps_per_epoch, lr, amp):
        self.stop, self.device, self.steps_per_epoch = stop, device, steps_per_epoch
        self.hint = f"Try a lower --lr (now {lr:g}), --clip-grad-norm 1, or --amp off (now {amp})"
        self.pending = None

    def check(self, step, bad_run, force=False):
        if step % CHECK_EVERY and not force:
            return utils.get_world_size() == 1 and self.stop.is_set()
        flags = torch.stack([torch.full((), float(self.stop.is_set()), device=self.device), bad_run.float()])
        earlier, self.pending = self.pending, read_later(utils.all_reduce(flags, ReduceOp.MAX))
        use_earlier = earlier is not None and not force and self.device.type == "cuda"  # elsewhere reading is free
        stop, bad = (earlier if use_earlier else self.pending)()
        if bad >= MAX_BAD_STEPS:
            where = f"epoch {(step - 1) // self.steps_per_epoch + 1} step {(step - 1) % self.steps_per_epoch + 1}"
            raise SystemExit(f"error: the loss was inf or NaN for the last {bad:.0f} steps (at {where}; each was "
                             f"skipped): the run diverged and stops without saving, so last.pt keeps the last good "
                             f"epoch. {self.hint}")
        return stop > 0


def read_later(tensor):
    """Starts copying a device tensor to the host; returns a function that gives its values, waiting if need be."""
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
    """--time: the number of epochs that fit in `hours`, from the first epoch's training (per step: a resumed run
    ran only some) and evaluation time, the slowest process's, so that all follow the same schedule."""
    epoch_seconds = train_seconds / steps_run * steps_per_epoch + eval_seconds
    epoch_seconds = torch.tensor(epoch_seconds, dtype=utils.sum_dtype(device), device=device)
    epoch_seconds = utils.all_reduce(epoch_seconds, ReduceOp.MAX).item()
    epochs = max(1, int(hours * 3600 / epoch_seconds))
    log(f"--time {hours:g} h: {epoch_seconds:.2f} s per epoch (training measured over {steps_run} of {steps_per_epoch} "
        f"steps), so {epochs} epochs; the schedule follows")
    return epochs


def epochs_for_patience(patience, epoch, epochs, best_epoch, log):
    """--patience: the run ends after this epoch (`epoch`, from 0) if val top-1 has not improved for `patience`."""
    if epoch + 1 - best_epoch < patience or epoch + 1 >= epochs:
        return epochs
    log(f"stopping early: val top-1 has not improved for {patience} epochs (best at epoch {best_epoch}, --patience)")
    return epoch + 1


def exit_for_resume(where, output_dir, log):
    log(f"stopped {where}; continue with: python train.py --resume {Path(output_dir) / 'last.pt'}")
    utils.cleanup_distributed()
    sys.exit(128 + signal.SIGTERM)


class Progress:
    """One live line per epoch, redrawn in place about once a second on a terminal (else logged every
    PROGRESS_LOG_SECONDS); its final state is logged."""
    # each line reads the loss from the device: a sync point, once a second at most

    def __init__(self, epoch, epochs, steps, first_step, log):
        self.head, self.steps, self.first_step, self.log = f"epoch {epoch + 1}/{epochs}", steps, first_step, log
        self.live = sys.stdout.isatty()
        self.start = self.last_draw = time.perf_counter()
        self.seen, self.data_wait = 0, 0.0

    def timed(self, read, batches):
        """A batch, counting the time spent waiting for it."""
        wait = time.perf_counter()
        batch = read(batches)
        self.data_wait += time.perf_counter() - wait
        return batch

    def line(self, step, loss, lr):
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(step - self.first_step, 1) * (self.steps - step)
        speed = self.seen * utils.get_world_size() / elapsed  # every process's, as the epoch line's: they see as many
        return (f"{self.head}  step {step}/{self.steps}  loss {loss:.4f}  lr {lr:.4g}  "
                f"{speed:.0f} img/s  data wait {100 * self.data_wait / elapsed:.0f}%  "
                f"eta {timedelta(seconds=round(eta))}")

    def update(self, step, loss_sum, lr):
        """Redraws (or logs) the line, with this process's loss so far: loss_sum over the images it has seen."""
        since = time.perf_counter() - self.last_draw
        if since < (1.0 if self.live else PROGRESS_LOG_SECONDS) or not self.live and step == self.steps:
            return  # not due yet (finish logs the epoch's last line)
        self.last_draw = time.perf_counter()
        line = self.line(step, loss_sum.item() / max(self.seen, 1), lr)
        if self.live:
            print("\r" + line, end="", flush=True)
        else:
            self.log(line)

    def finish(self, step, loss, lr):
        if self.live:
            print("\r", end="")
        self.log(self.line(step, loss, lr))


# -----------------------------------------------------------------------------
# checkpoints and results

def make_checkpoint(model, ema_model, optimizer, scaler, args, classes, preprocess, files, epoch, step, best,
                    metrics=None, elapsed=0.0):
    """Everything needed to continue the run or to use the model alone. best: (score, epoch). epoch and step count
    those completed; files: {"train": digest, "val": digest}, data.files_digest of each split; elapsed: the run's
    wall time so far, in seconds."""
    # no RNG state: every random draw is seeded from (seed, epoch, step, rank) or (seed, epoch, sample index)
    return {"model": utils.unwrap_state_dict(model.state_dict()),
            "model_ema": utils.unwrap_state_dict(ema_model.state_dict()) if ema_model is not None else None,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "step": step,
            "best_score": best[0], "best_epoch": best[1], "metrics": metrics, "world_size": utils.get_world_size(),
            "args": vars(args), "model_name": args.model, "classes": classes, "preprocess": preprocess,
            "files": files, "elapsed": elapsed}


def save_checkpoints(checkpoint, output_dir, is_best=False, save_period=0):
    """last.pt, and best.pt and epoch<N>.pt when due (a checkpoint with metrics is an epoch's end)."""
    # best.pt first, so last.pt never records a best that best.pt lacks
    if is_best:
        utils.save_checkpoint(checkpoint, output_dir / "best.pt")
    if checkpoint["metrics"] is not None and save_period and checkpoint["epoch"] % save_period == 0:
        utils.save_checkpoint(checkpoint, output_dir / f"epoch{checkpoint['epoch']}.pt")
    utils.save_checkpoint(checkpoint, output_dir / "last.pt")


def save_first_batch(loader, mix, classes, args, device, path, count=32):
    """train_batch.jpg: the first images the model trains on, augmented and mixed, each with its label (a mixed
    label names its two largest shares)."""
    # mixed as the first step mixes them: MixUp and CutMix are linear, so mixing before normalising is the same
    loader.sampler.set_epoch(0)
    images, targets = next(iter(loader))
    images = images.float()
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


def plot_run(output_dir, task, classes, log):
    """results.png from results.csv, and confusion_matrix.png of best.pt."""
    with open(output_dir / "results.csv", newline="") as f:
        utils.plot_results(list(csv.DictReader(f)), output_dir / "results.png",
                           "val_top1" if task == "single" else "val_f1")
    if task == "single" and not (output_dir / "best.pt").exists():  # a run resumed from a last.pt copied alone
        log(f"warning: no best.pt in {output_dir} (no epoch since the resume beat the run's best): "
            "no confusion_matrix.png")
    elif task == "single":
        utils.plot_confusion(utils.load_checkpoint(output_dir / "best.pt")["metrics"]["confusion"], classes,
                             output_dir / "confusion_matrix.png")


# -----------------------------------------------------------------------------

@contextmanager
def stop_on_signals():
    """SIGTERM (a cluster preempting the job) and Ctrl-C set the event it gives: the loop saves, then stops."""
    # entered once the data is ready: before, they end the run at once, since reading the data (an hour's cache
    # build for ImageNet, which goes on where it stopped) has nothing to save
    # the previous handlers come back at the end: train.main may run inside another program
    stop = threading.Event()
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:  # ignored by who started us (`train.py &` in a script, nohup): stays so
            signal.signal(signum, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv=None):
    args = parse_args(argv)
    try:
        with utils.deterministic_mode(args.deterministic), ExitStack() as run_files:
            train(args, run_files)  # run_files: closed (train.log unlocked, signals restored) however the run ends
    except KeyboardInterrupt:  # Ctrl-C while the data was read: nothing trained yet
        print("interrupted before training started: nothing to save (a cache build goes on where it stopped at "
              "the next run)", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


def train(args, run_files):
    started = time.perf_counter()
    args, checkpoint = resume_args(args) if args.resume else (args, None)
    before = checkpoint.get("elapsed", 0.0) if checkpoint else 0.0  # the wall time of the run's earlier processes

    def run_time():  # the run's wall time over its stops and resumes: time to accuracy (results.csv's time)
        return before + time.perf_counter() - started
    rank, local_rank, world_size, device = utils.setup_distributed(args.device)
    check_device(args, device, world_size)
    output_dir, log_file = claim_output_dir(args, rank, run_files)
    log = utils.make_logger(log_file, enabled=rank == 0)
    log(f"{'resuming ' + args.resume if args.resume else 'training'}: {' '.join(sys.argv)}")
    if checkpoint is not None and is_finished(checkpoint, args, world_size, log):
        return utils.cleanup_distributed()

    # data
    args, classes, train_samples, val_samples = load_data(args, output_dir, local_rank, world_size, device, log)
    files = {"train": data.files_digest(train_samples), "val": data.files_digest(val_samples)}
    if checkpoint is not None:
        check_same_data(checkpoint, args.resume, classes, files)
    preprocess = data.eval_preprocess(args.img_size, args.crop_pct)
    train_loader, val_loader = data.make_loaders(args, train_samples, val_samples, preprocess, rank, local_rank,
                                                 world_size, device, output_dir, log)
    stop = run_files.enter_context(stop_on_signals())  # from here on a signal saves the run, then stops it
    steps_per_epoch = count_steps(train_loader, args, world_size, log)

    # model, optimizer, loss
    model, frozen = make_model(args, classes, world_size, device, log)
    normalize = data.make_normalize(preprocess, device, args.channels_last)
    if hasattr(model, "whiten_stem") and not args.weights and checkpoint is None:  # a resumed run has its stem
        whiten_stem(model, train_loader, normalize, log)
    ema_model = make_ema(model, args, len(classes), device)
    optimizer, scaler = make_optimizer(model, args, device), make_scaler(args.amp, device)
    step, best = restore(checkpoint, args.resume, model, ema_model, optimizer, scaler) if checkpoint else (0, (-1.0, 0))
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else None
    train_model = torch.compile(ddp_model or model) if args.compile else ddp_model or model
    criterion = make_criterion(args.task, args.label_smoothing)
    mix = data.make_mix(args.mixup_alpha, args.cutmix_alpha, len(classes))

    epoch, epochs = step // steps_per_epoch, args.epochs  # a run stopped mid-epoch goes on inside that epoch
    if checkpoint is not None:
        log(f"resumed at epoch {epoch}/{epochs} step {step - epoch * steps_per_epoch}/{steps_per_epoch}, "
            f"best val score so far {best[0]:.2f}%")
    if rank == 0:
        (output_dir / "args.json").write_text(json.dumps(vars(args), indent=1))
        if checkpoint is None:  # what the model sees, for a look before the run goes far
            save_first_batch(train_loader, mix, classes, args, device, output_dir / "train_batch.jpg")
        trim_results(output_dir / "results.csv", epoch, RESULTS_COLUMNS[args.task])

    def save(epochs_done, step, metrics=None, is_best=False):
        if rank == 0:  # the number of epochs that --time or --patience decided goes with the arguments
            run_args = argparse.Namespace(**{**vars(args), "epochs": epochs})
            save_checkpoints(make_checkpoint(model, ema_model, optimizer, scaler, run_args, classes, preprocess,
                                             files, epochs_done, step, best, metrics, run_time()),
                             output_dir, is_best, args.save_period)

    flags = StopFlags(stop, device, steps_per_epoch, args.lr, args.amp)

    def after_step(step):
        if ema_model is not None:
            update_ema(ema_model, model, args.model_ema_decay, step)

    while epoch < epochs:  # `while`: --time and --patience decide the number of epochs on the way
        model.train()
        keep_frozen_in_eval(frozen)  # after train(), which would wake them
        lr_of_step = partial(lr_at, total_steps=epochs * steps_per_epoch, base_lr=args.lr, min_lr=args.lr_min,
                             warmup_steps=round(args.lr_warmup_epochs * steps_per_epoch), decay=args.lr_scheduler)
        first_step = step
        step, stats = train_one_epoch(
            train_model, criterion, optimizer, scaler, train_loader, epoch, step, args, device, epochs=epochs,
            normalize=normalize, mix=mix, lr_of_step=lr_of_step, after_step=after_step,
            no_sync=ddp_model.no_sync if ddp_model else nullcontext, flags=flags, save=save, log=log)
        if stats is None:
            exit_for_resume(f"at epoch {epoch + 1} step {step - epoch * steps_per_epoch}/{steps_per_epoch}",
                            output_dir, log)
        eval_start = time.perf_counter()
        recompute_batch_norm(ema_model or model, model, train_loader, normalize, epoch, device, args.amp)
        metrics = evaluate_model(ema_model or model, val_loader, args, device, classes, preprocess)
        is_best = metrics["score"] > best[0]  # strictly: a tie never replaces the best
        best = (metrics["score"], epoch + 1) if is_best else best
        stats["time"] = run_time()
        log_epoch(epoch, epochs, stats, metrics, is_best, output_dir if rank == 0 else None, args.task, log)
        if args.time and epoch == 0:
            epochs = epochs_for_time(args.time, stats["seconds"], step - first_step, steps_per_epoch,
                                     time.perf_counter() - eval_start, device, log)
        if args.patience:
            epochs = epochs_for_patience(args.patience, epoch, epochs, best[1], log)
        save(epoch + 1, step, metrics, is_best)
        if epoch + 1 < epochs and flags.check(step, torch.zeros((), device=device), force=True):
            exit_for_resume(f"after epoch {epoch + 1}", output_dir, log)
        epoch += 1
    if rank == 0:
        plot_run(output_dir, args.task, classes, log)
    log(f"done: best val {'top-1' if args.task == 'single' else 'F1'} {best[0]:.2f}% (epoch {best[1]}); checkpoints, "
        f"results.csv, results.png, confusion_matrix.png and train.log in {output_dir}")
    utils.cleanup_distributed()


if __name__ == "__main__":
    main()
