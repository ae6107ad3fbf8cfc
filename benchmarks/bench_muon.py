"""Time and accuracy of Muon's orthogonalisation (train.orthogonalize) for one optimizer step of a model's filters,
against the plain Newton-Schulz iteration (x <- p(x x^T) x, five times) that it computes another way.

    python benchmarks/bench_muon.py                     # smallnet's filters, as --opt muon orthogonalises them
    python benchmarks/bench_muon.py --model smallnet_tiny

Each update is a random matrix of the filter's [out, in*k*k] shape whose singular values spread over
--decades powers of ten (momentum updates are far from full rank); the error is relative to the plain iteration
in float64. Times are the median of --repeats, each over every filter of the model.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import build_model, head_name  # noqa: E402
from train import NEWTON_SCHULZ, orthogonalize  # noqa: E402


def plain_iteration(matrix, dtype=torch.float32, steps=5):
    a, b, c = NEWTON_SCHULZ
    x = matrix.to(dtype) / (matrix.to(dtype).norm() + 1e-7)
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


def spread_matrix(shape, decades, generator):
    """A random matrix whose singular values run from 1 down to 10^-decades."""
    rank = min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], rank, generator=generator))[0]
    v = torch.linalg.qr(torch.randn(shape[1], rank, generator=generator))[0]
    return (u * torch.logspace(0, -decades, rank)) @ v.T


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smallnet", help="model whose filters are orthogonalised (default: smallnet)")
    p.add_argument("--decades", type=float, default=6, help="spread of the singular values (default: 6)")
    p.add_argument("--repeats", type=int, default=20, help="timed steps; the median is given (default: 20)")
    args = p.parse_args()
    model = build_model(args.model, 10, log=lambda *_: None)
    head = model.get_submodule(head_name(model)).weight
    shapes = [tuple(p.flatten(1).shape) for p in model.parameters() if p.requires_grad and p.ndim > 1 and p is not head]
    updates = [spread_matrix(shape, args.decades, torch.Generator().manual_seed(i)) for i, shape in enumerate(shapes)]
    print(f"{args.model}: {len(shapes)} filters, {', '.join('x'.join(map(str, s)) for s in shapes)}; "
          f"{torch.get_num_threads()} threads")
    for name, function in (("plain iteration", plain_iteration), ("train.orthogonalize", orthogonalize)):
        for update in updates:  # warm-up
            function(update)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for update in updates:
                function(update)
            times.append(time.perf_counter() - start)
        error = max(((function(u).double() - plain_iteration(u, torch.float64)).norm()
                     / plain_iteration(u, torch.float64).norm()).item() for u in updates)
        print(f"{name:20s} {1000 * statistics.median(times):6.1f} ms a step (median of {args.repeats}), "
              f"largest relative error against float64 {error:.1e}")


if __name__ == "__main__":
    main()
