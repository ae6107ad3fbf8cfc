"""train.py, evaluate.py and predict.py as a user runs them: real files, real subprocesses."""
import argparse
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
import utils
from conftest import ROOT, eval_transform, run_script, truncated_jpeg, write_image_folder
from model import build_model

TINY = ["--model", "smallnet_tiny", "-b", "8", "--workers", "0"]
CPU = torch.device("cpu")


def read_results(run_dir):
    with open(run_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def test_training_writes_every_output(trained_run, image_folder):
    out, result = trained_run
    assert {"last.pt", "best.pt", "results.csv", "args.json", "train.log", "train_batch.jpg"} <= {
        p.name for p in out.iterdir()}
    rows = read_results(out)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == train.RESULTS_COLUMNS["single"]
    assert all(math.isfinite(float(r["train_loss"])) and float(r["images_per_s"]) > 0 for r in rows)
    assert_shows_augmented_images(out / "train_batch.jpg", image_folder, 8)
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    # time to accuracy: the run's wall time at each epoch's end, its training and evaluation and what came before
    times = [float(r["time"]) for r in rows]
    assert float(rows[0]["seconds"]) < times[0] < times[1] <= checkpoint["elapsed"]
    assert times[1] - times[0] > float(rows[1]["seconds"])
    assert checkpoint["epoch"] == 2 and checkpoint["classes"] == ["circle", "square", "triangle"]
    assert checkpoint["preprocess"]["img_size"] == 32 and checkpoint["args"]["epochs"] == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])
    assert {"optimizer", "scaler", "step", "best_score"} <= set(checkpoint)
    assert json.loads((out / "args.json").read_text())["model"] == "smallnet_tiny"
    log = (out / "train.log").read_text()
    assert "image size 32 px" in log and "step 6/6" in log and "img/s" in log and "eta" in log
    assert log.count("\r") == 0  # the log holds each epoch's final progress line, not redraws


def test_best_checkpoint_is_the_best_epoch(trained_run):
    out, _ = trained_run
    rows = read_results(out)
    best = torch.load(out / "best.pt", weights_only=True)
    best_row = max(rows, key=lambda r: float(r["val_top1"]))  # max() keeps the first of equals
    assert best["epoch"] == int(best_row["epoch"])
    assert best["metrics"]["top1"] == pytest.approx(float(best_row["val_top1"]), abs=1e-3)


def test_a_new_run_never_overwrites_the_checkpoints_of_another(trained_run, image_folder):
    out, _ = trained_run
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".pt", ".csv")}
    result = run_script("train.py", "--data", image_folder, "--epochs", 1, "--model", "smallnet_tiny", "-b", 8,
                        "--workers", 0, "--output-dir", out, check=False)
    assert result.returncode != 0
    assert f"--output-dir {out} already holds" in result.stderr and f"--resume {out / 'last.pt'}" in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".pt", ".csv")} == before


def test_two_runs_never_write_into_one_folder_at_once(trained_run, image_folder, tmp_path):
    """A second job started on a running run's folder (the same --output-dir, or a --resume of it, say a requeued
    job whose first copy still runs) would interleave their checkpoints: it is refused while the first holds it."""
    out, _ = trained_run
    for flags in (["--data", str(image_folder), "--output-dir", str(tmp_path), *TINY],
                  ["--resume", str(out / "last.pt"), "--workers", "0"]):
        folder = Path(flags[flags.index("--output-dir") + 1]) if "--output-dir" in flags else out
        running = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                                    "fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                                    str(folder / "train.log")], stdout=subprocess.PIPE, text=True)
        try:
            assert running.stdout.readline() == "locked\n"  # as a run holds it while it runs
            before = (folder / "train.log").read_bytes()
            with pytest.raises(SystemExit, match=f"another run is writing into {folder}: wait for it to end"):
                train.main(flags)
            assert (folder / "train.log").read_bytes() == before
        finally:
            running.kill()
            running.wait()
    assert not list(tmp_path.glob("*.pt"))


def test_resume_refuses_flags_that_would_change_the_run(trained_run, image_folder):
    out, _ = trained_run
    last = out / "last.pt"
    with pytest.raises(SystemExit, match=r"differ from the run's: --epochs 5 \(the run's: 2\), --tta \(the run's: "
                                         rf"False\).*--weights {last}"):
        train.main(["--resume", str(last), "--epochs", "5", "--tta", "--workers", "0"])
    # the run's own values, spelled as given or not, and what may change: the run is finished, nothing to do
    assert train.main(["--resume", str(last), "--epochs", "2", "--data", f"{image_folder}/", "--output-dir",
                       str(out), "--workers", "0", "--device", "cpu"]) is None


def test_resume_refuses_a_run_trained_with_a_flag_this_code_lacks(trained_run, tmp_path):
    """A flag since removed (--lookahead) that the run used: going on without it would not be the run it was."""
    checkpoint = torch.load(trained_run[0] / "last.pt", weights_only=True)
    checkpoint["args"].update(lookahead=True, epochs=3, output_dir=str(tmp_path))
    torch.save(checkpoint, tmp_path / "last.pt")
    with pytest.raises(SystemExit, match="was trained with --lookahead, which this train.py no longer has"):
        train.main(["--resume", str(tmp_path / "last.pt")])
    checkpoint["args"]["lookahead"] = False  # off, as by default: nothing lost
    torch.save(checkpoint, tmp_path / "last.pt")
    assert train.resume_args(train.parse_args(["--resume", str(tmp_path / "last.pt")]))[0].epochs == 3


def rename_a_class(data_now):
    for split in ("train", "val"):
        (data_now / split / "triangle").rename(data_now / split / "arrow")


def add_a_training_image(data_now):
    shutil.copy(data_now / "train" / "circle" / "001.jpg", data_now / "train" / "circle" / "new.jpg")


def remove_a_val_image(data_now):
    (data_now / "val" / "square" / "001.jpg").unlink()


def stopped_run_on_a_copy(trained_run, image_folder, tmp_path):
    """trained_run's last.pt as if it had stopped after 2 of 3 epochs, on a copy of its data in another folder."""
    checkpoint = torch.load(trained_run[0] / "last.pt", weights_only=True)
    data_now = tmp_path / "data"
    shutil.copytree(image_folder, data_now)
    checkpoint["args"].update(epochs=3, data=str(data_now), output_dir=str(tmp_path))
    torch.save(checkpoint, tmp_path / "last.pt")
    return tmp_path / "last.pt", data_now


def test_resume_on_a_copy_of_the_data_elsewhere(trained_run, image_folder, tmp_path, capsys):
    """last.pt copied alone, without best.pt: the run ends, with a word on the missing confusion matrix (it ended
    in a traceback after the last epoch when no epoch beat the run's best, so wrote no best.pt)."""
    last, _ = stopped_run_on_a_copy(trained_run, image_folder, tmp_path)
    checkpoint = torch.load(last, weights_only=True)
    torch.save({**checkpoint, "best_score": 100.0}, last)  # a best that no epoch beats
    assert train.main(["--resume", str(last), "--workers", "0"]) is None
    assert torch.load(last, weights_only=True)["epoch"] == 3 and (tmp_path / "results.png").exists()
    assert f"warning: no best.pt in {tmp_path}" in capsys.readouterr().out


def test_resume_on_data_moved_elsewhere_takes_its_new_place(trained_run, image_folder, tmp_path):
    """A cluster job requeued on another node, its data copied to that node's scratch folder: --data gives the new
    place, whose files must be the run's; the old place gone is an error that says to give it."""
    last, data_now = stopped_run_on_a_copy(trained_run, image_folder, tmp_path)
    moved = data_now.rename(tmp_path / "moved")
    with pytest.raises(SystemExit, match=re.escape(f"the run's --data {data_now} does not exist: if the data moved")):
        train.main(["--resume", str(last), "--workers", "0"])
    remove_a_val_image(shutil.copytree(moved, tmp_path / "other"))
    with pytest.raises(SystemExit, match="the validation images are not the run's"):
        train.main(["--resume", str(last), "--data", str(tmp_path / "other"), "--workers", "0"])
    with pytest.raises(SystemExit, match="--train-csv"):  # the run read a folder: a CSV would be another run
        train.main(["--resume", str(last), "--train-csv", str(moved / "x.csv"), "--workers", "0"])
    assert train.main(["--resume", str(last), "--data", str(moved), "--workers", "0"]) is None
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["epoch"] == 3 and checkpoint["args"]["data"] == str(moved)


def test_resume_with_other_parameter_groups_is_a_clear_error(trained_run, image_folder, tmp_path):
    """A run whose optimizer grouped its parameters otherwise (code since changed) cannot go on as it was: an error
    that says what to do, not torch's."""
    last, _ = stopped_run_on_a_copy(trained_run, image_folder, tmp_path)
    checkpoint = torch.load(last, weights_only=True)
    groups = checkpoint["optimizer"]["param_groups"]
    groups[0]["params"] = groups[0]["params"] + groups.pop(1)["params"]  # two groups as one
    torch.save(checkpoint, last)
    with pytest.raises(SystemExit, match=f"{last}: its optimizer state does not fit this code's parameter groups"):
        train.main(["--resume", str(last), "--workers", "0"])


@pytest.mark.parametrize("change, error", [
    (rename_a_class, r"the classes of the data \(arrow, circle, square\) are not the run's \(circle, square, tri"),
    (add_a_training_image, r"the training images are not the run's: files were added, removed"),
    (remove_a_val_image, r"the validation images are not the run's: files were added, removed")])
def test_resume_on_data_that_changed_is_refused(trained_run, image_folder, tmp_path, change, error):
    """A class renamed between the stop and the resume shifts the sorted class indices: the model's outputs would
    be trained on other labels. An image added or removed changes the epoch's order (a resume inside an epoch would
    skip other images than those it saw) and its steps, or the images that best.pt is chosen on."""
    last, data_now = stopped_run_on_a_copy(trained_run, image_folder, tmp_path)
    change(data_now)
    with pytest.raises(SystemExit, match=error):
        train.main(["--resume", str(last), "--workers", "0"])
    assert torch.load(last, weights_only=True)["epoch"] == 2


def test_evaluate_agrees_with_training(trained_run, image_folder, tmp_path):
    """The figures of best.pt, and its files written into folders that do not exist yet."""
    out, _ = trained_run
    best = torch.load(out / "best.pt", weights_only=True)
    result = run_script("evaluate.py", "--ckpt", out / "best.pt", "--data", image_folder, "--workers", 0,
                        "--json", tmp_path / "new" / "m.json", "--csv", tmp_path / "new2" / "m.csv")
    metrics = json.loads((tmp_path / "new" / "m.json").read_text())
    assert metrics["count"] == 18
    assert metrics["top1"] == pytest.approx(best["metrics"]["top1"], abs=1e-6)
    assert metrics["loss"] == pytest.approx(best["metrics"]["loss"], rel=1e-4)
    assert sum(map(sum, metrics["confusion"])) == 18 and metrics["k"] is None  # top-5 of 3 classes: 100%
    assert "per-class top-1" in result.stdout and "confusion matrix" in result.stdout and "triangle" in result.stdout
    rows = list(csv.reader(open(tmp_path / "new2" / "m.csv")))
    assert rows[0][:3] == ["class", "images", "top1"] and len(rows) == 4
    # a val/ that lacks a class: that class has no top-1 (not 0%, which reads as every image wrong)
    shutil.copytree(image_folder, tmp_path / "lacking")
    shutil.rmtree(tmp_path / "lacking" / "val" / "triangle")
    import evaluate
    lacking = evaluate.main(["--ckpt", str(out / "best.pt"), "--data", str(tmp_path / "lacking"), "--workers", "0"])
    assert lacking["per_class_count"][2] == 0 and lacking["per_class_top1"][2] is None
    assert None not in lacking["per_class_top1"][:2]
    assert re.search(r"\n2 triangle +0 +- ", evaluate.format_report(lacking, ["circle", "square", "triangle"]))


def test_the_report_of_many_classes_fits_a_terminal(tmp_path, capsys):
    """A confusion matrix has a column per class: past 20 classes evaluate.py prints, for each class, the class it
    is most often mistaken for instead; --csv keeps the whole matrix."""
    import evaluate
    classes = [f"class_{i:02d}" for i in range(25)]
    folder = write_image_folder(tmp_path / "data", classes, n_train=2, n_val=1)
    train.main(["--data", str(folder), "--epochs", "1", *TINY, "--output-dir", str(tmp_path / "run")])
    capsys.readouterr()
    metrics = evaluate.main(["--ckpt", str(tmp_path / "run" / "best.pt"), "--data", str(folder), "--workers", "0",
                             "--csv", str(tmp_path / "m.csv")])
    report = capsys.readouterr().out.splitlines()
    assert max(map(len, report[1:])) <= 120 and len(report) == 2 + 2 + 1 + 25  # title, totals, heading, table
    for true, row in enumerate(metrics["confusion"]):
        line = next(line for line in report if line.startswith(f"{true} {classes[true]} "))
        wrong = [count if j != true else 0 for j, count in enumerate(row)]
        if max(wrong):
            predicted = wrong.index(max(wrong))
            assert line.endswith(f"{classes[predicted]} ({100 * max(wrong) / sum(row):.0f}%)")
        else:
            assert line.split()[-1].endswith("%")  # top-1, and no class named
    rows = list(csv.reader(open(tmp_path / "m.csv")))
    assert len(rows) == 26 and len(rows[0]) == 3 + 25


def test_predict_names_the_class(trained_run, image_folder):
    out, _ = trained_run
    image = image_folder / "val" / "square" / "001.jpg"
    table = run_script("predict.py", image, "--ckpt", out / "best.pt", "--topk", 2, "--threshold", 0.3)
    assert "warning: --threshold does nothing with a single-label model" in table.stderr
    table = table.stdout
    results = json.loads(run_script("predict.py", image_folder / "val", "--ckpt", out / "best.pt", "--json").stdout)
    assert len(results) == 18
    (predicted,) = [r["predictions"] for r in results if r["path"] == str(image)]
    row = next(line for line in table.splitlines() if line.startswith(str(image))).split()
    assert row[1:] == [f"{p['class']}" if i % 2 == 0 else f"{p['probability']:.3f}"
                       for p in predicted[:2] for i in (0, 1)]  # the table names the JSON's top-2, in order
    probabilities = [p["probability"] for p in results[0]["predictions"]]
    assert len(probabilities) == 3 and sum(probabilities) == pytest.approx(1, abs=1e-4)
    assert probabilities == sorted(probabilities, reverse=True)
    globbed = json.loads(run_script("predict.py", f"{image_folder}/val/*/00[01].*", "--ckpt", out / "best.pt",
                                    "--json").stdout)
    assert len(globbed) == 6


def test_predict_matches_evaluate_preprocessing(trained_run, image_folder):
    """predict.py and evaluate.py classify each image identically (same decode, resize, crop)."""
    out, _ = trained_run
    import data
    import predict
    from model import model_from_checkpoint
    checkpoint = utils.load_checkpoint(out / "best.pt")
    model = model_from_checkpoint(checkpoint)
    paths = predict.expand_inputs([str(image_folder / "val")])
    predicted = [top[0][0] for _, top in predict.predict(model, paths, checkpoint["preprocess"], torch.device("cpu"))]
    batches = data.eval_batches([(p, 0) for p in paths], checkpoint["preprocess"], len(paths), torch.device("cpu"))
    ((images, _),) = list(batches)  # what evaluate.py reads
    with torch.no_grad():
        logits = model(data.make_normalize(checkpoint["preprocess"], torch.device("cpu"))(images))
    assert predicted == logits.argmax(1).tolist()


def test_predict_classifies_as_evaluate_does(trained_run, image_folder, tmp_path, capsys):
    """predict.py reads images as evaluate.py does, in loader processes with -j and in the run's autocast where
    this device computes it fast, with or without --tta: over a val folder its answers make evaluate.py's
    confusion matrix, with any -j, and a file that does not decode is skipped with a warning (on stderr: stdout
    is the JSON's)."""
    import evaluate
    import predict
    ckpt = str(trained_run[0] / "best.pt")
    folder = shutil.copytree(image_folder / "val", tmp_path / "val")
    (folder / "circle" / "broken.jpg").write_bytes(truncated_jpeg())
    classes = utils.load_checkpoint(ckpt)["classes"]
    for workers, tta in (("0", []), ("2", ["--tta"])):
        metrics = evaluate.main(["--ckpt", ckpt, "--data", str(tmp_path), "--workers", "0", *tta])
        capsys.readouterr()
        results = predict.main([str(folder), "--ckpt", ckpt, "--json", "-j", workers, *tta])
        out, err = capsys.readouterr()
        assert json.loads(out)[0]["path"] == results[0][0] and "broken.jpg" in err and "--strict" not in err
        confusion = [[sum(Path(path).parent.name == true and top[0][0] == j for path, top in results)
                      for j in range(len(classes))] for true in classes]
        assert confusion == metrics["confusion"], tta


@pytest.mark.parametrize("macos_14", [True, False])
def test_a_mac_before_macos_14_trains_in_float32(monkeypatch, macos_14):
    """MPS has bf16 from macOS 14 on; before, the first bf16 tensor is an error ("MPS BFloat16 is only supported on
    MacOS 14 or newer"), and fp16 autocast is refused on MPS: the default there is off."""
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos_14 or major < 14,
                        raising=False)
    assert utils.native_amp(torch.device("mps")) == ("bf16" if macos_14 else "off")


def test_a_cpu_without_bf16_units_trains_and_evaluates_in_float32(image_folder, trained_run, tmp_path, monkeypatch,
                                                                  capsys):
    """Emulated bf16 is slower than float32, 15x on a CPU without AVX-512: where the CPU has no bf16 instructions,
    --amp is off by default, in training and in evaluate.py of a run trained in bf16 or fp16 on a GPU; given,
    it is a warning in evaluate.py and predict.py, as in train.py."""
    import evaluate
    import predict
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False)
    train.main(["--data", str(image_folder), "--epochs", "1", *TINY, "--output-dir", str(tmp_path / "run")])
    assert json.loads((tmp_path / "run" / "args.json").read_text())["amp"] == "off"
    assert "amp: off, what this cpu computes fast" in (tmp_path / "run" / "train.log").read_text()
    checkpoint = torch.load(trained_run[0] / "best.pt", weights_only=True)
    used, evaluate_single = [], evaluate.EVALUATE["single"]
    monkeypatch.setitem(evaluate.EVALUATE, "single", lambda *a, **k: used.append(a[5]) or evaluate_single(*a, **k))
    for amp in ("bf16", "fp16"):  # trained where it is fast: a GPU
        checkpoint["args"]["amp"] = amp
        torch.save(checkpoint, tmp_path / f"{amp}.pt")
        evaluate.main(["--ckpt", str(tmp_path / f"{amp}.pt"), "--data", str(image_folder), "--workers", "0"])
    assert used == ["off", "off"]
    assert "emulated" not in capsys.readouterr().out
    evaluate.main(["--ckpt", str(tmp_path / "bf16.pt"), "--data", str(image_folder), "--workers", "0", "--amp", "bf16"])
    predict.main([str(image_folder / "val"), "--ckpt", str(tmp_path / "bf16.pt"), "--workers", "0", "--amp", "bf16"])
    output = capsys.readouterr()
    assert used[-1] == "bf16" and "warning: --amp bf16 is emulated on this cpu" in output.out
    assert "warning: --amp bf16 is emulated on this cpu" in output.err  # predict.py's stdout is its results


def test_progress_lines_go_to_a_log_file_in_the_epoch(image_folder, tmp_path, monkeypatch, capsys):
    """Where stdout is not a terminal (a cluster job's log file), a progress line is logged every
    PROGRESS_LOG_SECONDS: an ImageNet epoch would otherwise show nothing for an hour."""
    monkeypatch.setattr(train, "PROGRESS_LOG_SECONDS", 0.0)
    train.main(["--data", str(image_folder), "--epochs", "1", *TINY, "--output-dir", str(tmp_path / "run")])
    for text in (capsys.readouterr().out, (tmp_path / "run" / "train.log").read_text()):
        assert [text.count(f"step {step}/6") for step in range(1, 7)] == [1] * 6 and "\r" not in text


def test_many_options_together(image_folder, tmp_path):
    """fp16 with a GradScaler (runs on the CPU too, slowly: a warning says so), EMA, MixUp/CutMix, clipping,
    accumulation, AdamW and resized crops, on the cached path (the default for small sets), with classes in an order
    of their own; evaluate.py reads the data in that order."""
    import evaluate
    out = tmp_path / "run"
    train.main(["--data", str(image_folder), "--epochs", "2", *TINY, "--output-dir", str(out), "--amp", "fp16",
                "--model-ema", "--model-ema-decay", "0.9", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0",
                "--clip-grad-norm", "1.0", "--accum-steps", "2", "--opt", "adamw", "--train-crop", "resized",
                "--no-channels-last", "--label-smoothing", "0.2", "--classes", "triangle,circle,square"])
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    log = (out / "train.log").read_text()
    assert "--cache on" in log and checkpoint["classes"] == ["triangle", "circle", "square"]
    assert "warning: --amp fp16 is emulated on this cpu: many times slower than --amp " in log  # 30x here
    assert checkpoint["model_ema"] is not None and checkpoint["step"] == 2 * 3  # 6 batches / 2 accumulation steps
    assert checkpoint["scaler"]["scale"] > 0
    assert not torch.equal(checkpoint["model_ema"]["fc.weight"], checkpoint["model"]["fc.weight"])
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert "adamw" in str(checkpoint["args"]["opt"])
    metrics = evaluate.main(["--ckpt", str(out / "last.pt"), "--data", str(image_folder), "--workers", "0",
                             "--amp", "fp16"])  # as trained (by default a CPU evaluates fp16 runs in bf16 or float32)
    assert metrics["count"] == 18 and metrics["top1"] == pytest.approx(checkpoint["metrics"]["top1"])
    assert metrics["loss"] == pytest.approx(checkpoint["metrics"]["loss"], rel=1e-4)
    assert_shows_augmented_images(out / "train_batch.jpg", image_folder, 8)
    # --weights starts from the weights that were evaluated and kept as best: the EMA
    start = build_model("smallnet_tiny", 3, weights=out / "last.pt", log=lambda *_: None)
    assert torch.equal(start.fc.weight, checkpoint["model_ema"]["fc.weight"])


def assert_shows_augmented_images(path, image_folder, count):
    """train_batch.jpg: `count` tiles of 96 px (32 px images, enlarged 3x) with two caption lines each, none of them
    the plain training image it came from (cropped, flipped or mixed)."""
    import data
    with Image.open(path) as grid:
        assert grid.size == (96 * min(count, 8), -(-count // 8) * (96 + 30))
        tiles = [np.asarray(grid.crop((96 * i, 0, 96 * i + 96, 96)).resize((32, 32), Image.Resampling.NEAREST))
                 for i in range(min(count, 8))]
    transform = eval_transform(data.eval_preprocess(32))  # resized and center-cropped: not augmented
    plain = [transform(p).permute(1, 2, 0).numpy() for p in (image_folder / "train").rglob("*.*g")]
    for tile in tiles:
        assert tile.std() > 10  # a picture, not a blank
        assert min(np.abs(tile.astype(int) - image).mean() for image in plain) > 3


def test_deterministic_runs_are_bitwise_equal(image_folder, tmp_path):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    finals = []
    for name in ("a", "b"):
        train.main(["--data", str(image_folder), "--epochs", "1", *TINY, "--output-dir", str(tmp_path / name),
                    "--deterministic", "--mixup-alpha", "0.5"])
        finals.append(torch.load(tmp_path / name / "last.pt", weights_only=True)["model"])
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    # an in-process run leaves the process as it found it
    assert not torch.are_deterministic_algorithms_enabled()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_lr_schedule_is_warmup_then_cosine():
    """The peak once, at the warmup's last step; --lr-min at the run's last step."""
    lrs = [train.lr_at(s, 100, 10, 1.0, 0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10])) and all(a > b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[54] == pytest.approx(0.505) and lrs[99] == pytest.approx(0.01)
    assert train.lr_at(0, 10, 0, 1.0, 0.0) == 1.0 and train.lr_at(9, 10, 0, 1.0, 0.0) == 0.0  # no warmup


def recipe_args(*flags, model="smallnet_tiny"):
    """parse_args, then the optimizer's recipe for the flags not given, as train.load_data settles them."""
    args = train.parse_args(list(flags))
    return argparse.Namespace(**{**vars(args), **train.recipe_defaults(args, model, 1024, 1, log=lambda *_: None)})


def test_optimizer_groups_follow_the_recipe():
    """No weight decay on norms and biases; smallnet's BatchNorm biases learn at 64x the lr and its head at 806x
    (airbench's) with SGD and Muon, not AdamW; its BatchNorm scales are fixed; Muon (its default) takes the filters."""
    from model import build_model
    net = build_model("smallnet_tiny", 3)
    trainable = [p for p in net.parameters() if p.requires_grad]  # not the whitening stem, not BatchNorm's scales
    assert len(trainable) == len(list(net.parameters())) - 1 - 6
    sgd = train.make_optimizer(net, recipe_args("--opt", "sgd", "--wd", "0.1"), torch.device("cpu"))
    train.set_lr(sgd, 0.1)
    filters, biases, head = sgd.param_groups
    assert [g["weight_decay"] for g in sgd.param_groups] == pytest.approx([0.1, 0, 0.1 / 806.4])
    assert [g["lr"] for g in sgd.param_groups] == pytest.approx([0.1, 6.4, 80.64])
    assert all(p.ndim == 4 for p in filters["params"]) and all(p.ndim == 1 for p in biases["params"])
    assert head["params"] == [net.fc.weight] and len(trainable) == sum(len(g["params"]) for g in sgd.param_groups)
    args = recipe_args()
    assert args.opt == "muon" and args.batch_size == 64 and args.lr == pytest.approx(0.6 * 0.25)  # sqrt(64 / 1024)
    muon = train.make_optimizer(net, args, torch.device("cpu"))
    train.set_lr(muon, args.lr)
    (orthogonalized,) = [g for g in muon.param_groups if g["orthogonalize"]]
    assert orthogonalized["params"] == filters["params"] and orthogonalized["lr"] == pytest.approx(args.muon_lr)
    assert [g["lr"] / args.lr for g in muon.param_groups if not g["orthogonalize"]] == pytest.approx([64, 806.4])
    adamw = train.make_optimizer(net, recipe_args("--opt", "adamw"), torch.device("cpu"))
    assert [g["lr_scale"] for g in adamw.param_groups] == [1, 1]  # filters and head; biases
    squeezenet = build_model("squeezenet1_1", 3)  # its head is a 1x1 convolution: no filter either
    muon = train.make_optimizer(squeezenet, recipe_args("--opt", "muon"), torch.device("cpu"))
    assert not any(p is squeezenet.classifier[1].weight for g in muon.param_groups if g["orthogonalize"]
                   for p in g["params"])


@pytest.mark.parametrize("opt", ["sgd", "muon"])
def test_a_learning_rate_scale_speeds_the_step_not_the_weight_decay(opt):
    """smallnet's head learns at 806x the lr: its gradient steps are 806x larger, its weight decay is not (airbench's
    rule). Decayed 806x faster, the head of an `--opt sgd` run lost 2% of its weights a step: 35% val top-1 on 2,000
    CIFAR images where SGD reaches 60%."""
    net = build_model("smallnet_tiny", 3)
    optimizer = train.make_optimizer(net, recipe_args("--opt", opt, "--wd", "0.01"), CPU)
    train.set_lr(optimizer, 0.1)
    decayed = [p for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]]
    assert any(p is net.fc.weight for p in decayed)
    before = [p.detach().clone() for p in decayed]
    for p in net.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()  # a zero gradient: the step is the decay alone, Nesterov's (1 + momentum) x lr x wd of p
    for p, start in zip(decayed, before):
        assert torch.allclose(p, start * (1 - (1 + optimizer.defaults["momentum"]) * 0.1 * 0.01), rtol=0, atol=1e-6)
    net.fc.weight.grad = torch.ones_like(net.fc.weight)  # and the gradient's step is the scaled lr's
    start = net.fc.weight.detach().clone()
    optimizer.step()
    assert ((start - net.fc.weight) / 0.1).mean().item() > 500


def test_batch_norm_statistics_are_recomputed_at_the_evaluated_weights():
    """Before each evaluation, the BatchNorm layers that train take the mean statistics of the epoch's first
    training batches at the current weights; a frozen one keeps its own, and each keeps its momentum."""
    class Loader:  # the part of data.Batches that the recomputation uses
        def __init__(self, batches):
            self.batches, self.sampler = batches, argparse.Namespace(set_epoch=lambda epoch: None)

        def __iter__(self):
            return iter(self.batches)
    batches = [(torch.randn(4, 3, 5, 5) * (i + 1) + i, None) for i in range(3)]
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 2, 1), torch.nn.Dropout(0.5),
                                torch.nn.BatchNorm2d(2))
    model.train()
    model[0].eval()  # frozen, as keep_frozen_in_eval leaves it
    frozen_mean = model[0].running_mean.clone()
    train.recompute_batch_norm(model, model, Loader(batches), lambda x: x, 0, torch.device("cpu"), "off", images=8)
    with torch.no_grad():
        outputs = [model[:3](x) for x, _ in batches[:2]]  # 8 images: two batches; dropout off
    assert torch.equal(model[0].running_mean, frozen_mean) and model[3].momentum == 0.1
    expected_mean = torch.stack([out.mean((0, 2, 3)) for out in outputs]).mean(0)
    expected_var = torch.stack([out.var((0, 2, 3)) for out in outputs]).mean(0)
    assert torch.allclose(model[3].running_mean, expected_mean, atol=1e-6)
    assert torch.allclose(model[3].running_var, expected_var, atol=1e-5)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Non-square JPEG photos of mixed sizes (60-99 x 40-59 px), two classes."""
    root, rng = tmp_path_factory.mktemp("photos"), np.random.default_rng(3)
    for split, count in (("train", 20), ("val", 5)):
        for name in ("circle", "cross"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                size = (int(rng.integers(60, 100)), int(rng.integers(40, 60)))
                data.draw_shape(name, rng).resize(size).save(root / split / name / f"{i}.jpg", quality=80)
    return root


@pytest.mark.parametrize("recipe", [["--train-crop", "padded"],
                                    ["--train-crop", "resized", "--auto-augment", "ta_wide", "--random-erase", "0.5"]])
def test_cache_changes_speed_not_results(photo_folder, tmp_path, recipe):
    """--cache and --no-cache train to bitwise-identical weights and metrics: the padded-crop recipe, and the
    resized-crop one with auto-augment and random erasing, on non-square photos (the per-image run with 2 loader
    processes)."""
    runs = {}
    for cache, workers in (("--cache", "0"), ("--no-cache", "2")):
        out = tmp_path / cache
        train.main(["--data", str(photo_folder), "--epochs", "2", "--img-size", "32", *TINY, "--workers", workers,
                    cache, *recipe, "--output-dir", str(out)])
        runs[cache] = torch.load(out / "last.pt", weights_only=True), read_results(out)
        assert f"--cache {'on' if cache == '--cache' else 'off'}" in (out / "train.log").read_text()
    (cached, cached_rows), (decoded, decoded_rows) = runs["--cache"], runs["--no-cache"]
    assert all(torch.equal(cached["model"][k], decoded["model"][k]) for k in cached["model"])
    assert cached["metrics"] == decoded["metrics"]
    columns = ("train_loss", "train_top1", "val_loss", "val_top1")
    assert [[r[c] for c in columns] for r in cached_rows] == [[r[c] for c in columns] for r in decoded_rows]


# --deterministic: on a GPU, only deterministic kernels give bitwise-equal runs (on the CPU it changes nothing)
RESUME_ARGS = ["--epochs", 3, *TINY, "--seed", 7, "--model-ema", "--mixup-alpha", "0.4", "--deterministic",
               "--auto-augment", "ta_wide", "--random-erase", "0.25"]
# the cached path (the default for small sets) and the per-image path give the same weights: one run to compare with
PATHS = {"cache": ["--cache"], "per-image": ["--no-cache"]}


@pytest.fixture(scope="module")
def uninterrupted(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run_script("train.py", "--data", image_folder, *RESUME_ARGS, "--cache", "--output-dir", out)
    return torch.load(out / "last.pt", weights_only=True)


def assert_same_weights(a, b):
    for key in ("model", "model_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]


@pytest.mark.parametrize("path", list(PATHS))
def test_killed_run_resumes_to_the_same_weights(image_folder, tmp_path, uninterrupted, path):
    """SIGKILL once a last.pt exists (every 2 steps, so often mid-epoch), resume: bitwise the same as no kill
    (the per-image path with 2 loader processes, the cached one with none)."""
    full = uninterrupted
    workers = "2" if path == "per-image" else "0"
    out = tmp_path / "interrupted"
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(image_folder), *map(str, RESUME_ARGS), *PATHS[path],
           "--workers", workers, "--save-every-steps", "2", "--output-dir", str(out)]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stopped_at = torch.load(out / "last.pt", weights_only=True)["step"]
    assert stopped_at < full["step"], "the run finished before it could be killed"
    # the per-image run goes on from the cache: --cache changes speed, not results
    switch = ["--cache"] if path == "per-image" else []
    result = run_script("train.py", "--resume", out / "last.pt", "--workers", workers, *switch)
    assert "resumed at epoch" in result.stdout and "--cache on" in result.stdout
    assert_same_weights(full, torch.load(out / "last.pt", weights_only=True))
    assert [r["epoch"] for r in read_results(out)] == ["1", "2", "3"]
    again = run_script("train.py", "--resume", out / "last.pt")
    assert "finished run" in again.stdout


def test_sigterm_saves_mid_epoch_and_resumes_exactly(image_folder, tmp_path, uninterrupted):
    full = uninterrupted  # on the cached path: the signal handling is the same on both
    out = tmp_path / "preempted"
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(image_folder), *map(str, RESUME_ARGS), "--cache",
           "--output-dir", str(out)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith("batch:"):  # about to start the first step
            process.send_signal(signal.SIGTERM)
            break
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 143, output
    assert "stopped at epoch 1 step 1/6" in output and "--resume" in output
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["step"] == 1 and checkpoint["epoch"] == 0
    result = run_script("train.py", "--resume", out / "last.pt")
    assert "resumed at epoch 0/3 step 1/6" in result.stdout
    assert_same_weights(full, torch.load(out / "last.pt", weights_only=True))
    assert float(read_results(out)[0]["time"]) > checkpoint["elapsed"]  # the time before the stop counts


def test_ctrl_c_while_the_cache_is_built_stops_at_once(tmp_path):
    """Ctrl-C before training starts (the cache build of an ImageNet-sized set takes an hour) ends the run at once,
    with a line that says so and nothing saved."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "photos" / "train" / name).mkdir(parents=True)
        for i in range(80):  # photo-sized noise: about a second to decode
            Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(
                tmp_path / "photos" / "train" / name / f"{i:02d}.jpg")
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(tmp_path / "photos"), "--img-size", "128", *TINY,
           "--epochs", "1", "--output-dir", str(tmp_path / "run")]
    # as in a terminal, where Ctrl-C reaches the foreground job: a suite started with `&` passes SIGINT on ignored
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stdout:
        if line.startswith("data: --cache on"):  # the build begins
            process.send_signal(signal.SIGINT)
            break
    output = process.communicate(timeout=20)[0]
    assert process.returncode == 130 and "interrupted before training started" in output, output
    assert not list((tmp_path / "photos" / ".cache").glob("*.npy")) and not list((tmp_path / "run").glob("*.pt"))


def test_default_run_learns_the_shapes(tmp_path):
    """`python train.py` with no --data: writes the shapes dataset once and trains on it with every default
    (smallnet, the cache, Muon); two epochs reach 95%, and predict.py names the right class as often as evaluation
    says."""
    import evaluate
    import predict
    result = run_script("train.py", "--epochs", 2, cwd=tmp_path)
    assert "generated shapes" in result.stdout and "--cache on" in result.stdout and "model: smallnet," in result.stdout
    # smallnet's recipe (Muon), its batch of 1024 cut to give 2,400 images 16 steps or more, its lrs scaled to it
    assert "recipe: --opt muon --lr 0.212 " in result.stdout and " --batch-size 128 " in result.stdout
    val = tmp_path / "datasets" / "shapes" / "val"
    assert len(list(val.rglob("*.jpg"))) == 600
    (run_dir,) = (tmp_path / "runs").iterdir()
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert run_dir.name.startswith("shapes-") and best["metrics"]["top1"] >= 95
    predicted = predict.main([str(val), "--ckpt", str(run_dir / "best.pt"), "--topk", "1"])
    right = sum(Path(path).parent.name == best["classes"][top[0][0]] for path, top in predicted)
    in_fp32 = evaluate.main(["--ckpt", str(run_dir / "best.pt"), "--data", str(tmp_path / "datasets" / "shapes"),
                             "--amp", "off", "--workers", "0"])  # training evaluated in bf16, predict.py in fp32
    assert 100 * right / len(predicted) == pytest.approx(in_fp32["top1"]) and in_fp32["top1"] >= 95


def test_a_tiny_set_trains_a_batchnorm_net_two_images_a_batch(tmp_path):
    """Under 32 images the batch that gives 16 steps an epoch would be 1, on which BatchNorm cannot train (resnet18
    at 32 px ends at 1x1: torch's ValueError "Expected more than 1 value per channel"): the default batch is 2 or
    more, and -b 1 given with a BatchNorm net is an error that says what to do."""
    folder = write_image_folder(tmp_path / "data", classes=("circle", "square"), n_train=12, n_val=2)  # 24 images
    flags = ["--data", str(folder), "--model", "resnet18", "--img-size", "32", "--epochs", "1", "--workers", "0"]
    result = run_script("train.py", *flags, "--output-dir", tmp_path / "run")
    assert " --batch-size 2 " in result.stdout and (tmp_path / "run" / "last.pt").is_file()
    with pytest.raises(SystemExit, match="error: -b 1: the model's BatchNorm layers need 2 or more images a batch in "
                                         "each process to train; give -b 2 or more"):
        train.main([*flags, "-b", "1", "--output-dir", str(tmp_path / "one")])


def test_small_photo_set_from_a_csv_whose_first_file_is_truncated(tmp_path):
    """244 training / 153 val photos of mixed sizes, non-square, every default (resnet18 from scratch, 96 px, the
    cache, resized crops). With a batch of 64 (3 steps per epoch) and its lr, this run once gave train loss 5.3 in
    epoch 2, val losses 54, 42, 6.2 and 67% val top-1; now the batch gives 16+ steps per epoch, the lr is scaled to
    it, and the run suggests --pretrained. Listed in random order after a file that passes the header scan and fails
    to decode: the images after it must keep their own labels (once, every one was paired with its neighbour's).
    The val CSV was written on Windows: its paths are split by backslashes."""
    from conftest import truncated_jpeg, write_photo_folder
    root = write_photo_folder(tmp_path / "photos")
    rng = np.random.default_rng(0)
    for split, separator in (("train", "/"), ("val", "\\")):
        rows = [(str(path.relative_to(root)).replace("/", separator), path.parent.name)
                for path in sorted(root.glob(f"{split}/*/*"))]
        (root / split / "bad.jpg").write_bytes(truncated_jpeg())
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("image", "label"), (f"{split}{separator}bad.jpg", "red_disc"),
                                     *rng.permutation(rows)])
    result = run_script("train.py", "--train-csv", root / "train.csv", "--val-csv", root / "val.csv", "--epochs", 3,
                        "--output-dir", tmp_path / "run")
    assert "model: resnet18," in result.stdout and "--cache on" in result.stdout and "image size 96 px" in result.stdout
    assert "--batch-size 8 " in result.stdout
    assert result.stdout.count("--pretrained (torchvision's ImageNet weights)") == 1
    assert result.stdout.count("skipping 1 image file(s) that could not be decoded") == 2
    rows = read_results(tmp_path / "run")
    assert all(float(r["train_loss"]) < 1 and float(r["val_loss"]) < 5 for r in rows), rows
    assert float(rows[-1]["val_top1"]) >= 90
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["metrics"]["count"] == 153


def test_grayscale_digits_train_with_every_default(tmp_path):
    """Grayscale images (saved as grayscale PNGs, as MNIST is) on the default path: smallnet, Muon, the cache. They
    vary in 4 of the whitening stem's 12 directions, and max-pooled black backgrounds give channels without
    variance: with airbench's BatchNorm eps (1e-12) the first step's gradients reached 1e31 and the run stayed at
    chance (50%) with a val loss of 1e34."""
    from PIL import ImageDraw
    rng = np.random.default_rng(0)
    for split, count in (("train", 160), ("val", 20)):
        for name in ("line", "ring"):
            (tmp_path / "digits" / split / name).mkdir(parents=True)
            for i in range(count):
                image = Image.new("L", (28, 28))
                x, y = rng.integers(5, 12, 2)
                shape = ImageDraw.Draw(image).ellipse if name == "ring" else ImageDraw.Draw(image).rectangle
                shape([x, y, x + (11 if name == "ring" else 2), y + 13], outline=255, width=2)
                image.save(tmp_path / "digits" / split / name / f"{i}.png")
    result = run_script("train.py", "--data", tmp_path / "digits", "--epochs", 2, "--output-dir", tmp_path / "run")
    assert "model: smallnet," in result.stdout and "--cache on" in result.stdout
    rows = read_results(tmp_path / "run")
    assert float(rows[-1]["val_top1"]) >= 95 and float(rows[-1]["val_loss"]) < 1, rows


def test_a_top_k_of_every_class_is_not_reported(tmp_path, capsys):
    """Top-2 of 2 classes (top-5 of 5) is 100% whatever the model: a figure with nothing in it is not shown."""
    import evaluate
    root = write_image_folder(tmp_path / "ds", classes=("circle", "ring"), n_train=8, n_val=3)
    trained = run_script("train.py", "--data", root, "--epochs", 1, *TINY, "--output-dir", tmp_path / "run")
    evaluate.main(["--ckpt", str(tmp_path / "run" / "best.pt"), "--data", str(root), "--workers", "0"])
    out = capsys.readouterr().out
    assert "top-1" in out and "top-2" not in out + trained.stdout
    assert read_results(tmp_path / "run")[0]["val_top5"] == ""
    evaluate.main(["--ckpt", str(tmp_path / "run" / "best.pt"), "--data", str(root), "--topk", "1", "--workers", "0"])
    assert next(line for line in capsys.readouterr().out.splitlines() if line.startswith("images ")).count("top-") == 1


def test_a_top_k_of_0_is_reported():
    """A model that ranks the true class last: top-5 of 6 classes is 0%, a figure to show, not to drop."""
    import evaluate

    class TrueClassLast(torch.nn.Module):
        def forward(self, images):
            return torch.arange(6.0).expand(len(images), 6)
    batches = [(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64))]
    metrics = evaluate.evaluate(TrueClassLast(), batches, torch.device("cpu"), 6, data.eval_preprocess(8))
    assert (metrics["k"], metrics["topk"]) == (5, 0.0) and metrics["summary"] == "top-1 0.00% top-5 0.00%"


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "0"], "--epochs must be in [1, inf), got 0"),
    (["-b", "0"], "--batch-size must be in [1, inf), got 0"),
    (["--img-size", "0"], "--img-size must be in [1, inf), got 0"),  # 0 was taken for "not given"
    (["--lr", "-1"], "--lr must be in (0, inf), got -1.0"),
    (["--lr", "0"], "--lr must be in (0, inf), got 0.0"),  # Muon's filters' lr is a multiple of it: 0 divided
    (["--momentum", "2"], "--momentum must be in [0, 1), got 2.0"),
    (["--min-scale", "2"], "--min-scale must be in (0, 1], got 2.0"),
    (["--crop-pct", "0"], "--crop-pct must be in (0, 1], got 0.0"),
    (["--mixup-alpha", "-1"], "--mixup-alpha must be in [0, inf), got -1.0"),
    (["--random-erase", "2"], "--random-erase must be in [0, 1], got 2.0"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1), got 1.5"),
    (["--model-ema-decay", "1.5"], "--model-ema-decay must be in [0, 1), got 1.5"),
    (["--model", "resnet19"], "did you mean resnet18"),
    (["--resume", "nowhere/last.pt"], "does not exist"),
    (["--weights", "nowhere/best.pt"], "--weights: nowhere/best.pt does not exist"),
    (["--model", "smallnet", "--pretrained"], "--pretrained: torchvision has no weights for our smallnet"),
])
def test_bad_flags_are_argparse_errors(flags, message, image_folder, capsys):
    with pytest.raises(SystemExit) as exit:
        train.main(["--data", str(image_folder), *flags])
    assert exit.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("model,size,message", [
    ("smallnet_tiny", 8, "--model smallnet_tiny cannot take --img-size 8 images"),  # its pooling leaves 0x0
    ("vit_b_16", 32, "Wrong image height! Expected 224 but got 32"),  # a fixed size
])
def test_an_image_size_the_model_cannot_take_is_an_error(model, size, message, image_folder, tmp_path):
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.main(["--data", str(image_folder), "--model", model, "--img-size", str(size), "--workers", "0",
                    "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "last.pt").exists()


def test_an_lr_min_above_the_peak_lr_is_an_error(image_folder, tmp_path):
    """The peak lr comes from the recipe, scaled to the batch, which small sets shrink: an --lr-min above it made
    the schedule rise instead of decay (SGD at batch 2 here: peak 0.0016, --lr-min 0.01), silently."""
    args = train.parse_args(["--data", str(image_folder), "--opt", "sgd", "--lr-min", "0.01"])
    with pytest.raises(SystemExit, match=r"--lr-min 0.01 is above the peak lr, 0.00156 here: .* lower --lr-min"):
        train.load_data(args, tmp_path, 0, 1, CPU, lambda *_: None)
    settled, *_ = train.load_data(train.parse_args(["--data", str(image_folder), "--lr", "0.01", "--lr-min", "0.01"]),
                                  tmp_path, 0, 1, CPU, lambda *_: None)  # a constant lr
    assert settled.lr == settled.lr_min == 0.01


def test_a_flag_that_the_other_settings_ignore_is_a_warning(image_folder, tmp_path):
    """--momentum with AdamW, --crop-padding with resized crops, --model-ema-decay without --model-ema: given, they
    did nothing, silently. The settings that do use them, and flags left at their defaults, warn of nothing."""
    messages = []
    given = ["--opt", "adamw", "--momentum", "0.8", "--train-crop", "resized", "--crop-padding", "3",
             "--model-ema-decay", "0.99", "--muon-lr", "0.1", "--min-scale", "0.3", "--val-fraction", "0.2",
             "--label-column", "tags"]
    train.load_data(train.parse_args(["--data", str(image_folder), *given]), tmp_path, 0, 1, CPU, messages.append)
    warnings = [m for m in messages if m.startswith("warning: ")]
    assert warnings == ["warning: --val-fraction does nothing with a val/ folder or --val-csv",
                        "warning: --label-column does nothing without --train-csv",
                        "warning: --momentum does nothing with --opt adamw",
                        "warning: --muon-lr does nothing without --opt muon",
                        "warning: --crop-padding does nothing with --train-crop resized",
                        "warning: --model-ema-decay does nothing without --model-ema"], warnings
    messages.clear()
    train.load_data(train.parse_args(["--data", str(image_folder), "--momentum", "0.8", "--crop-padding", "3"]),
                    tmp_path, 0, 1, CPU, messages.append)  # the defaults here: muon (its SGD part), padded crops
    assert not [m for m in messages if m.startswith("warning: ")]


def test_pretrained_picks_a_model_that_has_weights_for_small_images(image_folder, tmp_path):
    args = train.parse_args(["--data", str(image_folder), "--pretrained"])
    settled, *_ = train.load_data(args, tmp_path, 0, 1, CPU, lambda *_: None)
    assert settled.model == "resnet18"  # smallnet, the default for 32 px, has no pretrained weights


def test_more_accumulation_steps_than_batches_is_a_clear_error(image_folder, tmp_path):
    with pytest.raises(SystemExit, match=r"--accum-steps 7 is more than the 6 batch\(es\) of -b 8 in an epoch of 48"):
        train.main(["--data", str(image_folder), *TINY, "--accum-steps", "7", "--output-dir", str(tmp_path / "x")])


def test_list_models(capsys):
    with pytest.raises(SystemExit):
        train.main(["--list-models"])
    names = capsys.readouterr().out.split()
    assert "smallnet" in names and "resnet50" in names


def test_output_folders_of_runs_started_together_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = train.new_output_dir("data"), train.new_output_dir("data")
    assert first != second and first.is_dir() and second.is_dir()


def test_unwrapping_removes_only_prefixes():
    clean = utils.unwrap_state_dict({"module._orig_mod.head.module.w": 1, "_orig_mod.x": 2, "block.module.b": 3})
    assert clean == {"head.module.w": 1, "x": 2, "block.module.b": 3}


def test_compiled_model_saves_plain_weights(image_folder, tmp_path):
    """--compile (inductor on the CPU: about a minute of compiling) trains and saves weights without `_orig_mod.`."""
    run_script("train.py", "--data", image_folder, "--epochs", 1, *TINY, "--compile", "--output-dir", tmp_path / "run")
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert not any("_orig_mod" in k for k in checkpoint["model"])
    result = run_script("predict.py", image_folder / "val" / "circle" / "000.png", "--ckpt",
                        tmp_path / "run" / "last.pt")
    assert "000.png" in result.stdout


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("opt", ["sgd", "adamw", "muon"])
def test_step_with_non_finite_gradients_is_skipped(opt, amp):
    """The scaler skips the update (weights and optimizer state untouched), also with bf16 and fp32."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))  # muon: a hidden layer and a head
    args = recipe_args("--opt", opt, "--lr", "0.1", "--wd", "0.01")
    optimizer = train.make_optimizer(model, args, torch.device("cpu"))
    scaler = train.make_scaler(amp, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for clip in (1.0, None, None):  # unscaled before the step (to clip), or in it
        scaler.scale(model(torch.tensor([[1.0, float("nan"), 0.0]])).sum()).backward()
        train.optimizer_step(model, optimizer, scaler, clip_grad_norm=clip, fixed_scale=amp != "fp16")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert scaler.get_scale() == (1.0 if amp == "bf16" else 2.0**16 / 8)  # a fixed scale stays 1; fp16's backs off
    assert all(torch.isfinite(t).all() for s in optimizer.state.values() for t in s.values())
    scaler.scale(model(torch.ones(1, 3)).sum()).backward()  # a good step after it updates as usual
    train.optimizer_step(model, optimizer, scaler, fixed_scale=amp != "fp16")
    for key, value in model.state_dict().items():
        assert not torch.equal(before[key], value) and torch.isfinite(value).all(), key


def test_muon_orthogonalises_the_update_of_a_convolution_filter():
    """A Muon step on a 4-D filter: the update, seen as its [out, in*k*k] matrix, has every singular value near 1
    although the gradient's are spread widely; the filter keeps its norm."""
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3), torch.nn.Flatten(), torch.nn.Linear(16, 2))
    args = recipe_args("--opt", "muon", "--lr", "0.05", "--muon-lr", "0.24", "--muon-momentum", "0")
    optimizer = train.make_optimizer(model, args, torch.device("cpu"))
    filters = model[0].weight
    (orthogonalized,) = [g for g in optimizer.param_groups if g["orthogonalize"]]
    assert orthogonalized["params"] == [filters]
    u, v = torch.linalg.qr(torch.randn(16, 16))[0], torch.linalg.qr(torch.randn(72, 16))[0]
    gradient = u @ torch.diag(torch.logspace(0, -2, 16)) @ v.T  # singular values from 1 down to 0.01
    filters.grad = gradient.view(16, 8, 3, 3)
    before = filters.detach().clone()
    train.set_lr(optimizer, 0.05)  # the filters' group: 0.05 x muon_lr / lr
    optimizer.step()
    step = (before - filters.detach()).flatten(1) / (0.05 * orthogonalized["lr_scale"])
    spread = torch.linalg.svdvals(gradient)
    values = torch.linalg.svdvals(step)
    assert spread.max() / spread.min() > 99 and 0.6 < values.min() and values.max() < 1.2, values
    for _ in range(20):  # each step starts from the filter brought back to its first norm: it does not grow
        filters.grad = torch.randn_like(filters)
        optimizer.step()
    assert before.norm() < filters.norm() < 1.2 * before.norm()


def tiny_vit():
    from torchvision.models import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                             num_classes=3)


def tiny_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=3)


@pytest.mark.parametrize("build,not_muon", [(tiny_vit, ["class_token", "encoder.pos_embedding"]),
                                            (tiny_convnext, ["features.1.0.layer_scale", "features.3.0.layer_scale"])])
def test_muon_and_weight_decay_take_the_weights_of_linear_maps_not_tokens_or_scales(build, not_muon):
    """Muon steps the filters of convolutions and the matrices of hidden linear layers (attention's in-projection
    too), not what merely has 2 dimensions or more: a ViT's class token (zeros: Muon's kept norm made it NaN at the
    first step) and position embedding, a ConvNeXt's layer scales (1e-6, which Muon set back to before each fixed-
    size step) go with the rest, and train. Nor does weight decay take them, with any optimizer (it pulled the
    layer scales and the tokens to 0, as if they were weights; timm leaves them out too)."""
    from model import head_name
    torch.manual_seed(0)
    model = build()
    names = {id(p): name for name, p in model.named_parameters()}
    for opt in ("sgd", "adamw", "muon"):
        optimizer = train.make_optimizer(model, recipe_args("--opt", opt, "--lr", "0.1"), torch.device("cpu"))
        decayed = {names[id(p)] for group in optimizer.param_groups if group["weight_decay"] for p in group["params"]}
        assert not decayed & set(not_muon) and f"{head_name(model)}.weight" in decayed, (opt, decayed)
    muon = {names[id(p)] for group in optimizer.param_groups if group["orthogonalize"] for p in group["params"]}
    assert not muon & set(not_muon)
    assert any(name.endswith("in_proj_weight") for name in muon) == (build is tiny_vit)
    assert any(name.endswith("conv_proj.weight") or name.startswith("features.0.0.") for name in muon)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(2):
        train.set_lr(optimizer, 0.1)
        model(torch.randn(4, 3, 32, 32)).logsumexp(1).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    for name in not_muon:
        assert not torch.equal(before[name], model.get_parameter(name)), name


@pytest.mark.parametrize("shape", [(64, 576), (300, 40)])
def test_orthogonalize_computes_the_newton_schulz_iteration_as_closely_as_stepping_it(shape):
    """train.orthogonalize runs the iteration x <- a x + (b g + c g^2) x, g = x x^T, on the small Gram matrix; on a
    matrix whose singular values spread over 6 decades (tall or wide) it is as close to the iteration stepped in
    float64 as the iteration stepped in float32 is (1e-5), not 20x further, as without forming x again midway."""
    a, b, c = train.NEWTON_SCHULZ

    def stepped(x, dtype):
        x = x.to(dtype) / x.to(dtype).norm()
        wide = x.size(0) <= x.size(1)
        x = x if wide else x.T
        for _ in range(5):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        return x if wide else x.T
    torch.manual_seed(0)
    rank = min(shape)
    u, v = torch.linalg.qr(torch.randn(shape[0], rank))[0], torch.linalg.qr(torch.randn(shape[1], rank))[0]
    matrix = u @ torch.diag(torch.logspace(0, -6, rank)) @ v.T
    exact = stepped(matrix, torch.float64)
    error = (train.orthogonalize(matrix).double() - exact).norm() / exact.norm()
    assert error < 3 * (stepped(matrix, torch.float32).double() - exact).norm() / exact.norm() + 1e-6, error


def test_diverged_run_stops_and_keeps_the_last_good_checkpoint(trained_run, image_folder, tmp_path):
    """A start from weights holding NaN: every loss is NaN, every step is skipped; after 20 in a row the run stops
    with an error and saves nothing, so a resumed run's last.pt would keep its last good epoch."""
    run_dir, _ = trained_run
    nan_weights = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    first = next(k for k in nan_weights if k.endswith("weight"))
    nan_weights[first][0] = float("nan")
    torch.save(nan_weights, tmp_path / "nan.pt")
    out = tmp_path / "out"
    result = run_script("train.py", "--data", image_folder, "--epochs", 1, "--model", "smallnet_tiny", "-b", 2,
                        "--workers", 0, "--weights", tmp_path / "nan.pt", "--output-dir", out, check=False)
    assert result.returncode == 1
    assert "the loss was inf or NaN for the last 20 steps (at epoch 1 step 20" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(out.glob("*.pt"))


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL a process at random moments while it rewrites a checkpoint over and over: the file is always
    a complete checkpoint, never half of one."""
    path = tmp_path / "last.pt"
    writer = (f"import sys, torch; sys.path.insert(0, {str(ROOT)!r}); import utils\n"
              "i = 0\n"
              "while True:\n"
              f"    checkpoint = {{'step': i, 'classes': [], 'model': {{'w': torch.full((2_000_000,), float(i))}}}}\n"
              f"    utils.save_checkpoint(checkpoint, {str(path)!r})\n"
              "    i += 1\n")
    rng = np.random.default_rng(0)
    for attempt in range(6):
        process = subprocess.Popen([sys.executable, "-c", writer])
        deadline = time.time() + 60
        while not path.exists():
            assert process.poll() is None and time.time() < deadline, "the writer never wrote a checkpoint"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.6))
        process.send_signal(signal.SIGKILL)
        process.wait()
        checkpoint = utils.load_checkpoint(path)  # SystemExit if it were unreadable
        assert checkpoint["model"]["w"].eq(checkpoint["step"]).all()
        assert checkpoint["step"] >= 0
        path.unlink()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".pt"]  # leftovers are temp files, never *.pt


def test_a_failed_save_names_the_file_and_leaves_the_previous_one(tmp_path):
    """A write that fails half-way (a full disk; here a file-size limit, which fails the same way): a clear error,
    the previous last.pt intact, and no hidden temporary file left to fill the disk."""
    path = tmp_path / "last.pt"
    script = (f"import resource, signal, sys, torch; sys.path.insert(0, {str(ROOT)!r}); import utils\n"
              f"utils.save_checkpoint({{'step': 0, 'classes': [], 'model': {{}}}}, {str(path)!r})\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))\n"
              f"utils.save_checkpoint({{'step': 1, 'classes': [], 'model': {{'w': torch.zeros(2**20)}}}},"
              f" {str(path)!r})")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and f"error: could not write {path}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert utils.load_checkpoint(path)["step"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_evaluate_with_test_time_augmentation(trained_run, image_folder):
    """The TTA logits are the mean over the image, its mirror, and both shifted by 1/32 of the size (reflecting at
    the border) up-left and down-right; evaluate.py --tta reports the loss of exactly those logits."""
    import evaluate
    from model import model_from_checkpoint
    run_dir, _ = trained_run
    checkpoint = utils.load_checkpoint(run_dir / "best.pt")
    model = model_from_checkpoint(checkpoint)
    x = torch.rand(2, 3, 32, 32)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    shifts = [padded[..., :32, :32], padded[..., 2:, 2:]]
    views = [x, x.flip(3)] + [view for s in shifts for view in (s, s.flip(3))]
    with torch.no_grad():
        expected = torch.stack([model(v) for v in views]).mean(0)
        assert torch.allclose(evaluate.tta_logits(model, x), expected, atol=1e-5)
        big = torch.rand(2, 3, 96, 96)
        assert torch.allclose(evaluate.tta_logits(model, big), (model(big) + model(big.flip(3))) / 2, atol=1e-5)
    metrics = evaluate.main(["--ckpt", str(run_dir / "best.pt"), "--data", str(image_folder), "--tta", "--amp", "off",
                             "--workers", "0"])
    import data
    paths = sorted((image_folder / "val").rglob("*.*g"))
    transform, normalize = eval_transform(checkpoint["preprocess"]), data.make_normalize(checkpoint["preprocess"],
                                                                                            torch.device("cpu"))
    images = normalize(torch.stack([transform(p) for p in paths]))
    targets = torch.tensor([checkpoint["classes"].index(p.parent.name) for p in paths])
    with torch.no_grad():
        logits = evaluate.tta_logits(model, images)
    assert metrics["count"] == 18
    assert metrics["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-4)
    assert metrics["top1"] == pytest.approx(100 * (logits.argmax(1) == targets).float().mean().item())


def test_a_signal_the_caller_ignores_stays_ignored():
    """`python train.py &` in a script (or nohup) ignores Ctrl-C of the script: the run must not stop on it, as
    Python itself does not install its Ctrl-C handler then. SIGTERM still saves and stops."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with train.stop_on_signals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # a signal's Python handler runs between bytecodes of the main thread
            assert not stop.is_set()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            assert stop.is_set()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
