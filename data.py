"""Files to batches: folder layouts, image decoding, the decode-once cache, augmentation and loaders.

    DATA/train/<class>/*.jpg     training images, one folder per class
    DATA/val/<class>/*.jpg       validation images (or DATA/valid/, DATA/validation/, DATA/test/, or a split
                                 carved from train)

Two stages, each written once. Reading gives every split's images stored one way (upright RGB uint8 of one size),
from either source: decoded per image in loader processes, or from a memory-mapped cache decoded once (--cache).
Augmentation then runs on the training device, the same whatever the source: `--cache` changes speed, not results.
"""
import collections
import csv
import datetime
import hashlib
import io
import json
import math
import os
import shutil
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps, features
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from utils import (agree_on_failure, all_gather, broadcast_object, first_line, get_rank, get_world_size,
                   patient_group, seed_draws, seed_from)

# .jfif and .jpe: JPEGs as browsers on Windows save them; .avif where this Pillow reads it (recent ones do)
IMG_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif",
                  *[".avif"] * ("avif" in features.get_supported_modules())}
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # every torchvision pretrained model expects these
IMAGENET_STD = (0.229, 0.224, 0.225)


# -----------------------------------------------------------------------------
# decoding: every image becomes an upright 3-channel RGB image, in training, evaluation and prediction

class UnreadableImage(Exception):
    pass


def open_image(path):
    """Image.open without PIL's warning about images over 89 megapixels (phones take 108 MP photos, which the JPEG
    draft decodes fast); those over twice that are still refused, as PIL refuses them (DecompressionBombError)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def load_image(path, least=None):
    """An image file as upright RGB. least: a JPEG at least twice as large in both dimensions is decoded at 1/2,
    1/4 or 1/8 of its size (PIL's draft, in the DCT: fast), keeping at least `least` px on both sides."""
    try:
        with open_image(path) as image:
            if least:  # formats other than JPEG ignore it
                image.draft(None, (least, least))
            image = ImageOps.exif_transpose(image)  # phones store rotation in EXIF, not in the pixels
            return to_rgb(image)
    except Exception as e:  # truncated, corrupt, not an image, too many pixels...
        raise UnreadableImage(f"{path}: {e}") from e


def check_image(path):
    """Why a file cannot be used, from its size and header alone (fast), or None if it looks fine."""
    # damage deeper in the file (a truncated JPEG) shows only when it is decoded, in the loader
    if not os.path.isfile(path):
        return "no such file"
    if os.path.getsize(path) == 0:
        return "empty file"
    try:
        with open_image(path) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        return (f"over {2 * Image.MAX_IMAGE_PIXELS:,} pixels, PIL's decompression-bomb limit (if it is a real "
                "image, raise PIL.Image.MAX_IMAGE_PIXELS in data.py)")
    except Exception as e:
        return f"not a readable image ({type(e).__name__}: {e})"
    return "zero-sized image" if width * height == 0 else None


def scan_images(samples, strict=None, log=print, parallel_from=10_000, listed=20):
    """Drops the files that check_image refuses, naming the first `listed` and counting them, or stops on them
    with strict (None: the script has no --strict to name). Under torchrun each process checks its share of the
    files; a share of `parallel_from` files or more is checked by a process per core (at most 16)."""
    paths = [path for path, _ in samples]
    mine = paths[get_rank()::get_world_size()]  # every process checking every file: 8 GPUs, 8 times the reads
    # opening a header is as much Python work as a disk read: threads, held back by the GIL, gain nothing;
    # processes do (see the README's Speed). A small set is done before a pool of processes would have started.
    processes = min(16, cores_per_process())
    if len(mine) >= parallel_from and processes > 1:
        with ProcessPoolExecutor(processes) as pool:
            whys = list(pool.map(check_image, mine, chunksize=256))
    else:
        whys = [check_image(path) for path in mine]
    found = {}  # path: why, of every process's share
    for share in all_gather({path: why for path, why in zip(mine, whys) if why}):
        found.update(share)
    bad = [(path, found[path]) for path in paths if path in found]
    if bad:
        listing = "\n".join(f"  {path}: {why}" for path, why in bad[:listed]) + (
            f"\n  ... and {len(bad) - listed} more" if len(bad) > listed else "")
        if strict:
            raise SystemExit(f"error: {len(bad)} unusable image file(s) (--strict stops on them):\n{listing}")
        hint = "" if strict is None else " (--strict makes this an error)"
        log(f"warning: skipping {len(bad)} unusable image file(s){hint}:\n{listing}")
    return [sample for sample in samples if sample[0] not in found]


# the value that becomes 255, by mode: the format's range, the same for every image (torchvision's conventions:
# 16-bit integers to 65535, floats to 1), never an image's own largest value, which would make a dim frame as
# bright as any. PIL opens 16-bit files as I;16 (or I, in older versions)
DEEP_MODE_WHITE = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I": 65535, "F": 1.0}


def to_rgb(image):
    if image.mode in DEEP_MODE_WHITE:  # to 8 bits, scaled, not clipped
        array = np.asarray(image, dtype=np.float64) * (255 / DEEP_MODE_WHITE[image.mode])
        image = Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8))
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


def is_image_file(name):
    return not name.startswith(".") and Path(name).suffix.lower() in IMG_EXTENSIONS


def files_under(folder):
    """The paths of the files under folder, through linked folders (not those that lead back up, a loop), past
    hidden files and folders (.git, .ipynb_checkpoints, macOS's ._ files): what training reads of a class folder
    and predict.py of a folder."""
    for root, dirs, files in os.walk(folder, followlinks=True):
        here = os.path.join(os.path.realpath(root), "")  # with a trailing separator, "/" included
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and not here.startswith(os.path.join(os.path.realpath(os.path.join(root, d)), "")))
        yield from (os.path.join(root, file) for file in sorted(files) if not file.startswith("."))


def list_images(folder, classes, log=print):
    """[(path, class index)] for every image file under folder/<class>/, matched by extension in any case."""
    loose = sorted(e.name for e in os.scandir(folder) if e.is_file() and is_image_file(e.name))
    if loose:
        log(f"warning: {len(loose)} image file(s) directly in {folder} are in no class folder, so have no label: "
            f"left out ({', '.join(loose[:3])}{', ...' if len(loose) > 3 else ''}); move them into {folder}/<class>/")
    samples, others = [], collections.Counter()  # others: the suffixes of files left out
    for index, name in enumerate(classes):
        class_dir = Path(folder) / name
        if not class_dir.is_dir():
            continue
        for path in files_under(class_dir):
            if is_image_file(os.path.basename(path)):
                samples.append((path, index))
            else:
                others[Path(path).suffix.lower() or os.path.basename(path)] += 1
    if others:  # .heic, .svg...: images the user may expect to be read
        log(f"warning: {others.total()} file(s) in the class folders of {folder} are not images by their names "
            f"({', '.join(f'{n} {kind}' for kind, n in sorted(others.items()))}): left out; the names read end in "
            f"{' '.join(sorted(IMG_EXTENSIONS))}")
    return samples


def stratified_split(samples, fraction, seed):
    """Deterministic (train, val) with `fraction` of every class in val (multilabel samples: one group)."""
    rng = np.random.default_rng(seed)
    groups = {}  # one pass: a pass per class would take minutes for 1,000 classes of an ImageNet-sized set
    for sample in samples:
        groups.setdefault(sample[1] if isinstance(sample[1], int) else -1, []).append(sample)
    train, val = [], []
    for target in sorted(groups):
        members = groups[target]
        order = rng.permutation(len(members))
        n_val = max(1, round(len(members) * fraction)) if len(members) > 1 else 0
        val += [members[i] for i in sorted(order[:n_val])]
        train += [members[i] for i in sorted(order[n_val:])]
    return train, val


def select_classes(found, wanted=None, ignore=(), where="the data"):
    """The classes to train on: `wanted` in its order (--classes), else those found, less `ignore`."""
    # a found class that is neither wanted nor ignored is an error: its images would silently vanish;
    # an ignored class that is not found is a typo that would leave the class in
    unknown = [c for c in ignore if c not in found]
    if unknown:
        raise SystemExit(f"error: --ignore-classes names {', '.join(unknown)}, which {where} does not have")
    kept = [c for c in found if c not in ignore]
    if not wanted:
        return kept
    wanted = [c for c in wanted if c not in ignore]
    repeated = sorted({c for c in wanted if wanted.count(c) > 1})
    if repeated:  # a class at two indices: its images would be trained on with both labels
        raise SystemExit(f"error: --classes names {', '.join(repeated)} more than once: list each class once")
    missing = [c for c in wanted if c not in found]
    if missing:
        raise SystemExit(f"error: --classes names {', '.join(missing)}, which {where} does not have")
    extra = [c for c in kept if c not in wanted]
    if extra:
        raise SystemExit(f"error: {where} has class(es) that --classes does not list: {', '.join(extra)}; "
                         "add them to --classes or drop them with --ignore-classes")
    return wanted


def warn_of_alike_classes(classes, where, log):
    """The classes, with a warning for names that differ only in case ("Cat", "cat"): likely one class, labelled two
    ways, which the model would be asked to tell apart."""
    groups = collections.defaultdict(list)
    for name in classes:
        groups[name.casefold()].append(name)
    for names in (names for names in groups.values() if len(names) > 1):
        log(f"warning: class names that differ only in case: {', '.join(names)} (in {where}); if they are one "
            "class, give its images one name")
    return classes


def read_utf8(path):
    """A text file's contents, or an error naming it if it is not UTF-8."""
    try:  # utf-8-sig: a byte-order mark, as spreadsheets and Notepad write, is no part of the first name
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path} is not UTF-8 text (byte {e.start}): save it as UTF-8 (Excel: CSV UTF-8)"
                         ) from None


def parse_class_list(text):
    """--classes a,b,c, or the path of a file with one class per line."""
    if text is None:
        return None
    if os.path.isfile(text):
        return [line.strip() for line in read_utf8(text).splitlines() if line.strip()]
    return [name.strip() for name in text.split(",") if name.strip()]


def load_samples(data_root, val_fraction=0.1, seed=0, log=print, strict=False, wanted=None, ignore=()):
    """(classes, train samples, val samples) of DATA/train and DATA/val (or DATA/test, or a split of train)."""
    data_root = Path(data_root)
    train_dir = data_root / "train"
    if not data_root.is_dir():
        raise SystemExit(f"error: dataset folder {data_root} does not exist")
    if not train_dir.is_dir():
        raise SystemExit(no_train_folder(data_root))
    if not find_classes(train_dir):
        raise SystemExit(f"error: {train_dir} has no class folders; expected {train_dir}/<class>/<image>")
    classes = warn_of_alike_classes(select_classes(find_classes(train_dir), wanted, ignore, train_dir), train_dir, log)
    train = scan_training_images(list_images(train_dir, classes, log), classes, train_dir, strict, log)

    val_dir = find_val_dir(data_root)
    if val_dir is None:
        train, val = stratified_split(train, val_fraction, seed)
        log(f"data: no val/, valid/, validation/ or test/ folder in {data_root}: holding out {val_fraction:.0%} of "
            f"each class of train/ for validation ({len(val)} images, --val-fraction)")
    else:
        if val_dir.name != "val":
            chosen = " (best.pt is chosen on it: not a held-out figure)" if val_dir.name == "test" else ""
            log(f"data: no val/ folder in {data_root}: validating on {val_dir}{chosen}")
        val = scan_images(check_val_classes(val_dir, classes, log, ignore), strict, log)
    if not val:  # 0% every epoch, and the first epoch kept as best
        fix = (f"add images to {val_dir}/<class>/, or remove {val_dir} to hold out --val-fraction of train/"
               if val_dir else "add images: a class needs 2 for one to be held out")
        raise SystemExit(f"error: no usable validation images in {val_dir or train_dir}: {fix}")
    log(f"data: {len(classes)} classes, {len(train)} train and {len(val)} val images")
    return classes, train, val


def image_class_folders(folder):
    """The class folders of `folder` that hold images: it is in the DATA/<class>/ layout of Keras and ImageFolder."""
    return [name for name in find_classes(folder) if any(is_image_file(e.name) for e in os.scandir(folder / name))]


def is_split_folder(folder):
    """Whether `folder` is the train/, val/ (valid/, ...) or test/ folder of a dataset, which --data should name
    instead."""
    return folder.name in ("train", *VAL_FOLDERS) and (folder.parent / "train").is_dir()


def no_train_folder(folder):
    """The error for a dataset folder without train/, with what to do if it holds class folders of images: it is
    the split folder of a dataset that --data named, or in the DATA/<class>/ layout of Keras and ImageFolder."""
    classes = image_class_folders(folder)
    if classes and is_split_folder(folder):
        return f"error: {folder} is the {folder.name}/ folder of a dataset: give --data {folder.parent}"
    if classes:
        names = ", ".join(classes[:3]) + ", ..." * (len(classes) > 3)
        return (f"error: {folder} holds class folders of images ({names}) but no train/ folder: move them into "
                f"{folder}/train/ (a share is held out for validation, --val-fraction)")
    return f"error: {folder} has no train/ folder; expected {folder}/train/<class>/<image>"


def files_digest(samples):
    """Which files a split holds, in 16 hex digits: a checkpoint keeps its splits'. Paths count from the folder
    that holds them all, so a copy of the data elsewhere has the same digest."""
    paths = [path for path, _ in samples]
    common = os.path.commonpath(paths) if paths else ""
    # fsencode: a name's bytes as on disk, also a name that is not UTF-8 (as zips made on Windows extract)
    return hashlib.sha1(b"\n".join(os.fsencode(os.path.relpath(path, common)) for path in paths)).hexdigest()[:16]


VAL_FOLDERS = ("val", "valid", "validation", "test")  # the folder names of the val split, first found first


def find_val_dir(data_root):
    """DATA/val (or DATA/valid, Kaggle's and Roboflow's, or Keras' DATA/validation), else DATA/test, else None
    (validation is then carved out of train/)."""
    return next((Path(data_root) / s for s in VAL_FOLDERS if (Path(data_root) / s).is_dir()), None)


def scan_training_images(listed, classes, where, strict, log):
    """scan_images, then an error if no file, or no file of a class, is usable."""
    samples = scan_images(listed, strict, log)
    if listed and not samples:  # paths relative to another folder, a dataset not yet copied...
        raise SystemExit(f"error: no usable training images in {where}: the warning above names the unusable files "
                         "(are they where they were listed? a CSV's relative paths start at its folder)")
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
    return list_images(val_dir, classes, log)


def read_csv_samples(csv_path, image_column="image", label_column="label", delimiter=None, log=print):
    """[(path, [label, ...])] of a CSV file with a header; relative paths may not leave the CSV's folder."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise SystemExit(f"error: CSV file {csv_path} does not exist")
    folder = csv_path.parent.resolve()
    text = read_utf8(csv_path)
    header = text.partition("\n")[0]  # the separator: Excel writes ';' where the decimal mark is a comma
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=next((d for d in ",;\t" if d in header), ","))
    for column in (image_column, label_column):
        if column not in (reader.fieldnames or []):
            raise SystemExit(f"error: {csv_path} has no column {column!r} (it has: {', '.join(reader.fieldnames or [])}"
                             "); name the columns with --image-column and --label-column")
    rows = []
    for row in reader:
        where = f"{csv_path} line {reader.line_num}"
        if row[image_column] is None or row[label_column] is None:
            raise SystemExit(f"error: {where}: fewer cells than the header has columns")
        path = Path(row[image_column].strip())
        if "\\" in str(path) and os.sep == "/" and not (folder / path).exists():  # written on Windows: dir\file.jpg
            path = Path(str(path).replace("\\", "/"))
        if not path.is_absolute():
            path = folder / path
            if not path.resolve().is_relative_to(folder):
                raise SystemExit(f"error: {where}: {row[image_column]!r} leads outside {folder}; use paths inside the "
                                 "CSV's folder, or absolute paths")
        text = row[label_column].strip()
        labels = [x.strip() for x in (text.split(delimiter) if delimiter else [text]) if x.strip()]
        rows.append((os.path.normpath(path), labels, reader.line_num))
    return check_repeats(rows, csv_path, log)


def check_repeats(rows, csv_path, log):
    """[(path, labels)]: an image on two rows with other labels is an error; a repeated row, a warning."""
    first = {}
    for path, labels, line in rows:
        seen_line, seen_labels = first.setdefault(path, (line, labels))
        if sorted(seen_labels) != sorted(labels):
            raise SystemExit(f"error: {csv_path} lines {seen_line} and {line} give {path} the labels "
                             f"{', '.join(seen_labels)} and {', '.join(labels)}: keep the right one")
    if len(first) < len(rows):
        log(f"warning: {csv_path}: {len(rows) - len(first)} row(s) repeat an earlier row's image, which then counts "
            "once more for each, in training and in the scores")
    return [(path, labels) for path, labels, _ in rows]


LIST_SEPARATORS = ";|,"  # in a label cell that no --label-delimiter splits: most likely a list of labels


def warn_of_listed_labels(rows, csv_path, multilabel, log):
    """A warning with the count when label cells that no --label-delimiter splits look like lists: each such
    cell is a class of its own (circle;square), which is rarely what was meant."""
    listed = [labels[0] for _, labels in rows if len(labels) == 1 and any(c in labels[0] for c in LIST_SEPARATORS)]
    if listed:
        separator = next(c for c in LIST_SEPARATORS if c in listed[0])
        flags = "--label-delimiter" if multilabel else "--task multilabel --label-delimiter"
        log(f"warning: {len(listed)} label cell(s) of {csv_path} look like lists ({listed[0]}): without "
            f"--label-delimiter each cell is one label, a class of its own; if they list several labels, give "
            f"{flags} '{separator}'")


def is_class_id(label):
    """Whether a CSV label is an integer id (0..K-1): 7, not 007 (a code, so a name) or 7.0."""
    return label.isdecimal() and label == str(int(label))


def name_labels(rows, names=None):
    """The rows with every label a class name: integer ids index `names` (--classes) when given, unless those are
    integers too (--classes 2,0,1 orders the ids, not renames them), else name themselves."""
    # whether ids index the names is decided by the names alone: a run's CSV files (train, val) all read alike
    found = {label for _, labels in rows for label in labels}
    if not names or all(map(is_class_id, names)) or not found or not all(map(is_class_id, found)):
        return rows
    largest = max(int(label) for label in found)
    if largest >= len(names):
        raise SystemExit(f"error: label id {largest} is out of range for the {len(names)} classes of --classes")
    return [(path, [names[int(label)] for label in labels]) for path, labels in rows]


def read_labelled_csv(csv_path, columns, names=None, ignore=(), multilabel=False, log=print):
    """[(path, [class name, ...])] of a CSV file; columns: (image column, label column, label separator or None)."""
    rows = read_csv_samples(csv_path, *columns, log=log)
    return drop_ignored(name_labels(rows, names), csv_path, ignore, multilabel, log)


def drop_ignored(rows, csv_path, ignore, multilabel, log):
    """An ignored class leaves out the rows that have it, or with multilabel only that label."""
    if multilabel:
        kept = [(path, [label for label in labels if label not in ignore]) for path, labels in rows]
    else:
        kept = [(path, labels) for path, labels in rows if not set(labels) & set(ignore)]
    if len(kept) < len(rows):
        log(f"data: left out {len(rows) - len(kept)} row(s) of {csv_path} with an ignored class (--ignore-classes)")
    return kept


def index_labels(rows, classes, where, multilabel=False):
    """[(path, target)]: the class index, or with multilabel a multi-hot float vector."""
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
    """(classes, train samples, val samples) of CSV files: like load_samples, with the labels in a column."""
    train_rows = name_labels(read_csv_samples(train_csv, *columns, log=log), wanted)
    if columns[2] is None:
        warn_of_listed_labels(train_rows, train_csv, multilabel, log)
    found = sorted({label for _, labels in train_rows for label in labels})
    if found and all(map(is_class_id, found)):  # ids that name themselves: every id up to the largest
        found = [str(i) for i in range(max(map(int, found)) + 1)]
    classes = warn_of_alike_classes(select_classes(found, wanted, ignore, train_csv), train_csv, log)
    train_rows = drop_ignored(train_rows, train_csv, ignore, multilabel, log)
    train = index_labels(train_rows, classes, train_csv, multilabel)
    train = scan_training_images(train, classes, train_csv, strict, log)
    if val_csv:
        val_rows = read_labelled_csv(val_csv, columns, wanted, ignore, multilabel, log)
        trained_on = {path for path, _ in train_rows}
        seen = sum(path in trained_on for path, _ in val_rows)
        if seen:
            log(f"warning: {seen} image(s) of {val_csv} are also in {train_csv}: their scores are of images the "
                "model trained on")
        val = scan_images(index_labels(val_rows, classes, val_csv, multilabel), strict, log)
    else:
        train, val = stratified_split(train, val_fraction, seed)
        log(f"data: no --val-csv: holding out {val_fraction:.0%} of each class of {train_csv} for validation "
            f"({len(val)} images, --val-fraction)")
    if not val:
        raise SystemExit(f"error: no usable validation images in {val_csv or train_csv}: add some")
    log(f"data: {len(classes)} classes, {len(train)} train and {len(val)} val images")
    return classes, train, val


def split_samples(data_root, split, classes, val_fraction=0.1, seed=0, log=print, strict=None, ignore=()):
    """Samples of one split, indexed by a trained model's `classes`, found by the rules of training; a held-out
    set may also come alone: DATA/val/<class>/ without train/, or DATA/<class>/ itself (DATA/test, say)."""
    root, train_dir = Path(data_root), Path(data_root) / "train"
    held_out = None if split == "train" else held_out_folder(root, split)
    ignored_here = []
    if train_dir.is_dir():
        found = find_classes(train_dir)
        ignored_here = [c for c in ignore if c in found]  # the run's --ignore-classes: this data may lack some
        data_classes = select_classes(found, None, ignored_here)
        if sorted(data_classes) != sorted(classes):
            raise SystemExit(f"error: the classes of {train_dir} ({', '.join(data_classes)}) are not the "
                             f"checkpoint's ({', '.join(classes)}); evaluate on the data the model was trained for")
    elif held_out is None:
        raise SystemExit(no_train_folder(root))
    if held_out is not None:
        return scan_images(check_val_classes(held_out, classes, log, ignore), strict, log)
    _, train, val = load_samples(data_root, val_fraction, seed, log, strict, wanted=list(classes), ignore=ignored_here)
    return train if split == "train" else val


def held_out_folder(root, split):
    """The folder of the val or test split's class folders, or None where val is carved out of train/."""
    named = root / "test" if split == "test" else find_val_dir(root)
    if named is not None and named.is_dir():
        return named
    if not (root / "train").is_dir() and root.name != "train" and image_class_folders(root):
        return root  # the held-out set alone, in ImageFolder's layout (DATA/test itself too, not DATA/train)
    if split == "test":
        raise SystemExit(f"error: {root} has no test/ folder")
    return None


def image_sizes(paths, max_samples=256):
    """(width, height) of up to max_samples images spread over `paths`, from their headers alone (fast)."""
    sizes = []
    for path in paths[::max(1, len(paths) // max_samples)]:
        try:
            with open_image(path) as image:
                sizes.append(image.size)
        except Exception:  # unreadable files are reported by the loader, not here
            pass
    return sizes


def infer_img_size(paths):
    """About the median short side of the images, as a multiple of 32 between 32 and 224."""
    short_sides = [min(size) for size in image_sizes(paths)]
    if not short_sides:
        return 224
    return int(min(224, max(32, round(statistics.median(short_sides) / 32) * 32)))


def whole_image_side(paths, img_size, min_scale):
    """The side of the square (the whole image, squashed) that resized crops are drawn from."""
    # large enough that the smallest window (min_scale of the area) is not enlarged; at most the images' median
    # long side: more pixels than the files hold would add none
    long_sides = [max(size) for size in image_sizes(paths)] or [img_size]
    return int(min(math.ceil(img_size / math.sqrt(min_scale) / 8) * 8, statistics.median(long_sides)))


def eval_preprocess(img_size, crop_pct=None):
    """Eval preprocessing as plain data, stored in every checkpoint. crop_pct: the crop's share of the short side."""
    # 0.875 is the ImageNet convention; small images (<= 64 px) are not zoomed: they would lose too much
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
# reading: what training and evaluation consume, upright RGB uint8 [H, W, 3] images of one size per split, stored
# one way whichever the source: decoded from the files when asked for (DecodedImages, in loader processes), or
# decoded once into a memory-mapped cache (build_cache) and gathered from it (CachedImages).
#   val, and train with padded crops: the short side resized to `resize`, then the center square of `side`
#   train with resized crops (resize None): the whole image squashed to side x side, its aspect ratio kept beside

def store_image(image, side, resize=None):
    """A PIL image as stored: (uint8 [side, side, 3], its aspect ratio width / height)."""
    # torchvision's Resize(resize) and CenterCrop(side), to the pixel, in PIL: importing torchvision takes 1.5 s
    width, height = image.size
    if resize is None:
        image = image.resize((side, side), Image.Resampling.BILINEAR)
    else:
        size = (resize, int(resize * height / width)) if width <= height else (int(resize * width / height), resize)
        if size != image.size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        left, top = int(round((size[0] - side) / 2.0)), int(round((size[1] - side) / 2.0))
        image = image.crop((left, top, left + side, top + side))
    return torch.from_numpy(np.asarray(image).copy()), width / height


def read_image(path, side, resize=None):
    """An image file as stored (store_image), decoded at the least scale that keeps twice the side the resize
    filters down to, as PIL's thumbnail does (its reducing_gap 2): a 12-megapixel photo 3x faster than whole."""
    return store_image(load_image(path, least=2 * (resize or side)), side, resize)


class DecodedImages(Dataset):
    """Stored images decoded from the files when asked for. An item is (image, aspect, why): why is "" or the
    reason the file did not decode (a truncated file passes the header scan), with a blank image."""

    def __init__(self, samples, side, resize=None, strict=False):
        self.paths, self.side, self.resize, self.strict = [path for path, _ in samples], side, resize, strict

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, row):
        try:
            return *read_image(self.paths[row], self.side, self.resize), ""
        except UnreadableImage as e:
            if self.strict:
                raise
            return torch.zeros(self.side, self.side, 3, dtype=torch.uint8), 1.0, str(e)

    def __getitems__(self, rows):
        """A batch: images, aspects and rows of the files that decoded, and (row, why) of those that did not."""
        items = [self[row] for row in rows]
        kept = [i for i, (_, _, why) in enumerate(items) if not why]
        images = [items[i][0] for i in kept] or [torch.zeros(0, self.side, self.side, 3, dtype=torch.uint8)]
        return (torch.stack(images) if kept else images[0], torch.tensor([items[i][1] for i in kept]),
                torch.tensor([rows[i] for i in kept], dtype=torch.int64),
                [(row, why) for row, (_, _, why) in zip(rows, items) if why])


class CachedImages:
    """Stored images gathered from the cache's arrays on `device`: resident on a GPU (copied there once), the
    mapped file elsewhere (a batch is one memory copy)."""

    def __init__(self, images, aspects, device):
        self.images, self.aspects = torch.from_numpy(images).to(device), torch.from_numpy(aspects).to(device)

    def __getitems__(self, rows):
        rows = torch.as_tensor(rows, dtype=torch.int64)
        where = to_device(rows, self.images.device)
        return self.images.index_select(0, where), self.aspects[where], rows, []


def read_as_is(batch):
    return batch  # the DataLoader's collate_fn: __getitems__ gives whole batches


class EpochSampler(DistributedSampler):
    """The sample indices `rows` in an order that is a function of (seed, epoch) only. Process r of w takes every
    w-th, so w processes with batch b see in each step the same images as 1 process with batch w*b."""

    skip = 0

    def set_epoch(self, epoch, skip=0):  # skip: this process's samples of the epoch already seen (a resume)
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(np.asarray(self.dataset)[list(super().__iter__())[self.skip:]].tolist())


class Batches:
    """One split's batches on the training device, like a DataLoader: (images uint8 [N, 3, H, W], targets).
    `sampler` gives sample indices: a sample's image, target and random draws are all looked up by its index.
    A batch is read from `images` (DecodedImages in loader processes, or CachedImages), moved to the device and,
    in training, augmented there."""

    def __init__(self, images, targets, sampler, batch_size, device, augment=None, workers=0, drop_last=False):
        self.images, self.sampler, self.device, self.augment, self.reported = images, sampler, device, augment, set()
        self.batches = BatchSampler(sampler, batch_size, drop_last)
        # every sample's class index (or multi-hot row), on the device once: a batch's are gathered there
        self.targets = torch.stack([torch.as_tensor(t) for t in targets]).to(device) if len(targets) else None
        if isinstance(images, DecodedImages):  # decoding wants loader processes; the cache is read in-process
            self.loader = DataLoader(images, batch_sampler=self.batches, collate_fn=read_as_is, num_workers=workers,
                                     persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                                     pin_memory=device.type == "cuda")  # pinned memory only speeds up copies to a GPU

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        epoch = getattr(self.sampler, "epoch", 0)
        reads = self.loader if isinstance(self.images, DecodedImages) else map(self.images.__getitems__, self.batches)
        for images, aspects, rows, failures in reads:
            for why in {why for _, why in failures} - self.reported:  # a batch is one image shorter, not padded
                print(f"warning: skipping {why} (it passed the header scan but does not decode)", file=sys.stderr,
                      flush=True)
                self.reported.add(why)
            images = to_device(images, self.device)
            if self.augment is None:
                images = images.permute(0, 3, 1, 2)
            else:
                images = self.augment(images, to_device(aspects, self.device), rows.numpy(), epoch)
            yield images, self.targets[to_device(rows, self.device)]

    def sample(self, n):
        """n stored images of the split (uint8 [n, 3, H, W] on the device), evenly spread, not augmented: the same
        in every process and from either source."""
        rows = np.asarray(getattr(self.sampler, "dataset", self.sampler))
        rows = rows[np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int)]
        return to_device(self.images.__getitems__(rows.tolist())[0], self.device).permute(0, 3, 1, 2)


def to_device(tensor, device):
    """Moves a host tensor to `device`; to a GPU without waiting."""
    # a copy to a GPU from pageable host memory first waits for all the GPU's queued work: a sync point that would
    # stall the loop at every batch. From pinned memory it is queued behind that work and the host goes on.
    # Elsewhere it waits: on MPS a copy that does not may read its source after it is freed (pytorch#189690)
    if device.type != "cuda":
        return tensor.to(device)
    if tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def make_epoch_sampler(rows, batch_size, seed=0, rank=0, world_size=1):
    sampler = EpochSampler(rows, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    if len(sampler) < batch_size:
        raise SystemExit(f"error: {len(rows)} training images give {len(sampler)} per process, "
                         f"fewer than one batch (-b {batch_size}): lower --batch-size")
    return sampler


def eval_batches(samples, preprocess, batch_size, device, workers=0, rank=0, world_size=1, strict=False):
    """Evaluation batches decoded per image. Process r evaluates images r, r+w, r+2w...: each exactly once."""
    images = DecodedImages(samples, preprocess["img_size"], preprocess["resize_size"], strict)
    return Batches(images, [t for _, t in samples], range(rank, len(samples), world_size), batch_size, device,
                   workers=workers)


def make_loaders(args, train_samples, val_samples, preprocess, rank, local_rank, world_size, device, output_dir, log):
    """The training and validation Batches of a run: read from the cache or decoded per image, augmented as args
    say (--train-crop, --min-scale, --crop-padding, --auto-augment, --random-erase, --seed)."""
    if args.train_crop == "padded":
        train_layout = (args.img_size, args.img_size)
    else:
        train_layout = (whole_image_side([path for path, _ in train_samples], args.img_size, args.min_scale), None)
    splits = [(train_samples, train_layout), (val_samples, (preprocess["img_size"], preprocess["resize_size"]))]
    workers = default_workers(device) if args.workers is None else args.workers
    if decide_cache(args.cache, [(len(samples), layout[0]) for samples, layout in splits], log):
        (train_images, train_rows), (val_images, val_rows) = cache_splits(args, splits, rank, local_rank, device,
                                                                          output_dir, log)
        workers = 0  # reading is a memory copy: no loader processes to compete with the model for cores
    else:
        (train_images, train_rows), (val_images, val_rows) = [
            (DecodedImages(samples, *layout, args.strict), np.arange(len(samples))) for samples, layout in splits]
    augment = partial(augment_batch, seed=args.seed, crop=args.train_crop, size=args.img_size,
                      padding=args.img_size // 16 if args.crop_padding is None else args.crop_padding,
                      min_scale=args.min_scale, auto_augment=args.auto_augment, random_erase=args.random_erase)
    sampler = make_epoch_sampler(train_rows, args.batch_size, args.seed, rank, world_size)
    # drop_last keeps every step the same size: no tiny last batch with noisy BatchNorm statistics
    train = Batches(train_images, [t for _, t in train_samples], sampler, args.batch_size, device, augment, workers,
                    drop_last=True)
    val = Batches(val_images, [t for _, t in val_samples], val_rows[rank::world_size].tolist(), args.batch_size,
                  device, workers=workers)
    log(f"data: {workers} loader worker(s) per process; augmented in batches on {device}")
    return train, val


def default_workers(device):
    """Loader processes per training process: on a GPU every core but one (at most 16), on the CPU fewer."""
    # on the CPU they compete with the model for cores: leave about half to compute; with 2 cores or fewer per
    # process the model's threads use them all, and loading in the training process itself is faster
    cores = cores_per_process()
    if device.type == "cuda":
        return max(1, min(16, cores - 1))
    return 0 if cores <= 2 else max(1, min(8, cores // 2))


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # a container's CPU quota under cgroup v2: "<quota> <period>"


def cpu_cores():
    """The cores this process may use: those it may run on (a taskset, a container's cpuset), or fewer where a
    container's CPU quota allows fewer (a Kubernetes CPU limit: the container sees every core of the node)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()
        return max(1, min(cores, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 (macOS, cgroup v1), or "max": no quota
        return cores


def cores_per_process():
    """This machine's cores shared among the training processes on it (torchrun's LOCAL_WORLD_SIZE; not the
    world size, which counts the processes of every node)."""
    return max(1, cpu_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", get_world_size())))


def decide_cache(cache, counts_and_sides, log):
    """--cache on or off as asked; by default on when the decoded images take at most a quarter of the memory (of
    rank 0's machine: every process must read the same way, and another machine may have less)."""
    if not hasattr(os, "sysconf"):  # Windows: the cache is a memory-mapped file locked with fcntl, POSIX's
        if cache:
            raise SystemExit("error: --cache needs Linux or macOS (its files are locked with fcntl); drop the flag")
        log("data: --cache off (it needs Linux or macOS): each image is decoded when it is read")
        return False
    size_gib = sum(n * side * side * 3 for n, side in counts_and_sides) / 2**30
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    why = "as asked" if cache is not None else f"on by default up to a quarter of the memory, {memory_gib / 4:.1f} GiB"
    cache = broadcast_object(size_gib <= memory_gib / 4) if cache is None else cache
    log(f"data: --cache {'on' if cache else 'off'} ({why}): the decoded images take {size_gib:.2f} GiB")
    return cache


def cache_splits(args, splits, rank, local_rank, device, output_dir, log):
    """CachedImages and usable rows of each (samples, layout) split, in DATA/.cache (the run's folder if that is
    not writable). Local rank 0 decodes; the other processes wait, then map its files."""
    source = Path(args.data) if args.data else Path(args.train_csv).parent
    shared = source / ".cache"  # not writable: DATA read-only, or .cache another user's
    folder = shared if os.access(shared if shared.exists() else source, os.W_OK) else Path(output_dir) / "cache"
    workers, waiting = cpu_cores(), patient_group()

    def build():
        return [build_cache(samples, *layout, folder, workers, log, args.strict) for samples, layout in splits]
    if local_rank == 0:
        try:
            built = build()
        except BaseException:
            agree_on_failure(True, waiting)
            raise
    if agree_on_failure(False, waiting):
        raise SystemExit(f"error: process {rank}: the process that decodes the images into the cache failed; "
                         "its error is in its output")
    built = built if local_rank == 0 else build()
    size = sum(images.nbytes for images, _, _ in built)
    log(f"data: decoded images cached in {folder} ({size / 2**30:.2f} GiB, reused while the files are unchanged)")
    report_other_caches(folder, [Path(images.filename) for images, _, _ in built], log)
    home = torch.device("cpu")
    if device.type == "cuda":  # resident when they take at most a quarter of the GPU's memory
        memory = torch.cuda.get_device_properties(device).total_memory
        home = device if size <= memory / 4 else home
        log(f"data: the cached images are {'copied to' if home.type == 'cuda' else 'too large for'} the GPU "
            f"(at most a quarter of its memory, {memory / 4 / 2**30:.1f} GiB)")
    return [(CachedImages(images, aspects, home), rows) for images, aspects, rows in built]


def report_other_caches(folder, in_use, log):
    """Says how much room the caches in `folder` of other versions of the data (or other sizes) take: left there,
    since another run may read them, they would fill the disk unseen."""
    stem = lambda path: path.name.split(".")[0]  # noqa: E731  32px-<key>, of every file of one cache
    in_use = {stem(path) for path in in_use}
    others = [path for path in Path(folder).iterdir() if stem(path) not in in_use]
    if others:
        log(f"data: {folder} also holds {len({stem(p) for p in others})} cache file(s) of other images or sizes "
            f"({sum(map(file_size, others)) / 2**30:.2f} GiB): delete them when no run reads them")


def file_size(path):
    """Its size in bytes; 0 for a file gone since it was listed (another run's cache build renames its files)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# -----------------------------------------------------------------------------
# decode once (--cache): every image decoded a single time into a uint8 array in a memory-mapped .npy file,
# reused by later runs while the files are unchanged and shared (through the page cache) by every process on the
# machine

CACHE_VERSION = 4  # bump when the way images are stored changes


def cache_key(samples, how):
    """Changes when a file, its class, or the way it is stored changes (size and mtime stand for content)."""
    digest = hashlib.sha1(f"{CACHE_VERSION} {how}".encode())
    for path, target in samples:
        stat = os.stat(path)
        digest.update(os.fsencode(path) + f"\0{target}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def build_cache(samples, side, resize, folder, workers=0, log=print, strict=False, chunk=256):
    """(images, aspects, usable rows): `samples` as store_image stores them, in a memory-mapped uint8 array
    [N, side, side, 3], folder/<side>px-<key>.npy, decoded by `workers` processes the first time."""
    path = Path(folder) / f"{side}px-{cache_key(samples, (side, resize))}.npy"
    if not path.exists():
        import fcntl  # POSIX only, like the rest of the cache
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            try:  # another job decoding the same files: wait for it, then use its file
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError:  # a file system without locks (Lustre mounted without flock): decode all the same
                pass
            if not path.exists():
                decode_into(path, DecodedImages(samples, side, resize), workers, log, chunk)
    bad = json.loads(path.with_suffix(".json").read_text())
    if bad:
        listing = "\n".join(f"  {why}" for _, why in bad)
        if strict:
            raise SystemExit(f"error: {len(bad)} image file(s) could not be decoded (--strict stops on them):\n"
                             f"{listing}")
        log(f"warning: skipping {len(bad)} image file(s) that could not be decoded:\n{listing}")
    usable = np.setdiff1d(np.arange(len(samples)), [i for i, _ in bad])
    # copy-on-write: writable, as torch.from_numpy wants; never written, so its pages stay the page cache's,
    # shared by every process that maps the file
    return np.load(path, mmap_mode="c"), np.load(path.with_suffix(".aspects")), usable


def open_cache_arrays(partial_path, aspects_path, images, mode):
    """The memory-mapped arrays of a cache build; new ones have their disk blocks allocated first."""
    # a full disk (or quota) would otherwise show while the map is written: a SIGBUS that kills without a message
    shape = (len(images), images.side, images.side, 3)
    try:
        arrays = (np.lib.format.open_memmap(partial_path, mode, np.uint8, shape),
                  np.lib.format.open_memmap(aspects_path, mode, np.float32, shape[:1]))
        if mode == "w+" and hasattr(os, "posix_fallocate"):  # macOS has none
            for path in (partial_path, aspects_path):
                with open(path, "r+b") as f:
                    os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
        return arrays
    except OSError as e:
        for path in (partial_path, aspects_path):
            path.unlink(missing_ok=True)
        raise SystemExit(f"error: no room for the decoded images ({math.prod(shape) / 2**20:,.0f} MiB) in "
                         f"{partial_path.parent} ({first_line(e)}): free disk space there, or train with "
                         "--no-cache") from None


def decode_into(path, images, workers, log, chunk):
    """Decodes `images` (a DecodedImages) into `path`, their aspect ratios into path.aspects, the list of
    undecodable ones into path.json."""
    # written as path.partial, with the count of images done saved after each chunk is on disk: an interrupted
    # build (an ImageNet-sized set takes an hour) goes on where it stopped. Renamed when complete: never half used.
    partial_path, progress = path.with_suffix(".partial"), path.with_suffix(".progress.json")
    done, bad = json.loads(progress.read_text()) if progress.exists() and partial_path.exists() else (0, [])
    array, aspects = open_cache_arrays(partial_path, path.with_suffix(".aspects"), images, "r+" if done else "w+")
    if done:
        log(f"data: the cache build of {path.name} goes on at image {done}/{len(images)}")
    chunks = [list(range(i, min(i + chunk, len(images)))) for i in range(done, len(images), chunk)]
    loader = DataLoader(images, batch_sampler=chunks, collate_fn=read_as_is, num_workers=workers)
    start, resumed_at = time.perf_counter(), done
    last_report = start
    for (batch, batch_aspects, rows, failures), rows_asked in zip(loader, chunks):
        array[rows.numpy()] = batch.numpy()  # an image that failed stays blank, and is listed
        aspects[rows.numpy()] = batch_aspects.numpy()
        array.flush(), aspects.flush()  # on disk before the progress says so
        bad += failures
        done += len(rows_asked)
        progress.with_suffix(".tmp").write_text(json.dumps([done, bad]))
        os.replace(progress.with_suffix(".tmp"), progress)
        if time.perf_counter() - last_report > 10 or done == len(images):
            last_report, rate = time.perf_counter(), (done - resumed_at) / (time.perf_counter() - start)
            eta = datetime.timedelta(seconds=round((len(images) - done) / rate))
            log(f"data: decoding into the cache: {done}/{len(images)} images, {rate:.0f} images/s, eta {eta}")
    del array, aspects
    path.with_suffix(".json").write_text(json.dumps(bad))
    os.replace(partial_path, path)
    progress.unlink()


# -----------------------------------------------------------------------------
# augmentation: one implementation, whatever the source. Each image's random numbers are a function of
# (seed, epoch, sample index): the same in any batch, process or worker, and after a resume.
#   on the training device, in whole batches: the crop (padded or resized) and the flip; MixUp and CutMix
#   on the training device, image by image: --auto-augment and --random-erase (torchvision's transforms)
#   in the loader processes: nothing; they only read (decode files, or gather cached rows)

AUTO_AUGMENT = {"ta_wide": "TrivialAugmentWide", "ra": "RandAugment", "augmix": "AugMix"}  # torchvision v2's


def augment_batch(images, aspects, rows, epoch, *, seed, crop, size, padding, min_scale, auto_augment=None,
                  random_erase=0.0):
    """A training batch of stored images (uint8 [N, H, W, 3] on the device, their aspect ratios, their sample
    indices) -> uint8 [N, 3, size, size]. crop "padded": shifts of up to `padding` px and a flip (the CIFAR recipe:
    small images have no detail to spare for zooming); "resized": RandomResizedCrop and a flip."""
    draws = to_device(hash_uniforms(seed, epoch, rows, 4), images.device)
    flips = to_device(alternating_flips(seed, epoch, rows), images.device)
    if crop == "padded":
        images = padded_crop_flip(images, draws, flips, padding)
    else:
        images = resized_crop_flip(images, aspects, draws, flips, size, min_scale)
    if auto_augment or random_erase:
        images = augment_each(images, [seed_from(seed, epoch, row) for row in rows], auto_augment, random_erase)
    return images


def hash_uniforms(seed, epoch, indices, count):
    """`count` uniform numbers in [0, 1) per sample index, a function of (seed, epoch, index) only."""
    # splitmix64 hashing, vectorised: a sample's augmentation does not depend on the batch or process it lands in
    x = np.asarray(indices, dtype=np.uint64)[:, None] * np.uint64(count) + np.arange(count, dtype=np.uint64)
    x = x + np.uint64(seed_from(seed, epoch))  # uint64 arrays wrap around silently: that is the point
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = (x ^ (x >> np.uint64(shift))) * np.uint64(mult)
    x = x ^ (x >> np.uint64(31))
    return torch.from_numpy((x >> np.uint64(40)).astype(np.float32) / 2.0**24)  # 24 bits: exact in float32, < 1


def alternating_flips(seed, epoch, indices):
    """Which images to mirror: a random half of them in even epochs, the other half in odd ones."""
    # airbench's alternating flip: every image is seen both ways in every two epochs, where a fresh coin toss
    # each epoch shows some images the same way several epochs running
    first = hash_uniforms(seed_from(seed, 2**32), 0, indices, 1)[:, 0] < 0.5  # a draw of its own, fixed for the run
    return first ^ (epoch % 2 == 1)


def reflect(positions, size):
    """Mirrors positions that fall outside 0..size-1 back inside, like reflect padding."""
    positions = positions.abs()
    return torch.where(positions >= size, 2 * (size - 1) - positions, positions)


def padded_crop_flip(images, draws, flips, pad):
    """Shifts each image by up to `pad` px each way (reflecting at the borders) and mirrors those where `flips` is
    True. images: [N, H, W, C] uint8 -> [N, C, H, W] (a channels_last view)."""
    n, h, w, _ = images.shape
    device = images.device
    shift = (draws[:, :2] * (2 * pad + 1)).floor().long() - pad
    rows = reflect(torch.arange(h, device=device) + shift[:, :1], h)
    cols = torch.arange(w, device=device).expand(n, w)
    cols = torch.where(flips[:, None], w - 1 - cols, cols)
    cols = reflect(cols + shift[:, 1:2], w)
    batch = torch.arange(n, device=device)[:, None, None]
    return images[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def resized_crop_flip(images, aspects, draws, flips, size, min_scale):
    """RandomResizedCrop (area share min_scale..1, width/height 3/4..4/3 of the original, whose aspect ratio is
    `aspects`) and a mirror where `flips` is True, as one bilinear grid_sample of the whole images squashed to
    squares. images: [N, S, S, C] uint8 -> [N, C, size, size] uint8."""
    area = min_scale + (1 - min_scale) * draws[:, 0]
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * draws[:, 1])
    width = (area * ratio / aspects).sqrt().clamp(max=1)  # shares of the original's width and height
    height = (area * aspects / ratio).sqrt().clamp(max=1)
    zero = torch.zeros_like(width)
    theta = torch.stack([torch.stack([width * torch.where(flips, -1.0, 1.0), zero, (2 * draws[:, 2] - 1) * (1 - width)],
                                     1), torch.stack([zero, height, (2 * draws[:, 3] - 1) * (1 - height)], 1)], 1)
    grid = F.affine_grid(theta, [len(images), 3, size, size], align_corners=False)
    crops = F.grid_sample(images.permute(0, 3, 1, 2).float(), grid, mode="bilinear", padding_mode="reflection",
                          align_corners=False)
    return crops.round_().clamp_(0, 255).to(torch.uint8)


def augment_each(images, seeds, auto_augment, random_erase):
    """torchvision's auto-augment policy and random erasing (to the mean colour), image by image, each seeded
    from its own seed."""
    from torchvision.transforms import v2  # imported when used: it takes 1.5 s
    steps = [getattr(v2, AUTO_AUGMENT[auto_augment])()] if auto_augment else []
    if random_erase:
        steps.append(v2.RandomErasing(random_erase, value=[round(255 * m) for m in IMAGENET_MEAN]))
    transform = v2.Compose(steps)
    device = images.device
    augmented = []
    # the transforms draw from the CPU's generator, and AugMix from the images' device's too: both seeded per
    # image, and left as they were for the caller
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        for image, seed in zip(images, seeds):
            seed_draws(seed, device.type)
            augmented.append(transform(image))
    return torch.stack(augmented)


def make_mix(mixup_alpha, cutmix_alpha, num_classes):
    """MixUp or CutMix, one of them at random per batch (after normalisation: both are linear), or None."""
    if not (mixup_alpha > 0 or cutmix_alpha > 0):
        return None
    from torchvision.transforms import v2  # imported when used: it takes 1.5 s
    mixes = [v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []
    mixes += [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else []
    return v2.RandomChoice(mixes)


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
