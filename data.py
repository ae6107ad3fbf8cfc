"""Files to batches: folder layouts, image decoding, transforms, samplers and loaders.

    DATA/train/<class>/*.jpg     training images, one folder per class
    DATA/val/<class>/*.jpg       validation images (or DATA/test/, or a split carved from train)

Images leave the loader as uint8 tensors (4x less to copy between processes than float32);
`make_normalize` turns a batch into float on the training device.
Small datasets can instead be decoded once into a memory-mapped uint8 array and augmented in whole batches
on the device (`--cache`, the second half of this file).
"""
import csv
import datetime
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, default_collate
from torchvision.transforms import v2

from utils import seed_draws, seed_from

IMG_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # every torchvision pretrained model expects these
IMAGENET_STD = (0.229, 0.224, 0.225)


# -----------------------------------------------------------------------------
# decoding: every image becomes an upright 3-channel RGB image, in training, evaluation and prediction

class UnreadableImage(Exception):
    pass


def load_image(path):
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)  # phones store rotation in EXIF, not in the pixels
            return to_rgb(image)
    except Exception as e:  # truncated, corrupt, not an image, too many pixels...
        raise UnreadableImage(f"{path}: {e}") from e


def check_image(path):
    """Why a file cannot be used, from its size and header alone (fast), or None if it looks fine.
    Damage deeper in the file (a truncated JPEG) shows only when it is decoded, in the loader."""
    if not os.path.isfile(path):
        return "no such file"
    if os.path.getsize(path) == 0:
        return "empty file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"too many pixels for PIL's decompression-bomb limit ({Image.MAX_IMAGE_PIXELS} pixels)"
    except Exception as e:
        return f"not a readable image ({type(e).__name__}: {e})"
    return "zero-sized image" if width * height == 0 else None


def scan_images(samples, strict=False, log=print):
    """Drops the files that check_image refuses, naming each, or stops on them with strict."""
    problems = [(path, check_image(path)) for path, _ in samples]
    bad = [(path, why) for path, why in problems if why]
    if bad:
        listing = "\n".join(f"  {path}: {why}" for path, why in bad)
        if strict:
            raise SystemExit(f"error: {len(bad)} unusable image file(s) (--strict stops on them):\n{listing}")
        log(f"warning: skipping {len(bad)} unusable image file(s) (--strict makes this an error):\n{listing}")
    return [sample for sample, (_, why) in zip(samples, problems) if not why]


def to_rgb(image):
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or float: scale to 8 bits, don't clip
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if array.max() > 255 else 1.0
        image = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):  # transparent pixels hold arbitrary colours: put them on white
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")  # grayscale, palette, CMYK, YCbCr...


# -----------------------------------------------------------------------------
# folder layout

def find_classes(folder):
    """Class names are the sorted sub-folder names; hidden folders (.git, .ipynb_checkpoints) are never classes."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def list_images(folder, classes):
    """[(path, class index)] for every image file under folder/<class>/, matched by extension in any case."""
    samples = []
    for index, name in enumerate(classes):
        class_dir = Path(folder) / name
        if not class_dir.is_dir():
            continue
        for root, dirs, files in os.walk(class_dir, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for file in sorted(files):
                if not file.startswith(".") and Path(file).suffix.lower() in IMG_EXTENSIONS:
                    samples.append((os.path.join(root, file), index))
    return samples


def stratified_split(samples, fraction, seed):
    """Deterministic split of samples into (train, val) with `fraction` of every class in val
    (multilabel samples, whose targets are vectors, are split as one group)."""
    rng = np.random.default_rng(seed)
    def group(target):
        return target if isinstance(target, int) else -1
    train, val = [], []
    for target in sorted({group(t) for _, t in samples}):
        members = [s for s in samples if group(s[1]) == target]
        order = rng.permutation(len(members))
        n_val = max(1, round(len(members) * fraction)) if len(members) > 1 else 0
        val += [members[i] for i in sorted(order[:n_val])]
        train += [members[i] for i in sorted(order[n_val:])]
    return train, val


def select_classes(found, wanted=None, ignore=(), where="the data"):
    """The classes to train on: `wanted` in its order (--classes), else those found, less `ignore`
    (--ignore-classes). A found class that is neither wanted nor ignored is an error: its images would vanish."""
    kept = [c for c in found if c not in ignore]
    if not wanted:
        return kept
    wanted = [c for c in wanted if c not in ignore]
    missing = [c for c in wanted if c not in found]
    if missing:
        raise SystemExit(f"error: --classes names {', '.join(missing)}, which {where} does not have")
    extra = [c for c in kept if c not in wanted]
    if extra:
        raise SystemExit(f"error: {where} has class(es) that --classes does not list: {', '.join(extra)}; "
                         "add them to --classes or drop them with --ignore-classes")
    return wanted


def parse_class_list(text):
    """--classes a,b,c, or the path of a file with one class per line."""
    if text is None:
        return None
    if os.path.isfile(text):
        return [line.strip() for line in Path(text).read_text().splitlines() if line.strip()]
    return [name.strip() for name in text.split(",") if name.strip()]


def load_samples(data_root, val_fraction=0.1, seed=0, log=print, strict=False, wanted=None, ignore=()):
    """Reads DATA/train and DATA/val (or DATA/test, or a split of train). Returns classes, train and val samples.
    Unusable files are skipped with a warning (an error with strict). wanted/ignore: select_classes."""
    data_root = Path(data_root)
    train_dir = data_root / "train"
    if not data_root.is_dir():
        raise SystemExit(f"error: dataset folder {data_root} does not exist")
    if not train_dir.is_dir():
        raise SystemExit(f"error: {data_root} has no train/ folder; expected {data_root}/train/<class>/<image>")
    if not find_classes(train_dir):
        raise SystemExit(f"error: {train_dir} has no class folders; expected {train_dir}/<class>/<image>")
    classes = select_classes(find_classes(train_dir), wanted, ignore, train_dir)
    train = check_nonempty(scan_images(list_images(train_dir, classes), strict, log), classes, train_dir)

    val_dir = find_val_dir(data_root)
    if val_dir is None:
        train, val = stratified_split(train, val_fraction, seed)
        log(f"data: no val/ or test/ folder in {data_root}: holding out {val_fraction:.0%} of each class "
            f"of train/ for validation ({len(val)} images, --val-fraction)")
    else:
        if val_dir.name == "test":
            log(f"data: no val/ folder in {data_root}: validating on {val_dir}")
        val = scan_images(check_val_classes(val_dir, classes, log, ignore), strict, log)
    log(f"data: {len(classes)} classes, {len(train)} train and {len(val)} val images")
    return classes, train, val


def find_val_dir(data_root):
    """DATA/val, else DATA/test, else None (validation is then carved out of train/)."""
    return next((Path(data_root) / s for s in ("val", "test") if (Path(data_root) / s).is_dir()), None)


def check_nonempty(samples, classes, where):
    present = {i for _, t in samples for i in ([t] if isinstance(t, int) else t.nonzero().flatten().tolist())}
    empty = [name for i, name in enumerate(classes) if i not in present]
    if empty:
        raise SystemExit(f"error: class(es) with no images in {where}: {', '.join(empty)} "
                         "(an empty class would shift every class index: remove it or add images)")
    return samples


def check_val_classes(val_dir, classes, log=print, ignore=()):
    """Lists val_dir with the class indices of `classes` (never re-indexed by position)."""
    val_classes = [c for c in find_classes(val_dir) if c not in ignore]
    unknown = sorted(set(val_classes) - set(classes))
    if unknown:
        raise SystemExit(f"error: {val_dir} has class folder(s) that the training classes lack: "
                         f"{', '.join(unknown)}; rename or remove them")
    missing = sorted(set(classes) - set(val_classes))
    if missing:
        log(f"warning: {val_dir} has no folder for {len(missing)} class(es): {', '.join(missing)}; "
            "they are not validated")
    return list_images(val_dir, classes)


def read_csv_samples(csv_path, image_column="image", label_column="label", delimiter=None):
    """[(path, [label, ...])] from a CSV file with a header. Paths are absolute, or relative to the CSV's folder,
    which a relative path may not leave (no `..`, no symlink out): such a row is an error naming it."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise SystemExit(f"error: CSV file {csv_path} does not exist")
    folder = csv_path.parent.resolve()
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        for column in (image_column, label_column):
            if column not in (reader.fieldnames or []):
                raise SystemExit(f"error: {csv_path} has no column {column!r} "
                                 f"(it has: {', '.join(reader.fieldnames or [])}); "
                                 "name the columns with --image-column and --label-column")
        rows = []
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            path = Path(row[image_column].strip())
            if not path.is_absolute():
                path = folder / path
                if not path.resolve().is_relative_to(folder):
                    raise SystemExit(f"error: {csv_path} line {line}: {row[image_column]!r} leads outside {folder}; "
                                     "use paths inside the CSV's folder, or absolute paths")
            text = row[label_column].strip()
            labels = [x.strip() for x in (text.split(delimiter) if delimiter else [text]) if x.strip()]
            rows.append((str(path), labels))
    return rows


def name_labels(rows, names=None):
    """Integer labels are class ids: positions in `names` (--classes) when given, else their own names ('0', '1',
    ...). Returns the rows with every label a class name, so that everything after indexes by name alone."""
    found = {label for _, labels in rows for label in labels}
    if not names or not found or not all(label.isdigit() for label in found):
        return rows
    largest = max(int(label) for label in found)
    if largest >= len(names):
        raise SystemExit(f"error: label id {largest} is out of range for the {len(names)} classes of --classes")
    return [(path, [names[int(label)] for label in labels]) for path, labels in rows]


def drop_ignored(rows, ignore, multilabel=False):
    """Leaves out the rows with an ignored class (--ignore-classes), or with multilabel only that label."""
    if multilabel:
        return [(path, [label for label in labels if label not in ignore]) for path, labels in rows]
    return [(path, labels) for path, labels in rows if not set(labels) & set(ignore)]


def read_labelled_csv(csv_path, columns, names=None, ignore=(), multilabel=False, log=print):
    """[(path, [class name, ...])] of a CSV file: ids named (name_labels), ignored classes dropped.
    columns: (image column, label column, separator of several labels or None)."""
    rows = name_labels(read_csv_samples(csv_path, *columns), names)
    kept = drop_ignored(rows, ignore, multilabel)
    if len(kept) < len(rows):
        log(f"data: left out {len(rows) - len(kept)} row(s) of {csv_path} with an ignored class (--ignore-classes)")
    return kept


def index_labels(rows, classes, where, multilabel=False):
    """[(path, target)] of rows whose labels are class names of `classes`. The target is the class index, or with
    multilabel a multi-hot float vector."""
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for path, labels in rows:
        if not multilabel and len(labels) != 1:
            raise SystemExit(f"error: {where}: {path} has {len(labels)} labels; one is expected "
                             "(several labels need --task multilabel)")
        bad = [label for label in labels if label not in index]
        if bad:
            raise SystemExit(f"error: {where}: {path} has label(s) {', '.join(bad)}, not among the classes")
        targets = [index[label] for label in labels]
        samples.append((path, torch.zeros(len(classes)).index_fill_(0, torch.tensor(targets, dtype=torch.long), 1.0)
                        if multilabel else targets[0]))
    return samples


def load_csv_samples(train_csv, val_csv=None, columns=("image", "label", None), val_fraction=0.1, seed=0,
                     log=print, strict=False, wanted=None, ignore=(), multilabel=False):
    """Classes, train and val samples from CSV files: like load_samples, with the labels in a column.
    Labels are class names or integer ids (0..K-1, in --classes order when given). An ignored class drops
    the rows that have it, or with multilabel only that label."""
    train_rows = read_labelled_csv(train_csv, columns, wanted, ignore, multilabel, log)
    found = sorted({label for _, labels in train_rows for label in labels})
    if found and all(label.isdigit() for label in found):  # ids that name themselves: every id up to the largest
        found = [str(i) for i in range(max(map(int, found)) + 1)]
    classes = select_classes(found, wanted, ignore, train_csv)
    train = check_nonempty(scan_images(index_labels(train_rows, classes, train_csv, multilabel), strict, log),
                           classes, train_csv)
    if val_csv:
        val_rows = read_labelled_csv(val_csv, columns, wanted, ignore, multilabel, log)
        val = scan_images(index_labels(val_rows, classes, val_csv, multilabel), strict, log)
    else:
        train, val = stratified_split(train, val_fraction, seed)
        log(f"data: no --val-csv: holding out {val_fraction:.0%} of each class of {train_csv} for validation "
            f"({len(val)} images, --val-fraction)")
    log(f"data: {len(classes)} classes, {len(train)} train and {len(val)} val images")
    return classes, train, val


def split_samples(data_root, split, classes, val_fraction=0.1, seed=0, log=print, strict=False, ignore=()):
    """Samples of one split, indexed by a trained model's `classes` (in their order, sorted or not). train and val
    follow the same rules as training (val/, else test/, else the same held-out part of train/)."""
    if split == "test":
        test_dir = Path(data_root) / "test"
        if not test_dir.is_dir():
            raise SystemExit(f"error: {data_root} has no test/ folder")
        return scan_images(check_val_classes(test_dir, classes, log, ignore), strict, log)
    train_dir = Path(data_root) / "train"
    data_classes = select_classes(find_classes(train_dir), None, ignore) if train_dir.is_dir() else []
    if sorted(data_classes) != sorted(classes):
        raise SystemExit(f"error: the classes of {train_dir} ({', '.join(data_classes)}) are not the "
                         f"checkpoint's ({', '.join(classes)}); evaluate on the data the model was trained for")
    val_dir = find_val_dir(data_root)
    if split == "val" and val_dir is not None:
        return scan_images(check_val_classes(val_dir, classes, log, ignore), strict, log)
    _, train, val = load_samples(data_root, val_fraction, seed, log, strict, wanted=list(classes), ignore=ignore)
    return train if split == "train" else val


def infer_img_size(paths, max_samples=256):
    """About the median short side of a sample of images, as a multiple of 32 between 32 and 224.
    Reads only headers, so it is fast even on large folders."""
    step = max(1, len(paths) // max_samples)
    short_sides = []
    for path in paths[::step]:
        try:
            with Image.open(path) as image:
                short_sides.append(min(image.size))
        except Exception:  # unreadable files are reported by the loader, not here
            pass
    if not short_sides:
        return 224
    return int(min(224, max(32, round(statistics.median(short_sides) / 32) * 32)))


# -----------------------------------------------------------------------------
# transforms (PIL image in, uint8 CHW tensor out) and normalisation (on the training device)

AUTO_AUGMENT = {"ta_wide": v2.TrivialAugmentWide, "ra": v2.RandAugment, "augmix": v2.AugMix}


def train_transform(img_size, crop="resized", min_scale=0.25, auto_augment=None, random_erase=0.0, hflip=0.5,
                    padding=None):
    """crop "resized": RandomResizedCrop, the ImageNet recipe (zoom and aspect changes). crop "padded":
    resize the short side, then a random crop from a reflect-padded image (shifts of up to `padding` px,
    by default 1/8 of the size), the CIFAR recipe: small images have no detail to spare for zooming."""
    if crop == "resized":
        steps = [v2.RandomResizedCrop(img_size, scale=(min_scale, 1.0), antialias=True)]
    else:
        steps = [v2.Resize(img_size, antialias=True)]
    if auto_augment:  # on the PIL image: 2-5x faster than on a tensor
        steps.append(AUTO_AUGMENT[auto_augment]())
    steps.append(v2.PILToTensor())
    if crop == "padded":  # padding and cropping: twice as fast on the tensor as on the PIL image
        steps.append(v2.RandomCrop(img_size, padding=img_size // 8 if padding is None else padding,
                                   padding_mode="reflect"))
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if random_erase > 0:  # erase to the mean colour, as erasing to 0 after normalisation would
        steps.append(v2.RandomErasing(random_erase, value=[round(255 * m) for m in IMAGENET_MEAN]))
    return v2.Compose(steps)


def eval_transform(preprocess):
    """Resize the short side, then center-crop: `preprocess` is the dict stored in every checkpoint."""
    return v2.Compose([v2.Resize(preprocess["resize_size"], antialias=True),
                       v2.CenterCrop(preprocess["img_size"]), v2.PILToTensor()])


def eval_preprocess(img_size, crop_pct=None):
    """Eval preprocessing as plain data. crop_pct is the crop's share of the resized short side:
    0.875 is the ImageNet convention; small images (<= 64 px) are not zoomed, they lose too much."""
    if crop_pct is None:
        crop_pct = 1.0 if img_size <= 64 else 0.875
    return {"img_size": img_size, "resize_size": int(round(img_size / crop_pct)),
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def make_normalize(preprocess, device, channels_last=False):
    """A function: a uint8 (or 0..255 float) NCHW batch on `device` -> normalised float32."""
    mean = torch.tensor(preprocess["mean"], device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(preprocess["std"], device=device).view(1, -1, 1, 1) * 255
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def normalize(images):
        return ((images.float() - mean) / std).contiguous(memory_format=memory_format)
    return normalize


# -----------------------------------------------------------------------------
# datasets, samplers, loaders

class ImageDataset(Dataset):
    """(path, target) samples -> (uint8 tensor, target).

    Indexed by (index, epoch) from EpochSampler, the augmentation of each sample is seeded from
    (seed, epoch, index): the same whatever the number of workers or processes, and repeatable on resume."""

    def __init__(self, samples, transform, seed=0, strict=False):
        self.samples, self.transform, self.seed, self.strict = samples, transform, seed, strict

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        """(image, target, ""), or (None, target, why) for a file that passed the header scan and failed to decode
        (a truncated file, say): collate_decoded leaves it out of its batch."""
        index, epoch = key if isinstance(key, tuple) else (key, None)
        path, target = self.samples[index]
        try:
            image = load_image(path)
        except UnreadableImage as e:
            if self.strict:
                raise
            return None, target, str(e)
        if epoch is None:
            return self.transform(image), target, ""
        generator = torch.random.default_generator  # what the transforms draw from (they run on the CPU)
        state = generator.get_state()  # left as it was for the caller (matters with 0 workers)
        seed_draws(seed_from(self.seed, epoch, index))
        try:
            return self.transform(image), target, ""
        finally:
            generator.set_state(state)


def collate_decoded(items):
    """A batch of the images that decoded, their targets, and why the others did not."""
    decoded = [(image, target) for image, target, _ in items if image is not None]
    images, targets = default_collate(decoded) if decoded else (torch.zeros(0, dtype=torch.uint8), torch.zeros(0))
    return images, targets, [why for image, _, why in items if image is None]


class ImageLoader(DataLoader):
    """A DataLoader of ImageDataset batches, each without the files that failed to decode: a batch is one image
    shorter rather than trained or counted twice on another one. Each such file is named once per process."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, collate_fn=collate_decoded, **kwargs)
        self.reported = set()

    def __iter__(self):
        for images, targets, failures in super().__iter__():
            for why in set(failures) - self.reported:
                print(f"warning: skipping {why} (it passed the header scan but does not decode)", file=sys.stderr,
                      flush=True)
            self.reported.update(failures)
            yield images, targets


class EpochSampler(DistributedSampler):
    """DistributedSampler that yields (index, epoch). Its order is a function of (seed, epoch) only;
    process r of w takes every w-th index, so w processes with batch b see in each step the same
    images as 1 process with batch w*b."""

    skip = 0

    def set_epoch(self, epoch, skip=0):
        """skip: how many of this process's samples of the epoch to leave out (a mid-epoch resume)."""
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = list(super().__iter__())[self.skip:]
        return ((index, self.epoch) for index in indices)


def loader_kwargs(workers, device):
    return dict(num_workers=workers, persistent_workers=workers > 0,
                pin_memory=device.type == "cuda",  # pinned memory only speeds up copies to a GPU
                prefetch_factor=4 if workers > 0 else None)


def make_epoch_sampler(n, batch_size, seed=0, rank=0, world_size=1):
    sampler = EpochSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    if len(sampler) < batch_size:
        raise SystemExit(f"error: {n} training images give {len(sampler)} per process, "
                         f"fewer than one batch (-b {batch_size}): lower --batch-size")
    return sampler


def make_train_loader(dataset, batch_size, workers, device, seed=0, rank=0, world_size=1):
    sampler = make_epoch_sampler(len(dataset), batch_size, seed, rank, world_size)
    # drop_last keeps every step the same size: no tiny last batch with noisy BatchNorm statistics
    return ImageLoader(dataset, batch_size, sampler=sampler, drop_last=True, **loader_kwargs(workers, device))


def make_eval_loader(dataset, batch_size, workers, device, rank=0, world_size=1):
    """Process r evaluates images r, r+w, r+2w...: every image exactly once, no padding duplicates."""
    shard = Subset(dataset, range(rank, len(dataset), world_size))
    return ImageLoader(shard, batch_size, shuffle=False, **loader_kwargs(workers, device))


# -----------------------------------------------------------------------------
# decode once (--cache): every image decoded a single time into a uint8 array in a memory-mapped .npy
# file, reused by later runs while the files are unchanged and shared (through the page cache) by every
# process on the machine. Batches are gathered from it and augmented on the training device as whole-batch
# tensor operations: no per-image PIL work, no loader processes competing with the model for cores.

CACHE_VERSION = 1  # bump when the way images are stored changes


def cache_key(samples, how):
    """Changes when a file, its class, or the way it is stored changes (size and mtime stand for content)."""
    digest = hashlib.sha1(f"{CACHE_VERSION} {how}".encode())
    for path, target in samples:
        stat = os.stat(path)
        digest.update(f"{path}\0{target}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


class SquareImages(Dataset):
    """Decodes for the cache: short side resized to `resize`, center square of `side` px, HWC uint8 plus the
    reason an image could not be decoded ("" if it could)."""

    def __init__(self, samples, resize, side):
        self.samples, self.side = samples, side
        self.transform = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(side)])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        try:
            image = self.transform(load_image(self.samples[index][0]))
        except UnreadableImage as e:
            return torch.zeros(self.side, self.side, 3, dtype=torch.uint8), str(e)
        return torch.from_numpy(np.asarray(image).copy()), ""


def build_cache(samples, resize, side, folder, workers=0, log=print, strict=False, chunk=256):
    """Returns (array, usable rows): the memory-mapped uint8 array [N, side, side, 3] of `samples`, decoded by
    `workers` processes the first time and read from folder/<side>px-<key>.npy afterwards."""
    path = Path(folder) / f"{side}px-{cache_key(samples, (resize, side))}.npy"
    bad_path = path.with_suffix(".bad.json")
    if not path.exists():
        import fcntl  # POSIX only, like the rest of the cache
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another job decoding the same files: wait for it, then use its file
            if not path.exists():
                decode_into(path, bad_path, SquareImages(samples, resize, side), workers, log, chunk)
    bad = json.loads(bad_path.read_text())
    if bad:
        listing = "\n".join(f"  {why}" for _, why in bad)
        if strict:
            raise SystemExit(f"error: {len(bad)} image file(s) could not be decoded (--strict stops on them):\n"
                             f"{listing}")
        log(f"warning: skipping {len(bad)} image file(s) that could not be decoded:\n{listing}")
    usable = np.setdiff1d(np.arange(len(samples)), [i for i, _ in bad])
    # copy-on-write: writable, as torch.from_numpy wants; never written, so its pages stay the page cache's,
    # shared by every process that maps the file
    return np.load(path, mmap_mode="c"), usable


def decode_into(path, bad_path, images, workers, log, chunk):
    """Decodes `images` (a SquareImages) into the .npy file `path` and lists the undecodable ones in bad_path. The
    array is written as path.partial, with the number of images done saved after each chunk is on disk, so an
    interrupted build (an ImageNet-sized set takes an hour) starts again where it stopped; the file takes its
    name when complete, so a half-built cache is never used."""
    partial, progress = path.with_suffix(".partial"), path.with_suffix(".progress.json")
    done, bad = json.loads(progress.read_text()) if progress.exists() and partial.exists() else (0, [])
    if done:
        array = np.lib.format.open_memmap(partial, mode="r+")
        log(f"data: the cache build of {path.name} goes on at image {done}/{len(images)}")
    else:
        array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8,
                                          shape=(len(images), images.side, images.side, 3))
    loader = DataLoader(Subset(images, range(done, len(images))), batch_size=chunk, num_workers=workers)
    start, resumed_at = time.perf_counter(), done
    last_report = start
    for batch, errors in loader:
        array[done:done + len(batch)] = batch.numpy()
        array.flush()  # on disk before the progress says so
        bad += [(done + i, why) for i, why in enumerate(errors) if why]
        done += len(batch)
        progress.with_suffix(".tmp").write_text(json.dumps([done, bad]))
        os.replace(progress.with_suffix(".tmp"), progress)
        if time.perf_counter() - last_report > 10 or done == len(images):
            last_report, rate = time.perf_counter(), (done - resumed_at) / (time.perf_counter() - start)
            eta = datetime.timedelta(seconds=round((len(images) - done) / rate))
            log(f"data: decoding into the cache: {done}/{len(images)} images, {rate:.0f} images/s, eta {eta}")
    del array
    bad_path.write_text(json.dumps(bad))
    os.replace(partial, path)
    progress.unlink()


def hash_uniforms(seed, epoch, indices, count):
    """`count` uniform numbers in [0, 1) per sample index, a function of (seed, epoch, index) only (splitmix64
    hashing, vectorised): a sample's augmentation does not depend on the batch or process it lands in."""
    x = np.asarray(indices, dtype=np.uint64)[:, None] * np.uint64(count) + np.arange(count, dtype=np.uint64)
    x = x + np.uint64(seed_from(seed, epoch))  # uint64 arrays wrap around silently: that is the point
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = (x ^ (x >> np.uint64(shift))) * np.uint64(mult)
    x = x ^ (x >> np.uint64(31))
    return torch.from_numpy((x >> np.uint64(40)).astype(np.float32) / 2.0**24)  # 24 bits: exact in float32, < 1


def reflect(positions, size):
    """Mirrors positions that fall outside 0..size-1 back inside, like reflect padding."""
    positions = positions.abs()
    return torch.where(positions >= size, 2 * (size - 1) - positions, positions)


def translate_flip(images, uniforms, flips, pad):
    """The padded-crop recipe on a batch: shift each image by up to `pad` px in each direction (reflecting
    at the borders; uniforms[:, :2]) and mirror those where `flips` is True.
    images: [N, H, W, C] uint8 -> [N, C, H, W] (a channels_last view)."""
    n, h, w, _ = images.shape
    device = images.device
    uniforms = uniforms.to(device)
    shift = (uniforms[:, :2] * (2 * pad + 1)).floor().long() - pad
    rows = reflect(torch.arange(h, device=device) + shift[:, :1], h)
    cols = torch.arange(w, device=device).expand(n, w)
    cols = torch.where(flips.to(device)[:, None], w - 1 - cols, cols)
    cols = reflect(cols + shift[:, 1:2], w)
    batch = torch.arange(n, device=device)[:, None, None]
    return images[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def resized_crop_flip(images, uniforms, flips, size, min_scale):
    """RandomResizedCrop (area share min_scale..1, aspect 3/4..4/3, place: uniforms[:, :4]) and a mirror where
    `flips` is True, on a batch, as one bilinear grid_sample. images: [N, S, S, C] uint8 -> [N, C, size, size]
    float in 0..255."""
    uniforms = uniforms.to(images.device)
    area = min_scale + (1 - min_scale) * uniforms[:, 0]
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * uniforms[:, 1])
    width, height = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)  # shares of the side
    flip = torch.where(flips.to(images.device), -1.0, 1.0)
    zero = torch.zeros_like(width)
    theta = torch.stack([torch.stack([width * flip, zero, (2 * uniforms[:, 2] - 1) * (1 - width)], 1),
                         torch.stack([zero, height, (2 * uniforms[:, 3] - 1) * (1 - height)], 1)], 1)
    grid = F.affine_grid(theta, [len(images), 3, size, size], align_corners=False)
    return F.grid_sample(images.permute(0, 3, 1, 2).float(), grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def alternating_flips(seed, epoch, indices):
    """Which images to mirror: a random half of them in even epochs, the other half in odd ones, so that every
    image is seen both ways in every two epochs (airbench's alternating flip: more variety than a fresh coin
    toss each epoch, which shows some images the same way several epochs running)."""
    first = hash_uniforms(seed_from(seed, 2**32), 0, indices, 1)[:, 0] < 0.5  # a draw of its own, fixed for the run
    return first ^ (epoch % 2 == 1)


class CachedLoader:
    """Batches from a cached array: rows gathered on the host (a memory copy), moved to the device, augmented
    there. Yields (images [N, C, H, W] on the device, targets) like a DataLoader, and has the same
    `sampler` and `len()`. The sampler draws positions among the usable `rows`; a row is a sample's index in the
    sample list, and its image, target and augmentation are all looked up by it. augment: None, or a function
    (images, uniforms, flips) -> images."""

    def __init__(self, array, rows, targets, sampler, batch_size, device, augment=None, seed=0, drop_last=False):
        self.images, self.rows = torch.from_numpy(array), torch.as_tensor(rows, dtype=torch.int64)
        # every sample's class index, or multi-hot row: on the device once, a batch's are gathered there
        self.targets = torch.stack([torch.as_tensor(t) for t in targets]).to(device)
        self.sampler, self.batch_size, self.device = sampler, batch_size, device
        self.augment, self.seed, self.drop_last = augment, seed, drop_last

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        keys = list(self.sampler)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = keys[start:start + self.batch_size]
            rows = self.rows[[k[0] if isinstance(k, tuple) else k for k in batch]]
            # one copy on the host, by several threads, straight into pinned memory on CUDA (3x np.take's speed)
            images = torch.empty((len(rows), *self.images.shape[1:]), dtype=torch.uint8,
                                 pin_memory=self.device.type == "cuda")
            torch.index_select(self.images, 0, rows, out=images)
            images = to_device(images, self.device)
            if self.augment is None:
                images = images.permute(0, 3, 1, 2)
            else:
                epoch = batch[0][1]
                images = self.augment(images, to_device(hash_uniforms(self.seed, epoch, rows.numpy(), 4), self.device),
                                      to_device(alternating_flips(self.seed, epoch, rows.numpy()), self.device))
            yield images, self.targets[to_device(rows, self.device)]


def to_device(tensor, device):
    """Moves a host tensor to `device` without waiting. A copy to a GPU from ordinary (pageable) host memory
    first waits for all the GPU's queued work: a sync point, which would stall the loop at every batch. From
    pinned memory it is queued behind that work instead, and the host goes on to the next batch."""
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


# -----------------------------------------------------------------------------
# the embedded dataset: `python train.py` with no --data trains on coloured shapes

SHAPES = ("circle", "cross", "ring", "square", "star", "triangle")


def draw_shape(name, rng):
    """One image of a shape of random size, place, rotation and colours on a noisy background."""
    width, height = rng.integers(32, 49, size=2)
    scale = 4  # draw large and downsample: smooth edges
    background = tuple(int(c) for c in rng.integers(0, 256, 3))
    foreground = tuple(int((c + rng.integers(90, 166)) % 256) for c in background)  # always contrasts
    image = Image.new("RGB", (width * scale, height * scale), background)
    radius = rng.uniform(0.3, 0.45) * min(width, height) * scale
    cx = rng.uniform(radius, width * scale - radius)
    cy = rng.uniform(radius, height * scale - radius)
    angle = rng.uniform(0, 2 * np.pi)

    def polygon(n, inner=None):  # regular polygon, or a star when inner radius is given
        corners = n * (2 if inner else 1)
        radii = [radius if (i % 2 == 0 or not inner) else radius * inner for i in range(corners)]
        return [(cx + r * np.cos(angle + 2 * np.pi * i / corners), cy + r * np.sin(angle + 2 * np.pi * i / corners))
                for i, r in enumerate(radii)]

    draw = ImageDraw.Draw(image)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if name == "circle":
        draw.ellipse(box, fill=foreground)
    elif name == "ring":
        draw.ellipse(box, outline=foreground, width=int(radius * 0.35))
    elif name == "square":
        draw.polygon(polygon(4), fill=foreground)
    elif name == "triangle":
        draw.polygon(polygon(3), fill=foreground)
    elif name == "star":
        draw.polygon(polygon(5, inner=0.45), fill=foreground)
    elif name == "cross":
        w = radius * 0.3
        arm = [(-radius, -w), (radius, -w), (radius, w), (-radius, w)]
        for turn in (angle, angle + np.pi / 2):
            c, s = np.cos(turn), np.sin(turn)
            draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in arm], fill=foreground)
    image = image.resize((int(width), int(height)), Image.Resampling.LANCZOS)
    noise = rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def make_shapes_dataset(root, train_per_class=400, val_per_class=100, seed=0):
    """Writes shapes as JPEG files into root/{train,val}/<shape>/ once; later calls reuse them."""
    root = Path(root)
    if (root / "val").is_dir():
        return root
    tmp = root.with_name(f".{root.name}.tmp{os.getpid()}")  # written aside, then renamed: never half a dataset
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in SHAPES:
            (tmp / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw_shape(name, rng).save(tmp / split / name / f"{i:04d}.jpg", quality=90)
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root
