"""Time to accuracy, measured as the README's Results measure it. Per seed: DATA/.cache deleted (so decoding counts),
`train.py` run in a new process, then `evaluate.py --tta` on its last.pt (the final epoch, chosen by nothing).
Prints each run's val top-1 and wall times, then their means. Flags after `--` go to train.py. Run it alone: it
deletes DATA/.cache, which another run may be building, and its times want the machine to themselves.

    python benchmarks/time_to_accuracy.py --data cifar10-dev --seeds 0 1 -- --epochs 17
    python benchmarks/time_to_accuracy.py --data cifar10-dev --seeds 0 1 --target 91 -- --epochs 17 --tta

--target: the run's time at the end of the first epoch whose val top-1 reaches it (results.csv's `time`: from the
start of train.py's work, decoding included, Python's start not). With train.py's --tta each epoch's figure is with
TTA; that costs an evaluation of 6 views an epoch, little on a GPU.
"""
import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_run(command):
    """Runs a Python script (its output passes through); returns its wall time in seconds, or stops if it fails."""
    start = time.perf_counter()
    command = [sys.executable, *map(str, command)]
    if subprocess.run(command).returncode:
        raise SystemExit(f"error: {' '.join(command[1:])} failed: its output is above")
    return time.perf_counter() - start


def measure(data, seed, run_dir, train_flags, target):
    """One seed's figures: val top-1 of the last epoch (results.csv), with TTA (evaluate.py), the wall times, and
    the time at which val top-1 first reached `target` (None: never, or no target)."""
    shutil.rmtree(Path(data) / ".cache", ignore_errors=True)
    train_s = timed_run([ROOT / "train.py", "--data", data, "--seed", seed, "--output-dir", run_dir, *train_flags])
    report = run_dir / "last_tta.json"
    eval_s = timed_run([ROOT / "evaluate.py", "--ckpt", run_dir / "last.pt", "--data", data, "--tta", "--json", report])
    with open(run_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    reached = next((float(row["time"]) for row in rows if target and float(row["val_top1"]) >= target), None)
    return {"seed": seed, "top1": float(rows[-1]["val_top1"]), "tta_top1": json.loads(report.read_text())["top1"],
            "train_s": train_s, "total_s": train_s + eval_s, "target_s": reached}


def minutes(seconds):
    return "-" if seconds is None else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def table_line(name, figures):
    return (f"{name:>4}  {figures['top1']:6.2f}  {figures['tta_top1']:6.2f}  {minutes(figures['train_s']):>12}  "
            f"{minutes(figures['total_s']):>13}  {minutes(figures.get('target_s'))}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset folder, as train.py's --data")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (default: 0)")
    p.add_argument("--target", type=float, help="val top-1 (%%) whose time to report (default: none)")
    p.add_argument("--output-dir", default="runs/time-to-accuracy",
                   help="runs go to DIR/seed<N> (default: %(default)s)")
    p.add_argument("train_flags", nargs="*", help="after --: train.py's flags (--epochs 17, ...)")
    args = p.parse_args()
    results = [measure(args.data, seed, Path(args.output_dir) / f"seed{seed}", args.train_flags, args.target)
               for seed in args.seeds]
    print(f"\ntrain.py --data {args.data} {' '.join(args.train_flags)}; then evaluate.py --tta on last.pt")
    print(f"{'seed':>4}  {'top-1':>6}  {'TTA':>6}  {'train':>12}  {'with TTA eval':>13}  to {args.target or '-'}%")
    for figures in results:
        print(table_line(figures["seed"], figures))
    print(table_line("mean", {key: statistics.mean(r[key] for r in results)
                              for key in ("top1", "tta_top1", "train_s", "total_s")}))


if __name__ == "__main__":
    main()
