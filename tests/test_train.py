"""train.py, evaluate.py and predict.py as a user runs them: real files, real subprocesses."""
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train
import utils
from conftest import ROOT, run_script, write_image_folder

TINY = ["--model", "smallnet_tiny", "-b", "8", "--workers", "0"]


def read_results(run_dir):
    with open(run_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def test_training_writes_every_output(trained_run, image_folder):
    out, result = trained_run
    assert {"last.pt", "best.pt", "results.csv", "args.json", "train.log"} <= {p.name for p in out.iterdir()}
    rows = read_results(out)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == train.RESULTS_COLUMNS["single"]
    assert all(math.isfinite(float(r["train_loss"])) and float(r["images_per_s"]) > 0 for r in rows)
    checkpoint = torch.load(out / "last.pt", weights_only=True)
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


def test_evaluate_agrees_with_training(trained_run, image_folder, tmp_path):
    out, _ = trained_run
    best = torch.load(out / "best.pt", weights_only=True)
    result = run_script("evaluate.py", "--ckpt", out / "best.pt", "--data", image_folder, "--workers", 0,
                        "--json", tmp_path / "m.json", "--csv", tmp_path / "m.csv")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["count"] == 18
    assert metrics["top1"] == pytest.approx(best["metrics"]["top1"], abs=1e-6)
    assert metrics["loss"] == pytest.approx(best["metrics"]["loss"], rel=1e-4)
    assert sum(map(sum, metrics["confusion"])) == 18 and metrics["k"] == 3  # top-5 capped at 3 classes
    assert "per-class top-1" in result.stdout and "confusion matrix" in result.stdout and "triangle" in result.stdout
    rows = list(csv.reader(open(tmp_path / "m.csv")))
    assert rows[0][:3] == ["class", "images", "top1"] and len(rows) == 4


def test_predict_names_the_class(trained_run, image_folder):
    out, _ = trained_run
    image = image_folder / "val" / "square" / "001.jpg"
    table = run_script("predict.py", image, "--ckpt", out / "best.pt", "--topk", 2).stdout
    assert str(image) in table and ("square" in table or "circle" in table or "triangle" in table)
    results = json.loads(run_script("predict.py", image_folder / "val", "--ckpt", out / "best.pt", "--json").stdout)
    assert len(results) == 18
    probabilities = [p["probability"] for p in results[0]["predictions"]]
    assert len(probabilities) == 3 and sum(probabilities) == pytest.approx(1, abs=1e-4)
    assert probabilities == sorted(probabilities, reverse=True)
    globbed = json.loads(run_script("predict.py", f"{image_folder}/val/*/00[01].*", "--ckpt", out / "best.pt", "--json").stdout)
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
    dataset = data.ImageDataset([(p, 0) for p in paths], data.eval_transform(checkpoint["preprocess"]))
    images = torch.stack([dataset[i][0] for i in range(len(paths))])
    with torch.no_grad():
        logits = model(data.make_normalize(checkpoint["preprocess"], torch.device("cpu"))(images))
    assert predicted == logits.argmax(1).tolist()


def test_many_options_together(image_folder, tmp_path):
    """fp16 with a GradScaler (runs on the CPU too), EMA, MixUp/CutMix, clipping, accumulation, AdamW, augmentations."""
    out = tmp_path / "run"
    train.main(["--data", str(image_folder), "--epochs", "2", *TINY, "--output-dir", str(out), "--amp", "fp16",
                "--model-ema", "--model-ema-decay", "0.9", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0",
                "--clip-grad-norm", "1.0", "--accum-steps", "2", "--opt", "adamw", "--auto-augment", "ta_wide",
                "--random-erase", "0.25", "--train-crop", "resized", "--no-channels-last", "--label-smoothing", "0.2"])
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["model_ema"] is not None and checkpoint["step"] == 2 * 3  # 6 batches / 2 accumulation steps
    assert checkpoint["scaler"]["scale"] > 0
    assert not torch.equal(checkpoint["model_ema"]["fc.weight"], checkpoint["model"]["fc.weight"])
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert "adamw" in str(checkpoint["args"]["opt"])


def test_deterministic_runs_are_bitwise_equal(image_folder, tmp_path):
    finals = []
    for name in ("a", "b"):
        train.main(["--data", str(image_folder), "--epochs", "1", *TINY, "--output-dir", str(tmp_path / name),
                    "--deterministic", "--mixup-alpha", "0.5"])
        finals.append(torch.load(tmp_path / name / "last.pt", weights_only=True)["model"])
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_lr_schedule_is_warmup_then_cosine():
    lrs = [train.lr_at(s, 100, 10, 1.0, 0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[55] == pytest.approx(0.505, abs=0.01) and train.lr_at(100, 100, 10, 1.0, 0.01) == pytest.approx(0.01)


def test_no_weight_decay_on_norms_and_biases():
    from model import build_model
    net = build_model("smallnet_tiny", 3)
    args = train.parse_args(["--wd", "0.1"])
    decay, no_decay = train.make_optimizer(net, args, torch.device("cpu")).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    trainable = [p for p in net.parameters() if p.requires_grad]  # all but the fixed whitening stem
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable) == len(list(net.parameters())) - 1


# --deterministic: on a GPU, only deterministic kernels give bitwise-equal runs (on the CPU it changes nothing)
RESUME_ARGS = ["--epochs", 3, *TINY, "--seed", 7, "--model-ema", "--mixup-alpha", "0.4", "--auto-augment", "ta_wide",
               "--deterministic"]


@pytest.fixture(scope="module")
def uninterrupted(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run_script("train.py", "--data", image_folder, *RESUME_ARGS, "--output-dir", out)
    return torch.load(out / "last.pt", weights_only=True)


def assert_same_weights(a, b):
    for key in ("model", "model_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_run_resumes_to_the_same_weights(image_folder, tmp_path, uninterrupted, workers):
    """SIGKILL once a last.pt exists (every 2 steps, so often mid-epoch), resume: bitwise the same as no kill."""
    out = tmp_path / "interrupted"
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(image_folder), *map(str, RESUME_ARGS),
           "--workers", str(workers), "--save-every-steps", "2", "--output-dir", str(out)]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stopped_at = torch.load(out / "last.pt", weights_only=True)["step"]
    assert stopped_at < uninterrupted["step"], "the run finished before it could be killed"
    result = run_script("train.py", "--resume", out / "last.pt", "--workers", workers)
    assert "resumed at epoch" in result.stdout
    assert_same_weights(uninterrupted, torch.load(out / "last.pt", weights_only=True))
    assert [r["epoch"] for r in read_results(out)] == ["1", "2", "3"]
    again = run_script("train.py", "--resume", out / "last.pt")
    assert "finished run" in again.stdout


def test_sigterm_saves_mid_epoch_and_resumes_exactly(image_folder, tmp_path, uninterrupted):
    out = tmp_path / "preempted"
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(image_folder), *map(str, RESUME_ARGS), "--output-dir", str(out)]
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
    assert_same_weights(uninterrupted, torch.load(out / "last.pt", weights_only=True))


def test_default_run_generates_shapes(tmp_path):
    """`python train.py` with no --data: writes the shapes dataset once and trains on it."""
    result = run_script("train.py", "--epochs", 1, "--model", "smallnet_tiny", cwd=tmp_path)
    assert "generated shapes" in result.stdout
    assert len(list((tmp_path / "datasets" / "shapes" / "val").rglob("*.jpg"))) == 600
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("shapes-") and (run_dir / "best.pt").exists()


def test_two_class_dataset_reports_top2(tmp_path):
    root = write_image_folder(tmp_path / "ds", classes=("circle", "ring"), n_train=8, n_val=3)
    run_script("train.py", "--data", root, "--epochs", 1, *TINY, "--output-dir", tmp_path / "run")
    result = run_script("evaluate.py", "--ckpt", tmp_path / "run" / "best.pt", "--data", root, "--workers", 0)
    assert "top-2" in result.stdout
    assert read_results(tmp_path / "run")[0]["val_top5"] == "100"


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["-b", "0"], "--batch-size must be at least 1"),
    (["--model", "resnet19"], "did you mean resnet18"),
    (["--resume", "nowhere/last.pt"], "does not exist"),
])
def test_bad_flags_are_argparse_errors(flags, message, image_folder):
    result = run_script("train.py", "--data", image_folder, *flags, check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_list_models():
    result = run_script("train.py", "--list-models")
    assert "smallnet" in result.stdout.split() and "resnet50" in result.stdout.split()


def test_compiled_model_saves_plain_weights(image_folder, tmp_path):
    """--compile (inductor on the CPU: about a minute of compiling) trains and saves weights without `_orig_mod.`."""
    run_script("train.py", "--data", image_folder, "--epochs", 1, *TINY, "--compile", "--output-dir", tmp_path / "run")
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert not any("_orig_mod" in k for k in checkpoint["model"])
    result = run_script("predict.py", image_folder / "val" / "circle" / "000.png", "--ckpt", tmp_path / "run" / "last.pt")
    assert "000.png" in result.stdout


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_step_with_non_finite_gradients_is_skipped(opt, amp):
    """The scaler skips the update (weights and optimizer state untouched), also with bf16 and fp32."""
    import argparse
    model = torch.nn.Linear(3, 2)
    args = argparse.Namespace(opt=opt, lr=0.1, momentum=0.9, wd=0.01)
    optimizer, scaler = train.make_optimizer(model, args, torch.device("cpu")), train.make_scaler(amp, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scaler.scale(model(torch.tensor([[1.0, float("nan"), 0.0]])).sum()).backward()
    train.optimizer_step(model, optimizer, scaler, clip_grad_norm=1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.isfinite(t).all() for s in optimizer.state.values() for t in s.values())
    scaler.scale(model(torch.ones(1, 3)).sum()).backward()  # a good step after it updates as usual
    train.optimizer_step(model, optimizer, scaler)
    assert not torch.equal(before["weight"], model.weight) and torch.isfinite(model.weight).all()


def test_diverged_run_stops_and_keeps_the_last_good_checkpoint(trained_run, image_folder, tmp_path):
    """A start from weights holding NaN: every loss is NaN, every step is skipped; after 20 in a row the run stops
    with an error, and the last.pt already in the output folder is left as it was."""
    run_dir, _ = trained_run
    nan_weights = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    first = next(k for k in nan_weights if k.endswith("weight"))
    nan_weights[first][0] = float("nan")
    torch.save(nan_weights, tmp_path / "nan.pt")
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(run_dir / "last.pt", out / "last.pt")
    good = (out / "last.pt").read_bytes()
    result = run_script("train.py", "--data", image_folder, "--epochs", 1, "--model", "smallnet_tiny", "-b", 2,
                        "--workers", 0, "--weights", tmp_path / "nan.pt", "--output-dir", out, check=False)
    assert result.returncode == 1
    assert "the loss was inf or NaN for the last 20 steps (at epoch 1 step 20" in result.stderr
    assert "Traceback" not in result.stderr
    assert (out / "last.pt").read_bytes() == good and not (out / "best.pt").exists()


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL a process at random moments while it rewrites a checkpoint over and over: the file is always
    a complete checkpoint, never half of one."""
    path = tmp_path / "last.pt"
    writer = (f"import sys, torch; sys.path.insert(0, {str(ROOT)!r}); import utils\n"
              "i = 0\n"
              "while True:\n"
              f"    utils.save_checkpoint({{'step': i, 'classes': [], 'model': {{'w': torch.full((2_000_000,), float(i))}}}}, {str(path)!r})\n"
              "    i += 1\n")
    rng = np.random.default_rng(0)
    for attempt in range(6):
        process = subprocess.Popen([sys.executable, "-c", writer])
        while not path.exists():
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.6))
        process.send_signal(signal.SIGKILL)
        process.wait()
        checkpoint = utils.load_checkpoint(path)  # SystemExit if it were unreadable
        assert checkpoint["model"]["w"].eq(checkpoint["step"]).all()
        assert checkpoint["step"] >= 0
        path.unlink()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".pt"]  # leftovers are temp files, never *.pt


def test_evaluate_with_test_time_augmentation(trained_run, image_folder, tmp_path):
    import evaluate
    calls = []
    model = lambda x: calls.append(x.shape) or x.mean((2, 3))  # noqa: E731
    evaluate.tta_logits(model, torch.rand(2, 3, 32, 32))
    assert len(calls) == 6  # flip, and two shifts of both, for small images
    calls.clear()
    evaluate.tta_logits(model, torch.rand(2, 3, 96, 96))
    assert len(calls) == 2  # flip only
    run_dir, _ = trained_run
    result = run_script("evaluate.py", "--ckpt", run_dir / "best.pt", "--data", image_folder, "--tta", "--json", tmp_path / "m.json")
    assert "with test-time augmentation" in result.stdout
    assert json.loads((tmp_path / "m.json").read_text())["count"] == 18
