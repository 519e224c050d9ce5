"""demo.py: the mechanics of the miniature (not its outcome) in well under a minute, the world
it renders, and its command line."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import demo


@pytest.fixture
def one_thread():
    """On 2 cores shared with other jobs, two torch threads spin on each other: one is faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_quick_demo_runs_every_row_and_checks_the_regime(tmp_path, one_thread, capsys):
    record = demo.main(["--quick", "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "demo.json")])
    # The table names the domains as what they are, their ImageNet analogues once; --quick says
    # that its regime check is not expected to hold.
    out = capsys.readouterr().out
    assert "\nImageNet analogues: photo = ImageNet, resampled photo = -V2, sketch = -Sketch, painting = -R, " \
           "cluttered = -A\n" in out
    table = out.split("ImageNet analogues: ", 1)[1].splitlines()[1:3 + len(demo.ROWS)]
    assert table[0].split() == ["resampled"]
    assert table[1].split()[:7] == ["cost", "photo", "photo", "sketch", "painting", "cluttered", "Avg."]
    assert [line[:28].strip() for line in table[2:]] == list(demo.ROWS) and max(map(len, table)) <= 110
    assert "\na reduced run (--quick) is not expected to meet these targets: it shows the mechanics only\n" \
           "regime check: " in out
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["results"] == record["results"] and saved["regime"] == record["regime"]
    rows = record["results"]
    assert list(rows) == list(demo.ROWS)
    for r in rows.values():
        assert all(0 <= r[d] <= 100 for d in demo.DOMAINS.values())
        assert r["Avg. shifts"] == pytest.approx(sum(r[d] for d in list(demo.DOMAINS.values())[1:]) / 4)
    assert [r["cost"] for r in rows.values()] == [0, 1, 2, 2, 2, 2, 1]
    # Fine-tuning moved the weights; averaging lands nearer the center than one fine-tune.
    # (Whether w0 is nearer than one fine-tune depends on their cosine: not a property of --quick.)
    assert rows["zero-shot"]["distance to center"] > 0 and rows["vanilla FT"]["distance to center"] > 0
    assert rows["uniform average (2 FT)"]["distance to center"] < rows["vanilla FT"]["distance to center"]
    # The ConvNeXt tower keeps no running statistics: every tensor is a parameter.
    assert record["geometry"]["buffers"] == [] and record["geometry"]["buffer_share"] == 0
    # One merge per epoch, each logged with t per group; the WiSE-FT line spans 0..1.
    assert len(record["merges"]) == record["args"]["epochs"]
    assert all(set(m["t_summary"]) == {"matrices", "vectors", "head"} for m in record["merges"])
    assert min(map(float, record["wise_ft_id"])) == 0 and max(map(float, record["wise_ft_id"])) == 1
    assert [t["target"][0] for t in record["regime"]] == list("12223333333334445556")
    # The committed pre-trained model, nothing pre-trained here; derivation.md §11's prediction.
    assert record["pretrained"] == str(demo.WEIGHTS) and not list((tmp_path / "cache").glob("*clip.safetensors"))
    prediction = record["prediction"]
    assert prediction["measured"] == pytest.approx(rows["Model Stock, post-training"]["ImageNet"]
                                                   - rows["uniform average (2 FT)"]["ImageNet"])
    assert "\npost-training Model Stock against the uniform average, ID (derivation.md §11):\n  predicted: " in out


def test_summarize_aggregates_runs_and_refuses_bad_input(tmp_path, capsys):
    run = {"results": {"zero-shot": {d: 50.0 for d in [*demo.DOMAINS.values(), "Avg. shifts", "distance to center"]} | {"cost": 0}},
           "regime": [{"target": "6. test images per domain", "value": 5000.0, "rule": [">=", 5000], "paper": ""}],
           "merges": [{"epoch": 1, "t_summary": {g: {"mean": 0.5} for g in ("matrices", "vectors", "head")}}],
           "args": {"seed": 0, "lr": 1e-4}, "test_images": 5000, "seconds": 1.0}
    paths = []
    for seed, score in ((0, 50.0), (1, 60.0)):
        run["args"]["seed"] = seed
        run["results"]["zero-shot"]["ImageNet"] = score
        paths.append(tmp_path / f"demo_seed{seed}.json")
        paths[-1].write_text(json.dumps(run))
    summary = demo.main(["--summarize", *map(str, paths)])
    assert summary["runs"] == 2 and summary["regime"][0]["value"] == 5000
    out = capsys.readouterr().out
    assert "| zero-shot | 0 | 55.0 ± 7.1 |" in out
    assert "| row | cost | photo | resampled photo | sketch | painting | cluttered | Avg. shifts | " \
           "distance to center |" in out  # printed names; the JSON keys stay ImageNet's
    expected = "expected a file written by demo.py --output"
    (tmp_path / "other.json").write_text(json.dumps({**run, "test_images": 100}))
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "list.json").write_text("[]")
    for bad, message in (
            (["missing.json"], f"--summarize missing.json: no such file or directory; {expected}"),
            ([str(tmp_path)], f"--summarize {tmp_path}: is a directory; {expected}"),
            ([str(tmp_path / "bad.json")], f"--summarize {tmp_path / 'bad.json'} is not JSON (Expecting "
                                           f"property name enclosed in double quotes, line 1); {expected}"),
            ([str(tmp_path / "list.json")], f"--summarize {tmp_path / 'list.json'} is not a demo.py result "
                                            f"(no results/regime/merges); {expected}"),
            ([str(paths[0]), str(tmp_path / "other.json")],
             "--summarize: the files come from runs with different settings; aggregate runs that differ only "
             "in --seed"),
            ([str(paths[1]), str(paths[1])],
             "--summarize: seeds [1, 1] repeat; expected runs of different --seed")):
        with pytest.raises(SystemExit) as error:
            demo.main(["--summarize", *bad])
        assert str(error.value) == f"demo.py: error: {message}" and error.value.code == 2


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "--seed must be >= 0, got -1"), (["--models", "2"], "--models must be at least 3"),
    (["--epochs", "1"], "--epochs must be at least 2"), (["--batch-size", "0"], "--batch-size must be in 1.."),
    (["--lr", "nan"], "--lr must be positive"), (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--output", "/no/such/folder/demo.json"],
     "--output /no/such/folder/demo.json: no folder /no/such/folder"),
    (["--output", "/"], "--output / is a folder; expected a file name such as demo.json")])
def test_bad_arguments_are_one_line_exit_2_before_any_work(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as error:
        demo.main(["--cache-dir", str(tmp_path / "cache"), *flags])
    assert str(error.value).startswith(f"demo.py: error: {message}") and error.value.code == 2
    assert "\n" not in str(error.value) and not (tmp_path / "cache").exists()


def test_an_unwritable_work_dir_is_one_line_exit_2_before_any_work(tmp_path):
    with pytest.raises(SystemExit) as error:  # /sys: not writable, even by root
        demo.main(["--quick", "--cache-dir", str(tmp_path / "cache"), "--work-dir", "/sys/demo_work",
                   "--output", str(tmp_path / "demo.json")])
    assert str(error.value).startswith("demo.py: error: --work-dir /sys/demo_work: cannot write in /sys (")
    assert error.value.code == 2 and not (tmp_path / "demo.json").exists()


def test_the_world_is_deterministic_and_covers_every_class():
    a = demo.render(np.random.default_rng(3), "hard")
    b = demo.render(np.random.default_rng(3), "hard")
    assert (a[0] == b[0]).all() and a[1:] == b[1:] and a[0].shape == (32, 32, 3)
    rng = np.random.default_rng(0)
    for domain in demo.DOMAINS:
        labels = {demo.render(rng, domain)[1] for _ in range(300)}
        assert labels == set(range(len(demo.SHAPES)))


def test_pretraining_shows_shapes_in_their_typical_colours_and_the_test_world_does_not():
    rng = np.random.default_rng(0)
    chance = 1 / len(demo.COLOURS)
    for bias, expected in ((demo.COLOUR_BIAS, demo.COLOUR_BIAS + (1 - demo.COLOUR_BIAS) * chance), (0.0, chance)):
        draws = [demo.render(rng, "photo", bias) for _ in range(3000)]
        typical = np.mean([colour == demo.TYPICAL_COLOUR[demo.SHAPES[label]] for _, label, colour in draws])
        assert abs(typical - expected) < 0.03
    assert 0 < demo.COLOUR_BIAS < 1 and set(demo.TYPICAL_COLOUR) == set(demo.SHAPES)
    assert set(demo.TYPICAL_COLOUR.values()) <= set(demo.COLOURS)
    # Captions name the shape by its class name, and its colour half of the time.
    names = [demo.caption_name(rng, "star", "red") for _ in range(2000)]
    assert set(names) == {"star", "red star"} and abs(names.count("star") / len(names) - 0.5) < 0.05


def test_a_share_of_the_photos_to_fine_tune_on_is_mislabelled_always_as_another_class():
    labels = [i % len(demo.CLASSES) for i in range(4000)]
    noisy = demo.mislabel(labels, demo.MISLABELLED, seed=5)
    assert noisy == demo.mislabel(labels, demo.MISLABELLED, seed=5) != demo.mislabel(labels, demo.MISLABELLED, seed=6)
    wrong = [a != b for a, b in zip(labels, noisy)]
    assert abs(np.mean(wrong) - demo.MISLABELLED) < 0.015 and 0 < demo.MISLABELLED < 0.5
    assert {b for a, b, w in zip(labels, noisy, wrong) if w} == set(range(len(demo.CLASSES)))  # any other class
    assert demo.mislabel(labels, 0.0, seed=5) == labels


def test_captions_that_say_the_same_thing_are_positives_whatever_their_template():
    import open_clip
    config = demo.clip_config(demo.Path(__import__("tempfile").mkdtemp()) / "model-stock-demo-clip.json")
    tokenizer = open_clip.get_tokenizer(config.stem)
    x, text, target = demo.captioned_batch(np.random.default_rng(0), 64, tokenizer, (0.5,) * 3, (0.25,) * 3)
    assert x.shape == (64, 3, 32, 32) and text.shape[0] == 64
    assert torch.allclose(target.sum(1), torch.ones(64)) and torch.equal(target, target.T)
    # Some positives are other captions (the same thing in other template words), never all.
    positives = (target > 0).sum(1)
    assert positives.max() > 1 and positives.min() >= 1 and positives.max() < 64
    assert len({tuple(t.tolist()) for t in text}) > len({tuple(row.tolist()) for row in (target > 0)})


def test_the_prediction_is_derivation_md_s_reading_of_the_miniature():
    """derivation.md §11's table: the miniature's means give kappa rho 0.08, alpha_max 0.83 and a
    predicted gain of -1.3 for post-training Model Stock over the uniform average."""
    wise = {0.0: 50.0, 0.9: 63.84, 1.0: 63.5}  # the line best at 0.9, 0.34 above its end
    p = demo.predicted_gain(2 * 0.568 / 1.568, 2, wise, averaging_gain=1.3)
    assert (p["alpha_1"], round(p["kappa_rho"], 2), round(p["alpha_max"], 2), round(p["gain"], 1)) == \
        (0.9, 0.08, 0.83, -1.3)
    end = demo.predicted_gain(0.7, 2, {0.0: 50.0, 0.9: 60.0, 1.0: 61.0}, averaging_gain=1.0)
    assert end["alpha_1"] == 1.0 and end["gain"] is None and end["alpha_max"] == pytest.approx(0.85)


def test_the_committed_model_is_checked_by_its_hash(tmp_path, monkeypatch):
    other = tmp_path / "miniature-clip.safetensors"
    other.write_bytes(b"not the model")
    monkeypatch.setattr(demo, "WEIGHTS", other)
    with pytest.raises(SystemExit) as error:
        demo.main(["--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "demo.json")])
    assert str(error.value) == (f"demo.py: error: {other} does not have the committed SHA-256 (damaged, or "
                                f"replaced); restore it (git checkout {tmp_path.name}) or pass a model that "
                                f"--pretrain wrote with --weights")
    assert error.value.code == 1 and not (tmp_path / "demo.json").exists()
    with pytest.raises(SystemExit) as error:
        demo.main(["--weights", str(tmp_path / "none.safetensors"), "--output", str(tmp_path / "demo.json")])
    assert error.value.code == 2 and str(error.value).startswith("demo.py: error: --weights ")


def test_the_committed_model_has_the_committed_hash():
    assert demo.sha256(demo.WEIGHTS) == demo.WEIGHTS_SHA256


def test_pretraining_writes_the_same_bytes_twice(tmp_path, one_thread, monkeypatch, capsys):
    monkeypatch.setattr(demo, "PRETRAINING", {"steps": 3, "batch_size": 8, "lr": 2e-3, "pool": 2})
    first = demo.main(["--pretrain", "--cache-dir", str(tmp_path / "a")])
    second = demo.main(["--pretrain", "--cache-dir", str(tmp_path / "b")])
    assert first.read_bytes() == second.read_bytes()
    out = capsys.readouterr().out
    assert f"SHA-256 {demo.sha256(first)}: not the committed model's" in out


def test_a_fine_tuning_run_that_fails_stops_the_demo_with_its_line(tmp_path):
    # The runs go on in processes of their own: train.py's error reaches the demo's one line.
    config = demo.clip_config(tmp_path / "config.json")
    run = (tmp_path / "run", tmp_path / "no_photos", config, demo.WEIGHTS, tmp_path, demo.parse_args([]), [])
    with pytest.raises(demo.cli.Exit) as stopped:
        demo.finetune_at_once([run], epochs=2)
    assert stopped.value.code == demo.cli.FAILURE
    assert str(stopped.value) == (f"demo.py: error: fine-tuning {tmp_path / 'run'} stopped: train.py: error: "
                                  f"--train-dir {tmp_path / 'no_photos'} does not exist; expected a folder with "
                                  f"one folder of images per class; its output is in {tmp_path / 'run.out'}")


def test_the_first_run_to_fail_stops_the_others(tmp_path):
    config = demo.clip_config(tmp_path / "config.json")
    images, labels = demo.render_set("photo", 64, seed=1)
    photos = demo.write_folder(tmp_path / "photos", images, labels)
    args = demo.parse_args(["--epochs", "200", "--batch-size", "8"])  # minutes, if nothing stopped it
    (tmp_path / "taken").write_text("a file where the run's folder would go")
    runs = [(tmp_path / "long", photos, config, demo.WEIGHTS, tmp_path, args, ["--num-models", "2"]),
            (tmp_path / "taken", photos, config, demo.WEIGHTS, tmp_path, args, [])]
    with pytest.raises(demo.cli.Exit) as stopped:
        demo.finetune_at_once(runs, args.epochs)
    assert f"fine-tuning {tmp_path / 'taken'} stopped: train.py: error: --output-dir" in str(stopped.value)
    assert multiprocessing.active_children() == [] and not (tmp_path / "long" / "model_0.safetensors").exists()


def test_ctrl_c_stops_the_runs_it_started(tmp_path):
    # Ctrl-C reaching demo.py alone (kill -INT): exit 130 and one line, and none of the fine-tuning
    # processes it started outlives it.
    root = Path(demo.__file__).parent
    command = [sys.executable, str(root / "demo.py"), "--quick", "--batch-size", "2", "--cache-dir", str(tmp_path),
               "--output", str(tmp_path / "demo.json")]  # batch 2: 64 steps an epoch, time to interrupt them
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not list(tmp_path.glob("work_seed0_quick/*/log.jsonl")) and time.time() < deadline:
        time.sleep(0.1)  # a run is training
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.strip().splitlines()[-1] == "demo.py: interrupted; the pre-trained model, once written, stays cached"
    assert "Traceback" not in err and "Warning" not in err  # the runs stopped quietly, leaking nothing
    deadline = time.time() + 10  # nothing left in its process group a moment later
    while time.time() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)
