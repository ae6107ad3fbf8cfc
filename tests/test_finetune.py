"""Fine-tuning controls and training plots: --weights of our runs, --freeze, --dropout, --patience, --time,
--save-period, results.png and confusion_matrix.png."""
import csv
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import model as models
import utils
from conftest import ROOT, run_script, write_image_folder

TINY = ["--model", "smallnet_tiny", "-b", "8", "--workers", "0"]


def test_freeze_backbone_trains_only_the_head(trained_run, tmp_path):
    """Fine-tune our own best.pt on data with other classes: the head's rows follow the class names, the rest is
    frozen, BatchNorm statistics too."""
    run_dir, _ = trained_run
    other = write_image_folder(tmp_path / "other", classes=("ring", "square"))
    out = tmp_path / "ft"
    result = run_script("train.py", "--data", other, "--epochs", 1, *TINY, "--weights", run_dir / "best.pt",
                        "--freeze-backbone", "--output-dir", out)
    assert "froze 4 of 5 stages; training fc" in result.stdout and "--freeze without" not in result.stdout
    assert "1 of this run's 2 classes keep their rows" in result.stdout  # square; ring starts fresh
    before = torch.load(run_dir / "best.pt", weights_only=True)["model"]
    after = torch.load(out / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("fc."))  # weights and BN stats
    assert after["fc.weight"].shape[0] == 2


def test_weights_of_our_run_keep_the_head_rows_of_the_classes_they_share(trained_run):
    """A head trained on circle, square, triangle: its rows go where this run has the same class names (fine-tuning
    with classes reordered, added or dropped), never to whichever class has the same index."""
    run_dir, _ = trained_run
    head = models.trained_weights(torch.load(run_dir / "best.pt", weights_only=True))["fc.weight"]
    def fine_tune(classes):
        messages = []
        net = models.build_model("smallnet_tiny", len(classes), weights=run_dir / "best.pt", classes=classes,
                                 log=messages.append)
        return net.fc.weight, "\n".join(messages)

    rows, log = fine_tune(["triangle", "square", "circle"])
    assert torch.equal(rows, head.flip(0)) and "3 of this run's 3 classes keep their rows" in log
    rows, log = fine_tune(["square", "star", "circle", "x"])
    assert torch.equal(rows[0], head[1]) and torch.equal(rows[2], head[0])
    assert not any(torch.equal(rows[i], row) for i in (1, 3) for row in head)  # new classes: fresh rows
    assert "2 of this run's 4 classes keep their rows" in log
    rows, log = fine_tune(["circle", "square", "triangle"])
    assert torch.equal(rows, head) and "keep their rows" not in log


def test_freeze_first_stages(image_folder, tmp_path):
    net = models.build_model("resnet18", 3, log=lambda *_: None)
    messages = []
    frozen = models.freeze(net, 3, messages.append)
    assert "froze 3 of 7 stages; training layer2, layer3, layer4, fc" in messages[0]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in net.layer2.parameters())
    net.train()
    models.keep_frozen_in_eval(frozen)
    assert not net.bn1.training and net.layer2[0].bn1.training


def test_freezing_a_vit_freezes_its_class_token():
    """torchvision's ViTs keep their class token on the model itself, in no stage: --freeze-backbone (a linear
    probe) trained it too, and through it what the encoder computes."""
    from torchvision.models import VisionTransformer
    def trained_after_freezing(count):
        net = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                                num_classes=3)
        models.freeze(net, count, lambda *_: None)
        return {name for name, p in net.named_parameters() if p.requires_grad}
    assert trained_after_freezing(-1) == {"heads.head.weight", "heads.head.bias"}
    trained = trained_after_freezing(1)  # the embedding: conv_proj and the class token
    assert not {"conv_proj.weight", "class_token"} & trained and "encoder.pos_embedding" in trained


@pytest.mark.parametrize("name", ["smallnet_tiny", "squeezenet1_1"])  # a Linear head, a convolution head
def test_dropout_applies_in_training_only_and_keeps_the_state_dict(name):
    net = models.build_model(name, 3, log=lambda *_: None)
    keys = set(net.state_dict())
    models.set_head_dropout(net, 0.9)
    assert set(net.state_dict()) == keys
    x = torch.rand(4, 3, 64, 64)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    torch.manual_seed(0)
    a = net(x)
    assert not torch.equal(a, net(x))


def test_patience_stops_and_the_run_counts_as_finished(image_folder, tmp_path):
    out = tmp_path / "patient"
    result = run_script("train.py", "--data", image_folder, "--epochs", 30, *TINY, "--lr", "1e-9", "--opt", "sgd",
                        "--patience", 2, "--save-period", 2, "--output-dir", out)
    assert "stopping early: val top-1 has not improved for 2 epochs" in result.stdout
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["epoch"] < 30 and checkpoint["epoch"] - checkpoint["best_epoch"] == 2
    assert (out / "epoch2.pt").exists() and not (out / "epoch1.pt").exists()
    again = run_script("train.py", "--resume", out / "last.pt")
    assert "finished run" in again.stdout
    # an older checkpoint of the run would resume behind last.pt, replacing it and the rows of results.csv after it
    files = {name: (out / name).read_bytes() for name in ("last.pt", "results.csv")}
    older = run_script("train.py", "--resume", out / "epoch2.pt", check=False)
    assert older.returncode == 1 and f"error: {out / 'epoch2.pt'} is at epoch 2, behind {out / 'last.pt'}" in \
        older.stderr and f"--resume {out / 'last.pt'}" in older.stderr and "--weights" in older.stderr
    assert files == {name: (out / name).read_bytes() for name in files}


def test_time_budget_refits_the_epochs_and_the_schedule(image_folder, tmp_path):
    """--time, stopped after the first step and resumed: the epoch time is measured over the steps the resumed run
    took (5 of 6), not taken from them as if they were a whole epoch; the run ends after the fitted number of epochs,
    and the schedule reaches --lr-min at the last step of the last of them."""
    import train
    out = tmp_path / "timed"
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(image_folder), "--epochs", "1000", *TINY,
           "--time", "0.001", "--lr-min", "0.001", "--output-dir", str(out)]  # 3.6 s: 2 epochs or more, even busy
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith("batch:"):  # about to start the first step
            process.send_signal(signal.SIGTERM)
            break
    assert process.wait(timeout=120) == 143
    result = run_script("train.py", "--resume", out / "last.pt")
    fitted = re.search(r"--time 0.001 h: ([\d.]+) s per epoch \(training measured over 5 of 6 steps\), so (\d+) epochs",
                       result.stdout)
    assert fitted, result.stdout
    epochs = int(fitted.group(2))
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert 1 <= epochs < 1000 and checkpoint["epoch"] == checkpoint["args"]["epochs"] == epochs
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == epochs
    run = checkpoint["args"]  # the recipe's lr (scaled to the batch), warmup and decay
    schedule = [train.lr_at(6 * e - 1, 6 * epochs, round(6 * run["lr_warmup_epochs"]), run["lr"], 0.001,
                            run["lr_scheduler"]) for e in range(1, epochs + 1)]
    # epoch 1 ran under the schedule of 1000 epochs; the refitted one takes over from epoch 2
    assert [float(r["lr"]) for r in rows[1:]] == pytest.approx(schedule[1:], rel=1e-5) and schedule[-1] == 0.001


def test_sync_bn_keeps_frozen_batchnorm_frozen():
    """SyncBatchNorm replaces resnet's top-level bn1: the frozen stages must be the modules left in the model."""
    import train
    args = train.parse_args(["--model", "resnet18", "--freeze", "2", "--sync-bn", "--img-size", "32"])
    messages = []
    model, frozen = train.make_model(args, ["a", "b", "c"], 2, torch.device("cpu"), log=messages.append)
    assert isinstance(model.bn1, torch.nn.SyncBatchNorm) and model.bn1 in frozen
    assert "warning: --freeze without --pretrained or --weights" in messages[-1]  # random weights, frozen
    model.train()
    models.keep_frozen_in_eval(frozen)
    assert not model.bn1.training and not model.bn1.weight.requires_grad and model.layer1[0].bn1.training


def test_plots_are_written_and_legible(trained_run, image_folder, tmp_path):
    run_dir, _ = trained_run
    for name in ("results.png", "confusion_matrix.png"):
        with Image.open(run_dir / name) as image:
            assert image.width >= 200 and len(np.unique(np.asarray(image.convert("L")))) > 10  # drawn, not blank
    run_script("evaluate.py", "--ckpt", run_dir / "best.pt", "--data", image_folder, "--plot",
               tmp_path / "new" / "cm.png")
    assert (tmp_path / "new" / "cm.png").exists()


def test_plot_axes_have_round_ticks_and_percentages_stay_within_0_to_100():
    assert utils.nice_ticks(0.31, 2.7) == [0, 0.5, 1, 1.5, 2, 2.5, 3]
    assert utils.nice_ticks(33.3, 99.7, 5, (0, 100)) == [20, 40, 60, 80, 100]
    assert utils.nice_ticks(97.2, 101.5, 5, (0, 100)) == [97, 98, 99, 100]
    assert utils.nice_ticks(0.0012, 0.0019) == [0.001, 0.0012, 0.0014, 0.0016, 0.0018, 0.002]
    assert utils.nice_ticks(1, 14, 8) == [0, 2, 4, 6, 8, 10, 12, 14]


def test_plots_write_accented_class_names_where_the_system_has_a_font_for_them():
    """Pillow's own font has no accented letters: a class named café came out as caf□. A system font with them
    (DejaVu Sans on Linux, Arial elsewhere) is used where there is one."""
    from PIL import ImageFont
    try:
        ImageFont.truetype("DejaVuSans.ttf", 13)
    except OSError:
        pytest.skip("no DejaVu Sans on this system")
    font = utils.text_font(13)
    assert bytes(font.getmask("é")) != bytes(font.getmask("\u0378"))  # U+0378 is no character: drawn as a box


@pytest.mark.parametrize("n,name", [(2, "class_{:03d}_with_a_long_name"), (100, "class_{:03d}_with_a_long_name"),
                                    (3, "c{}"), (1000, "n{:08d}")])
def test_confusion_matrix_scales_from_2_to_1000_classes(tmp_path, n, name):
    classes = [name.format(i) for i in range(n)]
    confusion = torch.eye(n, dtype=torch.int64).mul(5).tolist()
    utils.plot_confusion(confusion, classes, tmp_path / "cm.png")
    with Image.open(tmp_path / "cm.png") as image:
        assert 200 <= image.width <= 2000 and image.height <= 2100
        caption = np.asarray(image.convert("L"))[-30:]
        assert (caption[:, :3] == 255).all() and (caption[:, -3:] == 255).all()  # the caption fits: not cut off
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    # 2 classes: 60 px cells; 100 classes: 12 px, room for 10 px names; 1,000 classes: 1 px, and indices for names
    cell = max(12, min(60, 1200 // n)) if n <= 100 else 1
    dark = (pixels == (8, 48, 107)).all(1).sum()  # a share of 1.0: the diagonal cells
    assert n * (cell - 1) ** 2 * 0.8 <= dark <= n * (cell + 1) ** 2 and dark >= n
    text = ((pixels[:, 0] == pixels[:, 1]) & (pixels[:, 1] == pixels[:, 2]) & (pixels[:, 0] < 128)).sum()  # black text
    assert text > (n * 2 * 20 if n <= 100 else 20 * 2 * 20)  # a name per class, or about 10 indices per axis
