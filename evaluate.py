"""Evaluate a checkpoint on a split of an image folder: loss, top-1, top-k, per-class accuracy, confusion matrix.

    python evaluate.py --ckpt runs/exp/best.pt --data DATA              # DATA/val (same rules as training)
    python evaluate.py --ckpt runs/exp/best.pt --data DATA --split test --json metrics.json
    python evaluate.py --ckpt runs/exp/best.pt --data DATA --tta       # test-time augmentation: flips and shifts
    python evaluate.py --ckpt runs/exp/best.pt --data held_out/        # held_out/<class>/*.jpg, no train/
    python evaluate.py --ckpt runs/exp/best.pt --val-csv val.csv       # the run's --train-csv: the rows it held out
    torchrun --nproc_per_node 2 evaluate.py --ckpt runs/exp/best.pt --data DATA

`evaluate()` is also what train.py calls after every epoch. Each process evaluates its own shard
(every image exactly once) and the counts are summed over processes.
"""
import argparse
import csv
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import utils
from model import model_from_checkpoint


def tta_logits(model, images):
    """Test-time augmentation: the mean logits of the image and its mirror image, and for small images (64 px or
    less, where a pixel matters) of both shifted by 1/32 of the size diagonally each way."""
    views = [images, images.flip(3)]
    size = images.shape[-1]
    if size <= 64:
        pad = max(1, size // 32)
        padded = F.pad(images, (pad,) * 4, mode="reflect")
        for offset in (0, 2 * pad):  # up-left and down-right
            shifted = padded[..., offset:offset + size, offset:offset + size]
            views += [shifted, shifted.flip(3)]
    return torch.stack([model(view).float() for view in views]).mean(0)


def batch_logits(model, loader, device, preprocess, amp, channels_last, tta):
    """(float32 logits, targets) of every batch of the loader, on the device: the loop both metrics share."""
    model.eval()
    normalize = data.make_normalize(preprocess, device, channels_last)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)  # float16 for an `export.py --half` file
    for images, targets in loader:
        images = normalize(data.to_device(images, device)).to(dtype)
        with utils.autocast(device, amp):
            logits = tta_logits(model, images) if tta else model(images)
        yield logits.float(), data.to_device(targets, device)


@torch.inference_mode()
def evaluate(model, loader, device, num_classes, preprocess, amp="off", channels_last=False, topk=5, tta=False):
    """Metrics over the whole (sharded) loader, summed over processes, as plain numbers. tta: see tta_logits."""
    k = topk if 1 < topk < num_classes else None  # top-2 of 2 classes is 100% whatever the model: not shown
    ks = [1, k] if k else [1]
    loss_sum = torch.zeros((), dtype=utils.sum_dtype(device), device=device)
    correct = torch.zeros(len(ks), dtype=torch.int64, device=device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)  # [true, predicted]
    for logits, targets in batch_logits(model, loader, device, preprocess, amp, channels_last, tta):
        loss_sum += F.cross_entropy(logits, targets, reduction="sum")
        hits = logits.topk(ks[-1], dim=1).indices == targets[:, None]  # [N, k]: where the target is
        correct += torch.stack([hits[:, :k].any(1).sum() for k in ks])
        confusion.index_put_((targets, logits.argmax(1)), torch.ones_like(targets), accumulate=True)
    for tensor in (loss_sum, correct, confusion):
        utils.all_reduce(tensor)
    # one host sync for everything
    loss_sum, correct, confusion = loss_sum.item(), correct.tolist(), confusion.cpu()
    count = int(confusion.sum())
    per_class_count = confusion.sum(1)
    top1 = 100 * correct[0] / max(count, 1)
    topk = 100 * correct[-1] / max(count, 1) if k else None
    return {"count": count, "loss": loss_sum / max(count, 1), "top1": top1, "k": k, "topk": topk,
            "per_class_count": per_class_count.tolist(), "confusion": confusion.tolist(),
            "per_class_top1": percentages(confusion.diag(), per_class_count),
            # what train.py selects best.pt by, logs and writes to results.csv
            "score": top1, "summary": f"top-1 {top1:.2f}%" + (f" top-{k} {topk:.2f}%" if k else ""),
            "columns": {"val_top1": top1, "val_top5": topk}}


@torch.inference_mode()
def evaluate_multilabel(model, loader, device, num_classes, preprocess, amp="off", channels_last=False, topk=5,
                        tta=False, threshold=0.5):
    """Multilabel metrics: F1 (micro and macro), mAP, per-class precision and recall at `threshold`."""
    # average precision needs every score, so the shards are gathered (one exchange)
    scores, labels = [], []
    for logits, targets in batch_logits(model, loader, device, preprocess, amp, channels_last, tta):
        scores.append(logits)
        labels.append(targets.float())
    scores = torch.cat(scores) if scores else torch.zeros(0, num_classes, device=device)
    labels = torch.cat(labels) if labels else torch.zeros(0, num_classes, device=device)
    scores, labels = torch.cat(utils.all_gather(scores.cpu())), torch.cat(utils.all_gather(labels.cpu()))
    # summed over an image's labels, averaged over the images: training's loss (train.make_criterion)
    loss = F.binary_cross_entropy_with_logits(scores, labels, reduction="sum").item() / max(len(scores), 1)
    predicted, truth = scores.sigmoid() >= threshold, labels > 0.5
    tp, fp, fn = (predicted & truth).sum(0), (predicted & ~truth).sum(0), (~predicted & truth).sum(0)
    f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
    present = truth.any(0)  # classes without a positive image have no recall, F1 or AP to speak of
    micro_f1 = 100 * 2 * tp.sum().item() / max(1, (2 * tp + fp + fn).sum().item())
    macro_f1 = 100 * f1[present].mean().item() if present.any() else 0.0
    mean_ap = 100 * average_precision(scores, truth)[present].mean().item() if present.any() else 0.0
    return {"count": len(scores), "loss": loss, "threshold": threshold, "f1": micro_f1, "macro_f1": macro_f1,
            "map": mean_ap, "per_class_count": truth.sum(0).tolist(), "per_class_precision": percentages(tp, tp + fp),
            "per_class_recall": percentages(tp, tp + fn), "score": micro_f1,
            "summary": f"F1 {micro_f1:.2f}% (macro {macro_f1:.2f}%) mAP {mean_ap:.2f}%",
            "columns": {"val_f1": micro_f1, "val_macro_f1": macro_f1, "val_map": mean_ap}}


def percentages(parts, wholes):
    """100 * part / whole for each class, or None where the whole is 0: a class with no image to score has no
    accuracy, which 0% would misreport as every image wrong."""
    return [100 * part / whole if whole else None for part, whole in zip(parts.tolist(), wholes.tolist())]


def average_precision(scores, truth):
    """Per class: the mean, over its positive images, of the precision among the images scored at least as high
    (sklearn's: images with equal scores rank together, whatever their order; bf16 logits tie often)."""
    scores, order = scores.sort(0, descending=True)
    relevant = truth.gather(0, order).float()
    last_of_tie = torch.ones_like(scores, dtype=torch.bool)
    last_of_tie[:-1] = scores[:-1] != scores[1:]
    rank = torch.arange(len(scores)).unsqueeze(1).expand_as(scores)
    tie_end = torch.where(last_of_tie, rank, len(scores) - 1).flip(0).cummin(0).values.flip(0)  # of each one's tie
    precision_at = relevant.cumsum(0).gather(0, tie_end) / (tie_end + 1)
    return (precision_at * relevant).sum(0) / relevant.sum(0).clamp(min=1)


EVALUATE = {"single": evaluate, "multilabel": evaluate_multilabel}


def per_class_rows(metrics, classes):
    """(header, rows) of the per-class figures: precision and recall (multilabel), or top-1 and the confusion row."""
    if "f1" in metrics:
        return ["class", "positives", "precision", "recall"], [list(row) for row in zip(
            classes, metrics["per_class_count"], metrics["per_class_precision"], metrics["per_class_recall"])]
    return ["class", "images", "top1"] + [f"predicted:{name}" for name in classes], [
        [name, n, acc, *row] for name, n, acc, row in
        zip(classes, metrics["per_class_count"], metrics["per_class_top1"], metrics["confusion"])]


REPORT_MATRIX_UP_TO = 20  # classes: a wider confusion matrix does not fit a terminal (--csv and --plot draw any)


def format_report(metrics, classes):
    header, rows = per_class_rows(metrics, classes)
    rows = [[f"{x:.2f}%" if isinstance(x, float) else "-" if x is None else str(x) for x in row] for row in rows]
    line = f"images {metrics['count']}  loss {metrics['loss']:.4f}  {metrics['summary']}"
    if "f1" in metrics:
        return "\n".join([f"{line}  (threshold {metrics['threshold']})", "", "per class:",
                          utils.format_table(rows, header)])
    rows = [[f"{i} {row[0]}", *row[1:]] for i, row in enumerate(rows)]  # predicted classes by number: narrow columns
    header = ["true class", "images", "top-1"] + [str(i) for i in range(len(classes))]
    title = "per-class top-1 and confusion matrix (rows: true, columns: predicted):"
    if len(classes) > REPORT_MATRIX_UP_TO:
        rows = [[*row[:3], mistaken_for(i, counts, classes)] for i, (row, counts) in
                enumerate(zip(rows, metrics["confusion"]))]
        header = header[:3] + ["most often predicted instead"]
        title = "per-class top-1 and the class most often predicted instead (the whole matrix: --csv, --plot):"
    return "\n".join([line, "", title, utils.format_table(rows, header)])


def mistaken_for(true, counts, classes):
    """"name (share)" of the wrong class predicted most often for images of class `true`, or "" if none was."""
    wrong = max((j for j in range(len(counts)) if j != true), key=counts.__getitem__)
    return f"{classes[wrong]} ({100 * counts[wrong] / sum(counts):.0f}%)" if counts[wrong] else ""


def write_csv(metrics, classes, path):
    header, rows = per_class_rows(metrics, classes)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def csv_split(samples, split, path, checkpoint, log):
    """The samples of a CSV to evaluate: all, or for the run's own --train-csv (known by its files, or its path)
    the split the run made of it: the rows it held out (--split val) or those it trained on (--split train)."""
    train_args, digests = checkpoint["args"], checkpoint.get("files")  # no digests: a run of older code
    held_out = train_args.get("val_csv") is None  # the run validated on --val-fraction of its --train-csv's rows
    train, val = data.stratified_split(samples, train_args["val_fraction"], train_args["seed"]) if held_out else (
        samples, [])
    same_files = digests is not None and data.files_digest(train) == digests["train"]
    same_path = bool(train_args.get("train_csv")) and Path(train_args["train_csv"]).resolve() == Path(path).resolve()
    if not (same_files or same_path):
        if split != "val":
            raise SystemExit(f"error: --split {split}: {path} is not the run's --train-csv, whose splits --split "
                             "picks; leave --split out to evaluate on all of it")
        return samples
    if digests is not None and not same_files:
        log(f"warning: the rows of {path}, the run's --train-csv, changed since the run (files added, removed or "
            "renamed): the split below is not the run's and may hold images the model trained on")
    if split == "val" and not held_out:
        log(f"warning: {path} is the run's --train-csv: the model trained on every image in it")
        return samples
    chosen, what = (train, "it trained on") if split == "train" else (val, "it held out for validation")
    log(f"data: {path} is the run's --train-csv: evaluating on the {len(chosen)} rows {what} (--split)")
    return chosen


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (best.pt or last.pt)")
    p.add_argument("--data", help="dataset folder: train/ and val/ (valid/) or test/, or a held-out set alone")
    p.add_argument("--val-csv", help="instead of --data: a CSV of images and labels (the training run's columns)")
    p.add_argument("--split", default="val", choices=["val", "test", "train"],
                   help="which split of --data or of the run's --train-csv (default: val)")
    p.add_argument("-b", "--batch-size", type=int, help="per process (default: the training batch size)")
    p.add_argument("-j", "--workers", type=int, help="loader processes per process (default: as train.py)")
    p.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: the best available)")
    p.add_argument("--amp", choices=list(utils.AMP_DTYPES),
                   help="autocast dtype (default: the training run's where this device computes it fast)")
    p.add_argument("--topk", type=int, default=5, help="k of top-k accuracy, shown below the classes (default: 5)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: flips (and shifts up to 64 px)")
    p.add_argument("--plot", help="also draw the normalised confusion matrix into this PNG file")
    p.add_argument("--json", help="also write all metrics to this JSON file")
    p.add_argument("--csv", help="also write per-class accuracy and the confusion matrix to this CSV file")
    return p


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if (args.data is None) == (args.val_csv is None):
        parser.error("give one of --data and --val-csv")
    if args.val_csv and args.split == "test":
        parser.error("--split test is DATA/test: a --val-csv is the set itself")
    utils.check_ranges(parser, args, {"batch_size": "[1, inf)", "workers": "[0, inf)", "topk": "[1, inf)"})
    for flag, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)):
        if path and Path(path).exists() and Path(path).samefile(args.ckpt):
            parser.error(f"{flag} {path} is the checkpoint itself, which the report would replace: name another file")
        error = path and utils.create_folder(Path(path).parent, flag)  # into new folders, as train.py's --output-dir
        if error:
            raise SystemExit(error)
    rank, local_rank, world_size, device = utils.setup_distributed(args.device)
    log = utils.make_logger(enabled=rank == 0)

    checkpoint = utils.load_checkpoint(args.ckpt)
    classes, preprocess, train_args = checkpoint["classes"], checkpoint["preprocess"], checkpoint["args"]
    ignore = data.parse_class_list(train_args.get("ignore_classes")) or []  # the run's, like its classes
    if args.val_csv:
        columns = (train_args.get("image_column", "image"), train_args.get("label_column", "label"),
                   train_args.get("label_delimiter"))
        multilabel = train_args.get("task") == "multilabel"
        rows = data.read_labelled_csv(args.val_csv, columns, data.parse_class_list(train_args.get("classes")), ignore,
                                      multilabel, log)
        samples = data.scan_images(data.index_labels(rows, classes, args.val_csv, multilabel), log=log)
        samples = csv_split(samples, args.split, args.val_csv, checkpoint, log)
    else:
        samples = data.split_samples(args.data, args.split, classes, train_args["val_fraction"], train_args["seed"],
                                     log, ignore=ignore)
        run_val, digest = checkpoint.get("files", {}).get("val"), data.files_digest(samples)  # None: older code
        carved = args.split == "val" and data.find_val_dir(args.data) is None and Path(args.data, "train").is_dir()
        if carved and run_val not in (None, digest):
            log(f"warning: the val split carved from {args.data}/train is not the run's (files were added, removed "
                "or renamed since): it may hold images the model trained on")
        called_test = args.split == "test" or Path(args.data).resolve().name == "test"
        if called_test and run_val == digest:
            log("warning: these test images are the ones the run validated on, and chose best.pt by (a dataset "
                "without val/ is validated on test/): this is no held-out figure; for one, train with a val/ folder")
    if not samples:
        raise SystemExit(f"error: no usable images in {args.val_csv or f'the {args.split} split of {args.data}'}")
    workers = data.default_workers(device) if args.workers is None else args.workers
    loader = data.eval_batches(samples, preprocess, args.batch_size or train_args["batch_size"], device, workers, rank,
                               world_size)

    model = model_from_checkpoint(checkpoint, args.ckpt).to(device)
    channels_last = train_args["channels_last"]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    task = train_args.get("task", "single")
    amp = args.amp or utils.fast_amp(train_args["amp"], device)  # a run trained where bf16 is fast, evaluated where not
    utils.warn_if_emulated(amp, device, log)
    metrics = EVALUATE[task](model, loader, device, len(classes), preprocess, amp, channels_last, args.topk, args.tta)

    split = f" ({args.split})" if args.data and Path(args.data, "train").is_dir() else ""  # else the folder is the set
    log(f"{args.ckpt} on {args.data or args.val_csv}{split}{', with test-time augmentation' if args.tta else ''}:")
    log(format_report(metrics, classes))
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"ckpt": args.ckpt, "data": args.data, "split": args.split, "classes": classes, **metrics}, f,
                      indent=1)
    if rank == 0 and args.csv:
        write_csv(metrics, classes, args.csv)
    if rank == 0 and args.plot and task == "single":
        utils.plot_confusion(metrics["confusion"], classes, args.plot)
    utils.cleanup_distributed()
    return metrics


if __name__ == "__main__":
    main()
