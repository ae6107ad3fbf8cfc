"""Evaluate a checkpoint on a split of an image folder: loss, top-1, top-k, per-class accuracy, confusion matrix.

    python evaluate.py --ckpt runs/exp/best.pt --data DATA              # DATA/val (same rules as training)
    python evaluate.py --ckpt runs/exp/best.pt --data DATA --split test --json metrics.json
    python evaluate.py --ckpt runs/exp/best.pt --data DATA --tta       # test-time augmentation: flips and shifts
    torchrun --nproc_per_node 2 evaluate.py --ckpt runs/exp/best.pt --data DATA

`evaluate()` is also what train.py calls after every epoch. Each process evaluates its own shard
(every image exactly once) and the counts are summed over processes.
"""
import argparse
import csv
import json
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import data
import utils
from model import model_from_checkpoint

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def autocast(device, amp):
    """Mixed precision context for "bf16" | "fp16" | "off"."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def tta_logits(model, images):
    """Test-time augmentation: the mean of the logits of the image and its mirror image, and for small images
    (64 px or less, where a pixel matters) of both shifted by 1/32 of the size diagonally each way."""
    views = [images, images.flip(3)]
    size = images.shape[-1]
    if size <= 64:
        pad = max(1, size // 32)
        padded = F.pad(images, (pad,) * 4, mode="reflect")
        for offset in (0, 2 * pad):  # up-left and down-right
            shifted = padded[..., offset:offset + size, offset:offset + size]
            views += [shifted, shifted.flip(3)]
    return torch.stack([model(view).float() for view in views]).mean(0)


@torch.inference_mode()
def evaluate(model, loader, device, num_classes, preprocess, amp="off", channels_last=False, topk=5, tta=False):
    """Sums over the whole (sharded) loader, reduced over processes. Returns plain numbers.
    tta: average the logits over flipped and shifted views (tta_logits)."""
    model.eval()
    ks = sorted({1, min(topk, num_classes)})  # top-5 of a 2-class problem is meaningless (and would crash)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros(len(ks), dtype=torch.int64, device=device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)  # [true, predicted]
    normalize = data.make_normalize(preprocess, device, channels_last)
    for images, targets in loader:
        images = normalize(images.to(device, non_blocking=True))
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = tta_logits(model, images) if tta else model(images).float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum")
        correct += utils.topk_correct(logits, targets, ks)
        confusion.index_put_((targets, logits.argmax(1)), torch.ones_like(targets), accumulate=True)
    for tensor in (loss_sum, correct, confusion):
        utils.all_reduce_sum(tensor)
    # one host sync for everything
    loss_sum, correct, confusion = loss_sum.item(), correct.tolist(), confusion.cpu()
    count = int(confusion.sum())
    per_class_count = confusion.sum(1)
    return {
        "count": count,
        "loss": loss_sum / max(count, 1),
        "top1": 100 * correct[0] / max(count, 1),
        "k": ks[-1],
        "topk": 100 * correct[-1] / max(count, 1),
        "per_class_count": per_class_count.tolist(),
        "per_class_top1": (100 * confusion.diag() / per_class_count.clamp(min=1)).tolist(),
        "confusion": confusion.tolist(),
    }


def format_report(metrics, classes):
    lines = [f"images {metrics['count']}  loss {metrics['loss']:.4f}  top-1 {metrics['top1']:.2f}%  "
             f"top-{metrics['k']} {metrics['topk']:.2f}%", "", "per-class top-1:"]
    rows = [[name, str(n), f"{acc:.2f}%"] for name, n, acc in
            zip(classes, metrics["per_class_count"], metrics["per_class_top1"])]
    lines += [utils.format_table(rows, ["class", "images", "top-1"]), "", "confusion matrix (rows: true, columns: predicted):"]
    short = [str(i) for i in range(len(classes))]
    rows = [[f"{i} {name}"] + [str(x) for x in row] for i, (name, row) in enumerate(zip(classes, metrics["confusion"]))]
    lines.append(utils.format_table(rows, ["true \\ predicted"] + short))
    return "\n".join(lines)


def write_csv(metrics, classes, path):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "images", "top1"] + [f"predicted:{name}" for name in classes])
        for name, n, acc, row in zip(classes, metrics["per_class_count"], metrics["per_class_top1"], metrics["confusion"]):
            writer.writerow([name, n, f"{acc:.4f}"] + row)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py (best.pt or last.pt)")
    parser.add_argument("--data", required=True, help="dataset folder with train/ and val/ or test/")
    parser.add_argument("--split", default="val", choices=["val", "test", "train"], help="which split (default: val)")
    parser.add_argument("-b", "--batch-size", type=int, default=None,
                        help="per process (default: the training batch size, so numbers match training's)")
    parser.add_argument("-j", "--workers", type=int, default=2, help="data loading processes per process (default: 2)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--amp", default=None, choices=list(AMP_DTYPES), help="mixed precision (default: the training run's)")
    parser.add_argument("--topk", type=int, default=5, help="k of top-k accuracy, capped at the number of classes (default: 5)")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation: average over flips (and 1/32-size shifts up to 64 px)")
    parser.add_argument("--json", default=None, help="also write all metrics to this JSON file")
    parser.add_argument("--csv", default=None, help="also write per-class accuracy and the confusion matrix to this CSV file")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        get_args_parser().error("--batch-size must be at least 1")
    rank, local_rank, world_size, device = utils.setup_distributed(args.device)
    log = utils.make_logger(enabled=rank == 0)

    checkpoint = utils.load_checkpoint(args.ckpt)
    classes, preprocess, train_args = checkpoint["classes"], checkpoint["preprocess"], checkpoint["args"]
    samples = data.split_samples(args.data, args.split, classes, train_args["val_fraction"], train_args["seed"], log)
    dataset = data.ImageDataset(samples, data.eval_transform(preprocess))
    loader = data.make_eval_loader(dataset, args.batch_size or train_args["batch_size"], args.workers, device,
                                   rank, world_size)

    model = model_from_checkpoint(checkpoint).to(device)
    channels_last = train_args["channels_last"]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    metrics = evaluate(model, loader, device, len(classes), preprocess, args.amp or train_args["amp"],
                       channels_last, args.topk, args.tta)

    log(f"{args.ckpt} on {args.data} ({args.split}{', with test-time augmentation' if args.tta else ''}):")
    log(format_report(metrics, classes))
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"ckpt": args.ckpt, "data": args.data, "split": args.split, "classes": classes, **metrics}, f, indent=1)
    if rank == 0 and args.csv:
        write_csv(metrics, classes, args.csv)
    utils.cleanup_distributed()
    return metrics


if __name__ == "__main__":
    main()
