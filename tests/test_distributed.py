"""torchrun on the CPU (gloo): the same files, the same optimisation path, exact evaluation, several nodes."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script, write_image_folder

# two processes on two cores; on the CPU (gloo) also where a GPU is visible: one GPU cannot take two processes
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def torchrun(script, *args, nproc=2, launcher=("--standalone",), check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc-per-node={nproc}",
           str(ROOT / script), *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_processes_mentioning(text):
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass  # gone already


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_two_processes_write_the_same_files(image_folder, tmp_path):
    out = tmp_path / "ddp"
    result = torchrun("train.py", "--data", image_folder, "--epochs", 2, "--model", "smallnet_tiny", "-b", 4,
                      "--workers", 0, "--output-dir", out)
    assert {"last.pt", "best.pt", "results.csv", "args.json", "train.log"} <= {p.name for p in out.iterdir()}
    assert "4 per process x 2 process(es) x 1 accumulation step(s) = 8 images per update" in result.stdout
    assert result.stdout.count("epoch 2/2  train loss") == 1  # rank 1 stays quiet
    assert not any(k.startswith("module.") for k in weights(out / "last.pt"))
    # a different number of processes cannot continue this run
    resumed = run_script("train.py", "--resume", out / "last.pt", check=False)
    assert resumed.returncode != 0 and "2 process(es)" in resumed.stderr


@pytest.mark.parametrize("cache", ["--cache", "--no-cache"])
def test_two_processes_follow_the_path_of_one(image_folder, tmp_path, cache):
    """2 processes x batch 4 and 1 process x batch 8 see the same images per step, augmented the same way
    (per-image PIL or batched on the device), and average the same gradients."""
    common = ["--data", image_folder, "--epochs", 1, "--model", "smallnet_tiny_gn", "--amp", "off", "--workers", 0, cache]
    run_script("train.py", *common, "-b", 8, "--output-dir", tmp_path / "one", env=ENV)
    torchrun("train.py", *common, "-b", 4, "--output-dir", tmp_path / "two")
    one, two = weights(tmp_path / "one" / "last.pt"), weights(tmp_path / "two" / "last.pt")
    for key in one:  # equal up to float summation order: within 1e-5 relative, tensor by tensor
        assert (one[key] - two[key]).norm() <= 1e-5 * one[key].norm(), key
    start = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["step"]
    assert start == 6  # 48 images / 8 per step: the comparison covers real steps


def test_killed_torchrun_job_resumes_to_the_same_weights(image_folder, tmp_path):
    """SIGKILL the whole torchrun job once a last.pt exists, resume it under torchrun: bitwise the same weights."""
    common = ["--data", image_folder, "--epochs", 2, "--model", "smallnet_tiny", "-b", 4, "--workers", 0,
              "--model-ema", "--seed", 3]
    torchrun("train.py", *common, "--output-dir", tmp_path / "full")
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(ROOT / "train.py"),
           *map(str, common), "--save-every-steps", "2", "--output-dir", str(out)]
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    kill_processes_mentioning(str(out))  # the agent and both training processes (in sessions of their own)
    job.wait()
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    assert torch.load(out / "last.pt", weights_only=True)["step"] < full["step"], "finished before the kill"
    result = torchrun("train.py", "--resume", out / "last.pt")
    assert "resumed at epoch" in result.stdout
    resumed = torch.load(out / "last.pt", weights_only=True)
    for key in ("model", "model_ema"):
        assert all(torch.equal(full[key][k], resumed[key][k]) for k in full[key]), key


def test_odd_validation_set_is_counted_exactly_once(trained_run, tmp_path):
    run_dir, _ = trained_run
    root = write_image_folder(tmp_path / "odd", n_train=1, n_val=3)
    for extra in sorted((root / "val").rglob("*.*"))[:2]:
        extra.unlink()  # 9 - 2 = 7 validation images
    single = tmp_path / "single.json"
    run_script("evaluate.py", "--ckpt", run_dir / "best.pt", "--data", root, "-b", 2, "--workers", 0, "--json", single)
    double = tmp_path / "double.json"
    torchrun("evaluate.py", "--ckpt", run_dir / "best.pt", "--data", root, "-b", 2, "--workers", 0, "--json", double)
    single, double = json.loads(single.read_text()), json.loads(double.read_text())
    assert single["count"] == double["count"] == 7
    assert double["top1"] == single["top1"] and double["confusion"] == single["confusion"]
    assert double["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_two_nodes_train_together(image_folder, tmp_path):
    port = free_port()
    out = tmp_path / "multinode"
    procs = []
    for node_rank in (0, 1):
        launcher = ("--nnodes=2", f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}")
        cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc-per-node=1", str(ROOT / "train.py"),
               "--data", str(image_folder), "--epochs", "1", "--model", "smallnet_tiny", "-b", "4", "--workers", "0",
               "--output-dir", str(out)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert any("x 2 process(es)" in o for o in outputs)
    assert (out / "last.pt").exists()


def test_sync_bn_on_cpu_is_a_clear_error(image_folder, tmp_path):
    result = torchrun("train.py", "--data", image_folder, "--epochs", 1, "--model", "smallnet_tiny", "-b", 4,
                      "--workers", 0, "--sync-bn", "--output-dir", tmp_path / "x", check=False)
    assert result.returncode != 0 and "--sync-bn needs CUDA" in result.stdout + result.stderr


def test_more_processes_than_gpus_is_a_clear_error(image_folder, tmp_path):
    """--device cuda where no GPU is visible (CUDA_VISIBLE_DEVICES is empty here): process 0 has no GPU either."""
    result = torchrun("train.py", "--data", image_folder, "--epochs", 1, "--device", "cuda", "--output-dir",
                      tmp_path / "x", check=False)
    assert result.returncode != 0
    assert "needs GPU 0 (one GPU per process), but 0 GPU(s) are visible" in result.stdout + result.stderr


def test_one_failing_process_ends_the_job(tmp_path):
    """A truncated image with --strict crashes the process that decodes it; the other must not hang."""
    root = write_image_folder(tmp_path / "ds")
    from conftest import write_messy_files
    write_messy_files(root / "train" / "circle")
    for name in ("zero.jpg", "text.jpg", "corrupt.png", "bomb.png"):  # keep only what the header scan lets through
        (root / "train" / "circle" / name).unlink()
    start = time.time()
    result = torchrun("train.py", "--data", root, "--epochs", 3, "--model", "smallnet_tiny", "-b", 4, "--workers", 0,
                      "--strict", "--output-dir", tmp_path / "run", check=False)
    assert result.returncode != 0 and time.time() - start < 120
    assert "truncated." in result.stdout + result.stderr
