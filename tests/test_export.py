"""export.py: TorchScript and ONNX files that run without our code and agree with the checkpoint. export.py and
predict.py run in the test's process (their subprocess runs are tested in test_train.py)."""
import json
import subprocess
import sys
import warnings

import pytest

import export
import predict
import utils
from conftest import run_script


def top1(images, ckpt):
    """predict.py's top-1 class name of each image, with `ckpt` (a checkpoint or an export)."""
    _, classes, *_ = predict.load_for_prediction(ckpt, utils.get_device("cpu"))
    return [classes[top[0][0]] for _, top in predict.main([*images, "--ckpt", str(ckpt), "--workers", "0"])]


def test_torchscript_round_trip_without_our_code(trained_run, image_folder, tmp_path, capsys):
    """Any file name (here model.ts): the JSON beside it is named after the whole file, so a TorchScript and an
    ONNX export of one checkpoint do not share one, and predict.py knows an export by it, not by its suffix."""
    run_dir, _ = trained_run
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.jit's deprecation is ours to handle
        export.main(["--ckpt", str(run_dir / "best.pt"), "--output", str(tmp_path / "model.ts")])
    assert "on a sample batch of 3" in capsys.readouterr().out  # traced at 2: a batch size kept in it would fail
    meta = json.loads((tmp_path / "model.ts.json").read_text())
    assert meta["classes"] == ["circle", "square", "triangle"] and meta["preprocess"]["img_size"] == 32
    # a fresh interpreter in another folder, with torch, torchvision and PIL only: our modules cannot be imported
    images = sorted(str(p) for p in (image_folder / "val").rglob("*.*g"))
    standalone = f"""
import json, sys, torch
from PIL import Image
from torchvision.transforms import v2
assert "data" not in sys.modules
meta = json.load(open({str(tmp_path / 'model.ts.json')!r}))
p = meta["preprocess"]
transform = v2.Compose([v2.Resize(p["resize_size"]), v2.CenterCrop(p["img_size"]), v2.ToImage(),
                        v2.ToDtype(torch.float32, scale=True), v2.Normalize(p["mean"], p["std"])])
model = torch.jit.load({str(tmp_path / 'model.ts')!r})
batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in {images!r}])
print(json.dumps([meta["classes"][i] for i in model(batch).argmax(1).tolist()]))
"""
    out = subprocess.run([sys.executable, "-c", standalone], capture_output=True, text=True, cwd=tmp_path, check=True)
    exported = json.loads(out.stdout)
    assert exported == top1(images, run_dir / "best.pt")  # the same top-1, image by image
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert top1(images, tmp_path / "model.ts") == exported


def test_half_precision_export_predicts_like_the_checkpoint(trained_run, image_folder, tmp_path):
    """export.py --half: float16 weights; predict.py feeds the file float16 images and names the same classes. The
    file goes into a folder that does not exist yet."""
    run_dir, _ = trained_run
    exported = tmp_path / "new" / "half.torchscript"
    export.main(["--ckpt", str(run_dir / "best.pt"), "--half", "--output", str(exported)])
    assert json.loads((tmp_path / "new" / "half.torchscript.json").read_text())["input"].startswith("float16")
    images = sorted(str(p) for p in (image_folder / "val").rglob("*.*g"))
    assert top1(images, run_dir / "best.pt") == top1(images, exported)


def test_onnx_without_its_packages_names_them(trained_run, tmp_path):
    try:
        import onnx  # noqa: F401
        pytest.skip("onnx is installed here")
    except ImportError:
        pass
    run_dir, _ = trained_run
    result = run_script("export.py", "--ckpt", run_dir / "best.pt", "--format", "onnx", "--output", tmp_path / "m.onnx",
                        check=False)
    assert result.returncode != 0 and "pip install onnx onnxscript" in result.stderr


def test_onnx_export_runs_with_any_batch(trained_run, tmp_path):
    """Runs where the optional packages are installed (pip install onnx onnxscript onnxruntime)."""
    for name in ("onnx", "onnxscript"):
        pytest.importorskip(name)
    onnxruntime = pytest.importorskip("onnxruntime")
    import numpy as np
    run_dir, _ = trained_run
    result = run_script("export.py", "--ckpt", run_dir / "best.pt", "--format", "onnx", "--dynamic-batch",
                        "--output", tmp_path / "m.onnx")
    assert "largest difference from PyTorch" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]  # the weights inside: one file
    (tmp_path / "deployed").mkdir()
    session = onnxruntime.InferenceSession(str((tmp_path / "m.onnx").rename(tmp_path / "deployed" / "m.onnx")))
    assert session.run(None, {"images": np.zeros((5, 3, 32, 32), np.float32)})[0].shape == (5, 3)


def test_an_export_never_replaces_its_checkpoint(trained_run, image_folder, tmp_path, capsys):
    """Nor do evaluate.py's reports: an output file named like the checkpoint is an error."""
    import shutil
    import evaluate
    import export
    checkpoint = tmp_path / "best.pt"
    shutil.copy(trained_run[0] / "best.pt", checkpoint)
    before = checkpoint.read_bytes()
    with pytest.raises(SystemExit):
        export.main(["--ckpt", str(checkpoint), "--output", str(tmp_path / "." / "best.pt")])
    assert "error: --output " in capsys.readouterr().err and checkpoint.read_bytes() == before
    for flag in ("--json", "--csv", "--plot"):
        with pytest.raises(SystemExit):
            evaluate.main(["--ckpt", str(checkpoint), "--data", str(image_folder), flag, str(checkpoint)])
        assert f"error: {flag} " in capsys.readouterr().err and checkpoint.read_bytes() == before


def test_a_vision_transformer_exports_to_torchscript(tmp_path):
    """torch.jit.trace's own check compares two traces' graphs, which differ for torchvision's ViTs in the names of
    values alone (export.main compares the export's outputs with PyTorch's instead). Here at another batch size too."""
    import torch
    from torchvision.models import VisionTransformer
    import export
    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=8).eval()
    exported = export.export_torchscript(vit, torch.randn(2, 3, 32, 32), tmp_path / "vit.torchscript")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(exported(images), vit(images), atol=1e-5)
