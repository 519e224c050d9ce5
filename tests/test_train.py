"""train.py on a tiny open_clip config and a generated ImageFolder (CPU, no network)."""
import argparse
import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import probe
import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "tests" / "configs" / "tiny-clip-test.json")


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    """4 classes x 6 images of 40 px: 3 steps per epoch at batch 8."""
    root = tmp_path_factory.mktemp("train")
    gen = torch.Generator().manual_seed(0)
    for c in range(4):
        (root / f"class_{c}").mkdir()
        for i in range(6):
            pixels = (torch.rand(40, 40, 3, generator=gen) * 80 + 40 * c).byte().numpy()
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")
    return root


def assert_same_training(a_dir, b_dir, tolerance=1e-3):
    """Equal up to float rounding, measured against how far training moved the weights.

    Element by element is the wrong test: Adam divides by sqrt(v), so an element whose gradient
    is rounding noise can move by up to lr either way. The task vectors as a whole must agree.
    """
    w0 = load_file(a_dir / "w0.safetensors")
    a, b = load_file(a_dir / "final.safetensors"), load_file(b_dir / "final.safetensors")
    diff = sum((a[k] - b[k]).double().pow(2).sum() for k in a).sqrt()
    moved = sum((a[k] - w0[k]).double().pow(2).sum() for k in a).sqrt()
    assert moved > 0 and diff / moved < tolerance, (diff / moved).item()


def run(train_dir, out, *extra):
    train.main(["--train-dir", str(train_dir), "--output-dir", str(out), "--model", CONFIG, "--pretrained", "none",
                "--batch-size", "8", "--epochs", "2", "--warmup", "2", "--lr", "1e-3", "--workers", "0", *extra])
    return out


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_periodic_merging_makes_models_equal_at_each_merge(train_dir, tmp_path, monkeypatch):
    calls = []
    real_merge = train.model_stock.merge_models_

    def watched_merge(models, w0):
        before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
        calls.append({"differ": any(not torch.equal(before[0][k], before[1][k]) for k in before[0]),
                      "w0": {k: v.clone() for k, v in w0.items()}})
        ts = real_merge(models, w0)
        calls[-1]["equal"] = all(torch.equal(v, models[1].state_dict()[k]) for k, v in models[0].state_dict().items())
        return ts

    monkeypatch.setattr(train.model_stock, "merge_models_", watched_merge)
    out = run(train_dir, tmp_path / "run")
    assert len(calls) == 2  # one merge per epoch
    assert all(c["differ"] and c["equal"] for c in calls)  # differ between merges, equal after
    w0_file = load_file(out / "w0.safetensors")
    for c in calls:  # every merge is against the unchanged pre-trained w0
        assert all(torch.equal(c["w0"][k].cpu(), w0_file[k]) for k in w0_file)
    merges = [r for r in log(out) if r["event"] == "merge"]
    floating = {k for k, v in w0_file.items() if v.is_floating_point()}
    assert [r["step"] for r in merges] == [3, 6]
    assert all(set(r["t"]) == floating and set(r["angle"]) == floating for r in merges)
    assert set(merges[0]["t_summary"]) == {"matrices", "vectors", "head"}
    assert all(0 <= t <= 1 for r in merges for t in r["t"].values())
    final = load_file(out / "final.safetensors")
    assert final.keys() == w0_file.keys() and any(not torch.equal(final[k], w0_file[k]) for k in final)
    args = json.loads((out / "args.json").read_text())
    assert args["lr"] == 1e-3 and args["mixup"] == 0.5 and "code_version" in args


def test_resume_after_a_kill_equals_the_uninterrupted_run(train_dir, tmp_path, monkeypatch):
    extra = ["--save-every", "2", "--randaug", "rand-m10-n2", "--crop-scale", "0.5", "1", "--flip", "0.5"]
    whole = run(train_dir, tmp_path / "whole", *extra)

    real_step = train.train_step

    def killed_at_step_5(models, optimizers, micro, lr, step, *a, **k):
        if step == 5:  # step 4 was checkpointed; step 5's work is lost
            raise KeyboardInterrupt
        return real_step(models, optimizers, micro, lr, step, *a, **k)

    monkeypatch.setattr(train, "train_step", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(train_dir, tmp_path / "killed", *extra)
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(train, "train_step", real_step)
    resumed = run(train_dir, tmp_path / "killed", *extra, "--resume")

    a, b = load_file(whole / "final.safetensors"), load_file(resumed / "final.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s_per_model"} for r in rows]  # noqa: E731
    assert strip(log(whole)) == strip(log(resumed))


def test_data_workers_do_not_change_the_result(train_dir, tmp_path):
    """Two epochs: the same workers (persistent) serve the second epoch's new order and crops."""
    a = run(train_dir, tmp_path / "w0")
    b = run(train_dir, tmp_path / "w2", "--workers", "2")
    fa, fb = load_file(a / "final.safetensors"), load_file(b / "final.safetensors")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_one_model_never_merged_is_plain_finetuning(train_dir, tmp_path):
    """Lockstep does not couple the models: model i of an unmerged run is the single run with seed + i."""
    pair = run(train_dir, tmp_path / "pair", "--merge-every", "never")
    single = run(train_dir, tmp_path / "single", "--num-models", "1", "--merge-every", "never", "--seed", "1")
    assert not (pair / "final.safetensors").exists() and not any(r["event"] == "merge" for r in log(pair))
    a, b = load_file(pair / "model_1.safetensors"), load_file(single / "model_0.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    w0 = load_file(pair / "w0.safetensors")
    assert any(not torch.equal(a[k], w0[k]) for k in a)


def test_finished_run_without_checkpoint_is_not_wiped_by_resume(train_dir, tmp_path):
    out = run(train_dir, tmp_path / "done", "--epochs", "1")
    (out / "checkpoint.pt").unlink()  # deleted to save space after training
    before = (out / "final.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="holds a finished run .final.safetensors. and no checkpoint.pt to continue "
                                         "from; pass --overwrite to replace it"):
        run(train_dir, out, "--epochs", "2", "--resume")
    assert (out / "final.safetensors").read_bytes() == before


def test_hidden_folders_are_not_classes(train_dir, tmp_path):
    """A .thumbs/ folder must not shift the labels against the class names of the head."""
    tree = tmp_path / "tree"
    shutil.copytree(train_dir, tree)
    (tree / ".thumbs").mkdir()
    shutil.copy(tree / "class_0" / "0.png", tree / ".thumbs" / "x.png")
    folder, names = data.training_set(tree)
    assert names == ["class 0", "class 1", "class 2", "class 3"] and len(folder) == 24
    assert all(Path(path).parent.name == f"class_{label}" for path, label in folder.samples)


def test_accumulated_gradients_equal_the_full_batch_gradient():
    """Micro-batch losses are scaled by 1/accum-steps: the step sees the full batch's mean gradient."""
    class Recorder(torch.optim.SGD):
        def step(self, closure=None):
            self.grads = [p.grad.clone() for p in self.param_groups[0]["params"]]

    torch.manual_seed(0)
    images, labels = torch.randn(8, 6), torch.randint(0, 3, (8,))
    grads = []
    for split in (1, 4):
        model = torch.nn.Linear(6, 3)
        torch.nn.init.constant_(model.weight, 0.1)
        torch.nn.init.zeros_(model.bias)
        opt = Recorder(model.parameters(), lr=0.0)
        micro = [list(zip(images.chunk(split), labels.chunk(split)))]
        train.train_step([model], [opt], micro, 0.0, 0, argparse.Namespace(seed=0))
        grads.append(opt.grads)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert grads[0][0].norm() < 1.0  # unclipped, so the scale itself is compared


def test_mixup_uses_no_label_smoothing(train_dir, tmp_path, monkeypatch):
    seen = []
    real_loss = train.loss_of

    def spy(model, images, labels, mixup, *a, **k):
        seen.append(mixup)
        return real_loss(model, images, labels, mixup, *a, **k)

    monkeypatch.setattr(train, "loss_of", spy)
    run(train_dir, tmp_path / "run", "--epochs", "1")
    assert seen and all(m.mixup_alpha == 0.5 and m.label_smoothing == 0.0 and m.cutmix_alpha == 0 for m in seen)


def test_gradient_accumulation_matches_the_full_batch(train_dir, tmp_path):
    a = run(train_dir, tmp_path / "full", "--epochs", "1", "--mixup", "0")
    b = run(train_dir, tmp_path / "accum", "--epochs", "1", "--mixup", "0", "--accum-steps", "2")
    assert_same_training(a, b)


def test_learning_rate_schedule():
    base, warmup, total = 3e-5, 500, 25_000
    assert train.lr_at(0, base, warmup, total) == pytest.approx(base / warmup)  # warm-up starts low
    assert train.lr_at(warmup - 1, base, warmup, total) == pytest.approx(base)  # and ends at the peak
    assert train.lr_at(warmup, base, warmup, total) == pytest.approx(base)  # cosine starts at the peak
    mid = (warmup + total) // 2
    assert train.lr_at(mid, base, warmup, total) == pytest.approx(base / 2)
    last = train.lr_at(total - 1, base, warmup, total)
    assert last == pytest.approx(0.5 * (1 + math.cos(math.pi * (total - 1 - warmup) / (total - warmup))) * base)
    assert 0 < last < 1e-6 * base and train.lr_at(total, base, warmup, total) == pytest.approx(0, abs=1e-20)


def test_non_finite_loss_stops_naming_model_and_step(train_dir, tmp_path, monkeypatch):
    real_loss = train.loss_of
    calls = []

    def diverging(*a, **k):
        calls.append(1)
        loss = real_loss(*a, **k)
        return loss * float("nan") if len(calls) == 10 else loss  # step 5, model 1

    monkeypatch.setattr(train, "loss_of", diverging)
    with pytest.raises(SystemExit, match=r"model 1 has a non-finite loss \(nan\) in step 5; nothing after step 3 was "
                                         r"saved: the last good checkpoint is .*checkpoint.pt \(after step 3\)"):
        run(train_dir, tmp_path / "run")
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("extra, message", [
    (["--merge-every", "often"], "--merge-every must be 'epoch', 'never' or a positive number"),
    (["--num-models", "1"], "--num-models must be >= 2 to merge"),
    (["--batch-size", "32"], "has 24 images, fewer than one batch of 32"),
    (["--batch-size", "5"], "mixup pairs images within a micro-batch; 5 per process is odd"),
    (["--accum-steps", "3"], "--batch-size 8 is not divisible by 1 processes x 3 accumulation steps"),
])
def test_bad_arguments(train_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        run(train_dir, tmp_path / "run", *extra)
    assert message in str(e.value) + capsys.readouterr().err


def test_bad_folders_and_existing_runs(train_dir, tmp_path):
    with pytest.raises(SystemExit, match="--train-dir .*nowhere does not exist; expected a folder with one folder "
                                         "of images per class"):
        run(tmp_path / "nowhere", tmp_path / "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="--train-dir .*empty.*expected one folder of images per class"):
        run(tmp_path / "empty", tmp_path / "b")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"holds files train.py did not write \(notes.txt\); expected a new or empty "
                                         r"folder, or a run's folder"):
        run(train_dir, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    run(train_dir, tmp_path / "done", "--epochs", "1")
    with pytest.raises(SystemExit, match=r"done already holds a run \(checkpoint.pt\); pass --resume to continue it, "
                                         r"--overwrite to replace it"):
        run(train_dir, tmp_path / "done", "--epochs", "1")
    with pytest.raises(SystemExit, match=r"--resume with different --lr \(0.001 in the run, 0.01 now\)"):
        train.main(["--train-dir", str(train_dir), "--output-dir", str(tmp_path / "done"), "--model", CONFIG,
                    "--pretrained", "none", "--batch-size", "8", "--epochs", "1", "--warmup", "2", "--lr", "1e-2",
                    "--workers", "0", "--resume"])


def test_two_processes_match_one_with_the_same_global_batch(train_dir, tmp_path):
    """torchrun with 2 gloo processes: each holds both models and half of every batch."""
    one = run(train_dir, tmp_path / "one", "--epochs", "1", "--mixup", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "--master_addr=127.0.0.1", str(ROOT / "train.py"), "--train-dir", str(train_dir),
           "--output-dir", str(tmp_path / "two"), "--model", CONFIG, "--pretrained", "none", "--batch-size", "8",
           "--epochs", "1", "--warmup", "2", "--lr", "1e-3", "--workers", "0", "--mixup", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(one, tmp_path / "two")


def test_linear_probe_fits_the_head_on_frozen_features():
    torch.manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    labels = torch.arange(5).repeat(40)
    features = torch.nn.functional.normalize(centers[labels] + 0.3 * torch.randn(200, 16), dim=-1)
    classifier = torch.nn.Module()
    classifier.classification_head = torch.nn.Linear(16, 5)
    torch.nn.init.zeros_(classifier.classification_head.weight)
    torch.nn.init.zeros_(classifier.classification_head.bias)
    report = probe.fit_linear_probe(classifier, features, labels)
    logits = classifier.classification_head(features)
    assert (logits.argmax(1) == labels).float().mean() > 0.9  # the classes overlap: noise 0.3 per dimension
    assert report["probe"]["heldout_accuracy"] > 80 and report["heldout_images"] == 20


def test_linear_probe_init_and_evaluation_every_epoch(train_dir, tmp_path):
    zero_shot = run(train_dir, tmp_path / "zs", "--epochs", "1")
    probed = run(train_dir, tmp_path / "lp", "--epochs", "1", "--init", "lp", "--eval-every-epoch", "--eval-dir", str(train_dir))
    a, b = load_file(zero_shot / "w0.safetensors"), load_file(probed / "w0.safetensors")
    assert torch.equal(a["model.visual.proj"], b["model.visual.proj"])  # the encoder is untouched
    assert not torch.equal(a["classification_head.weight"], b["classification_head.weight"])
    assert b["classification_head.bias"].abs().sum() > 0  # the probe fits a bias too
    epoch = [r for r in log(probed) if r["event"] == "epoch"][0]
    assert 0 <= epoch["eval"][train_dir.name] <= 100


def test_stock_star_flips_half_the_images_replayably_and_flip_0_turns_it_off(train_dir, capsys):
    """Model Soups' LP-init training flipped with p = 0.5; each flip is drawn under the image's seed."""
    visual = argparse.Namespace(preprocess_cfg={"size": 32, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})
    classifier = argparse.Namespace(model=argparse.Namespace(visual=visual))
    folder, _ = data.training_set(train_dir)

    def flipped(argv):
        args = train.parse_args(["--output-dir", "x", *argv, "--crop-scale", "1", "1", "--randaug", "none"])
        images = data.SeededImages(folder, data.train_transform(classifier, args))
        plain = data.SeededImages(folder, data.train_transform(classifier, train.parse_args(
            ["--output-dir", "x", "--crop-scale", "1", "1", "--flip", "0"])))
        draws = []
        for seed in range(40):
            image, reference = images[(0, seed)][0], plain[(0, seed)][0]
            assert torch.equal(image, images[(0, seed)][0])  # the same seed, the same draw
            draws.append(not torch.equal(image, reference))
            assert torch.equal(image, reference) or torch.equal(image, reference.flip(-1))
        return sum(draws)

    assert train.parse_args(["--output-dir", "x", "--recipe", "stock-star"]).flip == 0.5
    assert 10 <= flipped(["--recipe", "stock-star"]) <= 30
    assert flipped(["--recipe", "stock-star", "--flip", "0"]) == 0
    assert flipped([]) == 0  # "stock" names no flip
    with pytest.raises(SystemExit):
        train.parse_args(["--output-dir", "x", "--flip", "1.5"])
    assert "--flip is a probability between 0 and 1, got 1.5" in capsys.readouterr().err
