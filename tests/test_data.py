"""data.py: folder layouts, decoding of every image kind, transforms, sampling."""
import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import eval_transform, write_image_folder


# -- decoding -------------------------------------------------------------------

def test_every_image_mode_loads_as_rgb(tmp_path):
    base = Image.new("RGB", (40, 30), (200, 40, 10))
    files = {
        "gray.png": base.convert("L"),
        "rgba.png": base.convert("RGBA"),
        "palette.png": base.convert("P"),
        "cmyk.jpg": base.convert("CMYK"),
        "gray.jpg": base.convert("L"),
        "pic.bmp": base, "pic.tiff": base, "pic.webp": base, "pic.ppm": base, "pic.pgm": base.convert("L"),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
    for name in files:
        image = data.load_image(tmp_path / name)
        assert image.mode == "RGB" and image.size == (40, 30), name


def test_transparent_pixels_become_white(tmp_path):
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    image.putpixel((0, 0), (10, 20, 30, 255))
    image.save(tmp_path / "t.png")
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    rgba = np.asarray(data.load_image(tmp_path / "t.png"))
    assert tuple(rgba[0, 0]) == (10, 20, 30) and tuple(rgba[4, 4]) == (255, 255, 255)
    pal = np.asarray(data.load_image(tmp_path / "p.png"))
    assert tuple(pal[1, 1]) == (255, 0, 0) and tuple(pal[4, 4]) == (255, 255, 255)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = np.asarray(data.load_image(tmp_path / "deep.png"))[0, :, 0].astype(int)
    assert out[0] == 0 and out[-1] == 255 and 120 <= out[32] <= 135  # mid-grey stays mid-grey
    assert np.all(np.diff(out) >= 0)


def test_deep_images_are_scaled_by_their_format_not_by_their_content(tmp_path):
    """A 16-bit image maps 0..65535 to 0..255 however dark it is (a dim frame among brighter ones of the same
    sensor is as dim after), and a float image maps 0..1 (torchvision's convention for floats), not 0..255: a
    float TIFF of values in 0..1 is not a black image."""
    dim = np.full((8, 8), 200, np.uint16)  # 200 of 65535: under 1/255 of the range
    Image.fromarray(dim).save(tmp_path / "dim.png")
    assert np.asarray(data.load_image(tmp_path / "dim.png")).max() <= 1
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    out = np.asarray(data.load_image(tmp_path / "float.tif"))[0, :, 0].astype(int)
    assert out[0] == 0 and out[-1] == 255 and 120 <= out[32] <= 135 and np.all(np.diff(out) >= 0)


def test_exif_orientation_is_applied(tmp_path):
    # 60x20 pixels stored, EXIF orientation 6 (rotate 90 degrees clockwise to display): shown as 20x60
    image = Image.new("RGB", (60, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    shown = data.load_image(tmp_path / "rotated.jpg")
    assert shown.size == (20, 60)
    top = np.asarray(shown)[2, 10]
    assert top[0] > 200 and top[2] < 60  # the stored left edge is now the top



def test_a_photo_far_larger_than_needed_is_decoded_at_a_reduced_scale(tmp_path):
    """A 2048x1536 JPEG (EXIF-rotated) stored at 224 px or squashed to 448: decoded at half its size, stored within
    about a level of the whole decode, upright, its aspect ratio kept; a PNG decodes whole."""
    y, x = np.mgrid[0:1536, 0:2048]
    noise = np.random.default_rng(0).normal(0, 8, (1536, 2048, 3))
    pixels = np.stack([x / 8 % 256, y / 6 % 256, (x + y) / 10 % 256], -1) + noise
    photo = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned: 1536 wide, 2048 high
    photo.save(tmp_path / "photo.jpg", quality=90, exif=exif)
    photo.save(tmp_path / "photo.png")
    assert data.load_image(tmp_path / "photo.jpg", least=512).size == (768, 1024)  # 1/2: 1/4 would keep < 512
    assert data.load_image(tmp_path / "photo.png", least=512).size == (2048, 1536)  # as stored: no EXIF, no draft
    for side, resize in ((224, 256), (448, None)):
        stored, aspect = data.read_image(tmp_path / "photo.jpg", side, resize)
        whole, whole_aspect = data.store_image(data.load_image(tmp_path / "photo.jpg"), side, resize)
        assert stored.shape == whole.shape == (side, side, 3) and aspect == pytest.approx(whole_aspect) == 0.75
        assert (stored.float() - whole.float()).abs().mean() < 1.0


def test_a_108_megapixel_phone_photo_is_read_and_a_bomb_is_not(tmp_path):
    """Over PIL's 89-megapixel warning, a phone's 108 MP photo is an image like any other, decoded fast (1/8 in
    the JPEG decoder), without a warning; a header that claims 900 MP is refused, as PIL refuses it."""
    import warnings
    from conftest import png_header_only
    Image.new("RGB", (12000, 9000), (120, 130, 140)).save(tmp_path / "phone.jpg", quality=90)
    (tmp_path / "bomb.png").write_bytes(png_header_only(30000, 30000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.check_image(tmp_path / "phone.jpg") is None
        stored, aspect = data.read_image(tmp_path / "phone.jpg", 224, 256)
    assert stored.shape == (224, 224, 3) and aspect == pytest.approx(4 / 3)
    assert stored[100, 100].tolist() == [120, 130, 140]
    assert data.check_image(tmp_path / "bomb.png").startswith("over 178,956,970 pixels")


def test_stored_images_are_torchvision_resize_and_center_crop_to_the_pixel():
    """store_image resizes and crops in PIL alone (torchvision is imported only when used): the same pixels as
    torchvision's v2 Resize(resize) then CenterCrop(side), for wide, tall, square, odd and already-sized images."""
    from torchvision.transforms import v2
    rng = np.random.default_rng(0)
    sizes = ((300, 200, 224, 256), (123, 457, 32, 36), (77, 77, 64, 73), (256, 301, 224, 256), (40, 32, 32, 32),
             (1000, 97, 96, 110))
    for width, height, side, resize in sizes:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        expected = np.asarray(v2.functional.center_crop(v2.functional.resize(image, resize), side))
        stored, aspect = data.store_image(image, side, resize)
        assert np.array_equal(stored.numpy(), expected) and aspect == width / height


# -- folder layout --------------------------------------------------------------

def test_classes_and_files(tmp_path):
    root = write_image_folder(tmp_path / "ds", n_train=2, n_val=1)
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "circle" / "notes.txt").write_text("not an image")
    (root / "train" / "circle" / ".DS_Store").write_bytes(b"\0\0")
    Image.new("RGB", (32, 32)).save(root / "train" / "circle" / "UPPER.JPG")
    Image.new("RGB", (32, 32)).save(root / "train" / "square" / "mixed.Png")
    Image.new("P", (32, 32)).save(root / "train" / "square" / "palette.gif")
    (root / "train" / "square" / "phone.heic").write_bytes(b"\0")  # needs a plugin Pillow lacks
    Image.new("RGB", (32, 32)).save(root / "train" / "square" / "download.jfif", format="JPEG")  # Windows browsers'
    avif = ".avif" in data.IMG_EXTENSIONS  # recent Pillows read (and write) AVIF
    if avif:
        Image.new("RGB", (32, 32)).save(root / "train" / "square" / "photo.avif")
    for folder, name in ((root / "train", "loose1.jpg"), (root / "train", "loose2.PNG"), (root / "val", "lost.jpg")):
        Image.new("RGB", (32, 32)).save(folder / name)  # in no class folder: no label to train on
    messages = []
    classes, train, val = data.load_samples(root, log=messages.append)
    assert classes == ["circle", "square", "triangle"]
    names = [p.rsplit("/", 1)[-1] for p, _ in train]
    assert "UPPER.JPG" in names and "mixed.Png" in names and "notes.txt" not in names and "loose1.jpg" not in names
    assert "palette.gif" in names and "download.jfif" in names and ("photo.avif" in names) == avif
    assert any(f"2 file(s) in the class folders of {root / 'train'} are not images by their names (1 .heic, 1 .txt)"
               in m for m in messages)
    assert any(f"2 image file(s) directly in {root / 'train'}" in m and "loose1.jpg" in m for m in messages)
    assert any(f"1 image file(s) directly in {root / 'val'}" in m and "lost.jpg" in m for m in messages)
    assert len(train) == 10 + avif and len(val) == 3
    assert all(classes[t] in p for p, t in train + val)


def test_a_folder_linked_into_itself_is_read_once(tmp_path):
    """A link back up the tree (`latest -> .`) made every image of the class 41 times a sample (os.walk follows
    links until the system's limit of 40): a silently inflated, imbalanced class."""
    root = write_image_folder(tmp_path / "ds", n_train=4, n_val=2)
    (root / "train" / "circle" / "again").symlink_to(".")
    (root / "train" / "square" / "parent").symlink_to("..")  # the whole train/ inside one class
    (root / "train" / "triangle" / "everything").symlink_to("/")
    _, train, _ = data.load_samples(root, log=lambda *_: None)
    assert len(train) == 12 and len({path for path, _ in train}) == 12


def test_test_folder_replaces_missing_val(tmp_path):
    root = write_image_folder(tmp_path / "ds", n_train=2, n_val=2, splits=("train", "test"))
    messages = []
    _, _, val = data.load_samples(root, log=messages.append)
    assert len(val) == 6 and all("/test/" in p for p, _ in val)
    assert any("test" in m for m in messages)


def test_valid_or_validation_folder_is_the_val_split_not_test(tmp_path):
    """Kaggle's and Roboflow's layout, train/ valid/ test/ (Keras' validation/): the val split is valid/; test/
    stays held out, for evaluate.py --split test."""
    classes = ["circle", "square", "triangle"]
    for name in ("valid", "validation"):
        root = write_image_folder(tmp_path / name, n_train=2, n_val=3, splits=("train", name))
        write_image_folder(root, n_val=1, splits=("test",))
        messages = []
        _, _, val = data.load_samples(root, log=messages.append)
        assert len(val) == 9 and all(f"/{name}/" in p for p, _ in val)
        assert any(f"validating on {root / name}" in m for m in messages)
        assert data.split_samples(root, "val", classes) == val and len(data.split_samples(root, "test", classes)) == 3
        with pytest.raises(SystemExit, match=f"is the {name}/ folder of a dataset: give --data"):
            data.load_samples(root / name)  # to train on
        assert data.split_samples(root / name, "val", classes) == val  # to evaluate: it is a held-out set


def test_val_split_is_stratified_and_deterministic(tmp_path):
    root = write_image_folder(tmp_path / "ds", n_train=20, splits=("train",))
    messages = []
    classes, train, val = data.load_samples(root, val_fraction=0.2, seed=3, log=messages.append)
    assert len(val) == 12 and len(train) == 48
    assert [sum(t == c for _, t in val) for c in range(3)] == [4, 4, 4]
    assert not {p for p, _ in train} & {p for p, _ in val}
    assert data.load_samples(root, val_fraction=0.2, seed=3, log=lambda *_: None)[2] == val
    assert any("--val-fraction" in m for m in messages)


def test_val_class_missing_from_train_is_an_error(tmp_path):
    root = write_image_folder(tmp_path / "ds", n_train=2, n_val=1)
    write_image_folder(tmp_path / "ds", classes=("hexagon",), n_train=0, n_val=1, splits=("val",))
    with pytest.raises(SystemExit, match="hexagon"):
        data.load_samples(root, log=lambda *_: None)


def test_val_lacking_a_class_keeps_train_indices(tmp_path):
    root = write_image_folder(tmp_path / "ds", n_train=2, n_val=0, splits=("train",))
    write_image_folder(root, classes=("triangle",), n_val=2, splits=("val",))
    messages = []
    classes, _, val = data.load_samples(root, log=messages.append)
    assert {t for _, t in val} == {classes.index("triangle")} == {2}
    assert any("circle" in m and "square" in m for m in messages if m.startswith("warning"))


def test_a_split_without_usable_images_is_an_error(tmp_path):
    """A val/ with no images (not yet filled, or only broken files) would report 0% every epoch and keep the
    first epoch as best: training stops instead, saying what to do."""
    root = write_image_folder(tmp_path / "ds", n_train=2, splits=("train",))
    (root / "val" / "circle").mkdir(parents=True)
    (root / "val" / "circle" / "broken.jpg").write_bytes(b"not a picture")
    quiet = {"log": lambda *_: None}
    with pytest.raises(SystemExit, match=rf"no usable validation images in {root / 'val'}: add images to"):
        data.load_samples(root, **quiet)


@pytest.mark.parametrize("side,expected", [(40, 32), (32, 32), (100, 96), (150, 160), (800, 224), (12, 32)])
def test_image_size_is_inferred_from_short_sides(tmp_path, side, expected):
    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (side + 7 * i, side)).save(path)
        paths.append(str(path))
    assert data.infer_img_size(paths) == expected


# -- transforms and sampling ----------------------------------------------------

CPU = torch.device("cpu")


def settled_args(folder, out, *flags):
    """train.py's arguments for `folder`, with the data-dependent defaults settled as a run settles them."""
    import train
    args = train.parse_args(["--data", str(folder), "--output-dir", str(out), "--workers", "0", *flags])
    return train.load_data(args, out, 0, 1, torch.device("cpu"), lambda *_: None)


def augment(crop, auto_augment=None, random_erase=0.0, seed=5):
    return partial(data.augment_batch, seed=seed, crop=crop, size=32, padding=4, min_scale=0.25,
                   auto_augment=auto_augment, random_erase=random_erase)


def test_augmentation_gives_uint8_crops_and_eval_the_center(image_folder):
    _, train, _ = data.load_samples(image_folder, log=lambda *_: None)
    for crop, layout in (("padded", (32, 32)), ("resized", (48, None))):
        images, aspects, rows, _ = data.DecodedImages(train, *layout).__getitems__([0, 1, 2])
        out = augment(crop, "ta_wide", 1.0)(images, aspects, rows.numpy(), 0)
        assert out.dtype == torch.uint8 and out.shape == (3, 3, 32, 32)
    preprocess = data.eval_preprocess(32)
    out = eval_transform(preprocess)(train[0][0])
    assert out.shape == (3, 32, 32) and preprocess["resize_size"] == 32
    assert data.eval_preprocess(224)["resize_size"] == 256
    x = data.make_normalize(preprocess, CPU)(out[None])
    assert x.dtype == torch.float32 and abs(x.mean().item()) < 3


@pytest.mark.parametrize("crop", ["padded", "resized"])
def test_augmentation_is_a_function_of_seed_epoch_and_index(image_folder, crop):
    _, train, _ = data.load_samples(image_folder, log=lambda *_: None)
    images = data.DecodedImages(train, 32, 32 if crop == "padded" else None)
    transform = augment(crop, "ta_wide", 0.5)

    def augmented(rows, epoch):
        batch, aspects, rows, _ = images.__getitems__(rows)
        return dict(zip(rows.tolist(), transform(batch, aspects, rows.numpy(), epoch)))
    torch.manual_seed(0)
    before = torch.rand(1)
    a, b = augmented([3, 1, 7], 1), augmented([9, 3], 1)
    assert torch.equal(a[3], b[3])  # the same image whatever batch it is in
    assert not torch.equal(a[3], augmented([3], 2)[3])  # another epoch, another crop
    torch.manual_seed(0)
    assert torch.equal(before, torch.rand(1))  # the caller's random stream is left alone
    sampler = data.make_epoch_sampler(np.arange(len(train)), 4, seed=0)
    loader = data.Batches(images, [t for _, t in train], sampler, 4, CPU, transform, workers=2)
    sampler.set_epoch(1)
    first, _ = next(iter(loader))  # read in a worker process
    assert torch.equal(first, torch.stack(list(augmented(list(sampler)[:4], 1).values())))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_augmix_is_a_function_of_the_seed_on_the_images_device(image_folder, device):
    """AugMix draws its mixing weights on the images' device (the others draw on the CPU): on a GPU that device's
    generator, too, is seeded per image, and left as it was for the caller."""
    _, train, _ = data.load_samples(image_folder, log=lambda *_: None)
    batch, aspects, rows, _ = data.DecodedImages(train, 32, 32).__getitems__([0, 1])
    outputs, draws = [], []
    for state in (1, 2):  # whatever state the caller's generators are in
        torch.manual_seed(state)
        outputs.append(augment("padded", "augmix")(batch.to(device), aspects.to(device), rows.numpy(), 0))
        draws.append(torch.rand(2, device=device))
    assert torch.equal(*outputs)
    torch.manual_seed(2)
    assert torch.equal(draws[1], torch.rand(2, device=device))


def test_only_copies_to_a_gpu_from_pinned_memory_do_not_wait(monkeypatch):
    """On a Mac (MPS) a copy that does not wait can read its source after it is freed (pytorch/pytorch#189690):
    batches and their labels would change silently. Not run on a Mac (none here): the copies are recorded."""
    copies = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: copies.append(kwargs) or self)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)  # no CUDA here to pin for
    for device in ("mps", "cpu", "cuda"):
        data.to_device(torch.zeros(2), torch.device(device))
    assert [copy.get("non_blocking", False) for copy in copies] == [False, False, True]


def test_two_processes_see_the_global_batch_of_one(image_folder):
    dataset = list(range(100, 148))  # sample indices
    one = data.EpochSampler(dataset, num_replicas=1, rank=0, seed=1)
    ranks = [data.EpochSampler(dataset, num_replicas=2, rank=r, seed=1) for r in range(2)]
    for sampler in [one, *ranks]:
        sampler.set_epoch(4)
    single, shards = list(one), [list(s) for s in ranks]
    for step in range(6):  # batch 8 on one process = batch 4 on each of two
        both = shards[0][4 * step:4 * step + 4] + shards[1][4 * step:4 * step + 4]
        assert sorted(single[8 * step:8 * step + 8]) == sorted(both)
    one.set_epoch(4, skip=5)
    assert list(one) == single[5:]  # a resume inside the epoch skips what was seen
    assert sorted(single) == dataset


def test_eval_shards_count_every_image_once(image_folder):
    _, _, val = data.load_samples(image_folder, log=lambda *_: None)
    samples = [(path, i) for i, (path, _) in enumerate(val[:7])]
    preprocess = data.eval_preprocess(32)
    seen = [i for rank in range(2) for _, targets in data.eval_batches(samples, preprocess, 2, CPU, 0, rank, 2)
            for i in targets.tolist()]
    assert sorted(seen) == list(range(7))


def test_resized_crops_reach_the_long_sides_on_both_sources(tmp_path):
    """Wide photos with a red strip at the left edge and a blue one at the right: some of the crops show each,
    whichever source reads them, and both sources give the same crops."""
    picture = np.zeros((48, 96, 3), np.uint8)
    picture[:, :, 1] = 160
    picture[:, :6], picture[:, -6:] = (255, 0, 0), (0, 0, 255)
    for split, count in (("train", 24), ("val", 2)):
        for name in ("a", "b"):
            (tmp_path / "wide" / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(picture).save(tmp_path / "wide" / split / name / f"{i}.png")
    batches = {}
    for cache in ("--cache", "--no-cache"):
        args, _, train, val = settled_args(tmp_path / "wide", tmp_path / "run", "--img-size", "32", cache,
                                           "--train-crop", "resized", "-b", "16")
        loader, _ = data.make_loaders(args, train, val, data.eval_preprocess(32), 0, 0, 1, CPU, tmp_path / "run",
                                      lambda *_: None)
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            batches[cache, epoch] = torch.cat([images for images, _ in loader]).int()
    for epoch in range(2):
        assert torch.equal(batches["--cache", epoch], batches["--no-cache", epoch])
    crops = torch.cat([batches["--cache", 0], batches["--cache", 1]])
    red = ((crops[:, 0] > 200) & (crops[:, 1] < 60) & (crops[:, 2] < 60)).flatten(1).any(1)
    blue = ((crops[:, 2] > 200) & (crops[:, 0] < 60) & (crops[:, 1] < 60)).flatten(1).any(1)
    assert red.sum() >= 2 and blue.sum() >= 2, (red.sum(), blue.sum())


def test_shapes_dataset_is_written_once(tmp_path):
    root = data.make_shapes_dataset(tmp_path / "shapes", train_per_class=3, val_per_class=2)
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == 6 * 5
    mtimes = [f.stat().st_mtime_ns for f in files]
    data.make_shapes_dataset(tmp_path / "shapes", train_per_class=3, val_per_class=2)
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert not list(tmp_path.glob(".shapes*"))


# -----------------------------------------------------------------------------
# the decode-once cache

def test_cache_is_built_once_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    import errno
    import fcntl
    root = write_image_folder(tmp_path / "ds", n_train=4, splits=("train",))
    samples = data.list_images(root / "train", data.find_classes(root / "train"))
    def no_locks(*_):  # a file system without locks (Lustre mounted without flock): the cache is built all the same
        raise OSError(errno.ENOSYS, "Function not implemented")
    with monkeypatch.context() as patch:
        patch.setattr(fcntl, "flock", no_locks)
        array, aspects, rows = data.build_cache(samples, 32, 32, tmp_path / "cache", log=lambda *_: None)
    assert array.shape == (len(samples), 32, 32, 3) and array.dtype == np.uint8
    assert list(rows) == list(range(len(samples)))
    image, aspect, _ = data.DecodedImages(samples, 32, 32)[3]
    assert np.array_equal(array[3], image.numpy()) and aspects[3] == np.float32(aspect)  # as decoding it now
    files = sorted((tmp_path / "cache").glob("*.npy"))
    mtime = files[0].stat().st_mtime_ns
    data.build_cache(samples, 32, 32, tmp_path / "cache", log=lambda *_: None)
    assert sorted((tmp_path / "cache").glob("*.npy")) == files and files[0].stat().st_mtime_ns == mtime  # reused
    assert samples[0][0].endswith(".png")
    Image.new("RGB", (40, 40), (255, 0, 0)).save(samples[0][0])  # the file changes: a new cache
    array, _, _ = data.build_cache(samples, 32, 32, tmp_path / "cache", log=lambda *_: None)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2 and (array[0] == [255, 0, 0]).all()


def test_a_cache_folder_this_user_cannot_write_is_left_alone(tmp_path):
    """DATA/.cache made by another user (DATA writable by the group, .cache by its owner alone): a new cache goes
    to the run's folder, as for read-only data. Here .cache is mounted read-only in a namespace of the test's own."""
    import shlex
    import subprocess
    import sys
    from conftest import ROOT
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rm (a user and mount namespace) is not available here")
    root = write_image_folder(tmp_path / "ds", n_train=2, splits=("train",))
    (root / ".cache").mkdir()
    build = (f"import sys, types; sys.path.insert(0, {str(ROOT)!r}); import data, torch; "
             f"samples = data.list_images({str(root / 'train')!r}, ['circle']); "
             f"args = types.SimpleNamespace(data={str(root)!r}, train_csv=None, strict=False); "
             f"data.cache_splits(args, [(samples, (32, 32))], 0, 0, torch.device('cpu'), {str(tmp_path / 'run')!r}, "
             "print)")
    cache = shlex.quote(str(root / ".cache"))
    script = f"mount --bind -o ro {cache} {cache} && exec {shlex.join([sys.executable, '-c', build])}"
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "run" / "cache").glob("*.npy"))) == 1 and not any((root / ".cache").iterdir())


def test_a_run_says_what_the_caches_of_earlier_data_take(tmp_path, monkeypatch):
    """Each version of the data gets a cache of its own; the files of older versions stay (another run may still
    read them): a run says how much room they take, which would otherwise fill the disk unseen."""
    root = write_image_folder(tmp_path / "ds", n_train=4)
    for turn in range(2):
        messages = []
        args, _, train, val = settled_args(root, tmp_path / "run", "--cache")
        data.make_loaders(args, train, val, data.eval_preprocess(32), 0, 0, 1, CPU, tmp_path / "run", messages.append)
        others = [m for m in messages if "cache file(s) of other images" in m]
        assert len(others) == turn
        Image.new("RGB", (40, 40), (255, 0, 0)).save(train[0][0])  # the data changes: a new training cache
    assert f"{root / '.cache'} also holds 1 cache file(s) of other images or sizes (0.00 GiB)" in others[0]
    # another run's build renames and removes its files as it goes: a file listed, then gone, is counted as none
    listed = [*(root / ".cache").iterdir(), root / ".cache" / "32px-0123456789abcdef.progress.tmp"]
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(listed))
    messages = []
    data.report_other_caches(root / ".cache", [], messages.append)
    assert messages == [f"data: {root / '.cache'} also holds 4 cache file(s) of other images or sizes (0.00 GiB): "
                        "delete them when no run reads them"]


def test_header_scan_in_processes_drops_the_same_files_in_order(tmp_path):
    """Large sets are scanned by a process pool: the same files kept, in the same order with the same labels, and
    the same unusable ones named, as the scan in the process itself."""
    from conftest import write_messy_files
    root = write_image_folder(tmp_path / "ds", n_train=12, splits=("train",))
    write_messy_files(root / "train" / "circle")
    write_messy_files(root / "train" / "triangle")
    samples = data.list_images(root / "train", data.find_classes(root / "train"))
    serial, pooled = [], []
    kept = data.scan_images(samples, log=serial.append, parallel_from=len(samples) + 1)
    assert data.scan_images(samples, log=pooled.append, parallel_from=1) == kept and pooled == serial
    assert serial and "skipping 8 unusable image file(s)" in serial[0] and "triangle/zero.jpg" in serial[0]
    assert [s for s in samples if s in kept] == kept and len(kept) == len(samples) - 8


def test_cache_leaves_out_files_that_do_not_decode(tmp_path):
    from conftest import write_messy_files
    root = write_image_folder(tmp_path / "ds", n_train=4, splits=("train",))
    write_messy_files(root / "train" / "circle")
    messages = []
    samples = data.scan_images(data.list_images(root / "train", data.find_classes(root / "train")), log=messages.append)
    array, _, rows = data.build_cache(samples, 32, 32, tmp_path / "cache", log=messages.append)
    left_out = {samples[i][0].rsplit("/", 1)[-1] for i in set(range(len(samples))) - set(rows)}
    assert left_out == {"truncated.jpg", "truncated.png"} and "skipping 2 image file(s)" in messages[-1]
    with pytest.raises(SystemExit, match="truncated.jpg"):
        data.build_cache(samples, 32, 32, tmp_path / "cache", strict=True)


def test_a_cache_that_does_not_fit_on_the_disk_is_a_clear_error(tmp_path):
    """A full disk (here a file-size limit: the same error) when the cache is created: an error that says what to
    do, and no partial file left on the disk. The cache's blocks are allocated first: a disk that fills while the
    memory map is written would kill the process with SIGBUS, and no message (a tmpfs too small showed it)."""
    import subprocess
    import sys
    from conftest import ROOT
    root = write_image_folder(tmp_path / "ds", n_train=40, splits=("train",))  # 120 images of 64 px: 1.4 MB
    build = (f"import resource, signal, sys; sys.path.insert(0, {str(ROOT)!r}); import data\n"
             "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG\n"
             "resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))\n"
             f"data.build_cache(data.list_images({str(root / 'train')!r}, ['circle', 'square', 'triangle']), 64, 64, "
             f"{str(tmp_path / 'cache')!r})")
    result = subprocess.run([sys.executable, "-c", build], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"error: no room for the decoded images (1 MiB) in {tmp_path / 'cache'}" in result.stderr
    assert "--no-cache" in result.stderr
    assert not [p.name for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"]


def test_interrupted_cache_build_goes_on_where_it_stopped(tmp_path):
    """SIGKILL a cache build after some chunks are on disk: the next build decodes only the rest, says so, and
    gives the same array as decoding every file now."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos" / "a"
    folder.mkdir(parents=True)
    for i in range(160):  # photo-sized, so that decoding takes a while
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(folder / f"{i:03d}.jpg")
    Image.new("RGB", (10, 10)).save(folder / "zzz.png")
    (folder / "zzz.png").write_bytes((folder / "zzz.png").read_bytes()[:40])  # decodes in no chunk: listed bad
    samples = data.list_images(tmp_path / "photos", ["a"])
    build = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import data\n"
             f"data.build_cache(data.list_images({str(tmp_path / 'photos')!r}, ['a']), 64, None, "
             f"{str(tmp_path / 'cache')!r}, chunk=8)")
    process = subprocess.Popen([sys.executable, "-c", build])
    deadline = time.time() + 60
    while not list((tmp_path / "cache").glob("*.progress.json")) and time.time() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)  # a chunk or two of 8 images is on disk
    process.wait()
    assert not list((tmp_path / "cache").glob("*.npy")), "the build finished before it could be killed"
    messages = []
    array, aspects, rows = data.build_cache(samples, 64, None, tmp_path / "cache", log=messages.append, chunk=8)
    (resumed,) = [m for m in messages if "goes on at image" in m]
    assert 0 < int(resumed.split("image ")[1].split("/")[0]) < len(samples)
    assert any("decoding into the cache: 161/161 images" in m for m in messages)
    assert list(rows) == list(range(160)) and "zzz.png" in messages[-1]  # the bad file listed, left out
    fresh = data.DecodedImages(samples, 64)  # the whole photo, squashed: what resized crops are drawn from
    assert all(np.array_equal(array[i], fresh[i][0].numpy()) for i in range(160))
    assert np.allclose(aspects[:160], 4 / 3)
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".aspects", ".json", ".lock", ".npy"]


def test_batch_translation_matches_reflect_padding_and_cropping():
    images = torch.randint(0, 256, (16, 12, 10, 3), dtype=torch.uint8)
    uniforms, flips = data.hash_uniforms(0, 0, np.arange(16), 4), torch.arange(16) % 3 == 0
    out = data.padded_crop_flip(images, uniforms, flips, pad=3)
    assert out.shape == (16, 3, 12, 10) and out.is_contiguous(memory_format=torch.channels_last)
    padded = torch.nn.functional.pad(images.permute(0, 3, 1, 2).float(), (3, 3, 3, 3), mode="reflect")
    for i, (u, flip) in enumerate(zip(uniforms, flips)):
        dy, dx = int(u[0] * 7) - 3, int(u[1] * 7) - 3
        expected = padded[i][:, 3 + dy:3 + dy + 12, 3 + dx:3 + dx + 10]  # the crop, then maybe a flip
        expected = expected.flip(2) if flip else expected
        assert torch.equal(out[i].float(), expected), i


def test_batch_resized_crop_keeps_the_whole_image_at_full_scale():
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    square, full = torch.ones(2), torch.tensor([[1.0, 0.5, 0.5, 0.5], [1.0, 0.5, 0.5, 0.5]])  # area 1, aspect 1
    out = data.resized_crop_flip(images, square, full, torch.tensor([False, True]), 8, 0.25)
    assert torch.equal(out[0], images[0].permute(2, 0, 1))
    assert torch.equal(out[1], images[1].permute(2, 0, 1).flip(2))
    zoomed = data.resized_crop_flip(images, torch.tensor([0.5, 2.0]), torch.rand(2, 4), torch.rand(2) < 0.5, 16, 0.25)
    assert zoomed.shape == (2, 3, 16, 16) and zoomed.dtype == torch.uint8


def test_batch_augmentation_depends_on_the_sample_not_the_batch():
    a = data.hash_uniforms(5, 2, np.array([7, 3, 9]), 5)
    b = data.hash_uniforms(5, 2, np.array([9, 1, 7]), 5)
    assert torch.equal(a[0], b[2]) and torch.equal(a[2], b[0])
    assert not torch.equal(a, data.hash_uniforms(5, 3, np.array([7, 3, 9]), 5))  # a new epoch, new draws
    assert 0 <= a.min() and a.max() < 1
    flips = [data.alternating_flips(5, epoch, np.arange(1000)) for epoch in range(3)]
    assert torch.equal(flips[0], ~flips[1]) and torch.equal(flips[0], flips[2])  # each image both ways in 2 epochs
    assert 400 < flips[0].sum() < 600


def test_cached_loaders_shard_and_batch(tmp_path):
    root = write_image_folder(tmp_path / "ds", n_train=5, splits=("train",))
    samples = data.list_images(root / "train", data.find_classes(root / "train"))
    images = data.CachedImages(*data.build_cache(samples, 32, 32, tmp_path / "cache", log=lambda *_: None)[:2], CPU)
    rows, targets = np.arange(len(samples)), [t for _, t in samples]
    seen = []
    for rank in (0, 1):
        for batch, labels in data.Batches(images, targets, range(rank, len(rows), 2), 4, CPU):
            assert batch.dtype == torch.uint8 and batch.shape[1:] == (3, 32, 32)
            seen += labels.tolist()
    assert sorted(seen) == sorted(targets)  # every image once, none padded in
    sampler = data.make_epoch_sampler(rows, 4, seed=0)
    train = data.Batches(images, targets, sampler, 4, CPU, augment("padded"), drop_last=True)
    sampler.set_epoch(1)
    assert len(train) == 15 // 4 == len(list(train))


def test_windows_trains_without_the_cache(image_folder, tmp_path, monkeypatch, capsys):
    """The cache is a memory-mapped file locked with fcntl, and its default reads the memory with os.sysconf: POSIX
    alone. On Windows (no os.sysconf) a run decodes per image, and --cache is an error that says so."""
    import train
    monkeypatch.delattr(os, "sysconf")
    flags = ["--data", str(image_folder), "--epochs", "1", "--model", "smallnet_tiny", "-b", "8", "--workers", "0"]
    train.main([*flags, "--output-dir", str(tmp_path / "run")])
    assert "--cache off (it needs Linux or macOS)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--cache needs Linux or macOS"):
        train.main([*flags, "--cache", "--output-dir", str(tmp_path / "cached")])


def test_loader_workers_share_the_cores_of_their_node(monkeypatch):
    """Loader processes per training process divide the node's cores among its own processes (torchrun's
    LOCAL_WORLD_SIZE), not among every node's (the world size)."""
    monkeypatch.setattr(data, "cpu_cores", lambda: 32)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 processes here, of 8 on 2 nodes
    monkeypatch.setattr(data, "get_world_size", lambda: 8)
    assert data.default_workers(torch.device("cuda")) == 7 and data.default_workers(torch.device("cpu")) == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # a launcher that does not say: the world size, to be safe
    assert data.default_workers(torch.device("cuda")) == 3


def test_a_containers_cpu_quota_bounds_the_cores(tmp_path, monkeypatch):
    """A Kubernetes CPU limit (cgroup v2's cpu.max: quota and period in microseconds) allows fewer cores than the
    node has, and its container sees them all: loaders, the cache build and the header scan count the quota."""
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(data, "CGROUP_CPU_MAX", cpu_max)
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    for text, cores in (("150000 100000", 2), ("max 100000", 64), ("12800000 100000", 64)):
        cpu_max.write_text(text + "\n")
        assert data.cpu_cores() == cores
    cpu_max.unlink()  # no cgroup v2 (cgroup v1, macOS): the affinity alone
    assert data.cpu_cores() == 64


def test_evaluate_loads_with_the_workers_training_would(trained_run, image_folder, monkeypatch):
    """evaluate.py without -j takes the loader processes that train.py takes on the same machine (every core but
    one on a GPU), not a fixed count."""
    import evaluate
    chosen = []
    eval_batches = data.eval_batches
    monkeypatch.setattr(data, "eval_batches", lambda *a, **k: chosen.append(a[4]) or eval_batches(*a, **k))
    monkeypatch.setattr(data, "cpu_cores", lambda: 2)
    evaluate.main(["--ckpt", str(trained_run[0] / "best.pt"), "--data", str(image_folder)])
    assert chosen == [data.default_workers(torch.device("cpu"))] == [0]
