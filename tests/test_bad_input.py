"""Bad files, bad flags, bad checkpoints: a clear message naming the culprit, never a traceback wall."""
import importlib
import os
import pickle
import re
import shutil

import pytest
import torch

import data
from conftest import run_script, write_image_folder, write_messy_files


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("messy"))
    write_messy_files(root / "train" / "circle")
    write_messy_files(root / "val" / "square")
    # names that are not UTF-8, as a zip made on Windows extracts them here: an image, and an unusable file
    circle = root / "train" / "circle"
    shutil.copy(circle / "000.png", circle / os.fsdecode(b"caf\xe9.png"))
    (circle / "corrupt.png").rename(circle / os.fsdecode(b"corrupt-caf\xe9.png"))
    return root


def test_header_scan_names_each_bad_file(messy_folder):
    messages = []
    classes, train, val = data.load_samples(messy_folder, log=messages.append)
    names = {p.rsplit("/", 1)[-1] for p, _ in train + val}
    assert {"zero.jpg", "text.jpg", "corrupt.png", "bomb.png"}.isdisjoint(names)
    assert {"truncated.jpg", "truncated.png"} <= names  # only decoding finds them
    warnings = [m for m in messages if m.startswith("warning: skipping")]
    assert len(warnings) == 2 and all("skipping 4 unusable image file(s)" in w for w in warnings)
    assert sum("2 file(s) in the class folders of" in m and "(1 .db, 1 .txt)" in m for m in messages) == 2
    assert "bomb.png: over 178,956,970 pixels" in warnings[0] and "zero.jpg: empty file" in warnings[0]
    with pytest.raises(SystemExit, match="--strict"):
        data.load_samples(messy_folder, log=lambda *_: None, strict=True)


@pytest.mark.parametrize("cache", ["--cache", "--no-cache"])
def test_training_on_a_messy_folder_skips_and_finishes(messy_folder, tmp_path, cache):
    strict_stdout = {**os.environ, "PYTHONIOENCODING": "utf-8"}  # as in a UTF-8 locale (this one may be C)
    result = run_script("train.py", "--data", messy_folder, "--epochs", 2, "--model", "smallnet_tiny", "-b", 8,
                        "--workers", 2, cache, "--output-dir", tmp_path / "run", env=strict_stdout)
    assert "skipping 4 unusable image file(s) (--strict makes this an error)" in result.stdout
    assert "corrupt-caf\ufffd.png: " in result.stdout
    if cache == "--no-cache":  # found by a loader process: left out of its batch, named once in two epochs
        for split, folder in (("train", "circle"), ("val", "square")):
            for name in ("truncated.jpg", "truncated.png"):
                assert result.stderr.count(f"skipping {messy_folder / split / folder / name}:") == 1, result.stderr
    else:  # found while decoding into the cache, and left out
        assert result.stdout.count("skipping 2 image file(s) that could not be decoded") == 2
        assert "truncated.jpg" in result.stdout and "truncated.png" in result.stdout
    assert "Traceback" not in result.stderr
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["metrics"]["count"] == 18  # each image once
    strict = run_script("train.py", "--data", messy_folder, "--epochs", 1, "--strict", "--output-dir", tmp_path / "s",
                        check=False)
    assert strict.returncode != 0 and "text.jpg" in strict.stderr and "Traceback" not in strict.stderr


def test_evaluation_counts_each_decodable_image_once(messy_folder, trained_run, capsys):
    import evaluate
    run_dir, _ = trained_run
    metrics = evaluate.main(["--ckpt", str(run_dir / "best.pt"), "--data", str(messy_folder), "--workers", "0"])
    assert metrics["count"] == 18 and sum(map(sum, metrics["confusion"])) == 18  # not the truncated ones, not twice
    out = capsys.readouterr().out
    assert "warning: skipping" in out and "--strict" not in out  # a flag of train.py's, not evaluate.py's


def test_predict_skips_unreadable_files(trained_run, tmp_path):
    """A folder is searched as training searches a class folder: through linked folders, past hidden ones."""
    run_dir, _ = trained_run
    bad = write_messy_files(tmp_path)
    good = write_image_folder(tmp_path / "good", n_train=1, splits=("train",))
    latin = os.fsdecode(b"caf\xe9.png")  # a name that is not UTF-8, printed in a UTF-8 locale (this one may be C)
    shutil.copy(next(good.rglob("000.png")), tmp_path / latin)
    (good / ".ipynb_checkpoints").mkdir()  # Jupyter's copies of what it opened
    shutil.copy(next(good.rglob("000.png")), good / ".ipynb_checkpoints" / "000-checkpoint.png")
    (tmp_path / "linked").symlink_to(good / "train" / "circle")
    result = run_script("predict.py", tmp_path, "--ckpt", run_dir / "best.pt",
                        env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    predicted = [line.split()[0].rsplit("/", 1)[-1] for line in result.stdout.splitlines()[1:]]
    assert sorted(predicted) == ["000.png"] * 4 + ["caf\ufffd.png"]  # the good images; none of the bad ones
    assert all(name in result.stderr for name, unusable in bad.items() if unusable)


@pytest.mark.parametrize("make,message", [
    (lambda root: None, "does not exist"),
    (lambda root: (root / "train").mkdir(parents=True), "has no class folders"),
    (lambda root: root.mkdir(), "has no train/ folder"),
    (lambda root: [(root / "train" / c).mkdir(parents=True) for c in ("a", "b")], "class(es) with no images in"),
])
def test_bad_dataset_folders(make, message, tmp_path, monkeypatch):
    import train
    root = tmp_path / "ds"
    make(root)
    monkeypatch.chdir(tmp_path)  # a failed run leaves its output folder in tmp
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.main(["--data", str(root)])


def test_many_unusable_files_are_counted_and_none_usable_is_an_error(tmp_path):
    """Files that are not where they were listed (a CSV from another machine): the warning names the first 20 and
    counts the rest, and when no file is usable an error says so (not that every class is empty)."""
    write_image_folder(tmp_path, n_train=1, splits=("train",))
    good = (str(tmp_path / "train" / "circle" / "000.png"), 0)
    missing = [(str(tmp_path / f"{i}.png"), 0) for i in range(25)]
    messages = []
    assert data.scan_images([good, *missing], log=messages.append) == [good]
    assert messages[0].startswith("warning: skipping 25 unusable") and messages[0].count("no such file") == 20
    assert messages[0].endswith("\n  ... and 5 more")
    with open(tmp_path / "elsewhere.csv", "w") as f:
        f.write("image,label\n" + "".join(f"{i}.png,{i % 2}\n" for i in range(25)))
    with pytest.raises(SystemExit, match="no usable training images in .*elsewhere.csv: the warning above names"):
        data.load_csv_samples(tmp_path / "elsewhere.csv", log=messages.append)
    assert messages[-1].startswith("warning: skipping 25 unusable")


def test_class_names_that_differ_only_in_case_are_a_warning(tmp_path):
    """'Cat' and 'cat' in a hand-made CSV (or two such folders) are two classes: likely one, labelled two ways."""
    write_image_folder(tmp_path, classes=("Cat", "cat", "dog"), n_train=2, splits=("train",))
    rows = [f"{path.relative_to(tmp_path)},{path.parent.name}\n" for path in sorted(tmp_path.glob("train/*/*"))]
    (tmp_path / "labels.csv").write_text("image,label\n" + "".join(rows))
    for load in (data.load_samples, data.load_csv_samples):
        messages = []
        load(tmp_path if load is data.load_samples else tmp_path / "labels.csv", log=messages.append)
        assert sum("warning: class names that differ only in case: Cat, cat (" in m for m in messages) == 1, messages


def test_a_dataset_folder_in_another_layout_says_how_to_give_it(tmp_path):
    """Keras' and ImageFolder's layout, DATA/<class>/, and --data naming the train/ folder of a dataset."""
    write_image_folder(tmp_path / "x", splits=("train",)).joinpath("train").rename(tmp_path / "flowers")
    with pytest.raises(SystemExit, match=re.escape(f"{tmp_path / 'flowers'} holds class folders of images (circle, ")):
        data.load_samples(tmp_path / "flowers")
    write_image_folder(tmp_path / "ds")
    message = f"train is the train/ folder of a dataset: give --data {tmp_path / 'ds'}"
    with pytest.raises(SystemExit, match=re.escape(message)):
        data.load_samples(tmp_path / "ds" / "train")
    message = f"val is the val/ folder of a dataset: give --data {tmp_path / 'ds'}"
    with pytest.raises(SystemExit, match=re.escape(message)):
        data.load_samples(tmp_path / "ds" / "val")


class RunsCode:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def test_checkpoints_cannot_run_code(image_folder, tmp_path, monkeypatch):
    import evaluate
    import predict
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "classes": ["a"], "payload": RunsCode()}, evil)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    image = next((image_folder / "val" / "circle").iterdir())
    for ckpt, message in ((evil, "weights_only"), (tmp_path / "text.pt", "not a checkpoint"),
                          (tmp_path / "other.pt", "not a checkpoint written by train.py")):
        for main, args in ((predict.main, [str(image)]), (evaluate.main, ["--data", str(image_folder)])):
            with pytest.raises(SystemExit, match=message):
                main([*args, "--ckpt", str(ckpt)])
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)


def test_evaluate_refuses_data_of_other_classes(trained_run, tmp_path):
    run_dir, _ = trained_run
    other = write_image_folder(tmp_path / "other", classes=("ring", "star", "cross"), n_train=2, n_val=1)
    result = run_script("evaluate.py", "--ckpt", run_dir / "best.pt", "--data", other, check=False)
    assert result.returncode != 0 and "not the checkpoint's" in result.stderr and "Traceback" not in result.stderr


def test_evaluate_warns_when_the_split_carved_from_train_is_not_the_runs(tmp_path, capsys):
    """Without val/, the validation split is carved from train/ by seed; images added to train/ since the run
    reshuffle it, so evaluate.py's "val" would hold images the model trained on."""
    import evaluate
    root = write_image_folder(tmp_path / "ds", n_train=8, splits=("train",))
    run_script("train.py", "--data", root, "--epochs", 1, "--model", "smallnet_tiny", "--workers", 0,
               "--output-dir", tmp_path / "run")
    shutil.copytree(root, tmp_path / "copy")  # the same data in another folder: the same split
    for where in (tmp_path / "copy", root):
        flags = ["--ckpt", str(tmp_path / "run" / "best.pt"), "--data", str(where), "--workers", "0"]
        assert evaluate.main(flags)["count"] == 3 and "warning" not in capsys.readouterr().out  # the run's split
    write_image_folder(root, n_train=9, splits=("train",), seed=1)  # one more image per class, a new random draw
    assert evaluate.main(flags)["count"] == 3
    assert "warning: the val split carved from " in capsys.readouterr().out


def test_evaluate_takes_a_test_set_without_train_folder(trained_run, image_folder, tmp_path, capsys):
    """A held-out set kept on its own: DATA/val/<class>/ alone, or bare class folders (ImageFolder's layout, as timm's
    validate.py takes it) are evaluated as they are; the training images of a dataset are never taken for a test set."""
    import evaluate
    flags = ["--ckpt", str(trained_run[0] / "best.pt"), "--workers", "0"]
    full = evaluate.main([*flags, "--data", str(image_folder)])
    shutil.copytree(image_folder / "val", tmp_path / "only_val" / "val")
    shutil.copytree(image_folder / "val", tmp_path / "bare")
    for where, split in ((tmp_path / "only_val", "val"), (tmp_path / "bare", "val"), (tmp_path / "bare", "test"),
                         (image_folder / "val", "val")):  # DATA/val itself, as DATA/test would be
        metrics = evaluate.main([*flags, "--data", str(where), "--split", split])
        assert (metrics["count"], metrics["confusion"]) == (full["count"], full["confusion"]), where
    capsys.readouterr()
    next((tmp_path / "bare" / "circle").iterdir()).unlink()  # another set than the run's val: no split to warn of
    assert evaluate.main([*flags, "--data", str(tmp_path / "bare")])["count"] == full["count"] - 1
    out = capsys.readouterr().out
    assert "warning" not in out and f"on {tmp_path / 'bare'}:" in out  # no split named: the folder is the set
    with pytest.raises(SystemExit, match="give --data"):  # DATA/train named: its images are not a test set
        evaluate.main([*flags, "--data", str(image_folder / "train")])
    with pytest.raises(SystemExit, match="no train/ folder"):
        evaluate.main([*flags, "--data", str(tmp_path / "bare"), "--split", "train"])


def test_a_test_split_that_the_run_validated_on_is_a_warning(trained_run, image_folder, tmp_path, capsys):
    """A dataset of train/ and test/ alone is validated on test/, and best.pt chosen on it: evaluate.py --split test
    then gives no held-out figure, and says so. Here test/ holds the images the run validated on."""
    import evaluate
    flags = ["--ckpt", str(trained_run[0] / "best.pt"), "--workers", "0"]
    shutil.copytree(image_folder / "train", tmp_path / "ds" / "train")
    shutil.copytree(image_folder / "val", tmp_path / "ds" / "test")
    for data_flags in (["--data", str(tmp_path / "ds"), "--split", "test"], ["--data", str(tmp_path / "ds" / "test")]):
        evaluate.main([*flags, *data_flags])
        assert "warning: these test images are the ones the run validated on" in capsys.readouterr().out
    evaluate.main([*flags, "--data", str(image_folder)])  # its val split, called so
    assert "warning" not in capsys.readouterr().out


def test_an_output_folder_that_cannot_be_made_is_an_error_naming_its_flag(trained_run, image_folder, tmp_path,
                                                                         monkeypatch):
    """A file where a folder should go (or a folder without write permission): an error naming the flag, not a
    traceback of os.mkdir."""
    import evaluate
    import export
    import train
    monkeypatch.chdir(tmp_path)
    in_the_way = tmp_path / "results"
    in_the_way.write_text("a file")
    ckpt = str(trained_run[0] / "best.pt")
    for main, args, flag in (
            (train.main, ["--data", str(image_folder), "--output-dir", str(in_the_way / "run")], "--output-dir"),
            (evaluate.main, ["--ckpt", ckpt, "--data", str(image_folder), "--json", str(in_the_way / "m.json")],
             "--json"),
            (export.main, ["--ckpt", ckpt, "--output", str(in_the_way / "m.torchscript")], "--output")):
        with pytest.raises(SystemExit, match=re.escape(f"error: {flag}: cannot create the folder {in_the_way}")):
            main(args)
    (tmp_path / "runs").write_text("a file")  # where runs/<name>-<date>-<time> would go
    with pytest.raises(SystemExit, match=re.escape(f"cannot create a run folder in {tmp_path / 'runs'}")):
        train.main(["--data", str(image_folder)])


def test_evaluate_on_a_split_without_usable_images_is_an_error(trained_run, tmp_path):
    import evaluate
    run_dir, _ = trained_run
    root = write_image_folder(tmp_path / "ds", n_train=2, splits=("train",))  # the run's classes
    (root / "val" / "circle").mkdir(parents=True)
    with pytest.raises(SystemExit, match=rf"no usable images in the val split of {root}"):
        evaluate.main(["--ckpt", str(run_dir / "best.pt"), "--data", str(root), "--workers", "0"])


def test_a_single_class_is_an_error(tmp_path):
    """One class trains to 100% top-1 (and a 'top-1 100% top-1 100%' line) with nothing learnt."""
    import train
    root = write_image_folder(tmp_path / "ds", classes=("circle",), n_train=4, n_val=2)
    with pytest.raises(SystemExit, match=rf"{root}/train has one class \(circle\): a classifier needs two or more"):
        train.main(["--data", str(root), "--workers", "0", "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "last.pt").exists()


def test_weights_of_another_model_version_are_named_with_what_to_do(trained_run, image_folder, tmp_path):
    """A checkpoint from an earlier model.py (smallnet's head once had a bias) makes every script that loads it
    exit naming the file, the tensor that does not fit, and what to do, instead of torch's traceback."""
    import evaluate
    import export
    import predict
    import train
    run_dir, _ = trained_run
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    checkpoint["model"]["fc.bias"] = torch.zeros(3)
    checkpoint["epoch"] = 1  # unfinished, so that --resume gets as far as loading the weights
    old = tmp_path / "old.pt"
    torch.save(checkpoint, old)
    image = next((image_folder / "val" / "circle").iterdir())
    for main, args in ((predict.main, [image, "--ckpt", old]), (evaluate.main, ["--data", image_folder, "--ckpt", old]),
                       (export.main, ["--ckpt", old, "--output", tmp_path / "old.torchscript"]),
                       (train.main, ["--resume", old])):
        with pytest.raises(SystemExit, match=r"old\.pt do not fit .*another version of model\.py.*fc\.bias"):
            main([str(arg) for arg in args])


@pytest.mark.parametrize("script,flags,message", [
    ("evaluate", ["--data", "DATA", "--topk", "0"], "--topk must be in [1, inf), got 0"),  # printed "top-0" before
    ("evaluate", ["--data", "DATA", "--workers", "-1"], "--workers must be in [0, inf), got -1"),
    ("predict", ["image.jpg", "--threshold", "5"], "--threshold must be in [0, 1], got 5.0"),
    ("export", ["--batch-size", "0"], "--batch-size must be in [1, inf), got 0"),
])
def test_flags_out_of_range_are_argparse_errors(script, flags, message, capsys):
    with pytest.raises(SystemExit) as exit:
        importlib.import_module(script).main(["--ckpt", "never-read.pt", *flags])
    assert exit.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("script", ["train", "evaluate", "predict", "export"])
def test_a_device_that_is_not_here_is_named(script, trained_run, image_folder):
    """--device of a kind this machine lacks, or a name torch does not know: an error, in every script."""
    ckpt, image = str(trained_run[0] / "best.pt"), str(next((image_folder / "val" / "circle").iterdir()))
    flags = {"train": ["--data", str(image_folder)], "evaluate": ["--ckpt", ckpt, "--data", str(image_folder)],
             "predict": [image, "--ckpt", ckpt], "export": ["--ckpt", ckpt]}[script]
    absent = "cuda" if not torch.cuda.is_available() else "mps"
    for device, message in ((absent, f"--device {absent}: this machine has no {absent} device"),
                            ("gpu", "--device gpu: not a device")):
        with pytest.raises(SystemExit, match=message):
            importlib.import_module(script).main([*flags, "--device", device])
