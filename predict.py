"""Classify images with a trained checkpoint; it needs nothing but the checkpoint.

    python predict.py img.jpg --ckpt runs/exp/best.pt
    python predict.py photos/ "more/*.png" --ckpt runs/exp/best.pt --topk 3 --json
    python predict.py img.jpg --ckpt runs/exp/best.pt --tta        # test-time augmentation, as evaluate.py's
    python predict.py img.jpg --ckpt runs/exp/best.torchscript    # an export of export.py (with its .json beside it)

The class names and the eval preprocessing (resize, crop, mean, std) come from the checkpoint, which
is loaded with weights_only=True: a checkpoint cannot run code on your machine.
"""
import argparse
import glob
import json
import os
import sys
from functools import partial
from pathlib import Path

import torch

import data
import export
import utils
from evaluate import batch_logits
from model import model_from_checkpoint


def expand_inputs(inputs):
    """Files, folders (searched recursively) and glob patterns -> sorted image paths."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(p for p in data.files_under(item) if data.is_image_file(os.path.basename(p)))
        elif os.path.isfile(item):
            paths.append(item)
        elif glob.has_magic(item):
            paths += sorted(p for p in glob.glob(item, recursive=True) if data.is_image_file(Path(p).name))
        else:
            raise SystemExit(f"error: {item} is not a file, a folder or a glob pattern that matches anything")
    if not paths:
        raise SystemExit(f"error: no image files in {' '.join(inputs)}")
    return paths


@torch.inference_mode()
def predict(model, paths, preprocess, device, batch_size=32, topk=5, threshold=None, amp="off", workers=0,
            tta=False):
    """[(path, [(class index, probability)] best first)] of the images that decode: the top-k classes, or with a
    threshold (multilabel models) every class whose probability reaches it. Images are read as evaluate.py reads
    them (data.eval_batches), in `workers` loader processes; a sample's target is its index in `paths`.
    tta: as evaluate.py --tta (evaluate.batch_logits, the forward pass of both)."""
    warn = partial(print, file=sys.stderr, flush=True)  # stdout is the results' (--json)
    samples = data.scan_images([(path, i) for i, path in enumerate(paths)], log=warn)
    loader = data.eval_batches(samples, preprocess, batch_size, device, workers)
    results = []
    for logits, indices in batch_logits(model, loader, device, preprocess, amp, False, tta):
        batch_paths = [paths[i] for i in indices.tolist()]
        if threshold is None:
            probs, classes = logits.softmax(1).topk(min(topk, logits.shape[1]), dim=1)
            results += [(path, list(zip(c, p))) for path, p, c in zip(batch_paths, probs.tolist(), classes.tolist())]
            continue
        for path, p in zip(batch_paths, logits.sigmoid().tolist()):
            results.append((path, sorted(((i, q) for i, q in enumerate(p) if q >= threshold), key=lambda x: -x[1])))
    return results


def load_for_prediction(path, device):
    """(model, classes, preprocess, multilabel, amp) of a checkpoint, or of an export.py file (the JSON beside it);
    amp: the autocast of evaluate.py (the run's where `device` computes it fast; an export runs as exported)."""
    meta_path = export.meta_path(path)
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("format", "torchscript") != "torchscript":
            raise SystemExit(f"error: {path} is an {meta['format']} export: predict.py runs checkpoints and "
                             "TorchScript exports (python export.py --ckpt CKPT); run ONNX files with onnxruntime")
        model = export.load_torchscript(path, device)
        return model, meta["classes"], meta["preprocess"], meta.get("multilabel", False), "off"
    checkpoint = utils.load_checkpoint(path)
    run = checkpoint["args"]
    return (model_from_checkpoint(checkpoint, path).to(device), checkpoint["classes"], checkpoint["preprocess"],
            run.get("task", "single") == "multilabel", utils.fast_amp(run["amp"], device))


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py, or a .torchscript file of export.py")
    p.add_argument("--topk", type=int, help="single-label: classes to show per image (default: 5)")
    p.add_argument("--threshold", type=float,
                   help="multilabel: every class with at least this probability (default: 0.5)")
    p.add_argument("-b", "--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("-j", "--workers", type=int, help="loader processes (default: as train.py)")
    p.add_argument("--device", help="cuda, cuda:N, mps or cpu (default: the best available)")
    p.add_argument("--amp", choices=list(utils.AMP_DTYPES),
                   help="autocast dtype (default: evaluate.py's, the run's where this device computes it fast)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation, as evaluate.py --tta")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    utils.check_ranges(parser, args, {"topk": "[1, inf)", "batch_size": "[1, inf)", "threshold": "[0, 1]",
                                      "workers": "[0, inf)"})
    paths = expand_inputs(args.inputs)
    device = utils.get_device(args.device)
    model, classes, preprocess, multilabel, amp = load_for_prediction(args.ckpt, device)
    warn = partial(print, file=sys.stderr)  # stdout is the results'
    utils.warn_if_emulated(args.amp or amp, device, warn)
    if multilabel and args.topk is not None:
        warn("warning: --topk does nothing with a multilabel model (--threshold picks the labels)")
    if not multilabel and args.threshold is not None:
        warn("warning: --threshold does nothing with a single-label model")
    threshold = (0.5 if args.threshold is None else args.threshold) if multilabel else None
    workers = data.default_workers(device) if args.workers is None else args.workers
    results = predict(model, paths, preprocess, device, args.batch_size, args.topk or 5, threshold, args.amp or amp,
                      workers, args.tta)
    if not results:
        raise SystemExit("error: none of the inputs could be read as an image")
    if args.json:
        print(json.dumps([{"path": path,
                           "predictions": [{"class": classes[i], "probability": round(p, 6)} for i, p in top]}
                          for path, top in results], indent=1))
    else:
        rows = [[path] + [f"{classes[i]} {p:.3f}" for i, p in top] for path, top in results]
        width = max(len(top) for _, top in results)
        header = [f"top-{k + 1}" if threshold is None else f"label {k + 1}" for k in range(width)]
        print(utils.printable(utils.format_table(rows, ["image"] + header)))
    return results


if __name__ == "__main__":
    main()
