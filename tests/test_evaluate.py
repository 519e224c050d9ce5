"""evaluate.py against hand-computed accuracies on generated image trees (CPU, no network).

Every test image is 2x1 pixels whose colours encode the logits a stand-in classifier returns:
pixel 0 names the top ImageNet column (logit 2), pixel 1 the runner-up (logit 1). Each
dataset's scoring rule then has one right answer, counted by hand below.
"""
import json
import re
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import ToTensor

import cli
import evaluate as ev
import merge_checkpoints

pytestmark = pytest.mark.filterwarnings("ignore:.*the reference has")  # tiny trees by design
MAPPINGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "objectnet-1.0-mappings"
WNIDS = ev.timm_list("imagenet_synsets")


def coded_image(path, top, second=0):
    """A 2x1 PNG at path whose pixels encode the columns `top` and `second` (0..999)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (2, 1))
    image.putpixel((0, 0), (top % 256, top // 256, 0))
    image.putpixel((1, 0), (second % 256, second // 256, 0))
    image.save(path, format="PNG")  # lossless whatever the extension says


class CodedLogits(torch.nn.Module):
    """Reads coded_image pixels back: 1000-way logits with 2 at `top`, 1 at `second`."""

    def forward(self, images):  # (B, 3, 1, 2) in [0, 1] from ToTensor
        codes = (images * 255).round().long()
        top, second = codes[:, 0, 0, 0] + 256 * codes[:, 1, 0, 0], codes[:, 0, 0, 1] + 256 * codes[:, 1, 0, 1]
        logits = torch.zeros(len(images), 1000)
        rows = torch.arange(len(images))
        logits[rows, second] = 1.0
        logits[rows, top] = 2.0
        return logits


def write_objectnet_mappings(folder):
    """Mapping files in ObjectNet's format for 3 folders, 2 of which map to ImageNet.

    PyTorch index p has ImageNet 2012 id (p + 500) % 1000, so a mix-up of the two shows.
    analog clock = 409, digital clock = 530, banana = 954 (PyTorch indices).
    """
    folder.mkdir(parents=True)
    (folder / "folder_to_objectnet_label.json").write_text(json.dumps(
        {"alarm_clock": "Alarm clock", "banana": "Banana", "chair": "Chair"}))
    (folder / "objectnet_to_imagenet_1k.json").write_text(json.dumps(
        {"Banana": "banana", "Alarm clock": "analog clock; digital clock"}))  # not folder order
    (folder / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps(
        {str(p): (p + 500) % 1000 for p in range(1000)}))
    names = {409: "analog clock", 530: "digital clock", 954: "banana"}
    lines = [names.get((i - 500) % 1000, f"class {(i - 500) % 1000}") for i in range(1000)]
    (folder / "imagenet_to_label_2012_v2").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """All six layouts under one --data-location; sketch is a link to the ImageNet tree."""
    root = tmp_path_factory.mktemp("data")
    # ImageNet: class i predicted right for i < 700, as class i + 1 otherwise -> 70%.
    for i, wnid in enumerate(WNIDS):
        coded_image(root / "imagenet/val" / wnid / "a.JPEG", i if i < 700 else (i + 1) % 1000)
    (root / "sketch").symlink_to(root / "imagenet/val")
    # V2: folder k holds an image of class k, predicted wrong when k % 4 == 0 -> 75%.
    # Labels from string-sorted folders ("10" before "2") would score about 0%.
    for k in range(1000):
        coded_image(root / "imagenetv2-matched-frequency-format-val" / str(k) / "a.jpeg",
                    k if k % 4 else (k + 1) % 1000)
    # R and A: folder j (sorted) is ImageNet column c_j. j % 4 == 0: top is a column outside
    # the 200, runner-up c_j (right only if scored on the 200 columns); j % 4 == 1: top is
    # c_{j+1} (wrong); otherwise c_j -> 75% (50% if scored on all 1000 columns).
    for name in ["imagenet-r", "imagenet-a"]:
        folders = sorted(ev.timm_list(name.replace("-", "_") + "_synsets"))
        columns = [WNIDS.index(w) for w in folders]
        outside = next(c for c in range(1000) if c not in columns)
        for j, wnid in enumerate(folders):
            top, second = {0: (outside, columns[j]), 1: (columns[(j + 1) % 200], 0)}.get(
                j % 4, (columns[j], 0))
            coded_image(root / name / wnid / "a.jpg", top, second)
    # ObjectNet: labels alarm_clock = 0, banana = 1; chair does not map and is dropped.
    write_objectnet_mappings(root / "objectnet-1.0/mappings")
    images = root / "objectnet-1.0/images"
    coded_image(images / "alarm_clock/1.png", 530, 954)  # second of its two classes: right
    coded_image(images / "alarm_clock/2.png", 5, 409)  # unmapped column on top: right
    coded_image(images / "alarm_clock/3.png", 954)  # banana: wrong
    coded_image(images / "banana/1.png", 954)  # right
    coded_image(images / "banana/2.png", 409, 954)  # alarm clock: wrong
    coded_image(images / "chair/1.png", 954)
    coded_image(images / "chair/2.png", 954)
    return root


EXPECTED = {"ImageNet": (70.0, 1000), "ImageNet-V2": (75.0, 1000), "ImageNet-Sketch": (70.0, 1000),
            "ImageNet-R": (75.0, 200), "ObjectNet": (60.0, 5), "ImageNet-A": (75.0, 200)}


def test_each_dataset_is_scored_by_its_rule(data):
    with pytest.warns(UserWarning, match="1,000 images.*50,000"):
        eval_sets = ev.find_eval_sets(data, ToTensor())
    assert [s.name for s in eval_sets] == list(ev.DATASETS)
    results = {s.name: ev.evaluate(CodedLogits(), s, batch_size=64) for s in eval_sets}
    assert {k: (r["top1"], r["images"]) for k, r in results.items()} == EXPECTED  # exact fractions
    assert ev.avg_shifts(results) == pytest.approx((75 + 70 + 75 + 60 + 75) / 5)
    del results["ImageNet-A"]
    assert ev.avg_shifts(results) is None  # a partial mean would not compare with the paper


def test_missing_datasets_are_skipped_with_where_they_were_looked_for(tmp_path, capsys):
    assert ev.find_eval_sets(tmp_path, ToTensor()) == []
    out = capsys.readouterr().out
    assert out.count("skipped") == 6
    assert str(tmp_path / "imagenet/val_in_folder") in out and "ImageNetV2-matched-frequency" in out


def test_v2_accepts_the_loaders_folder_name(data, tmp_path):
    (tmp_path / "ImageNetV2-matched-frequency").symlink_to(data / "imagenetv2-matched-frequency-format-val")
    with pytest.warns(UserWarning, match="10,000"):
        (v2,) = ev.find_eval_sets(tmp_path, ToTensor(), names=["ImageNet-V2"])
    assert ev.evaluate(CodedLogits(), v2)["top1"] == 75.0


def test_r_and_a_columns_match_the_lists_timm_ships(data):
    for name, subset in [("ImageNet-R", "imagenet_r"), ("ImageNet-A", "imagenet_a")]:
        dataset, project = ev.DATASETS[name][2](data / name.lower(), ToTensor())
        logits = torch.arange(1000.0).repeat(2, 1)
        assert project(logits)[0].tolist() == [float(i) for i in ev.timm_list(f"{subset}_indices")]


@pytest.mark.parametrize("layout, message", [
    ("imagenet/val/ILSVRC2012_val_00000001.JPEG", "expected 1000 wnid folders"),
    ("imagenetv2-matched-frequency-format-val/n01440764/a.jpeg", "folders named 0..999"),
    ("imagenet-r/n01443537/a.jpg", "199 missing"),
    ("objectnet-1.0/images/chair/a.png", "folder_to_objectnet_label.json is missing"),
])
def test_malformed_trees_fail_naming_what_was_expected(tmp_path, layout, message):
    coded_image(tmp_path / layout, 0)
    with pytest.raises(ValueError, match=message):
        ev.find_eval_sets(tmp_path, ToTensor())


def test_empty_class_folder_is_an_error(data, tmp_path):
    shutil.copytree(data / "imagenet-a", tmp_path / "imagenet-a")
    first = sorted(ev.timm_list("imagenet_a_synsets"))[0]
    for image in (tmp_path / "imagenet-a" / first).iterdir():
        image.unlink()
    with pytest.raises(ValueError, match=f"imagenet-a.*{first}"):
        ev.find_eval_sets(tmp_path, ToTensor(), names=["ImageNet-A"])


@pytest.mark.skipif(not MAPPINGS.is_dir(), reason="ObjectNet mapping files not available")
def test_real_objectnet_mapping():
    classes = ev.objectnet_classes(MAPPINGS)
    assert len(classes) == 113
    assert len({i for v in classes.values() for i in v}) == 125
    assert classes["alarm_clock"] == [409, 530] and classes["banana"] == [954]
    assert list(classes) == sorted(classes)


def test_objectnet_mapping_goes_through_the_2012_ids(data):
    classes = ev.objectnet_classes(data / "objectnet-1.0/mappings")
    assert list(classes.items()) == [("alarm_clock", [409, 530]), ("banana", [954])]  # no chair


def test_objectnet_border_crop_is_off_by_default(data, tmp_path):
    shutil.copytree(data / "objectnet-1.0/mappings", tmp_path / "mappings")
    for folder in ["alarm_clock", "banana"]:
        (tmp_path / "images" / folder).mkdir(parents=True)
        Image.new("RGB", (10, 8)).save(tmp_path / "images" / folder / "a.png")
    size = lambda image: image.size  # noqa: E731
    assert ev.objectnet(tmp_path, size)[0][0][0] == (10, 8)
    assert ev.objectnet(tmp_path, size, crop=True)[0][0][0] == (6, 4)


# ---------------------------------------------------------------------------- the classifier

TEMPLATES = [lambda c: f"a photo of a {c}.", lambda c: f"art of the {c}."]


@pytest.fixture(scope="module")
def tiny_weights(tiny_clip_name, tmp_path_factory):
    """A tiny CLIP's weights as a local file, usable as --pretrained."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    merge_checkpoints.save_state_dict(open_clip.create_model(tiny_clip_name, pretrained=None).state_dict(), path)
    return str(path)


def test_zero_shot_head_shape_normalisation_scale_and_cache(tiny_clip_name, tiny_weights, tmp_path,
                                                            monkeypatch):
    names = ["cat", "dog", "red car"]
    classifier, _ = ev.build_classifier(tiny_clip_name, tiny_weights, names, TEMPLATES, cache_dir=tmp_path)
    head = classifier.classification_head
    clip = open_clip.create_model(tiny_clip_name, pretrained=tiny_weights).eval()
    scale = clip.logit_scale.exp().item()
    assert head.weight.shape == (3, 32) and not head.bias.any()
    assert head.weight.detach().norm(dim=1).tolist() == pytest.approx([scale] * 3, rel=1e-5)
    # Recomputed by hand: mean of unit template embeddings, renormalised, scaled.
    tokenizer = open_clip.get_tokenizer(tiny_clip_name)
    with torch.no_grad():
        e = torch.nn.functional.normalize(clip.encode_text(tokenizer([t("dog") for t in TEMPLATES])), dim=-1)
    assert torch.allclose(head.weight[1], scale * torch.nn.functional.normalize(e.mean(0), dim=0), atol=1e-5)
    assert not any(k.startswith("model.transformer") or "token_embedding" in k for k in classifier.state_dict())
    # The second build reads the cache instead of encoding 80,000 texts.
    monkeypatch.setattr(open_clip, "build_zero_shot_classifier", None)
    again, _ = ev.build_classifier(tiny_clip_name, tiny_weights, names, TEMPLATES, cache_dir=tmp_path)
    assert torch.equal(again.classification_head.weight, head.weight)
    assert len(list(tmp_path.glob("head_*.safetensors"))) == 1
    # A cache file cut short by a kill is rebuilt, not fatal.
    monkeypatch.undo()
    cache = next(tmp_path.glob("head_*.safetensors"))
    cache.write_bytes(cache.read_bytes()[:50])
    rebuilt, _ = ev.build_classifier(tiny_clip_name, tiny_weights, names, TEMPLATES, cache_dir=tmp_path)
    assert torch.allclose(rebuilt.classification_head.weight, head.weight, atol=1e-6)
    assert not list(tmp_path.glob("*.tmp"))


def test_classifier_normalises_features(tiny_clip_name):
    classifier, _ = ev.build_classifier(tiny_clip_name, None, ["a", "b"], TEMPLATES)
    images = torch.randn(3, 3, 32, 32)
    features = classifier.model.visual(images)
    expected = torch.nn.functional.normalize(features, dim=-1) @ classifier.classification_head.weight.T
    assert torch.allclose(classifier(images), expected, atol=1e-6)


def test_plain_vit_b_32_with_openai_weights_gets_quickgelu(monkeypatch):
    seen = {}

    def fake_create(name, pretrained, device, force_quick_gelu):
        seen.update(name=name, force_quick_gelu=force_quick_gelu)
        raise RuntimeError("stop before downloading")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    with pytest.raises(ValueError, match="cannot build ViT-B-32 with the 'openai' weights .RuntimeError: stop"):
        ev.build_classifier("ViT-B-32", "openai")
    assert seen == {"name": "ViT-B-32", "force_quick_gelu": True}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip(tiny_clip_name, tmp_path, suffix):
    a, _ = ev.build_classifier(tiny_clip_name, None, ["x", "y", "z"], TEMPLATES, zero_shot=False)
    b, _ = ev.build_classifier(tiny_clip_name, None, ["x", "y", "z"], TEMPLATES)
    merge_checkpoints.save_state_dict(b.state_dict(), tmp_path / f"b{suffix}")
    ev.load_checkpoint(a, tmp_path / f"b{suffix}")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert next(iter(b.state_dict())).startswith("model.visual.")


def test_checkpoint_from_data_parallel_and_model_soups_wrappers(tiny_clip_name, tmp_path):
    a, _ = ev.build_classifier(tiny_clip_name, None, ["x", "y"], TEMPLATES)
    wrapped = {f"module.{k}": v for k, v in a.state_dict().items()}
    wrapped["module.model.token_embedding.weight"] = torch.zeros(4, 32)  # Model Soups keeps these
    torch.save({"state_dict": wrapped, "epoch": 3}, tmp_path / "soup.pt")
    assert ev.read_checkpoint(tmp_path / "soup.pt").keys() == a.state_dict().keys()


def test_checkpoint_of_another_architecture_fails_in_one_line(tiny_clip_name, tmp_path):
    config = json.loads((Path(__file__).parent / "configs" / f"{tiny_clip_name}.json").read_text())
    config["vision_cfg"]["width"] = 128
    (tmp_path / "tiny-clip-wide.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "tiny-clip-wide.json")
    wide, _ = ev.build_classifier("tiny-clip-wide", None, ["x", "y"], TEMPLATES, zero_shot=False)
    merge_checkpoints.save_state_dict(wide.state_dict(), tmp_path / "wide.safetensors")
    tiny, _ = ev.build_classifier(tiny_clip_name, None, ["x", "y"], TEMPLATES, zero_shot=False)
    with pytest.raises(ValueError, match=r"wide.safetensors is not a checkpoint of this tiny-clip-test "
                                         r"classifier: model.visual.\S+ has shape") as error:
        ev.load_checkpoint(tiny, tmp_path / "wide.safetensors")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="key classification_head.bias is missing"):
        ev.load_checkpoint(tiny, {k: v for k, v in tiny.state_dict().items() if k != "classification_head.bias"})


def test_wise_ft_endpoints_and_midpoint():
    w0 = {"w": torch.randn(5, 3), "n": torch.tensor(1)}
    w = {"w": torch.randn(5, 3), "n": torch.tensor(7)}
    w0_before = w0["w"].clone()
    assert torch.equal(ev.wise_ft(w0, w, 0.0)["w"], w0["w"]) and torch.equal(ev.wise_ft(w0, w, 1.0)["w"], w["w"])
    assert torch.allclose(ev.wise_ft(w0, w, 0.25)["w"], 0.75 * w0["w"] + 0.25 * w["w"])
    assert ev.wise_ft(w0, w, 0.5)["n"] == 7  # integer buffers are not interpolated
    assert torch.equal(w0["w"], w0_before)  # inputs untouched
    with pytest.raises(ValueError, match="first difference: extra"):
        ev.wise_ft(w0, {**w, "extra": torch.zeros(1)}, 0.5)


# ---------------------------------------------------------------------------- the command line


def test_command_line_zero_shot_checkpoint_and_wise_ft(tiny_clip_name, tiny_weights, tmp_path, capsys):
    for name in ["red_car", "dog", "cat"]:
        (tmp_path / "val" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), (40 * i, 90, 200)).save(tmp_path / "val" / name / f"{i}.jpg")
    common = ["--model", tiny_clip_name, "--pretrained", tiny_weights, "--data-dir", str(tmp_path / "val"),
              "--cache-dir", str(tmp_path / "cache"), "--workers", "0"]
    (zero_shot,) = ev.main(common + ["--output", str(tmp_path / "zs.json")])
    assert zero_shot["datasets"]["val"]["images"] == 9
    # A fine-tuned stand-in: the zero-shot classifier with a different head.
    classifier, _ = ev.build_classifier(tiny_clip_name, tiny_weights, ["cat", "dog", "red car"], TEMPLATES,
                                        cache_dir=tmp_path / "cache")
    merge_checkpoints.save_state_dict(classifier.state_dict(), tmp_path / "ft.safetensors")
    runs = ev.main(common + ["--checkpoint", str(tmp_path / "ft.safetensors"), "--wise-ft", "0,1",
                             "--output", str(tmp_path / "wise.json")])
    saved = json.loads((tmp_path / "wise.json").read_text())
    assert [r["alpha"] for r in saved["runs"]] == [0.0, 1.0] and saved["args"]["wise_ft"] == [0.0, 1.0]
    assert "code_version" in saved
    assert runs[0]["datasets"]["val"]["top1"] == zero_shot["datasets"]["val"]["top1"]  # alpha 0 = w0
    out = capsys.readouterr().out
    assert "images/s" in out and "no WiSE-FT plot: it needs ImageNet and all five shifts" in out
    assert "Avg. shifts" not in out  # shown only when all five shifts ran


def test_command_line_errors_are_one_line_exit_2_and_early(tiny_clip_name, tmp_path, capsys):
    (tmp_path / "val" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "cat" / "0.png")
    common = ["--model", tiny_clip_name, "--pretrained", "none", "--data-dir", str(tmp_path / "val"),
              "--workers", "0", "--cache-dir", str(tmp_path / "cache")]
    cases = [
        (["--output", str(tmp_path / "nowhere" / "r.json")], "--output .*: its folder does not exist"),
        (["--checkpoint", str(tmp_path / "missing.pt")],
         r"--checkpoint .*missing.pt: no such file; expected a classifier state dict \(.safetensors, .pt\)"),
        (["--data-dir", str(tmp_path / "nope")], "--data-dir .*nope is not a folder"),
        (["--wise-ft", "0.5"], "--wise-ft interpolates towards a fine-tuned model: give it --checkpoint"),
        (["--wise-ft", "0,x"], "expected comma-separated numbers such as 0,0.5,1, got '0,x'"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            ev.main(common + ["--output", str(tmp_path / "out.json")] + extra)
        error = exit_info.value
        line = str(error) if isinstance(error, cli.Exit) else capsys.readouterr().err.strip()
        assert error.code == cli.USAGE and line.startswith("evaluate.py: error: "), line
        assert re.search(message, line) and "\n" not in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val"]  # nothing written, not even the cache
