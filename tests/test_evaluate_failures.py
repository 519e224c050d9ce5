"""evaluate.py accepts what train.py produces and turns bad input into one line (CPU, no network)."""
import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

import cli
import evaluate as ev
import merge_checkpoints

CONFIG = Path(__file__).resolve().parent / "configs" / "tiny-clip-test.json"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A --data-dir of 3 classes, a classifier checkpoint of the tiny config (as train.py writes
    one with --model CONFIG --pretrained none) and one of a wider architecture."""
    root = tmp_path_factory.mktemp("files")
    for c, name in enumerate(["cat", "dog", "red_car"]):
        (root / "val" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 30), (80 * c, 40 * i, 200)).save(root / "val" / name / f"{i}.png")
    model = ev.resolve_model(str(CONFIG))
    torch.manual_seed(0)
    classifier, _ = ev.build_classifier(model, None, ["cat", "dog", "red car"], zero_shot=False)
    torch.nn.init.normal_(classifier.classification_head.weight)
    merge_checkpoints.save_state_dict(classifier.state_dict(), root / "final.safetensors")
    config = json.loads(CONFIG.read_text())
    config["vision_cfg"]["width"] = 128
    (root / "tiny-clip-wide.json").write_text(json.dumps(config))
    wide, _ = ev.build_classifier(ev.resolve_model(str(root / "tiny-clip-wide.json")), None, ["a", "b", "c"],
                                  zero_shot=False)
    merge_checkpoints.save_state_dict(wide.state_dict(), root / "wide.safetensors")
    merge_checkpoints.save_state_dict(open_clip.create_model("tiny-clip-wide").state_dict(), root / "wide_clip.safetensors")
    (root / "flat").mkdir()
    shutil.copy(root / "val" / "cat" / "0.png", root / "flat" / "0.png")
    return root


def common(files, tmp_path):
    return ["--model", str(CONFIG), "--data-dir", str(files / "val"), "--workers", "0",
            "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "out.json")]


def test_a_model_trained_with_a_config_and_no_weights_evaluates(files, tmp_path, capsys):
    (run,) = ev.main(common(files, tmp_path) + ["--pretrained", "none", "--checkpoint", str(files / "final.safetensors")])
    assert run["datasets"]["val"]["images"] == 6 and 0 <= run["datasets"]["val"]["top1"] <= 100
    assert json.loads((tmp_path / "out.json").read_text())["args"]["model"] == "tiny-clip-test"
    (zero_shot,) = ev.main(common(files, tmp_path) + ["--pretrained", "none"])  # random weights, zero-shot head
    assert zero_shot["checkpoint"] == "zero-shot"
    assert "Avg. shifts" not in capsys.readouterr().out  # only with all five shifts


USAGE, FAILURE = cli.USAGE, cli.FAILURE


@pytest.mark.parametrize("flags, status, message", [
    (["--model", "ViT-B-32-typo"], USAGE, "--model 'ViT-B-32-typo' is not an open_clip model name"),
    (["--model", "missing.json"], USAGE, "--model missing.json: cannot read it (No such file or directory)"),
    (["--pretrained", "missing.pt"], USAGE,
     "--pretrained missing.pt: no such file; expected a weights file, a pretrained tag or 'none'"),
    (["--pretrained", "{files}/val"], USAGE,
     "--pretrained {files}/val is a folder; expected a weights file (.safetensors, .pt, .pth) in it, a "
     "pretrained tag or 'none'"),
    (["--pretrained", "laion2b"], USAGE,
     "--pretrained 'laion2b' is neither a weights file nor a pretrained tag of tiny-clip-test (it has no "
     "pretrained tags)"),
    # Weights that do not load, or cannot be downloaded: exit 1, as train.py says it.
    (["--pretrained", "{files}/wide_clip.safetensors"], FAILURE,
     "cannot build tiny-clip-test with a local weights file (RuntimeError: Error(s) in loading state_dict"),
    (["--model", "ViT-B-32-quickgelu"], FAILURE,
     "cannot build ViT-B-32-quickgelu with the 'openai' weights (RuntimeError: Failed to download weights"),
    (["--pretrained", "none", "--checkpoint", "{files}/wide.safetensors"], USAGE,
     "{files}/wide.safetensors is not a checkpoint of this tiny-clip-test classifier: "
     "model.visual.class_embedding has shape (128,), the model (64,); pass the --model it was trained with"),
    (["--pretrained", "none", "--checkpoint", "{files}/damaged.safetensors"], FAILURE,
     "{files}/damaged.safetensors: cannot be loaded"),
    (["--pretrained", "none", "--data-dir", "{files}/flat"], USAGE,
     "--data-dir {files}/flat: expected one folder of images per class, found files (0.png, ...) but no folders"),
    (["--pretrained", "none", "--output", "results.txt"], USAGE,
     "--output results.txt: expected a file name ending in .json"),
    (["--pretrained", "none", "--output", "{files}/val"], USAGE,
     "--output {files}/val: expected a file name ending in .json"),
    (["--pretrained", "none", "--output", "{files}/folder.json"], USAGE,
     "--output {files}/folder.json is a folder; expected a file name ending in .json"),
    (["--pretrained", "none", "--workers", "-1"], USAGE,
     "--batch-size must be >= 1 and --workers >= 0, got 256 and -1"),
    (["--pretrained", "none", "--device", "gpu"], USAGE,
     "--device gpu: not a torch device; expected cpu, cuda or cuda:N"),
    pytest.param(["--pretrained", "none", "--device", "cuda"], USAGE,
                 "--device cuda: no CUDA device here; expected --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")),
])
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys, monkeypatch, flags, status,
                                                  message):
    (files / "folder.json").mkdir(exist_ok=True)
    (files / "damaged.safetensors").write_bytes((files / "final.safetensors").read_bytes()[:100])  # cut short
    monkeypatch.setattr(open_clip, "build_zero_shot_classifier", None)  # fails after the checks, if ever reached
    flags = [f.format(files=files) for f in flags]
    with pytest.raises(SystemExit) as e:
        ev.main(common(files, tmp_path) + flags)
    line = str(e.value) if isinstance(e.value, cli.Exit) else capsys.readouterr().err.strip()
    assert e.value.code == status and line.startswith("evaluate.py: error: ") and "\n" not in line, line
    assert message.format(files=files) in line, line
    assert not (tmp_path / "out.json").exists()


def test_an_unwritable_output_folder_is_one_line_before_any_work(files, tmp_path, monkeypatch):
    monkeypatch.setattr(open_clip, "build_zero_shot_classifier", None)  # fails after the checks, if ever reached
    monkeypatch.setattr(ev.os, "access", lambda path, mode: False)  # a read-only folder, even for root
    with pytest.raises(SystemExit) as e:
        ev.main(common(files, tmp_path) + ["--pretrained", "none"])
    assert str(e.value) == f"evaluate.py: error: --output {tmp_path / 'out.json'}: cannot write in " \
                           f"{tmp_path} (permission denied); expected a writable folder"
    assert e.value.code == cli.USAGE and not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_unreadable_image_is_one_line_naming_it_and_exit_1(files, tmp_path, workers):
    val = tmp_path / "val"
    shutil.copytree(files / "val", val)
    (val / "dog" / "broken.jpg").write_text("not an image")  # a text file named .jpg
    flags = common(files, tmp_path) + ["--pretrained", "none", "--data-dir", str(val), "--workers", workers]
    with pytest.raises(SystemExit) as e:
        ev.main(flags)
    line = str(e.value)
    assert line.startswith(f"evaluate.py: error: val: image {val / 'dog' / 'broken.jpg'} cannot be read "
                           f"(UnidentifiedImageError: ") and "\n" not in line, line
    assert line.endswith("expected readable images: replace or remove it"), line
    assert e.value.code == cli.FAILURE and not (tmp_path / "out.json").exists()
