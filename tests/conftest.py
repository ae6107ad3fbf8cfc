"""Shared fixtures: small image folders written as real JPEG/PNG files, and a way to run the scripts."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402


def write_image_folder(root, classes=("circle", "square", "triangle"), n_train=16, n_val=6, splits=("train", "val"),
                       seed=0):
    """root/<split>/<class>/*.jpg|png of drawn shapes, mixed sizes (32 to 48 px), mixed formats."""
    rng = np.random.default_rng(seed)
    for split in splits:
        count = n_train if split == "train" else n_val
        for name in classes:
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                suffix = ".png" if i % 4 == 0 else ".jpg"
                data.draw_shape(name, rng).save(folder / f"{i:03d}{suffix}")
    return Path(root)


def eval_transform(preprocess):
    """Image file -> uint8 [3, H, W] as evaluate.py reads it: `preprocess` is the dict stored in every checkpoint."""
    return lambda path: data.read_image(path, preprocess["img_size"], preprocess["resize_size"])[0].permute(2, 0, 1)


def write_photo_folder(root, n_train=244, n_val=153, seed=0):
    """root/{train,val}/<class>/*.jpg: photo-like images of mixed sizes (80-139 x 60-104 px): a smooth colour
    background, a blurred red disc or blue square, sensor noise."""
    from PIL import ImageDraw, ImageFilter
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        for i in range(count):
            w, h = int(rng.integers(80, 140)), int(rng.integers(60, 105))
            background = rng.integers(0, 256, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3), dtype=np.uint8)
            image = Image.fromarray(background).resize((w, h), Image.BICUBIC)
            x, y, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, rng.uniform(0.15, 0.35) * min(w, h)
            warm = (int(rng.integers(150, 256)), int(rng.integers(0, 120)), int(rng.integers(0, 120)))
            draw = ImageDraw.Draw(image)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=warm) if i % 2 == 0 else draw.rectangle(
                [x - r, y - r, x + r, y + r], fill=warm[::-1])
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2)))
            pixels = np.asarray(image).astype(np.float32) + rng.normal(0, 12, (h, w, 3))
            folder = Path(root) / split / ("red_disc" if i % 2 == 0 else "blue_square")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=85)
    return Path(root)


def run_script(script, *args, cwd=None, env=None, check=True, timeout=300):
    """Runs `python script.py args...` as a user would; returns the CompletedProcess."""
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def trained_run(image_folder, tmp_path_factory):
    """One real two-epoch training run that several tests read."""
    out = tmp_path_factory.mktemp("run")
    result = run_script("train.py", "--data", image_folder, "--epochs", 2, "--model", "smallnet_tiny", "-b", 8,
                        "--workers", 0, "--output-dir", out)
    return out, result


def png_header_only(width, height):
    """The first bytes of a PNG that claims width x height pixels: enough for PIL to read its size."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def truncated_jpeg():
    """The first three quarters of a JPEG file: it passes the header scan and fails to decode."""
    from io import BytesIO
    buffer = BytesIO()
    data.draw_shape("circle", np.random.default_rng(1)).save(buffer, format="JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) * 3 // 4]


def write_messy_files(folder):
    """Files people really have in a dataset folder. Returns {name: is it unusable as an image}."""
    from io import BytesIO
    from PIL import Image
    folder = Path(folder)
    buffer = BytesIO()
    Image.new("RGB", (40, 40), (9, 9, 9)).save(buffer, format="PNG")
    files = {
        "zero.jpg": (b"", True),
        "text.jpg": (b"this is not a picture\n", True),
        "corrupt.png": (b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20, True),
        "bomb.png": (png_header_only(30000, 30000), True),
        "truncated.jpg": (truncated_jpeg(), True),  # passes the header scan, fails to decode
        "truncated.png": (buffer.getvalue()[:60], True),
        "notes.txt": (b"ignored", False),
        ".DS_Store": (b"\0\1", False),
        "Thumbs.db": (b"\0\1", False),
    }
    for name, (content, _) in files.items():
        (folder / name).write_bytes(content)
    return {name: bad for name, (_, bad) in files.items()}
