"""Images per second of decoding image files as training and evaluation store them, in one process.

    python benchmarks/bench_decode.py --data PHOTOS --img-size 224      # PHOTOS: any folder of images

For each layout (training with RandomResizedCrop: the whole image squashed to twice --img-size; evaluation:
the short side resized to --img-size / 0.875, the center cropped), two ways: `data.read_image`, which decodes a
JPEG far larger than needed at a reduced scale, and the whole file decoded, then resized. A loader process
per core multiplies the figure by about the core count.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402


def images_per_s(read, paths, repeats):
    read(paths[0])  # warm: imports, the first file's page cache
    start = time.perf_counter()
    for _ in range(repeats):
        for path in paths:
            read(path)
    return repeats * len(paths) / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a folder of images, searched recursively")
    p.add_argument("--img-size", type=int, default=224, help="training and evaluation size (default: 224)")
    p.add_argument("--images", type=int, default=50, help="at most this many files (default: 50)")
    p.add_argument("--repeats", type=int, default=2, help="passes over them (default: 2)")
    args = p.parse_args()
    paths = sorted(str(path) for path in Path(args.data).rglob("*") if data.is_image_file(path.name))[:args.images]
    if not paths:
        raise SystemExit(f"error: no image files in {args.data}")
    preprocess = data.eval_preprocess(args.img_size)
    layouts = {"train (whole image, squashed)": (2 * args.img_size, None),
               "eval (resized, center crop)": (preprocess["img_size"], preprocess["resize_size"])}
    width, height = data.load_image(paths[0]).size
    print(f"{len(paths)} files, e.g. {width}x{height} px")
    for name, (side, resize) in layouts.items():
        reduced = images_per_s(lambda path: data.read_image(path, side, resize), paths, args.repeats)
        whole = images_per_s(lambda path: data.store_image(data.load_image(path), side, resize), paths, args.repeats)
        print(f"{name}, stored at {side} px: read_image {reduced:.1f} images/s, whole decode {whole:.1f} images/s "
              f"({reduced / whole:.2f}x)")


if __name__ == "__main__":
    main()
