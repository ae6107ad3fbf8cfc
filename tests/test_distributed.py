"""torchrun on the CPU (gloo): the same files, the same optimisation path, exact evaluation, several nodes."""
import json
import os
import re
import signal
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import utils
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


TWO_PROCESSES = ["--epochs", 2, "--model", "smallnet_tiny", "-b", 4, "--workers", 0, "--model-ema"]


@pytest.fixture(scope="module")
def two_process_run(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, torchrun("train.py", "--data", image_folder, *TWO_PROCESSES, "--output-dir", out)


def test_two_processes_write_the_same_files(two_process_run, image_folder, tmp_path):
    out, result = two_process_run
    assert {"last.pt", "best.pt", "results.csv", "args.json", "train.log"} <= {p.name for p in out.iterdir()}
    assert "4 per process x 2 process(es) x 1 accumulation step(s) = 8 images per update" in result.stdout
    assert result.stdout.count("epoch 2/2  train loss") == 1  # rank 1 stays quiet
    # the epoch's last progress line is of every process, as the epoch line below it: its speed (the same images
    # over about the same time) and its loss
    progress, epoch = [line for line in result.stdout.splitlines() if line.startswith("epoch 2/2  ")]
    speeds = [float(re.findall(r"(\d+) img/s", line)[0]) for line in (progress, epoch)]
    assert 0.75 < speeds[0] / speeds[1] < 1.34, result.stdout
    assert re.findall(r" loss (\S+) ", progress) == re.findall(r"train loss (\S+) ", epoch), result.stdout
    assert not any(k.startswith("module.") for k in weights(out / "last.pt"))
    # each process evaluated its half of val with the EMA that rank 0 saved (the same BatchNorm statistics)
    best = torch.load(out / "best.pt", weights_only=True)
    run_script("evaluate.py", "--ckpt", out / "best.pt", "--data", image_folder, "--workers", 0, "--json",
               tmp_path / "m.json")
    alone = json.loads((tmp_path / "m.json").read_text())
    assert alone["count"] == best["metrics"]["count"] == 18
    assert alone["loss"] == pytest.approx(best["metrics"]["loss"], rel=1e-5)
    assert alone["top1"] == best["metrics"]["top1"]
    # a different number of processes cannot continue this run
    resumed = run_script("train.py", "--resume", out / "last.pt", check=False)
    assert resumed.returncode != 0 and "2 process(es)" in resumed.stderr
    # nor can a new job write into its folder: every process stops with the error, none mid-collective
    last = (out / "last.pt").read_bytes()
    again = torchrun("train.py", "--data", image_folder, *TWO_PROCESSES, "--output-dir", out, check=False)
    assert again.returncode != 0 and "already holds a run's checkpoints" in again.stderr
    assert "Connection closed by peer" not in again.stderr and (out / "last.pt").read_bytes() == last


@pytest.mark.parametrize("flags", [["--cache", "--opt", "sgd"], ["--no-cache"]])  # smallnet's default: Muon
def test_two_processes_follow_the_path_of_one(image_folder, tmp_path, flags):
    """2 processes x batch 4 and 1 process x batch 8 see the same images per step, augmented the same way (read
    from the cache or decoded per image), and average the same gradients (for SGD, and for Muon's updates)."""
    common = ["--data", image_folder, "--epochs", 1, "--model", "smallnet_tiny_gn", "--amp", "off", "--workers", 0,
              *flags]
    run_script("train.py", *common, "-b", 8, "--output-dir", tmp_path / "one", env=ENV)
    torchrun("train.py", *common, "-b", 4, "--output-dir", tmp_path / "two")
    one, two = weights(tmp_path / "one" / "last.pt"), weights(tmp_path / "two" / "last.pt")
    for key in one:  # equal up to float summation order: within 1e-5 relative, tensor by tensor
        assert (one[key] - two[key]).norm() <= 1e-5 * one[key].norm(), key
    start = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["step"]
    assert start == 6  # 48 images / 8 per step: the comparison covers real steps


def test_killed_torchrun_job_resumes_to_the_same_weights(image_folder, tmp_path):
    """SIGKILL the whole torchrun job once a last.pt exists, resume it under torchrun: bitwise the same weights
    (with Muon, whose state holds each filter's norm besides the momentum, and the EMA)."""
    common = ["--data", image_folder, "--epochs", 2, "--model", "smallnet_tiny", "-b", 4, "--workers", 0,
              "--model-ema", "--seed", 3, "--opt", "muon"]
    torchrun("train.py", *common, "--output-dir", tmp_path / "full")
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(ROOT / "train.py"),
           *map(str, common), "--save-every-steps", "7", "--output-dir", str(out)]
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


def test_two_nodes_train_together(image_folder, two_process_run, tmp_path):
    """Two nodes of one process each train exactly as one node of two processes."""
    port = free_port()
    out = tmp_path / "multinode"
    procs = []
    for node_rank in (0, 1):
        launcher = ("--nnodes=2", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint=127.0.0.1:{port}")
        cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc-per-node=1", str(ROOT / "train.py"),
               "--data", str(image_folder), *map(str, TWO_PROCESSES), "--output-dir", str(out)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert any("x 2 process(es)" in o for o in outputs)
    one_node, two_nodes = (torch.load(d / "last.pt", weights_only=True) for d in (two_process_run[0], out))
    for key in ("model", "model_ema"):
        assert all(torch.equal(one_node[key][k], two_nodes[key][k]) for k in one_node[key]), key


def test_each_header_is_checked_by_one_process(tmp_path):
    """Under torchrun the header scan is shared: each process reads half of the files (8 GPUs each reading every
    file of ImageNet would take 8 times as long), and every process keeps the same files and skips the same ones."""
    from conftest import write_messy_files
    root = write_image_folder(tmp_path / "ds", n_train=10, splits=("train",))
    write_messy_files(root / "train" / "circle")
    script = tmp_path / "scan.py"
    script.write_text(f"""import json, sys
sys.path.insert(0, {str(ROOT)!r})
import data, utils
checked, check = [], data.check_image
data.check_image = lambda path: checked.append(path) or check(path)
rank = utils.setup_distributed("cpu")[0]
samples = data.list_images({str(root / "train")!r}, data.find_classes({str(root / "train")!r}))
kept = data.scan_images(samples, log=lambda message: print(message.splitlines()[0]))
with open({str(tmp_path)!r} + f"/report{{rank}}.json", "w") as f:  # not stdout, where two processes' lines mix
    json.dump({{"checked": checked, "kept": kept, "files": len(samples)}}, f)
utils.cleanup_distributed()
""")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(script)], capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    reports = [json.loads((tmp_path / f"report{rank}.json").read_text()) for rank in (0, 1)]
    assert len(reports) == 2 and reports[0]["kept"] == reports[1]["kept"]
    files = reports[0]["files"]
    assert sorted(reports[0]["checked"] + reports[1]["checked"]) == sorted(set(reports[0]["checked"] +
                                                                              reports[1]["checked"]))
    assert [len(r["checked"]) for r in reports] == [(files + 1) // 2, files // 2]
    assert len(reports[0]["kept"]) == files - 4 and result.stdout.count("skipping 4 unusable image file(s)") == 2


def test_read_only_data_and_a_process_without_validation_images(tmp_path):
    """A dataset on a read-only file system: the cache goes to the output folder, which every process knows, so it
    is decoded once. One validation image for two processes: the second evaluates none and must still take part."""
    root = write_image_folder(tmp_path / "ds", n_train=8, n_val=1)
    for extra in sorted((root / "val").rglob("*.*"))[1:]:
        extra.unlink()
    # a read-only bind mount of the dataset onto itself, in a mount namespace of the job's own (root may write
    # anywhere else; no privileges needed: the user namespace maps the user to root inside it)
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rm (a user and mount namespace) is not available here")
    job = shlex.join([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                      str(ROOT / "train.py"), "--data", str(root), "--epochs", "1", "--model", "smallnet_tiny",
                      "-b", "4", "--workers", "0", "--cache", "--output-dir", str(tmp_path / "run")])
    script = f"mount --bind -o ro {shlex.quote(str(root))} {shlex.quote(str(root))} && exec {job}"
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=180,
                            env=ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "cache").exists() and not (root / ".cache").exists()
    assert len(list((tmp_path / "run" / "cache").glob("*.npy"))) == 2  # train and val, once
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["metrics"]["count"] == 1


def test_sync_bn_on_cpu_is_a_clear_error():
    import train
    args = train.parse_args(["--sync-bn"])
    with pytest.raises(SystemExit, match="--sync-bn needs CUDA"):
        train.check_device(args, torch.device("cpu"), world_size=2)
    train.check_device(args, torch.device("cpu"), world_size=1)  # one process: nothing to synchronise, no error


def test_more_processes_than_gpus_is_a_clear_error(image_folder, tmp_path):
    """--device cuda where no GPU is visible (CUDA_VISIBLE_DEVICES is empty here): every process says so. Which
    GPU a process takes (its local rank's, or --device cuda:N's in a single process), with 2 visible:"""
    result = torchrun("train.py", "--data", image_folder, "--epochs", 1, "--device", "cuda", "--output-dir",
                      tmp_path / "x", check=False)
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count("--device cuda: this machine has no cuda device") == 2
    cuda, cuda1 = torch.device("cuda"), torch.device("cuda:1")
    assert [utils.gpu_index(cuda, rank, 2, 2) for rank in (0, 1)] == [0, 1]
    assert utils.gpu_index(cuda1, 0, 1, 2) == 1  # before, a single process took GPU 0 whatever N was
    with pytest.raises(SystemExit, match=r"process 2 of this node needs GPU 2 .* but 2 GPU\(s\) are visible"):
        utils.gpu_index(cuda, 2, 3, 2)
    with pytest.raises(SystemExit, match="--device cuda:1 picks one GPU, but torchrun gives each process"):
        utils.gpu_index(cuda1, 0, 2, 2)


def test_one_failing_process_ends_the_job(tmp_path):
    """A truncated image with --strict stops the process that decodes the cache; the others end at once with a
    clear message, also when no torchrun agent is there to kill them (processes started by hand, as a cluster's
    scheduler does)."""
    root = write_image_folder(tmp_path / "ds")
    from conftest import write_messy_files
    write_messy_files(root / "train" / "circle")
    for name in ("zero.jpg", "text.jpg", "corrupt.png", "bomb.png"):  # keep only what the header scan lets through
        (root / "train" / "circle" / name).unlink()
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(root), "--epochs", "3", "--model", "smallnet_tiny",
           "-b", "4", "--workers", "0", "--strict", "--output-dir", str(tmp_path / "run")]
    start = time.time()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**ENV, **rendezvous, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in (0, 1)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs) and time.time() - start < 60
    assert "truncated.jpg" in outputs[0] and "--strict" in outputs[0]
    assert "error: process 1: the process that decodes the images into the cache failed" in outputs[1]
    assert "Traceback" not in outputs[0] + outputs[1]


def test_processes_read_and_compute_as_rank_0_decides_and_wait_for_the_cache_build(tmp_path):
    """Every process reads the way rank 0 decides (the cache build has collectives), and computes in its autocast
    (gradients of fp16 scaled up and of bf16 would be averaged), also on a machine with less memory and no bf16
    units. An ImageNet-sized cache takes an hour to decode, while collectives give up after 10 minutes: here 2 s,
    and a build of 6 s (each image takes a second)."""
    root = write_image_folder(tmp_path / "ds", n_train=3, n_val=1)
    script = tmp_path / "wait.py"
    script.write_text(f"""import datetime, sys, time, types
sys.path.insert(0, {str(ROOT)!r})
import torch, data, train, utils
utils.COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=2)
rank, local_rank, _, device = utils.setup_distributed("cpu")
torch.cpu._is_avx512_bf16_supported = lambda: rank == 0
if rank == 1:  # a machine with a page of memory: caching would not be its choice
    sysconf = data.os.sysconf
    data.os.sysconf = lambda name: 1 if name == "SC_PHYS_PAGES" else sysconf(name)
print(f"rank {{rank}} caches: {{data.decide_cache(None, [(6, 32)], print)}}", flush=True)  # one write: whole
args = train.parse_args(["--data", {str(root)!r}, "--workers", "0"])
print(f"rank {{rank}} amp: {{train.load_data(args, {str(tmp_path)!r}, local_rank, 2, device, print)[0].amp}}",
      flush=True)
store_image = data.store_image
data.store_image = lambda *args: time.sleep(1) or store_image(*args)
samples = data.list_images({str(root / "train")!r}, ["circle", "square"])
args = types.SimpleNamespace(data={str(root)!r}, train_csv=None, strict=False)
[(images, rows)] = data.cache_splits(args, [(samples, (32, 32))], rank, local_rank, device, None, print)
print(f"rank {{rank}} has {{len(rows)}} images", flush=True)
utils.cleanup_distributed()
""")
    result = torchrun(script)
    assert "rank 0 caches: True" in result.stdout and "rank 1 caches: True" in result.stdout
    assert "rank 0 amp: bf16" in result.stdout and "rank 1 amp: bf16" in result.stdout
    assert "rank 0 has 6 images" in result.stdout and "rank 1 has 6 images" in result.stdout


def test_time_budget_is_one_number_for_every_process(tmp_path):
    """Each process times its own first epoch; all must fit the same number of epochs, or they follow different
    schedules and one ends up waiting alone in a collective."""
    script = tmp_path / "fit.py"
    script.write_text(f"""import sys, pathlib
sys.path.insert(0, {str(ROOT)!r})
import train, utils
rank, _, _, device = utils.setup_distributed("cpu")
epochs = train.epochs_for_time(0.001, 1.0 + 0.9 * rank, 10, 10, 0.0, device, lambda *_: None)  # 3.6 s
pathlib.Path({str(tmp_path)!r}, f"rank{{rank}}").write_text(str(epochs))
utils.cleanup_distributed()
""")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             str(script)], capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 0, result.stderr
    fitted = [int((tmp_path / f"rank{rank}").read_text()) for rank in (0, 1)]
    assert fitted == [1, 1]  # the slower process's 1.9 s per epoch decides: 1 epoch, not 3
