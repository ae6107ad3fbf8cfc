"""The few things every script needs: distributed setup, seeding, checkpoints, metrics, logging.

Plain functions, no state of their own: each script calls what it needs from main().
"""
import datetime
import errno
import math
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


# -----------------------------------------------------------------------------
# distributed setup: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; a plain `python` run sets none

# how long a collective waits for a process that has died or hung, instead of waiting forever
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def setup_distributed(device_arg=None):
    """Returns (rank, local_rank, world_size, device). Starts the process group under torchrun."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = get_device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", gpu_index(device, local_rank, world_size, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    return rank, local_rank, world_size, device


def get_device(name=None):
    """The torch.device of --device NAME (default: the best available); an error if this machine has none."""
    try:
        device = torch.device(name or default_device())
    except RuntimeError:
        raise SystemExit(f"error: --device {name}: not a device (cuda, cuda:1, mps or cpu)") from None
    kind = {"cuda": torch.cuda, "mps": torch.backends.mps}.get(device.type, getattr(torch, device.type, None))
    if device.type != "cpu" and not (kind and kind.is_available()):
        raise SystemExit(f"error: --device {name}: this machine has no {device.type} device; use --device cpu")
    return device


def gpu_index(device, local_rank, world_size, visible):
    """This process's GPU: the one of --device cuda:N in a single process, else that of its local rank."""
    if device.index is not None and world_size > 1:
        raise SystemExit(f"error: --device {device} picks one GPU, but torchrun gives each process the GPU of its "
                         "local rank: give --device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
    index = local_rank if device.index is None else device.index
    if index >= visible:
        raise SystemExit(f"error: process {local_rank} of this node needs GPU {index} (one GPU per process), but "
                         f"{visible} GPU(s) are visible: start at most that many processes per node (torchrun "
                         "--nproc_per_node), or name a GPU that is here, or use --device cpu")
    return index


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cleanup_distributed():
    """Ends the process group once every process is done with it."""
    # the barrier: tearing the group down while a peer still talks to it can abort the process. The pause: gloo's
    # worker threads free the tensors of the last collectives just after those return, and need the interpreter
    # (the GIL) to do it. Destroying the group meanwhile could deadlock in older torch (2.5: its destructor waits
    # for them, holding the GIL); in newer torch DDP keeps the group alive past destroy_process_group and an
    # exiting process aborted ("terminate called without an active exception")
    if dist.is_initialized():
        dist.barrier()
        time.sleep(0.2)
        dist.destroy_process_group()


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(tensor, op=dist.ReduceOp.SUM):
    """Sums (or takes the maximum of) a tensor over processes, in place; a no-op on one process. A sync point."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op)
    return tensor


def sum_dtype(device):
    """The dtype of sums on `device` (losses, counts): float64, exact for any count; float32 on MPS, which has no
    float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def broadcast_object(value):
    """Rank 0's value (any picklable object) on every process; the value itself on one process."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module):
    """Copies rank 0's buffers (BatchNorm statistics) to every process, so that all evaluate what rank 0 saves."""
    # DDP broadcasts them before each training forward, but each process's last forward changes its own
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def patient_group():
    """A process group whose collectives wait as long as one process's work takes (decoding an ImageNet-sized
    cache: an hour, past COLLECTIVE_TIMEOUT), for agree_on_failure; None on one process. Made by every process."""
    # gloo, on the CPU whatever the backend: a peer that dies still ends the wait (its connection closes)
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1)) if dist.is_initialized() else None


def agree_on_failure(failed, group):
    """Every process of a patient_group says whether it failed; returns whether another one did."""
    # called where one process works (builds a cache) while the others wait: they learn of its error at once
    # instead of waiting at a collective until the timeout (NCCL does not notice a dead peer)
    if group is None:
        return False
    flags = torch.tensor([float(failed)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return bool(flags.item()) and not failed


def all_gather(value):
    """[every process's value] (any picklable object) in rank order; [value] on one process."""
    if not dist.is_initialized():
        return [value]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return parts


# -----------------------------------------------------------------------------
# seeding: every random draw of a run is a function of (seed, step, rank), so a resumed run
# needs no saved RNG state to repeat the same draws

def seed_from(*numbers):
    """A well-mixed 63-bit seed from a few non-negative integers, e.g. (seed, epoch, index)."""
    # shifted as a Python int: NumPy 1.x refuses a shift of a uint64 by a Python int (it makes the int an int64)
    return int(np.random.SeedSequence(list(numbers)).generate_state(2, np.uint64)[0]) >> 1


def seed_draws(seed, device_type="cpu"):
    """Seeds the generators that a training step or an augmentation draws from: the CPU's and the device's."""
    # not torch.manual_seed: it seeds every backend torch knows, ~100 us a call, too slow per image
    torch.random.default_generator.manual_seed(seed)
    if device_type != "cpu":
        torch.get_device_module(device_type).manual_seed(seed)


def seed_everything(seed):
    torch.manual_seed(seed)  # seeds CUDA too
    np.random.seed(seed % 2**32)


@contextmanager
def deterministic_mode(deterministic):
    """cudnn autotuning picks the fastest kernels but not always the same ones: off when asked for repeatability."""
    # the previous settings come back at the end: train.main may run inside another program
    previous = torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous[0]
        torch.use_deterministic_algorithms(previous[1])


# -----------------------------------------------------------------------------
# flags: the range check every script runs on its numeric flags

def check_ranges(parser, args, ranges):
    """An argparse error for a flag outside its interval in `ranges`, e.g. {"lr": "[0, inf)", "dropout": "[0, 1)"}."""
    for name, interval in ranges.items():
        value = getattr(args, name)
        low, high = (float(bound) for bound in interval[1:-1].split(","))
        if value is None:  # not given: the default decides
            continue
        if not ((low <= value if interval[0] == "[" else low < value) and
                (value <= high if interval[-1] == "]" else value < high)):
            parser.error(f"--{name.replace('_', '-')} must be in {interval}, got {value}")


# -----------------------------------------------------------------------------
# mixed precision: the same autocast in training and evaluation

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def native_amp(device):
    """The autocast dtype that `device` computes fast: bf16 on GPUs with bf16 tensor cores (Ampere and later), on
    CPUs with bf16 instructions (AVX512-BF16 or AMX) and on Macs since macOS 14, fp16 on older GPUs, else none."""
    # emulated bf16 is slower than float32, 15x on a CPU without AVX-512 (see the README's Speed)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device.type == "cpu":
        checks = [getattr(torch.cpu, name, lambda: False) for name in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported")]
        return "bf16" if any(check() for check in checks) else "off"
    # mps: bf16 from macOS 14 on (before, a bf16 tensor is an error; fp16 autocast is refused on mps)
    return "bf16" if getattr(torch.backends.mps, "is_macos_or_newer", lambda *_: False)(14, 0) else "off"


def fast_amp(amp, device):
    """`amp` where `device` computes it fast, else native_amp(device): bf16 needs bf16 units, fp16 a GPU."""
    # fp16 on a CPU is emulated too: 27x slower than float32 without AVX-512
    fast = amp in ("off", native_amp(device)) or (amp == "fp16" and device.type == "cuda")
    return amp if fast else native_amp(device)


def warn_if_emulated(amp, device, log):
    """A warning for an --amp given that `device` only emulates (a GPU command run on a CPU): many times slower."""
    if fast_amp(amp, device) != amp:
        log(f"warning: --amp {amp} is emulated on this {device.type}: many times slower than --amp "
            f"{native_amp(device)}, what it computes fast")


def autocast(device, amp):
    """Mixed precision context for "bf16" | "fp16" | "off"."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


# -----------------------------------------------------------------------------
# checkpoints

def unwrap_state_dict(state_dict):
    """Drops the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes so a checkpoint loads anywhere."""
    clean = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        clean[key] = value
    return clean


def save_checkpoint(checkpoint, path):
    """Atomic write: a kill during the save leaves the previous file at `path` intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before it takes the name: a power cut cannot leave an empty last.pt
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except Exception as e:  # torch reports a full disk as a RuntimeError about a file position
        tmp.unlink(missing_ok=True)  # a hidden half file would go on filling the disk
        raise SystemExit(f"error: could not write {path} ({first_line(e)}); is the disk full? The previous "
                         f"{path.name}, if any, is as it was") from None


def create_folder(path, flag):
    """Creates the folder `path` and its parents; None, or an error naming `flag` if it cannot be (a file in the
    way, no permission)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"error: {flag}: cannot create the folder {path} ({e.strerror or e}); give another {flag}"
    return None


def lock(file):
    """Locks an open file until this process closes it or ends; False if another process holds the lock."""
    # a POSIX record lock (lockf), not flock: it is this process's alone, not shared with the loader processes it
    # forks, so a run that is killed frees its lock at once even while its loader processes wind down
    try:
        import fcntl  # POSIX: elsewhere, and on file systems without locks, nothing is locked
        fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno not in (errno.EACCES, errno.EAGAIN)
    except ImportError:
        pass
    return True


def first_line(error):
    """The first line of an exception's message, or its type's name if it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_checkpoint(path):
    """Loads one of our checkpoints with weights_only=True (no pickled code in it can run), or exits with a line
    that says why not."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {path} is not a checkpoint this code can load safely "
                         f"(loaded with weights_only=True, which refuses pickled code): {first_line(e)}")
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "classes" not in checkpoint:
        raise SystemExit(f"error: {path} is not a checkpoint written by train.py "
                         "(expected a dict with 'model' and 'classes')")
    return checkpoint


# -----------------------------------------------------------------------------
# logging: rank 0 prints, and also appends to a log file when given one

def make_logger(log_file=None, enabled=True):
    """A function that prints a message (if enabled) and appends it to log_file, an open text file, if given."""
    def log(message=""):
        if not enabled:
            return
        message = printable(message)
        print(message, flush=True)
        if log_file:
            log_file.write(message + "\n")
            log_file.flush()
    return log


def printable(text):
    """The text with any file name that is not UTF-8 (held as surrogates, which a UTF-8 stream refuses: a crash)
    shown as `ls` shows it."""
    return text.encode(errors="surrogateescape").decode(errors="replace")


def format_table(rows, header):
    """Fixed-width text table: rows is a list of lists of strings."""
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header] + rows]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# plots, drawn with Pillow alone: training curves and the confusion matrix

COLORS = {"train": (31, 119, 180), "val": (255, 127, 14)}


def text_font(size):
    """A system font with accented letters where there is one (DejaVu Sans on Linux, Arial on macOS and Windows),
    else Pillow's own, which has none."""
    from PIL import ImageFont
    for name in ("DejaVuSans.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def plot_results(rows, path, val_score="val_top1"):
    """results.png: loss and top-1 (val: `val_score`) per epoch, from results.csv's rows (dicts of strings)."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (1000, 440), "white")
    draw = ImageDraw.Draw(image)
    epochs = [int(row["epoch"]) for row in rows]
    title = "top-1 (%)" if val_score == "val_top1" else f"train: all labels right; val: {val_score[4:]} (%)"
    panels = [("loss", "train_loss", "val_loss", None), (title, "train_top1", val_score, (0, 100))]
    for i, (title, train_key, val_key, limits) in enumerate(panels):
        series = [("train", [float(row[train_key]) for row in rows]), ("val", [float(row[val_key]) for row in rows])]
        line_chart(draw, (80 + 500 * i, 40, 460 + 500 * i, 370), epochs, series, title, limits)
    image.save(path)


def nice_ticks(low, high, count=5, limits=None):
    """About `count` round ticks (1, 2 or 5 times a power of ten apart) around low..high, within `limits`."""
    if limits:
        low, high = max(low, limits[0]), min(high, limits[1])
    step = (high - low) / count or abs(high) / 10 or 1.0
    power = 10 ** math.floor(math.log10(step))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= step * 0.999)
    ticks = [round(step * k, 12) for k in range(math.floor(low / step), math.ceil(high / step) + 1)]
    return [t for t in ticks if not limits or limits[0] <= t <= limits[1]]


def line_chart(draw, box, xs, series, title, limits=None):
    font = text_font(13)
    left, top, right, bottom = box
    values = [y for _, ys in series for y in ys if math.isfinite(y)] or [0.0]
    y_ticks, x_ticks = nice_ticks(min(values), max(values), 5, limits), nice_ticks(xs[0], xs[-1], 8)
    low, high = y_ticks[0], y_ticks[-1] if y_ticks[-1] > y_ticks[0] else y_ticks[0] + 1
    x_ticks = [x for x in x_ticks if xs[0] <= x <= xs[-1] and x == int(x)] or xs[:1]

    def point(x, y):
        return (left + (x - xs[0]) / max(xs[-1] - xs[0], 1) * (right - left),
                bottom - (min(max(y, low), high) - low) / (high - low) * (bottom - top))
    draw.rectangle(box, outline="black")
    draw.text(((left + right) / 2, top - 10), title, fill="black", font=font, anchor="md")
    for y in y_ticks:
        draw.line([(left - 4, point(xs[0], y)[1]), (left, point(xs[0], y)[1])], fill="black")
        draw.text((left - 7, point(xs[0], y)[1]), f"{y:g}", fill="black", font=font, anchor="rm")
    for x in x_ticks:
        draw.line([(point(x, low)[0], bottom), (point(x, low)[0], bottom + 4)], fill="black")
        draw.text((point(x, low)[0], bottom + 7), f"{x:g}", fill="black", font=font, anchor="mt")
    draw.text(((left + right) / 2, bottom + 26), "epoch", fill="black", font=font, anchor="mt")
    for i, (name, ys) in enumerate(series):
        points = [point(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=COLORS[name], width=2)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=COLORS[name])
        legend_x = left + 60 * i  # below the axis, where no curve is
        draw.line([(legend_x, bottom + 50), (legend_x + 18, bottom + 50)], fill=COLORS[name], width=2)
        draw.text((legend_x + 24, bottom + 50), name, fill=COLORS[name], font=font, anchor="lm")


def save_image_grid(images, captions, path, columns=8):
    """A JPEG of uint8 [N, 3, H, W] images in rows of `columns`, each with a caption of up to two lines below it."""
    # small images are enlarged to about 96 px, nearest neighbour, so their pixels stay visible
    from PIL import Image, ImageDraw
    font = text_font(11)
    n, _, h, w = images.shape
    scale = max(1, 96 // max(h, w))
    cell_w, cell_h = w * scale, h * scale + 30
    grid = Image.new("RGB", (min(n, columns) * cell_w, -(-n // columns) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        tile = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((cell_w, h * scale), Image.Resampling.NEAREST)
        grid.paste(tile, (x, y))
        lines = "\n".join(line[: cell_w // 6] for line in caption.split("\n")[:2])
        draw.multiline_text((x + 2, y + h * scale + 2), lines, fill="black", font=font, spacing=1)
    grid.save(path, quality=90)


NAMED_UP_TO = 100  # classes: beyond, a name would have under 12 px of height, so the axes give class indices


def plot_confusion(confusion, classes, path):
    """confusion_matrix.png: each row (true class) normalised, white to dark blue, class names on both axes (class
    indices past NAMED_UP_TO classes, where cells shrink to 1 px: 1,000 classes make a 1,100 px image)."""
    from PIL import Image, ImageDraw
    n = len(classes)
    named = n <= NAMED_UP_TO
    cell = max(12 if named else 1, min(60, 1200 // n))  # 2 classes: 60 px cells; 100: 12; 1,000: 1
    font = text_font(min(14, cell - 2) if named else 13)
    if named:
        names = {i: name if len(name) <= 24 else name[:23] + "…" for i, name in enumerate(classes)}
    else:  # about 10 round class indices on each axis
        names = {int(t): str(int(t)) for t in nice_ticks(0, n - 1, 10) if t < n}
    label = 12 + max(int(font.getlength(name)) for name in names.values())
    size = label + n * cell + 20
    caption, caption_font = "predicted (columns) / true (rows), each row normalised", text_font(13)
    width = max(size, int(caption_font.getlength(caption)) + 20)  # few classes: the caption sets the width
    image = Image.new("RGB", (width, size + 30), "white")
    draw = ImageDraw.Draw(image)
    counts = np.asarray(confusion, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    cells = (255 - shares[..., None] * (255 - np.array([8, 48, 107]))).astype(np.uint8).repeat(cell, 0).repeat(cell, 1)
    if named:  # grid lines between the cells
        cells = np.pad(cells, ((0, 1), (0, 1), (0, 0)))
        cells[::cell], cells[:, ::cell] = 220, 220
    image.paste(Image.fromarray(cells), (label, label))
    for i, name in names.items():
        middle = label + i * cell + cell / 2
        draw.text((label - 6, middle), name, fill="black", font=font, anchor="rm")
        column = Image.new("RGB", (label, font.size + 4), "white")  # column names: drawn sideways, then turned
        ImageDraw.Draw(column).text((label - 6, column.height / 2), name, fill="black", font=font, anchor="rm")
        image.paste(column.rotate(-90, expand=True), (round(middle - column.height / 2), 0))
    if cell >= 36:
        for (i, j), share in np.ndenumerate(shares):
            draw.text((label + j * cell + cell / 2, label + i * cell + cell / 2), f"{share:.2f}", font=font,
                      anchor="mm", fill="white" if share > 0.5 else "black")
    draw.text((width / 2, size + 8), caption, fill="black", font=caption_font, anchor="mt")
    image.save(path)
