"""Images per second and peak memory of four ways to train the same model on the same images.

    python benchmarks/bench_train.py --data /path/to/cifar10-dev                     # smallnet, 32 px
    python benchmarks/bench_train.py --data /path/to/cifar10-dev --model resnet18 --img-size 128 -b 64 \\
        --train-images 2000 --runs bare,per-image

  (1) bare       forward/backward/step on one batch already in memory: the compute alone
  (2) per-image  train.py --no-cache: decoded per image (loader processes as train.py chooses), augmented in
                 batches on the device
  (3) cache      train.py --cache: decoded once into a memory-mapped file, then the same augmentation
  (4) naive      torchvision ImageFolder + DataLoader + PIL transforms, fp32, as a first script would be written
  cache-ddp      (3) as two processes under torchrun (for its memory: the cached file is shared, not doubled)

Each runs in a process of its own; its memory is the peak of the summed PSS of its process tree (shared pages
counted once), and apart the part of it that is the mapped cache files (*.npy): shared through the page cache,
it stays the files' size however many processes read them. train.py's figure is the images/s of its last
epoch (loop only, evaluation excluded). --device cuda times the same on a GPU (the bare loop synchronises).
One window of a run varies by 10% from one run to the next, so each is repeated (--repeats) in turns with the
others, and the median is reported.
"""
import argparse
import csv
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="an image folder with train/<class>/ and val/<class>/")
    p.add_argument("--model", default="smallnet", help="model name (default: smallnet)")
    p.add_argument("--img-size", type=int, default=32, help="training image size (default: 32)")
    p.add_argument("-b", "--batch-size", type=int, default=256, help="batch size (default: 256)")
    p.add_argument("--train-images", type=int, default=10000,
                   help="training images used, taken evenly from the classes (default: 10000)")
    p.add_argument("-j", "--workers", type=int, default=None,
                   help="loader workers of (2) per-image (default: train.py's choice)")
    p.add_argument("--epochs", type=int, default=2, help="train.py epochs; the last one is timed (default: 2)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu, for every run (default: the best available)")
    p.add_argument("--runs", default="bare,per-image,cache,naive",
                   help="which of bare,per-image,cache,naive,cache-ddp to run (default: the first four)")
    p.add_argument("--repeats", type=int, default=3,
                   help="times each run is repeated, in turns; the median speed is reported (default: 3)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: run one in-process loop and print img/s
    return p.parse_args()


# -----------------------------------------------------------------------------
# the two loops that are not train.py

def bare_loop(args, device, steps=30, warmup=5):
    """train.py's numerics (its default autocast, channels_last, TF32 and cudnn autotuning on CUDA, fused SGD on CUDA,
    foreach elsewhere) on one batch that never changes: no data, no bookkeeping."""
    import torch
    sys.path.insert(0, str(ROOT))
    import utils
    from model import build_model
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = build_model(args.model, 10, log=lambda *_: None).to(device, memory_format=torch.channels_last)
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, **fast)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 10, (args.batch_size,), device=device)
    steps = steps * (10 if device.type == "cuda" else 1)  # GPU steps are short: more of them for a steady figure
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        with utils.autocast(device, utils.native_amp(device)):
            loss = torch.nn.functional.cross_entropy(model(images).float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)  # the GPU runs behind the host: wait for it before reading the clock
    return steps * args.batch_size / (time.perf_counter() - start)


def synchronize(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive_loop(args, data_dir, device):
    """What a first training script looks like: ImageFolder, PIL transforms, DataLoader(num_workers=2), fp32."""
    import torch
    from torchvision import datasets, transforms
    sys.path.insert(0, str(ROOT))
    from model import build_model
    transform = transforms.Compose([
        transforms.Resize(args.img_size), transforms.RandomCrop(args.img_size, padding=args.img_size // 8),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    dataset = datasets.ImageFolder(Path(data_dir) / "train", transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=2,
                                         drop_last=True)
    model = build_model(args.model, len(dataset.classes), log=lambda *_: None).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    seen, start = 0, None
    for i, (images, targets) in enumerate(loader):
        if i == 1:  # the first batch waits for the workers to start
            seen, start = 0, time.perf_counter()
        images, targets = images.to(device), targets.to(device)
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(images)
    synchronize(device)
    return seen / (time.perf_counter() - start)


# -----------------------------------------------------------------------------
# measuring a process tree

def tree_pss_bytes(pid):
    """Summed proportional set size of a process and its descendants (shared pages split between them), in all
    and of the mapped cache files (*.npy) alone: the second shows whether several processes double the data."""
    children = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(proc.name))
            except (OSError, IndexError, ValueError):
                pass
    total, cached, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            in_cache_file = False
            for line in Path(f"/proc/{p}/smaps").read_text().splitlines():
                if not line[0].isupper():  # a mapping's header: address range, permissions, ..., path
                    in_cache_file = line.endswith(".npy")
                elif line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    cached += int(line.split()[1]) * 1024 if in_cache_file else 0
        except OSError:
            pass
    return total, cached


def run_measured(cmd):
    """Runs cmd; returns (stdout, (peak memory, peak memory of the mapped cache files) in bytes)."""
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0, 0]

    def sample():
        while process.poll() is None:
            peak[:] = map(max, peak, tree_pss_bytes(process.pid))
            # reading smaps walks the process's page tables and holds it up: 5 reads a second cost it 10% of its speed
            time.sleep(1.0)
    sampler = threading.Thread(target=sample)
    sampler.start()
    output = process.communicate()[0]
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{output}")
    return output, tuple(peak)


def subset_folder(data_dir, train_images, tmp):
    """A folder of links to `train_images` training images, taken evenly from the classes, and 1,000 val images."""
    for split, count in (("train", train_images), ("val", 1000)):
        classes = sorted(d.name for d in (Path(data_dir) / split).iterdir() if d.is_dir())
        for name in classes:
            (tmp / split / name).mkdir(parents=True)
            files = sorted((Path(data_dir) / split / name).iterdir())[: count // len(classes)]
            for f in files:
                (tmp / split / name / f.name).symlink_to(f.resolve())
    return tmp


def measure(name, args, data_dir, out_dir):
    common = ["--model", args.model, "--img-size", str(args.img_size), "-b", str(args.batch_size),
              "--device", args.device]
    if name in ("bare", "naive"):
        cmd = [sys.executable, __file__, "--only", name, "--data", str(data_dir), *common]
        output, peak = run_measured(cmd)
        return float(output.strip().splitlines()[-1]), peak
    run_dir = out_dir / name
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] if name == "cache-ddp" else []
    # --opt sgd: the optimizer of the bare loop, so that what differs is the data pipeline
    cmd = [sys.executable, *launcher, str(ROOT / "train.py"), "--data", str(data_dir), *common, "--opt", "sgd",
           "--epochs", str(args.epochs), "--no-cache" if name == "per-image" else "--cache",
           "--output-dir", str(run_dir)]
    if name == "per-image" and args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    output, peak = run_measured(cmd)
    with open(run_dir / "results.csv") as f:
        return float(list(csv.DictReader(f))[-1]["images_per_s"]), peak


def main():
    args = get_args()
    if args.device is None:
        sys.path.insert(0, str(ROOT))
        from utils import default_device
        args.device = default_device()
    if args.only:
        import torch
        device = torch.device(args.device)
        loop = bare_loop(args, device) if args.only == "bare" else naive_loop(args, args.data, device)
        print(f"{loop:.1f}")
        return
    runs = args.runs.split(",")
    measured = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = subset_folder(args.data, args.train_images, Path(tmp) / "data")
        # in turns (1 2 3 4 1 2 3 4 ...), so that a slow minute of the machine does not fall on one run alone
        for repeat, name in itertools.product(range(args.repeats), runs):
            measured[name].append(measure(name, args, data_dir, Path(tmp) / f"runs{repeat}"))
            speed, (peak, cached) = measured[name][-1]
            print(f"{name:9s} {speed:8.1f} img/s  peak memory {peak / 2**30:.2f} GiB, of it cache files "
                  f"{cached / 2**30:.2f} GiB", flush=True)
        sys.path.insert(0, str(ROOT))
        import data  # the stored side: train.py's default crop, padded up to 64 px, resized above
        paths = [str(p) for p in (data_dir / "train").rglob("*.*")]
        side = args.img_size if args.img_size <= 64 else data.whole_image_side(paths, args.img_size, 0.25)
        decoded = args.train_images * side ** 2 * 3
    print(f"\n{args.model}, {args.img_size} px, batch {args.batch_size}, {args.train_images} training images, "
          f"{os.cpu_count()} cores, {args.device}, decoded training set {decoded / 2**30:.3f} GiB")
    print(f"{'run':10s}{'img/s':>10s}{'(spread)':>18s}{'peak GiB':>10s}{'of it cache files':>19s}")
    results = {}
    for name, repeats in measured.items():
        speeds = [speed for speed, _ in repeats]
        peak, cached = (max(peaks[i] for _, peaks in repeats) for i in (0, 1))
        results[name] = statistics.median(speeds)
        spread = f"{min(speeds):.1f}-{max(speeds):.1f}"
        print(f"{name:10s}{results[name]:10.1f}{spread:>18s}{peak / 2**30:10.2f}{cached / 2**30:19.2f}")
    for a, b in (("per-image", "bare"), ("cache", "bare"), ("cache", "naive")):
        if a in results and b in results:
            print(f"({a})/({b}) = {results[a] / results[b]:.2f}")


if __name__ == "__main__":
    main()
