"""The command line on files: python merge_checkpoints.py PRETRAINED FT1 FT2 [...] -o merged.safetensors."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import merge_checkpoints
import model_stock

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def checkpoints(tmp_path):
    """w0 and two fine-tunes on disk: safetensors, a DDP-style .pt, a .pt nesting 'state_dict'."""
    gen = torch.Generator().manual_seed(0)
    w0 = {"visual.proj": torch.randn(8, 4, generator=gen), "head.bias": torch.randn(4, generator=gen),
          "steps": torch.tensor(3)}
    ws = [{k: (v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + i + 1)
           for k, v in w0.items()} for i in range(2)]
    save_file(w0, tmp_path / "w0.safetensors")
    torch.save({f"module.{k}": v for k, v in ws[0].items()}, tmp_path / "ft1.pt")
    torch.save({"state_dict": ws[1], "epoch": 10}, tmp_path / "ft2.pth")
    paths = [str(tmp_path / name) for name in ("w0.safetensors", "ft1.pt", "ft2.pth")]
    return paths, w0, ws


def test_cli_merges_files_like_the_library(checkpoints, tmp_path, capsys):
    paths, w0, ws = checkpoints
    out = tmp_path / "merged.safetensors"
    merge_checkpoints.main(paths + ["-o", str(out)])
    merged = load_file(out)
    expected, ts = model_stock.merge(w0, ws)
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in merged)
    text = capsys.readouterr().out
    for key, t in ts.items():  # one table row per floating tensor, with its t
        assert any(line.startswith(key) and f"{t:6.3f}" in line for line in text.splitlines())
    assert "mean t over 1 matrices" in text and "mean t over 1 vectors" in text
    assert f"wrote {out}" in text
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_writes_pt_too(checkpoints, tmp_path):
    paths, w0, ws = checkpoints
    out = tmp_path / "merged.pt"
    merge_checkpoints.main(paths + ["-o", str(out)])
    merged = torch.load(out, weights_only=True)
    expected, _ = model_stock.merge(w0, ws)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_inspect_prints_the_table_and_writes_nothing(checkpoints, tmp_path, capsys):
    paths, _, _ = checkpoints
    before = sorted(os.listdir(tmp_path))
    merge_checkpoints.main(paths + ["--inspect"])
    assert sorted(os.listdir(tmp_path)) == before
    roles, header, *rows = (lambda lines: (lines[:3], *lines[3:]))(capsys.readouterr().out.splitlines())
    assert roles == [f"w0, the pre-trained model every fine-tune started from (the first argument): {paths[0]}",
                     f"ws[0], fine-tuned from w0: {paths[1]}", f"ws[1], fine-tuned from w0: {paths[2]}"]
    assert header.split()[:4] == ["key", "cos", "angle", "t"] and "|d0|" in header and "|d1|" in header
    assert sorted(row.split()[0] for row in rows[:2]) == ["head.bias", "visual.proj"]


def test_existing_output_is_not_overwritten_without_force(checkpoints, tmp_path, capsys):
    paths, w0, ws = checkpoints
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(SystemExit):
        merge_checkpoints.main(paths + ["-o", str(out)])
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    merge_checkpoints.main(paths + ["-o", str(out), "--force"])
    assert torch.equal(load_file(out)["head.bias"], model_stock.merge(w0, ws)[0]["head.bias"])
    (tmp_path / "notes").write_bytes(b"precious")  # a file, named as a folder output with a trailing /
    with pytest.raises(SystemExit):
        merge_checkpoints.main(paths + ["-o", f"{tmp_path / 'notes'}/"])
    assert "exists; pass --force" in capsys.readouterr().err
    for name in ("notes/", "notes"):  # even with --force, a folder output never replaces a file
        with pytest.raises(SystemExit):
            merge_checkpoints.main(paths + ["-o", f"{tmp_path / name}", "--force"])
        assert "is a file; expected a folder name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        merge_checkpoints.main(paths + ["--inspect", "--json", f"{tmp_path / 'table'}/"])
    assert "names a folder; expected a file name" in capsys.readouterr().err
    assert (tmp_path / "notes").read_bytes() == b"precious" and not (tmp_path / "table").exists()


@pytest.mark.parametrize("make_bad, message", [
    (lambda p: p.write_bytes(b"not a checkpoint"), "cannot be loaded"),
    (lambda p: torch.save({"weights": [1, 2, 3]}, p), r"expected a state dict \(str -> Tensor\)"),
    (lambda p: torch.save({"x": torch.ones(2)}, p), r"bad.pt lacks key '(head.bias|visual.proj)' of the pre-trained model .*w0.safetensors"),
])
def test_bad_files_give_one_clear_error(checkpoints, tmp_path, capsys, make_bad, message):
    paths, _, _ = checkpoints
    bad = tmp_path / "bad.pt"
    make_bad(bad)
    with pytest.raises(SystemExit) as exit_info:
        merge_checkpoints.main([paths[0], paths[1], str(bad), "-o", str(tmp_path / "out.safetensors")])
    assert re.search(message, str(exit_info.value)), exit_info.value
    assert not (tmp_path / "out.safetensors").exists()


def test_missing_file_and_missing_output_flag(checkpoints, tmp_path, capsys):
    paths, _, _ = checkpoints
    with pytest.raises(SystemExit) as exit_info:
        merge_checkpoints.main([paths[0], paths[1], str(tmp_path / "nope.pt"), "-o", str(tmp_path / "o.pt")])
    assert "nope.pt: cannot be loaded" in str(exit_info.value)
    with pytest.raises(SystemExit):
        merge_checkpoints.main(paths)
    assert "give -o/--output, or --inspect" in capsys.readouterr().err


def test_pickled_objects_are_refused(checkpoints, tmp_path):
    """weights_only=True: a checkpoint that needs arbitrary code to unpickle is not loaded."""
    paths, _, _ = checkpoints
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "obj": torch.nn.Linear(2, 2)}, evil)
    with pytest.raises(ValueError, match="weights_only=True"):
        merge_checkpoints.load_state_dict(evil)


def test_runs_as_a_script(checkpoints, tmp_path):
    paths, _, _ = checkpoints
    out = tmp_path / "merged.safetensors"
    result = subprocess.run([sys.executable, str(ROOT / "merge_checkpoints.py"), *paths, "-o", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.exists() and "mean t over" in result.stdout


@pytest.mark.parametrize("flags, message", [
    (["--threads", "0"], "--threads 0: expected 1 or more"),
    (["--threads", "x"], "argument --threads: invalid int value: 'x'"),
    (["--max-shard-size", "abc"], "argument --max-shard-size: 'abc' is not a size; expected e.g. 5GB"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_argument_errors_are_one_line_without_the_usage_block(checkpoints, capsys, flags, message):
    paths, _, _ = checkpoints
    with pytest.raises(SystemExit) as exit_info:
        merge_checkpoints.main(paths + ["--inspect", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("merge_checkpoints.py: error: ") and err.count("\n") == 1, err
    assert message in err


def test_bad_output_paths_fail_before_any_work(checkpoints, tmp_path, capsys):
    paths, _, _ = checkpoints
    for output, message in [(tmp_path / "no_such_folder" / "m.safetensors", "its parent folder does not exist"),
                            (tmp_path / "merged.bin", "unknown output suffix '.bin'; expected .safetensors, .pt, .pth"),
                            (tmp_path, "is a folder without a Hugging Face model; refusing to replace it")]:
        with pytest.raises(SystemExit):
            merge_checkpoints.main(paths + ["-o", str(output), "--force"])
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft1.pt", "ft2.pth", "w0.safetensors"]


def test_an_output_that_would_overwrite_an_input_is_refused_even_with_force(checkpoints, tmp_path, capsys):
    paths, w0, ws = checkpoints
    before = {p: open(p, "rb").read() for p in paths}
    (tmp_path / "hf").mkdir()  # a Hugging Face folder holding the pre-trained model
    os.link(paths[0], tmp_path / "hf" / "model.safetensors")
    for flags, name in [(["-o", paths[1], "--force"], paths[1]), (["-o", f"{tmp_path}/./ft2.pth", "--force"], paths[2]),
                        (["--inspect", "--json", paths[0], "--force"], paths[0])]:
        with pytest.raises(SystemExit):
            merge_checkpoints.main(paths + flags)
        err = capsys.readouterr().err
        assert f"would write over or inside the input {name}; expected a path outside the inputs" in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        merge_checkpoints.main([str(tmp_path / "hf" / "model.safetensors"), *paths[1:], "-o", str(tmp_path / "hf"), "--force"])
    assert "would write over or inside the input" in capsys.readouterr().err
    assert {p: open(p, "rb").read() for p in paths} == before
    # Nor inside an input's folder, nor over a file that an input folder links to.
    (tmp_path / "prev").mkdir()
    (tmp_path / "prev" / "model.safetensors").symlink_to(tmp_path / "hf" / "model.safetensors")
    for w0_path, flags in [("hf", ["--inspect", "--json", str(tmp_path / "hf" / "config.json")]),
                           ("prev", ["-o", str(tmp_path / "hf" / "model.safetensors"), "--force"]),
                           ("prev", ["-o", str(tmp_path / "hf"), "--force"])]:
        with pytest.raises(SystemExit):
            merge_checkpoints.main([str(tmp_path / w0_path), *paths[1:], *flags])
        assert "would write over or inside the input" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "hf")) == ["model.safetensors"]
    # --json never replaces the merge it describes, nor an existing file without --force.
    for flags, message in [(["-o", str(tmp_path / "m.safetensors"), "--json", str(tmp_path / "m.safetensors")], "would overwrite the merge's own output"),
                           (["-o", str(tmp_path / "m"), "--json", str(tmp_path / "m" / "model.safetensors")], "would overwrite the merge's own output"),
                           (["--inspect", "--json", str(tmp_path / "hf" / "model.safetensors")], "exists; pass --force")]:
        with pytest.raises(SystemExit):
            merge_checkpoints.main(paths + flags)
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert {p: open(p, "rb").read() for p in paths} == before
    # A link given as an input is not replaced either; one named only as the output is
    # replaced itself, and what it points to is not touched.
    (tmp_path / "link.pt").symlink_to(paths[1])
    with pytest.raises(SystemExit):
        merge_checkpoints.main([paths[0], str(tmp_path / "link.pt"), paths[2], "-o", str(tmp_path / "link.pt"), "--force"])
    assert "would write over or inside the input" in capsys.readouterr().err and (tmp_path / "link.pt").is_symlink()
    merge_checkpoints.main(paths + ["-o", str(tmp_path / "link.pt"), "--force"])
    assert not (tmp_path / "link.pt").is_symlink() and {p: open(p, "rb").read() for p in paths} == before


def test_unwritable_outputs_fail_before_any_work(checkpoints, tmp_path, capsys, monkeypatch):
    paths, _, _ = checkpoints
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(SystemExit):
        merge_checkpoints.main(paths + ["--inspect", "--json", str(tmp_path / "folder.json")])
    assert f"--json {tmp_path / 'folder.json'} is a folder; expected a file name" in capsys.readouterr().err
    monkeypatch.setattr(merge_checkpoints.os, "access", lambda path, mode: False)  # a read-only folder, even for root
    for flags, name in [(["-o", str(tmp_path / "m.safetensors")], "-o"), (["--inspect", "--json", str(tmp_path / "t.json")], "--json")]:
        with pytest.raises(SystemExit):
            merge_checkpoints.main(paths + flags)
        err = capsys.readouterr().err
        assert f"merge_checkpoints.py: error: {name} {flags[-1]}: cannot write in {tmp_path} (permission denied); " \
               f"expected a writable folder" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.json", "ft1.pt", "ft2.pth", "w0.safetensors"]


def test_the_same_file_twice_is_warned_about(checkpoints, capsys):
    paths, _, _ = checkpoints
    merge_checkpoints.main([paths[0], paths[1], paths[1], "--inspect"])
    assert "the same fine-tuned file is given twice" in capsys.readouterr().out
