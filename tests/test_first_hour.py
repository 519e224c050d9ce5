"""What a newcomer meets in the first hour with train.py and merge_checkpoints.py: silent wrong
inputs refused in one line, one rule for exit codes (2: a mistake in the command, found before
any work; 1: a failure while running), --help with defaults and examples. Each case asserts the
message and that nothing was written or damaged."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import cli
import merge_checkpoints
from test_train import CONFIG, run, train_dir  # noqa: F401 (train_dir is a fixture)

ROOT = Path(__file__).resolve().parents[1]
SYS_IS_READ_ONLY = merge_checkpoints.cannot_write_in("/sys") is not None


def failure(call):
    """(exit status, the one line) of a call that ends the command."""
    with pytest.raises(SystemExit) as e:
        call()
    assert isinstance(e.value, cli.Exit), e.value
    assert "\n" not in str(e.value)
    return e.value.code, str(e.value)


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


# ---- train.py ----

def test_eval_every_epoch_with_nothing_to_evaluate_is_refused(train_dir, tmp_path):
    code, line = failure(lambda: run(train_dir, tmp_path / "run", "--eval-every-epoch",
                                     "--data-location", str(tmp_path / "empty")))
    assert code == cli.USAGE
    assert line == (f"train.py: error: --eval-every-epoch: no evaluation set found under --data-location "
                    f"{tmp_path / 'empty'}; expected --eval-dir with a validation folder of the training classes, "
                    f"or the datasets of docs/datasets.md")
    assert not (tmp_path / "run").exists()


def test_an_eval_dir_of_other_classes_is_refused(train_dir, tmp_path):
    val = tmp_path / "val"
    for name in ("class_0", "class_1", "class_9"):
        shutil.copytree(train_dir / "class_0", val / name)
    code, line = failure(lambda: run(train_dir, tmp_path / "run", "--eval-every-epoch", "--eval-dir", str(val)))
    assert code == cli.USAGE
    assert line == (f"train.py: error: --eval-dir {val} has 3 class folders, --train-dir 4; 2 missing (first: "
                    f"class 2), 1 not in the training set (first: class 9); expected the training classes' "
                    f"validation folder")
    assert not (tmp_path / "run").exists()


def test_a_train_dir_that_is_a_file_or_missing_and_an_idle_eval_dir_are_refused(train_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    for path, what in ((tmp_path / "notes.txt", "is a file"), (tmp_path / "none", "does not exist")):
        code, line = failure(lambda: run(path, tmp_path / "run"))
        assert (code, line) == (cli.USAGE, f"train.py: error: --train-dir {path} {what}; expected a folder "
                                           f"with one folder of images per class")
    with pytest.raises(SystemExit) as e:
        run(train_dir, tmp_path / "run", "--eval-dir", str(train_dir))
    assert e.value.code == cli.USAGE and not (tmp_path / "run").exists()


def test_imagenet_sets_for_a_run_of_other_classes_are_refused(train_dir, tmp_path, monkeypatch):
    import evaluate
    monkeypatch.setattr(evaluate, "find_eval_sets", lambda *a, **k: ["ImageNet found"])
    code, line = failure(lambda: run(train_dir, tmp_path / "run", "--eval-every-epoch"))
    assert code == cli.USAGE and line.startswith("train.py: error: --eval-every-epoch scores ImageNet's 1000 "
                                                 "classes under --data-location, but --train-dir has 4 other")
    assert not (tmp_path / "run").exists()


def test_a_negative_learning_rate_is_read_as_a_number(train_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(train_dir, tmp_path / "run", "--lr", "-1e-3")
    assert e.value.code == cli.USAGE
    assert capsys.readouterr().err == ("train.py: error: --lr must be > 0 and --wd >= 0 (finite), got -0.001 and "
                                       "0.1 (see --help)\n")


@pytest.mark.skipif(not SYS_IS_READ_ONLY, reason="/sys is writable here")
def test_an_output_folder_that_root_cannot_write_fails_before_any_work(train_dir):
    code, line = failure(lambda: run(train_dir, Path("/sys/model_stock_run")))
    assert code == cli.USAGE
    assert line.startswith("train.py: error: --output-dir /sys/model_stock_run: cannot write in /sys (")


def test_help_shows_defaults_and_examples(capsys):
    import train
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: ~/data/imagenet/train)" in text and "examples:\n    python train.py" in text
    assert "(default: None)" not in text


# ---- merge_checkpoints.py ----

@pytest.fixture()
def models(tmp_path):
    gen = torch.Generator().manual_seed(0)
    w0 = {"a.weight": torch.randn(8, 8, generator=gen), "b.weight": torch.randn(4, 8, generator=gen),
          "bias": torch.randn(8, generator=gen)}
    shared = {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in w0.items()}  # fine-tunes agree in part
    ws = [{k: v + shared[k] + 0.1 * torch.randn(v.shape, generator=gen) for k, v in w0.items()} for _ in range(2)]
    paths = [tmp_path / name for name in ("w0.safetensors", "ft1.safetensors", "ft2.safetensors")]
    for path, state in zip(paths, [w0, *ws]):
        save_file(state, path)
    return [str(p) for p in paths], w0, ws


def test_the_merge_names_each_argument_s_role(models, capsys):
    paths, _, _ = models
    merge_checkpoints.main(paths + ["--inspect"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [f"w0, the pre-trained model every fine-tune started from (the first argument): {paths[0]}",
                         f"ws[0], fine-tuned from w0: {paths[1]}", f"ws[1], fine-tuned from w0: {paths[2]}"]
    assert not any(line.startswith("warning") for line in lines)


def test_an_anchor_that_the_task_vectors_point_away_from_is_warned_about(models, tmp_path, capsys):
    paths, _, ws = models
    middle = tmp_path / "average.safetensors"  # e.g. a uniform average given as the pre-trained model
    save_file({k: (ws[0][k] + ws[1][k]) / 2 for k in ws[0]}, middle)
    merge_checkpoints.main([str(middle), paths[1], paths[2], "--inspect"])
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert warning == [f"warning: in 2 of 2 matrices the task vectors point apart (cos < 0: t = 0, the layer stays "
                       f"at w0), which fine-tunes of one pre-trained model rarely do; check that the first argument, "
                       f"{middle}, is the model every fine-tune started from"]


def test_the_pre_trained_model_given_as_a_fine_tune_is_warned_about(models, capsys):
    paths, _, _ = models
    merge_checkpoints.main([paths[0], paths[0], paths[1], "--inspect"])
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert warnings == [f"warning: ws[0], {paths[0]}, equals w0 in every floating tensor (|d| = 0), which pulls t "
                        f"to 0: the merge is w0; expected fine-tuned models after the pre-trained one"]


def test_inputs_that_do_not_fit_are_a_mistake_in_the_command_nan_a_failure(models, tmp_path):
    paths, w0, ws = models
    save_file({**ws[1], "a.weight": torch.zeros(3, 3)}, tmp_path / "other.safetensors")
    out = tmp_path / "merged.safetensors"
    code, line = failure(lambda: merge_checkpoints.main([paths[0], paths[1], str(tmp_path / "other.safetensors"),
                                                         "-o", str(out)]))
    assert code == cli.USAGE and line == (f"merge_checkpoints.py: error: key 'a.weight': {tmp_path / 'other.safetensors'}"
                                          f" has shape (3, 3), the pre-trained model {paths[0]} (8, 8)")
    save_file({**ws[1], "bias": torch.full((8,), float("nan"))}, tmp_path / "nan.safetensors")
    code, line = failure(lambda: merge_checkpoints.main([paths[0], paths[1], str(tmp_path / "nan.safetensors"),
                                                         "-o", str(out)]))
    assert code == cli.FAILURE and line == (f"merge_checkpoints.py: error: key 'bias': {tmp_path / 'nan.safetensors'} "
                                            f"holds NaN or inf; refusing to merge it")
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_a_json_table_that_cannot_be_written_at_the_end_is_kept_elsewhere(models, tmp_path, monkeypatch):
    paths, _, _ = models

    def full_disk(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merge_checkpoints, "write_atomically", full_disk)
    code, line = failure(lambda: merge_checkpoints.main(paths + ["--inspect", "--json", str(tmp_path / "t.json")]))
    assert code == cli.FAILURE
    prefix = (f"merge_checkpoints.py: error: --json {tmp_path / 't.json'}: cannot write {tmp_path / 't.json'} (No "
              f"space left on device); the results are in ")
    assert line.startswith(prefix)
    kept = Path(line[len(prefix):])
    assert '"tensors"' in kept.read_text() and not (tmp_path / "t.json").exists()
    kept.unlink()


@pytest.mark.skipif(not SYS_IS_READ_ONLY, reason="/sys is writable here")
def test_a_json_table_that_root_cannot_write_fails_before_the_merge(models, capsys):
    paths, _, _ = models
    with pytest.raises(SystemExit) as e:
        merge_checkpoints.main(paths + ["--inspect", "--json", "/sys/layers.json"])
    assert e.value.code == cli.USAGE
    assert capsys.readouterr().err.startswith("merge_checkpoints.py: error: --json /sys/layers.json: cannot write in "
                                              "/sys (")


# ---- one rule for exit codes, as a shell sees them ----

def command(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    return done.returncode, done.stderr.strip().splitlines()


def test_exit_status_2_for_a_mistake_1_for_a_failure(models, tmp_path):
    paths, _, ws = models
    code, err = command("train.py", "--output-dir", str(tmp_path / "run"), "--train-dir", str(tmp_path / "none"),
                        "--model", CONFIG, "--pretrained", "none")
    assert code == 2 and err[-1].startswith(f"train.py: error: --train-dir {tmp_path / 'none'}")
    save_file({**ws[1], "bias": torch.full((8,), float("inf"))}, tmp_path / "inf.safetensors")
    code, err = command("merge_checkpoints.py", paths[0], paths[1], str(tmp_path / "inf.safetensors"), "--inspect")
    assert (code, err[-1]) == (1, f"merge_checkpoints.py: error: key 'bias': {tmp_path / 'inf.safetensors'} "
                                  f"holds NaN or inf; refusing to merge it")
    code, err = command("merge_checkpoints.py", paths[0], paths[1], "--inspect")
    assert (code, err) == (2, ["merge_checkpoints.py: error: Model Stock needs at least 2 fine-tuned models, got 1 "
                               "(see --help)"])
    assert files_under(tmp_path) == sorted(["w0.safetensors", "ft1.safetensors", "ft2.safetensors",
                                            "inf.safetensors"])
