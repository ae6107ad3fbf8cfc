"""Export a checkpoint to a file that runs without this code: TorchScript or ONNX.

    python export.py --ckpt runs/exp/best.pt                         # runs/exp/best.torchscript + .json beside it
    python export.py --ckpt runs/exp/best.pt --format onnx --dynamic-batch   # pip install onnx onnxscript; torch 2.7+
    python predict.py img.jpg --ckpt runs/exp/best.torchscript       # predict.py runs a TorchScript export too

The exported model takes a normalised float batch [N, 3, H, W] and returns logits. Beside it, <file>.json holds
what is needed to use it: the class names and the preprocessing (resize the short side to resize_size,
center-crop img_size, scale to 0..1, subtract mean, divide by std). The export is checked: its outputs on
a sample batch (of another size than traced, where the file takes any) are compared with PyTorch's and the largest
difference is printed.
"""
import argparse
import json
import warnings
from pathlib import Path

import torch

import utils
from model import model_from_checkpoint

TOLERANCE = {False: 1e-3, True: 5e-2}  # largest logit difference accepted for fp32 and for --half


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--format", default="torchscript", choices=["torchscript", "onnx"], help="(default: torchscript)")
    p.add_argument("--half", action="store_true", help="fp16 weights and inputs (for GPUs; CPUs run fp16 slowly)")
    p.add_argument("--dynamic-batch", action="store_true", help="ONNX: any batch size (TorchScript always accepts any)")
    p.add_argument("--batch-size", type=int, default=2, help="batch of the sample to export and check (default: 2)")
    p.add_argument("--device", default="cpu", help="where to export and check (default: cpu)")
    p.add_argument("--output", help="output file (default: beside the checkpoint, .torchscript or .onnx)")
    return p


def meta_path(path):
    return Path(f"{path}.json")  # best.torchscript -> best.torchscript.json: each export has its own


def export_torchscript(model, sample, path):
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export, but it is what runs everywhere
        warnings.simplefilter("ignore", FutureWarning)
        # no check_trace: it compares the graphs of two traces, which for torchvision's ViTs differ in the names
        # of values alone (an error); main compares the export's outputs with PyTorch's instead
        torch.jit.trace(model, sample, check_trace=False).save(str(path))
    loaded = load_torchscript(path, sample.device)
    return lambda x: loaded(x)


def load_torchscript(path, device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecation of torch.jit, as in export_torchscript
        return torch.jit.load(str(path), map_location=device)


def export_onnx(model, sample, path, dynamic_batch):
    try:
        import onnx  # noqa: F401  torch.onnx needs both
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"error: --format onnx needs the onnx and onnxscript packages ({e}): "
                         "pip install onnx onnxscript")
    dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None  # per input: dimension 0 may vary
    # the weights inside: one file that runs wherever it is copied; only past protobuf's 2 GiB limit beside it,
    # in <file>.data, which must then go with it
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30
    torch.onnx.export(model, (sample,), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_shapes=dynamic, dynamo=True, external_data=large)
    if large:
        print(f"note: the weights are in {path}.data, beside {path} (too large for one ONNX file): keep them together")
    try:
        import onnxruntime
    except ImportError:
        print("note: onnxruntime is not installed, so the ONNX file is checked with onnx.checker only")
        import onnx
        onnx.checker.check_model(str(path))
        return None
    session = onnxruntime.InferenceSession(str(path))
    return lambda x: torch.from_numpy(session.run(None, {"images": x.cpu().numpy()})[0])


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    utils.check_ranges(parser, args, {"batch_size": "[1, inf)"})
    checkpoint = utils.load_checkpoint(args.ckpt)
    device = utils.get_device(args.device)
    dtype = torch.float16 if args.half else torch.float32
    model = model_from_checkpoint(checkpoint, args.ckpt).to(device, dtype)
    size = checkpoint["preprocess"]["img_size"]
    sample = torch.randn(args.batch_size, 3, size, size, device=device, dtype=dtype)
    # a file that takes any batch is checked on another size than it was traced at: a size the trace kept as a
    # constant fails here, not in use
    any_batch = args.format == "torchscript" or args.dynamic_batch
    check = torch.randn(args.batch_size + any_batch, 3, size, size, device=device, dtype=dtype)
    suffix = ".torchscript" if args.format == "torchscript" else ".onnx"
    path = Path(args.output or Path(args.ckpt).with_suffix(suffix))
    if path.exists() and path.samefile(args.ckpt):
        parser.error(f"--output {path} is the checkpoint itself, which the export would replace: name another file")
    error = utils.create_folder(path.parent, "--output")
    if error:
        raise SystemExit(error)

    with torch.inference_mode():
        expected = model(check).float().cpu()
    if args.format == "torchscript":
        run_exported = export_torchscript(model, sample, path)
    else:
        run_exported = export_onnx(model, sample, path, args.dynamic_batch)
    meta = {"format": args.format, "classes": checkpoint["classes"], "preprocess": checkpoint["preprocess"],
            "model_name": checkpoint["model_name"],
            "multilabel": checkpoint["args"].get("task") == "multilabel",
            "input": f"float{16 if args.half else 32} [N, 3, {size}, {size}], normalised",
            "output": "logits [N, classes]"}
    meta_path(path).write_text(json.dumps(meta, indent=1))

    if run_exported is not None:
        with torch.inference_mode():
            difference = (run_exported(check).float().cpu() - expected).abs().max().item()
        print(f"exported {path}: largest difference from PyTorch {difference:.2e}, on a sample batch of {len(check)}")
        if difference > TOLERANCE[args.half]:
            raise SystemExit(f"error: the export differs from PyTorch by {difference:.2e} (> {TOLERANCE[args.half]})")
    print(f"wrote {path} and {meta_path(path)} (classes and preprocessing)")
    return path


if __name__ == "__main__":
    main()
