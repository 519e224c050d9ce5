"""train.py under bad input, kills, damaged run folders and unreadable images (CPU, no network).

Every user error must be one line, `train.py: error: ...`, before anything is written; a kill at
any point, a torn log line or a stale temporary file must resume to bit-identical weights.
"""
import copy
import json
import os
import re
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import merge_checkpoints
import cli
import data
import probe
import run_folder
import train
from test_train import CONFIG, log, run, train_dir  # noqa: F401 (train_dir is a fixture)

KILL_EXTRA = ["--save-every", "2", "--randaug", "rand-m10-n2", "--crop-scale", "0.5", "1"]


def error_of(call, capsys):
    """The one line of a failing command (argparse's on stderr, exit 2; or cli.fail's)."""
    with pytest.raises(SystemExit) as e:
        call()
    message = str(e.value) if isinstance(e.value, cli.Exit) else capsys.readouterr().err.strip()
    assert e.value.code != 0 and message.startswith("train.py: error: ") and "\n" not in message, message
    return message


def files_of(folder):
    """{name: bytes} of a folder: 'nothing was damaged' compares two of these."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def same_run(a, b):
    """Bit-identical final weights and logs (images/s aside)."""
    fa, fb = load_file(a / "final.safetensors"), load_file(b / "final.safetensors")
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s_per_model"} for r in rows]  # noqa: E731
    assert strip(log(a)) == strip(log(b))


def one_class(root):
    shutil.copytree(root / "class_0", root.parent / "one" / "class_0")
    return ["--train-dir", str(root.parent / "one")]


def flat(root):
    (root.parent / "flat").mkdir()
    shutil.copy(root / "class_0" / "0.png", root.parent / "flat" / "0.png")
    return ["--train-dir", str(root.parent / "flat")]


def wide_weights(root):
    """CLIP weights of another architecture, as --pretrained."""
    config = json.loads(Path(CONFIG).read_text())
    config["vision_cfg"]["width"] = 128
    (root.parent / "tiny-clip-wide.json").write_text(json.dumps(config))
    open_clip.add_model_config(root.parent / "tiny-clip-wide.json")
    path = root.parent / "wide.safetensors"
    merge_checkpoints.save_state_dict(open_clip.create_model("tiny-clip-wide", pretrained=None).state_dict(), path)
    return ["--pretrained", str(path)]


# (flags, or a function of a scratch copy of the training set returning flags; the message)
BAD_INPUT = [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--batch-size", "-8"], "--batch-size must be >= 1, got -8"),
    (["--accum-steps", "0"], "--accum-steps must be >= 1, got 0"),
    (["--workers", "-1"], "--workers must be >= 0, got -1"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--lr", "nan"], "--lr must be > 0 and --wd >= 0 (finite), got nan and 0.1"),
    (["--crop-scale", "0.5", "2"], "--crop-scale expects 0 < min <= max <= 1, got 0.5 2.0"),
    (["--merge-every", "often"], "--merge-every must be 'epoch', 'never' or a positive number of steps, got 'often'"),
    (["--num-models", "1"], "--num-models must be >= 2 to merge; vanilla fine-tuning is --num-models 1 --merge-every never"),
    (["--model", "ViT-B-32-typo"], "--model 'ViT-B-32-typo' is not an open_clip model name (e.g. ViT-B-32-quickgelu"),
    (["--model", "missing.json"], "--model missing.json: cannot read it (No such file or directory); expected an open_clip "
                                  "model config .json"),
    (["--pretrained", "missing.safetensors"], "--pretrained missing.safetensors: no such file; expected a weights file, "
                                              "a pretrained tag or 'none'"),
    (["--pretrained", "openai"], "--pretrained 'openai' is neither a weights file nor a pretrained tag of "
                                 "tiny-clip-test (it has no pretrained tags); 'none' gives random weights"),
    (wide_weights, "cannot build tiny-clip-test with a local weights file (RuntimeError: Error(s) in loading state_dict"),
    (["--model", "ViT-B-32-quickgelu", "--pretrained", "openai", "--randaug", "bogus"],
     "cannot build ViT-B-32-quickgelu with the 'openai' weights (RuntimeError: Failed to download weights"),
    (["--randaug", "bogus"], "--randaug 'bogus' is not a timm RandAugment config; expected e.g. rand-m10-n2, or none"),
    (["--batch-size", "32"], "has 24 images, fewer than one batch of 32"),
    (["--batch-size", "5"], "mixup pairs images within a micro-batch; 5 per process is odd"),
    (["--accum-steps", "3"], "--batch-size 8 is not divisible by 1 processes x 3 accumulation steps"),
    (lambda root: ["--train-dir", str(root.parent / "nowhere")], "--train-dir {data}/nowhere does not exist; "
                                                                  "expected a folder with one folder of images per class"),
    (flat, "--train-dir {data}/flat: expected one folder of images per class, found files (0.png, ...) but no folders"),
    (one_class, "--train-dir {data}/one has one class folder (class_0); expected one folder of images per class, at "
                "least 2 classes"),
]


@pytest.mark.parametrize("flags, message", BAD_INPUT, ids=lambda x: x if isinstance(x, str) else None)
def test_bad_input_is_one_line_and_writes_nothing(train_dir, tmp_path, capsys, flags, message):
    scratch = tmp_path / "data" / "train"
    shutil.copytree(train_dir, scratch)
    flags = flags(scratch) if callable(flags) else flags
    line = error_of(lambda: run(scratch, tmp_path / "run", *flags), capsys)
    assert message.format(data=tmp_path / "data") in line, line
    assert not (tmp_path / "run").exists()


def test_an_unwritable_output_folder_is_one_line(train_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only folder, even for root
    line = error_of(lambda: run(train_dir, tmp_path / "run"), capsys)
    assert line == f"train.py: error: --output-dir {tmp_path / 'run'}: cannot write in {tmp_path} (permission denied); " \
                   f"expected a writable folder"


@pytest.fixture(scope="module")
def finished(train_dir, tmp_path_factory):
    """A finished one-epoch run with its checkpoint, written under umask 027."""
    old = os.umask(0o027)
    try:
        out = run(train_dir, tmp_path_factory.mktemp("finished") / "run", "--epochs", "1")
    finally:
        os.umask(old)
    return out


def test_outputs_train_py_writes_honour_the_umask(finished):
    for name in ["args.json", "log.jsonl", "checkpoint.pt"]:
        assert (finished / name).stat().st_mode & 0o777 == 0o640, name


def test_overwrite_removes_the_old_run_only_after_the_new_one_passed_its_checks(finished, train_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = files_of(out)
    for flags in (["--model", "ViT-B-32-typo"], ["--pretrained", "missing.pt"], ["--batch-size", "32"],
                  ["--randaug", "bogus"]):
        error_of(lambda: run(train_dir, out, "--epochs", "1", "--overwrite", *flags), capsys)
        assert files_of(out) == before, flags
    run(train_dir, out, "--epochs", "1", "--overwrite", "--lr", "2e-3")
    assert json.loads((out / "args.json").read_text())["lr"] == 2e-3


def test_a_folder_without_checkpoint_or_results_is_reused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ["args.json", "w0.safetensors", "log.jsonl", "w0.safetensors.x1y2.tmp"]:
        (out / name).write_text("{}")
    args = train.parse_args(["--output-dir", str(out), "--model", CONFIG, "--pretrained", "none"])
    assert run_folder.plan_output(args, out) == {"resume": False, "checkpoint": False, "saved": None}


def damage(case, out):
    """Damages a copy of a finished run's folder the way `case` says; returns extra flags."""
    checkpoint = out / "checkpoint.pt"
    if case == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    elif case == "no args.json":
        (out / "args.json").unlink()
    elif case == "w0":
        (out / "w0.safetensors").write_bytes((out / "w0.safetensors").read_bytes()[:300])
    elif case in ("3 models", "step", "architecture"):
        state = torch.load(checkpoint, weights_only=True)
        if case == "3 models":
            state["models"].append(state["models"][0])
        elif case == "step":
            state["step"] = 99
        else:
            state["models"][0]["model.visual.proj"] = torch.zeros(3, 3)
        torch.save(state, checkpoint)
    elif case == "2 into 3":
        args = json.loads((out / "args.json").read_text())
        (out / "args.json").write_text(json.dumps({**args, "num_models": 3}))
        return ["--num-models", "3"]
    elif case == "other images":
        return "other images"
    return []


@pytest.mark.parametrize("case, message", [
    ("truncated", r"checkpoint.pt is truncated or damaged \(.*\); delete it to resume from step 0, or pass --overwrite"),
    ("no args.json", "has checkpoint.pt but no args.json, so --resume cannot check that it continues the same run"),
    ("w0", r"w0.safetensors: cannot be loaded \(.+\); expected a .safetensors file; restore it, or pass --overwrite "
           r"to start afresh"),
    ("3 models", "checkpoint.pt holds 3 models, this run 2: it belongs to another run"),
    ("2 into 3", "checkpoint.pt holds 2 models, this run 3: it belongs to another run"),
    ("step", "checkpoint.pt is at step 99, beyond this run's 3 steps: it belongs to another run"),
    ("architecture", r"checkpoint.pt does not hold classifiers of this run's tiny-clip-test: model.visual.proj has "
                     r"shape \(3, 3\), the model \(64, 32\)"),
    ("other images", r"--resume with a different training set in .* \(24 images in 4 classes in the run, 25 in 4 now, "
                     r"or other files\); expected the images the run started with"),
])
def test_a_checkpoint_that_is_not_this_runs_is_refused(finished, train_dir, tmp_path, capsys, case, message):
    out, data = tmp_path / "run", train_dir
    shutil.copytree(finished, out)
    flags = damage(case, out)
    if flags == "other images":
        data, flags = tmp_path / "data", []
        shutil.copytree(train_dir, data)
        shutil.copy(data / "class_0" / "0.png", data / "class_0" / "extra.png")
        args = json.loads((out / "args.json").read_text())
        (out / "args.json").write_text(json.dumps({**args, "train_dir": str(data)}))
    before = files_of(out)
    line = error_of(lambda: run(data, out, "--epochs", "1", "--resume", *flags), capsys)
    assert re.search(message, line), line
    assert files_of(out) == before


def test_resume_compares_folders_not_strings(finished, train_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    run(train_dir, f"{out}/", "--epochs", "1", "--resume")  # runs/x/ is runs/x: nothing left to train
    assert load_file(out / "final.safetensors").keys() == load_file(finished / "final.safetensors").keys()
    (tmp_path / "elsewhere" / train_dir.name).mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere")  # the same relative --train-dir names other (empty) data
    line = error_of(lambda: run(Path(train_dir.name), out, "--epochs", "1", "--resume"), capsys)
    assert f"--resume with different --train-dir ('{train_dir}' in the run, " in line


@pytest.fixture(scope="module")
def whole(train_dir, tmp_path_factory):
    return run(train_dir, tmp_path_factory.mktemp("whole") / "run", *KILL_EXTRA)


def killed_at(step_to_kill, monkeypatch):
    real_step = train.train_step

    def killed(models, optimizers, micro, lr, step, *a, **k):
        if step == step_to_kill:
            raise KeyboardInterrupt
        return real_step(models, optimizers, micro, lr, step, *a, **k)

    monkeypatch.setattr(train, "train_step", killed)
    return real_step


def test_a_kill_before_the_first_checkpoint_resumes_from_step_0(whole, train_dir, tmp_path, monkeypatch):
    real_step = killed_at(1, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(train_dir, tmp_path / "killed", *KILL_EXTRA)
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == ["args.json", "w0.safetensors"]
    monkeypatch.setattr(train, "train_step", real_step)
    same_run(whole, run(train_dir, tmp_path / "killed", *KILL_EXTRA, "--resume"))


def test_a_torn_log_line_and_stale_temporary_files_do_not_stop_a_resume(whole, train_dir, tmp_path, monkeypatch,
                                                                      caplog, capsys):
    out = tmp_path / "killed"
    real_step = killed_at(5, monkeypatch)  # step 4 was checkpointed
    with pytest.raises(KeyboardInterrupt):
        run(train_dir, out, *KILL_EXTRA)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"event": "epoch", "step": 6, "lo')  # a kill while a line was written
    (out / "checkpoint.pt.4242.tmp").write_bytes(b"\0" * 1000)  # and while checkpoint.pt or a model was
    (out / ".final.safetensors.k2j_9x.tmp").write_bytes(b"\0" * 1000)
    (out / "checkpoint.pt.tmp").write_bytes(b"\0" * 1000)  # the name an earlier version wrote
    monkeypatch.setattr(train, "train_step", real_step)
    caplog.clear()
    capsys.readouterr()
    same_run(whole, run(train_dir, out, *KILL_EXTRA, "--resume"))
    assert f"{out / 'log.jsonl'}: its last line was cut short by a kill and is dropped\n" in capsys.readouterr().out
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert "initialized randomly" not in caplog.text  # the weights come from w0.safetensors


def test_a_torn_log_line_that_the_checkpoint_covers_is_reported_as_lost(tmp_path, capsys):
    log_file = tmp_path / "log.jsonl"
    log_file.write_text('{"event": "merge", "step": 3}\n{"event": "epoch", "step": 3, "lo')
    assert run_folder.kept_log(log_file, 3) == ['{"event": "merge", "step": 3}']
    assert capsys.readouterr().out == (f"{log_file}: its last line was cut short by a kill and is dropped; its "
                                       f"record (step 3) is lost, the checkpoint being after it\n")


class NanGradient(torch.autograd.Function):
    """The identity on the loss, whose gradient is NaN: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("bad_call, message", [
    (10, r"model 1 has a non-finite gradient norm \(nan\) in step 5, loss [\d.]+; nothing after step 3 was saved: the "
         r"last good checkpoint is .*checkpoint.pt \(after step 3\); expected finite values"),
    (2, r"model 1 has a non-finite gradient norm \(nan\) in step 1, loss [\d.]+; no checkpoint had been saved yet"),
])
def test_a_finite_loss_with_a_non_finite_gradient_stops_before_the_step(train_dir, tmp_path, capsys, monkeypatch,
                                                                        bad_call, message):
    real_loss, calls = train.loss_of, []

    def bad_gradient(*a, **k):
        calls.append(1)
        loss = real_loss(*a, **k)
        return NanGradient.apply(loss) if len(calls) == bad_call else loss

    monkeypatch.setattr(train, "loss_of", bad_gradient)
    line = error_of(lambda: run(train_dir, tmp_path / "run"), capsys)
    assert re.search(message, line), line
    assert not (tmp_path / "run" / "final.safetensors").exists()
    if bad_call == 10:
        state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
        assert state["step"] == 3 and all(torch.isfinite(v).all() for m in state["models"] for v in m.values())
    else:
        assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("merge_every, message", [
    ("never", r"a model holds NaN or inf weights after step 6; nothing after step 3 was saved: the last good checkpoint"),
    ("epoch", r"the merge after step 6 failed: key .* holds NaN or inf; refusing to merge it; nothing after step 3 was saved"),
])
def test_nan_weights_are_never_saved_or_merged(train_dir, tmp_path, capsys, monkeypatch, merge_every, message):
    real_step = train.train_step

    def corrupting(models, *a, **k):
        losses = real_step(models, *a, **k)
        if a[3] == 5:  # the last step of epoch 2
            with torch.no_grad():
                next(run_folder.unwrap(models[1]).parameters())[0] = float("nan")
        return losses

    monkeypatch.setattr(train, "train_step", corrupting)
    line = error_of(lambda: run(train_dir, tmp_path / "run", "--merge-every", merge_every), capsys)
    assert re.search(message, line), line
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and all(torch.isfinite(v).all() for m in state["models"] for v in m.values())


# ---- Unreadable images

def truncated_jpeg(path):
    Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:300])


BAD_FILES = {"truncated JPEG": truncated_jpeg, "zero bytes": lambda p: p.write_bytes(b""),
             "text named .jpg": lambda p: p.write_text("not an image")}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_an_unreadable_image_is_replaced_by_the_next_readable_one_and_reported(train_dir, tmp_path, kind):
    tree = tmp_path / "tree"
    shutil.copytree(train_dir, tree)
    BAD_FILES[kind](tree / "class_1" / "00.jpg")  # between 0.png and 1.png
    folder, _ = data.training_set(tree)
    dataset = data.SeededImages(folder, lambda image: torch.tensor(image.getpixel((0, 0))))
    bad = [path for path, _ in folder.samples].index(str(tree / "class_1" / "00.jpg"))
    image, label, unreadable = dataset[(bad, 7)]
    reason = {"truncated JPEG": "OSError: ", "zero bytes": "an empty file",  # PIL words truncation variously
              "text named .jpg": "not an image format PIL can read"}[kind]
    assert len(unreadable) == 1 and unreadable[0][0] == str(tree / "class_1" / "00.jpg")
    assert unreadable[0][1].startswith(reason), unreadable
    assert label == 1 and torch.equal(image, dataset[(bad + 1, 7)][0])  # the next image of the folder
    assert dataset[(bad + 1, 7)][2] == []


def test_training_stops_at_an_unreadable_image_or_skips_it_deterministically(train_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(train_dir, data)
    bad = data / "class_2" / "broken.jpg"
    truncated_jpeg(bad)
    extra = ["--batch-size", "25", "--mixup", "0"]  # 25 images: every one in every epoch
    line = error_of(lambda: run(data, tmp_path / "stopped", *extra), capsys)
    assert line.startswith(f"train.py: error: training image {bad} cannot be read (OSError: ")
    assert line.endswith("replace it and continue with --resume, or add --skip-bad-images to train past unreadable "
                         "images")
    assert not (tmp_path / "stopped" / "checkpoint.pt").exists()
    resumed = run(data, tmp_path / "stopped", *extra, "--resume", "--skip-bad-images")
    skipped = [r for r in log(resumed) if r["event"] == "unreadable_image"]
    assert [(r["step"], r["model"], r["file"]) for r in skipped] == [(1, 0, str(bad)), (1, 1, str(bad)),
                                                                     (2, 0, str(bad)), (2, 1, str(bad))]
    same_run(run(data, tmp_path / "skipping", *extra, "--skip-bad-images"), resumed)


def test_a_damaged_linear_probe_cache_is_rebuilt(train_dir, tmp_path, capsys):
    folder, names = data.training_set(train_dir)
    classifier, preprocess = train.evaluate.build_classifier(train.evaluate.resolve_model(CONFIG), None, names,
                                                             zero_shot=False)
    args = train.parse_args(["--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--workers", "0"])
    args.model, args.pretrained = "tiny-clip-test", str(tmp_path / "clip.safetensors")  # real weights are cached
    features, labels = probe.probe_features(classifier, folder, preprocess, args, torch.device("cpu"))
    (cache,) = (tmp_path / "cache").glob("lp_features_*.safetensors")
    cache.write_bytes(cache.read_bytes()[:100])  # cut short, as by a full disk
    again = probe.probe_features(classifier, folder, preprocess, args, torch.device("cpu"))
    assert f"rebuilding the linear-probe features: cannot read {cache}" in capsys.readouterr().out
    assert torch.equal(again[0], features) and torch.equal(again[1], labels)
    assert load_file(cache).keys() == {"features", "labels"}


@pytest.mark.parametrize("bf16", [False, True])
def test_a_warm_linear_probe_cache_gives_the_features_a_fresh_run_fits(train_dir, tmp_path, bf16):
    """The cache holds the features in the precision the probe fits them in (fp32, also when
    they were computed under bf16 autocast), so a warm cache builds the fresh run's head."""
    folder, names = data.training_set(train_dir)
    classifier, preprocess = train.evaluate.build_classifier(train.evaluate.resolve_model(CONFIG), None, names)
    args = train.parse_args(["--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--workers", "0"])
    args.model, args.pretrained = "tiny-clip-test", str(tmp_path / "clip.safetensors")  # real weights are cached
    heads = []
    for _ in range(2):  # fresh, then warm
        features, labels = probe.probe_features(classifier, folder, preprocess, args, torch.device("cpu"), bf16)
        fitted = copy.deepcopy(classifier)
        probe.fit_linear_probe(fitted, features, labels, iterations=5)
        heads.append((features, fitted.classification_head.weight.detach().clone()))
    (cache,) = (tmp_path / "cache").glob("lp_features_*.safetensors")
    assert load_file(cache)["features"].dtype == torch.float32
    assert torch.equal(heads[0][0], heads[1][0]) and torch.equal(heads[0][1], heads[1][1])
    if bf16:  # features computed under autocast differ from fp32 ones: the flag reached the tower
        fp32_features, _ = probe.probe_features(classifier, folder, preprocess, args, torch.device("cpu"))
        assert not torch.equal(fp32_features, heads[0][0])


def test_an_unreadable_evaluation_image_stops_the_run_in_one_line(train_dir, tmp_path, capsys):
    val = tmp_path / "val"
    shutil.copytree(train_dir, val)
    truncated_jpeg(val / "class_3" / "broken.jpg")
    line = error_of(lambda: run(train_dir, tmp_path / "run", "--epochs", "1", "--eval-every-epoch", "--eval-dir", str(val)),
                    capsys)
    assert line.startswith(f"train.py: error: --eval-every-epoch: val: image {val / 'class_3' / 'broken.jpg'} cannot be "
                           f"read (OSError: "), line
    assert line.endswith("no checkpoint had been saved yet; continue with --resume"), line
