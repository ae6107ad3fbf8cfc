"""Training images/s of one model in float32 and in bf16 autocast, on this CPU as it is and as oneDNN runs it when
capped to an older instruction set (ONEDNN_MAX_CPU_ISA): why train.py's --amp is bf16 only on CPUs with bf16
instructions (utils.native_amp).

    python benchmarks/bench_amp.py                    # smallnet, 32 px, batch 256
    python benchmarks/bench_amp.py --model resnet18 --img-size 128 -b 64
    python benchmarks/bench_amp.py --isas AVX2 --fp16 --repeats 1     # fp16 too, where it takes minutes, not hours

  AVX2              a CPU without AVX-512: most laptops and desktops, AMD before Zen 4
  AVX512_CORE       AVX-512 without bf16: Xeon Skylake and Cascade Lake
  AVX512_CORE_BF16  AVX-512 with bf16 instructions (AVX512-BF16): Xeon Cooper Lake, AMD Zen 4
  ALL               this CPU as it is (with AMX: Xeon since Sapphire Rapids)

A cap can only take instructions away: the rows above this CPU's own are what it has. Each figure is the median of
--repeats runs, each in a process of its own.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ISAS = ["AVX2", "AVX512_CORE", "AVX512_CORE_BF16", "ALL"]


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smallnet", help="model name (default: smallnet)")
    p.add_argument("--img-size", type=int, default=32, help="image size (default: 32)")
    p.add_argument("-b", "--batch-size", type=int, default=256, help="batch size (default: 256)")
    p.add_argument("--steps", type=int, default=4, help="timed steps, after 2 untimed ones (default: 4)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each, in turns; the median is given (default: 3)")
    p.add_argument("--isas", default=",".join(ISAS), help=f"oneDNN caps to run (default: {','.join(ISAS)})")
    p.add_argument("--fp16", action="store_true", help="also fp16 autocast (emulated on most CPUs: very slow)")
    p.add_argument("--only", help=argparse.SUPPRESS)  # internal: time one dtype in this process
    return p.parse_args()


def images_per_s(args, amp):
    """Forward, backward and an SGD step on one batch in memory, as train.py runs them on the CPU."""
    import torch
    sys.path.insert(0, str(ROOT))
    import utils
    from model import build_model
    torch.manual_seed(0)
    model = build_model(args.model, 10, log=lambda *_: None).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                foreach=True)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 10, (args.batch_size,))
    for step in range(2 + args.steps):
        if step == 2:
            start = time.perf_counter()
        with utils.autocast(torch.device("cpu"), amp):
            loss = torch.nn.functional.cross_entropy(model(images).float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main():
    args = get_args()
    if args.only:
        print(images_per_s(args, args.only))
        return
    flags = ["--model", args.model, "--img-size", str(args.img_size), "-b", str(args.batch_size),
             "--steps", str(args.steps)]
    amps = ["off", "bf16"] + ["fp16"] * args.fp16
    figures = {(isa, amp): [] for isa in args.isas.split(",") for amp in amps}
    for _ in range(args.repeats):
        for isa, amp in figures:
            env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
            out = subprocess.run([sys.executable, __file__, *flags, "--only", amp], env=env, capture_output=True,
                                 text=True, check=True).stdout
            figures[isa, amp].append(float(out.split()[-1]))
    print(f"{args.model}, {args.img_size} px, batch {args.batch_size}: images/s, median of {args.repeats}")
    print(f"{'oneDNN ISA cap':18} {'float32':>8}" + "".join(f" {amp:>8} {amp + ' / float32':>15}" for amp in amps[1:]))
    for isa in args.isas.split(","):
        speeds = [statistics.median(figures[isa, amp]) for amp in amps]
        print(f"{isa:18} {speeds[0]:8.0f}" + "".join(f" {v:8.0f} {v / speeds[0]:15.2f}" for v in speeds[1:]))


if __name__ == "__main__":
    main()
