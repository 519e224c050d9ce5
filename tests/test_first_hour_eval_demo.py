"""A first hour with evaluate.py and demo.py: each mistake is one line with the exit status of
cli.py's rule (2: the command, found before any work; 1: a failure while running), and nothing
is written or damaged. CPU, no network; the subprocess tests run the scripts as a user would."""
import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

import cli
import data
import demo
import evaluate as ev
import merge_checkpoints

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "configs" / "tiny-clip-test.json"
SYS_REASON = os.path.isdir("/sys") and merge_checkpoints.cannot_write_in("/sys")


def image_tree(root, classes, images=2):
    """root/<class>/<i>.png, small solid images."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(images):
            Image.new("RGB", (40, 30), (80 * c, 40 * i, 200)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny test CLIP's registered name and a 3-class classifier checkpoint of it."""
    name = ev.resolve_model(str(CONFIG))
    folder = tmp_path_factory.mktemp("checkpoints")
    classifier, _ = ev.build_classifier(name, None, ["cat", "dog", "red car"], zero_shot=False)
    merge_checkpoints.save_state_dict(classifier.state_dict(), folder / "three.safetensors")
    return name, folder / "three.safetensors"


def evaluate_fails(argv):
    """(exit status, the one line) of evaluate.main(argv), which must fail."""
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    return e.value.code, str(e.value)


def common(tmp_path, *more):
    return ["--model", str(CONFIG), "--pretrained", "none", "--workers", "0",
            "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "out.json"), *more]


# ---------------------------------------------------------------------------- 1. --output


@pytest.mark.skipif(not SYS_REASON, reason="/sys is missing or writable here")
def test_an_output_in_a_folder_that_takes_no_files_fails_at_once(tmp_path):
    val = image_tree(tmp_path / "val", ["cat", "dog"])
    status, line = evaluate_fails(common(tmp_path, "--data-dir", str(val)) + ["--output", "/sys/eval.json"])
    assert status == 2 and line == f"evaluate.py: error: --output /sys/eval.json: cannot write in /sys " \
                                   f"({SYS_REASON}); expected a writable folder"
    with pytest.raises(SystemExit) as e:
        demo.main(["--quick", "--cache-dir", str(tmp_path / "democache"), "--output", "/sys/demo.json"])
    assert e.value.code == 2 and str(e.value) == f"demo.py: error: --output /sys/demo.json: cannot write " \
                                                 f"in /sys ({SYS_REASON}); expected a writable folder"
    assert not os.path.exists("/sys/eval.json") and not os.path.exists("/sys/demo.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val"]  # no cache, no demo world


def no_space(path, write):
    raise OSError(errno.ENOSPC, "No space left on device")


def kept_file(line, prefix):
    """The temporary file a 'the results are in ...' line names, after checking the line."""
    assert line.startswith(prefix) and "\n" not in line, line
    kept = Path(line.removeprefix(prefix))
    assert kept.parent == Path(tempfile.gettempdir()) and kept.is_file(), line
    return kept


def test_evaluate_keeps_its_results_when_the_output_cannot_be_written_at_the_end(tmp_path, monkeypatch,
                                                                                 capsys):
    val = image_tree(tmp_path / "val", ["cat", "dog"])
    (tmp_path / "out.json").write_text("precious")
    monkeypatch.setattr(merge_checkpoints, "write_atomically", no_space)
    status, line = evaluate_fails(common(tmp_path, "--data-dir", str(val)))
    assert status == cli.FAILURE
    kept = kept_file(line, f"evaluate.py: error: cannot write {tmp_path / 'out.json'} (No space left on "
                           f"device); the results are in ")
    try:
        record = json.loads(kept.read_text())
    finally:
        kept.unlink()
    assert record["runs"][0]["datasets"]["val"]["images"] == 4 and record["args"]["data_dir"] == str(val)
    assert (tmp_path / "out.json").read_text() == "precious"  # untouched
    assert "top-1 (%)" in capsys.readouterr().out  # the table was shown before the failure


def test_demo_keeps_its_record_when_the_output_cannot_be_written_at_the_end(tmp_path, monkeypatch):
    (tmp_path / "demo.json").write_text("precious")
    monkeypatch.setattr(merge_checkpoints, "write_atomically", no_space)
    monkeypatch.setattr(demo, "plot", None)  # not reached: nothing is drawn beside a file that is not there
    with pytest.raises(SystemExit) as e:
        demo.save({"results": {"zero-shot": {"ImageNet": 50.0}}}, str(tmp_path / "demo.json"))
    assert e.value.code == cli.FAILURE
    kept = kept_file(str(e.value), f"demo.py: error: cannot write {tmp_path / 'demo.json'} (No space left on "
                                   f"device); the results are in ")
    try:
        assert json.loads(kept.read_text()) == {"results": {"zero-shot": {"ImageNet": 50.0}}}
    finally:
        kept.unlink()
    assert (tmp_path / "demo.json").read_text() == "precious"


# ---------------------------------------------------------------------------- 2. splits, not classes


def test_a_folder_of_dataset_splits_is_not_taken_for_classes(tmp_path):
    root = tmp_path / "my_images"
    for split in ("train", "val"):
        image_tree(root / split, ["cat", "dog"])
    status, line = evaluate_fails(common(tmp_path, "--data-dir", str(root)))
    assert status == 2
    assert line == f"evaluate.py: error: --data-dir {root} holds train/ and val/: dataset splits, not " \
                   f"classes; expected the folder of one split, {root}/train or {root}/val"
    # train.py reads its --train-dir through the same check, with its flag in front.
    with pytest.raises(SystemExit) as e:
        data.training_set(root)
    assert e.value.code == 2
    assert str(e.value) == f"train.py: error: --train-dir {root} holds train/ and val/: dataset splits, " \
                           f"not classes; expected the folder of one split, {root}/train or {root}/val"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_images"]


def test_split_names_are_matched_whatever_their_case_and_only_when_every_folder_is_one(tmp_path):
    for name in ("Test", "Train", "VALIDATION"):
        (tmp_path / "a" / name / "cat").mkdir(parents=True)
    with pytest.raises(ValueError) as e:
        ev.folder_classnames(tmp_path / "a")
    a = tmp_path / "a"
    assert str(e.value) == f"{a} holds Test/, Train/ and VALIDATION/: dataset splits, not classes; " \
                           f"expected the folder of one split, {a / 'Test'} or {a / 'Train'} or " \
                           f"{a / 'VALIDATION'}"
    (tmp_path / "b" / "dev").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"b holds dev/: a dataset split, not a class; expected the folder "
                                         r"of one split, \S+/b/dev$"):
        ev.folder_classnames(tmp_path / "b")
    (tmp_path / "c" / "train").mkdir(parents=True)  # a class that happens to be called train
    (tmp_path / "c" / "tram").mkdir()
    assert ev.folder_classnames(tmp_path / "c") == ["train", "tram"]


# ---------------------------------------------------------------------------- 3. a head of other classes


def test_a_checkpoint_of_other_classes_says_so(tiny, tmp_path):
    _, three = tiny
    val = image_tree(tmp_path / "val", ["cat", "dog"])
    status, line = evaluate_fails(common(tmp_path, "--data-dir", str(val), "--checkpoint", str(three)))
    assert status == 2
    assert line == f"evaluate.py: error: checkpoint {three} has a head of 3 classes, --data-dir {val} " \
                   f"has 2 class folders; expected the validation folder of the classes it was trained on"
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "cache").exists()


@pytest.mark.filterwarnings("ignore:.*the reference has")  # a tree of 200 images, not 7,500
def test_without_data_dir_a_checkpoint_must_be_an_imagenet_classifier(tiny, tmp_path):
    _, three = tiny
    for wnid in ev.timm_list("imagenet_a_synsets"):
        (tmp_path / "data" / "imagenet-a" / wnid).mkdir(parents=True)
        Image.new("RGB", (2, 1)).save(tmp_path / "data" / "imagenet-a" / wnid / "a.png")
    status, line = evaluate_fails(common(tmp_path, "--data-location", str(tmp_path / "data"),
                                         "--checkpoint", str(three)))
    assert status == 2
    assert line == f"evaluate.py: error: checkpoint {three} has a head of 3 classes, not ImageNet's 1000; " \
                   f"expected a 1000-class ImageNet classifier (for your own classes, pass --data-dir with " \
                   f"their validation folder)"
    assert not (tmp_path / "out.json").exists()


# ---------------------------------------------------------------------------- 4, 5. exit 2, a quiet start


def test_no_dataset_found_points_to_the_layouts(tmp_path):
    status, line = evaluate_fails(common(tmp_path, "--data-location", str(tmp_path)))
    assert status == 2
    assert line == f"evaluate.py: error: no dataset found under --data-location {tmp_path}; expected the " \
                   f"folders of docs/datasets.md, or --data-dir with a folder of your own classes"
    assert (ROOT / "docs" / "datasets.md").is_file()


def test_a_run_starts_with_one_line_saying_what_runs_where(tmp_path, capsys):
    val = image_tree(tmp_path / "val", ["cat", "dog"])
    ev.main(common(tmp_path, "--data-dir", str(val)))
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"scoring the zero-shot tiny-clip-test (random weights) on cpu: --data-dir {val} " \
                    f"(2 classes, 4 images) -> {tmp_path / 'out.json'}"
    args = json.loads((tmp_path / "out.json").read_text())["args"]  # the arguments go into the JSON
    assert args["data_dir"] == str(val) and args["batch_size"] == 256 and args["checkpoint"] == []


# ---------------------------------------------------------------------------- 6. --help


@pytest.mark.parametrize("script", [ev, demo])
def test_help_shows_examples_from_the_docstring_and_each_default_once(script, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    examples = [line for line in script.__doc__.splitlines() if line.lstrip().startswith("python ")]
    assert 2 <= len(examples) <= 3 and text.rstrip().endswith("examples:\n" + "\n".join(examples))
    words = " ".join(text.split())
    assert words.count("default") == words.count("(default: ")  # only argparse's, never said twice
    if script is ev:
        assert "--device DEVICE cpu, cuda or cuda:N" in words


# ---------------------------------------------------------------------------- 8. one rule, as a user runs it


def run_script(*argv, cwd=ROOT):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("argv, line", [
    (["evaluate.py", "--batch-size", "0", "--workers", "0"],
     "evaluate.py: error: --batch-size must be >= 1 and --workers >= 0, got 0 and 0 (see --help)"),
    (["demo.py", "--seed", "-1", "--cache-dir", "{tmp}/cache"],
     "demo.py: error: --seed must be >= 0, got -1"),
    (["demo.py", "--summarize", "{tmp}/missing.json"],
     "demo.py: error: --summarize {tmp}/missing.json: no such file or directory; expected a file written by "
     "demo.py --output"),
])
def test_a_mistake_in_the_command_exits_2_with_one_line(tmp_path, argv, line):
    done = run_script(*[a.format(tmp=tmp_path) for a in argv])
    assert (done.returncode, done.stderr, done.stdout) == (2, line.format(tmp=tmp_path) + "\n", "")
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_image_exits_1_with_one_line(tmp_path):
    val = image_tree(tmp_path / "val", ["cat", "dog"])
    (val / "dog" / "broken.jpg").write_text("not an image")
    done = run_script("evaluate.py", *common(tmp_path, "--data-dir", str(val)))
    assert done.returncode == 1, done.stderr
    # The line comes last, after the progress bar of the zero-shot head's text encoding.
    last = done.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"evaluate.py: error: val: image {val / 'dog' / 'broken.jpg'} cannot be read "
                           f"(UnidentifiedImageError: ") and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out.json").exists()
