"""evaluate.py accepts what train.py produces and turns bad input into one line (CPU, no network)."""
import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

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


@pytest.mark.parametrize("flags, message", [
    (["--model", "ViT-B-32-typo"], "--model 'ViT-B-32-typo' is not an open_clip model name"),
    (["--model", "missing.json"], "--model missing.json: cannot read it (No such file or directory)"),
    (["--pretrained", "missing.pt"], "--pretrained missing.pt: no such file; expected a weights file, a pretrained tag "
                                     "or 'none'"),
    (["--pretrained", "{files}/val"], "--pretrained {files}/val is a folder; expected a weights file (.safetensors, "
                                      ".pt, .pth) in it, a pretrained tag or 'none'"),
    (["--pretrained", "laion2b"], "--pretrained 'laion2b' is neither a weights file nor a pretrained tag of "
                                  "tiny-clip-test (it has no pretrained tags)"),
    (["--pretrained", "{files}/wide_clip.safetensors"], "cannot build tiny-clip-test with a local weights file "
                                                         "(RuntimeError: Error(s) in loading state_dict"),
    (["--model", "ViT-B-32-quickgelu"], "cannot build ViT-B-32-quickgelu with the 'openai' weights (RuntimeError: Failed "
                                        "to download weights"),
    (["--pretrained", "none", "--checkpoint", "{files}/wide.safetensors"],
     "{files}/wide.safetensors is not a checkpoint of this tiny-clip-test classifier: model.visual.class_embedding has "
     "shape (128,), the model (64,); pass the --model it was trained with"),
    (["--pretrained", "none", "--data-dir", "{files}/flat"], "{files}/flat: expected one folder of images per class, "
                                                            "found files (0.png, ...) but no folders"),
    (["--pretrained", "none", "--output", "results.txt"], "--output results.txt: expected a file name ending in .json"),
    (["--pretrained", "none", "--output", "{files}/val"], "--output {files}/val: expected a file name ending in .json"),
    (["--pretrained", "none", "--output", "{files}/folder.json"], "--output {files}/folder.json is a folder; expected "
                                                                  "a file name ending in .json"),
    (["--pretrained", "none", "--workers", "-1"], "--batch-size must be >= 1 and --workers >= 0, got 256 and -1"),
    (["--pretrained", "none", "--device", "gpu"], "--device gpu: not a torch device; expected cpu, cuda or cuda:N"),
    pytest.param(["--pretrained", "none", "--device", "cuda"], "--device cuda: no CUDA device here; expected --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")),
])
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys, monkeypatch, flags, message):
    (files / "folder.json").mkdir(exist_ok=True)
    monkeypatch.setattr(open_clip, "build_zero_shot_classifier", None)  # fails only after the checks, if ever reached
    flags = [f.format(files=files) for f in flags]
    with pytest.raises(SystemExit) as e:
        ev.main(common(files, tmp_path) + flags)
    line = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip()
    assert e.value.code != 0 and line.startswith("evaluate.py: error: ") and "\n" not in line, line
    assert message.format(files=files) in line, line
    assert not (tmp_path / "out.json").exists()


def test_an_unwritable_output_folder_is_one_line_before_any_work(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(open_clip, "build_zero_shot_classifier", None)  # fails only after the checks, if ever reached
    monkeypatch.setattr(ev.os, "access", lambda path, mode: False)  # a read-only folder, even for root
    with pytest.raises(SystemExit) as e:
        ev.main(common(files, tmp_path) + ["--pretrained", "none"])
    assert e.value.code == f"evaluate.py: error: --output {tmp_path / 'out.json'}: cannot write in {tmp_path} " \
                           f"(permission denied); expected a writable folder"


@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_unreadable_image_is_one_line_naming_it(files, tmp_path, workers):
    val = tmp_path / "val"
    shutil.copytree(files / "val", val)
    (val / "dog" / "broken.jpg").write_text("not an image")  # a text file named .jpg
    flags = common(files, tmp_path) + ["--pretrained", "none", "--data-dir", str(val), "--workers", workers]
    with pytest.raises(SystemExit) as e:
        ev.main(flags)
    line = str(e.value.code)
    assert line.startswith(f"evaluate.py: error: val: image {val / 'dog' / 'broken.jpg'} cannot be read "
                           f"(UnidentifiedImageError: ") and "\n" not in line, line
    assert line.endswith("expected readable images: replace or remove it"), line
    assert not (tmp_path / "out.json").exists()
