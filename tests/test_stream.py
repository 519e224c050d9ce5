"""merge_checkpoints.py on Hugging Face folders: the streamed merge equals model_stock.merge bit
for bit, the output loads back through its index, and bad input leaves nothing behind."""
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cli
import merge_checkpoints
import model_stock

LAYERS = 3


def llama_like(seed, dtype=torch.bfloat16):
    """A tiny decoder's state dict with a language model's key names, and an integer buffer."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (40, 16), "model.norm.weight": (16,), "lm_head.weight": (40, 16)}
    for i in range(LAYERS):
        shapes |= {f"model.layers.{i}.self_attn.q_proj.weight": (16, 16),
                   f"model.layers.{i}.self_attn.o_proj.weight": (16, 16),
                   f"model.layers.{i}.mlp.up_proj.weight": (24, 16),
                   f"model.layers.{i}.mlp.down_proj.weight": (16, 24),
                   f"model.layers.{i}.input_layernorm.weight": (16,)}
    state = {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}
    return state | {"model.rotary.steps": torch.tensor([7, 1])}


def finetune(w0, seed, step=0.05):
    """w0 + a step every fine-tune shares + this seed's own noise: cosines well inside (0, 1)."""
    shared, own = torch.Generator().manual_seed(99), torch.Generator().manual_seed(seed)
    return {k: (v.float() + step * (torch.randn(v.shape, generator=shared) + torch.randn(v.shape, generator=own)))
            .to(v.dtype) if v.is_floating_point() else v + seed for k, v in w0.items()}


def hf_folder(path, state, max_shard_size):
    """A Hugging Face model folder: weights (sharded if they do not fit) plus config and tokenizer."""
    merge_checkpoints.save_state_dict(state, f"{path}/", max_shard_size=max_shard_size)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "name": path.name}))
    (path / "tokenizer.json").write_text("{}")
    return str(path)


@pytest.fixture()
def models(tmp_path):
    """w0 and three fine-tunes of four kinds: shards cut at different places, a single-file
    folder, a .safetensors file and a .pt state dict."""
    w0 = llama_like(0)
    ws = [finetune(w0, seed) for seed in (1, 2, 3)]
    paths = [hf_folder(tmp_path / "base", w0, 3000), hf_folder(tmp_path / "ft1", ws[0], 1700),
             hf_folder(tmp_path / "ft2", ws[1], 10**9), str(tmp_path / "ft3.safetensors")]
    save_file(ws[2], paths[3])
    return paths, w0, ws


def test_inputs_are_really_sharded_differently(models):
    paths, _, _ = models
    maps = [json.loads(open(f"{p}/model.safetensors.index.json").read())["weight_map"] for p in paths[:2]]
    assert len(set(maps[0].values())) >= 3 and len(set(maps[1].values())) > len(set(maps[0].values()))
    assert maps[0] != maps[1] and sorted(os.listdir(paths[2])) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_streamed_folder_merge_equals_merge_bit_for_bit(models, tmp_path):
    paths, w0, ws = models
    out = tmp_path / "merged"
    merge_checkpoints.main(paths + ["-o", f"{out}/", "--max-shard-size", "2KB"])
    merged = merge_checkpoints.load_state_dict(out)
    expected, ts = model_stock.merge(w0, ws)
    assert list(merged) == sorted(expected, key=merge_checkpoints._natural)
    for key in expected:
        assert merged[key].dtype == expected[key].dtype == w0[key].dtype
        assert torch.equal(merged[key], expected[key]), key
    assert 0 < min(ts.values()) < max(ts.values()) < 1  # a merge that is neither w0 nor the average


def test_output_folder_is_a_hugging_face_layout(models, tmp_path):
    paths, w0, ws = models
    out = tmp_path / "merged"
    merge_checkpoints.main(paths + ["-o", str(out), "--max-shard-size", "2KB"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    loaded = {}
    for shard in shards:
        tensors = load_file(out / shard)  # the safetensors library reads what we wrote
        assert sum(v.numel() * v.element_size() for v in tensors.values()) <= 2000
        assert all(index["weight_map"][k] == shard for k in tensors)
        loaded |= tensors
    assert loaded.keys() == w0.keys() == index["weight_map"].keys()
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in loaded.values())
    # The non-weight files come from the first fine-tuned model, and nothing else does.
    assert json.loads((out / "config.json").read_text())["name"] == "ft1"
    assert sorted(p.name for p in out.iterdir()) == sorted(shards + ["config.json", "model.safetensors.index.json",
                                                                      "tokenizer.json"])


def test_small_output_is_one_file_and_modes_follow_the_umask(models, tmp_path):
    paths, _, _ = models
    old = os.umask(0o027)
    try:
        merge_checkpoints.main(paths + ["-o", str(tmp_path / "one")])
        merge_checkpoints.main(paths + ["-o", str(tmp_path / "one.safetensors")])
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path / "one")) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert os.stat(tmp_path / "one").st_mode & 0o777 == 0o750
    assert os.stat(tmp_path / "one" / "model.safetensors").st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / "one.safetensors").st_mode & 0o777 == 0o640
    assert load_file(tmp_path / "one.safetensors").keys() == load_file(tmp_path / "one" / "model.safetensors").keys()


def test_force_replaces_an_existing_folder_and_only_with_force(models, tmp_path, capsys):
    paths, w0, ws = models
    out = tmp_path / "merged"
    merge_checkpoints.main(paths[:3] + ["-o", str(out)])  # two fine-tunes
    with pytest.raises(SystemExit):
        merge_checkpoints.main(paths + ["-o", str(out)])
    assert "exists; pass --force" in capsys.readouterr().err
    merge_checkpoints.main(paths + ["-o", str(out), "--force", "--max-shard-size", "2KB"])
    expected, _ = model_stock.merge(w0, ws)
    assert all(torch.equal(v, expected[k]) for k, v in merge_checkpoints.load_state_dict(out).items())
    assert not (out / "model.safetensors").exists()  # the old single file went with the old folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft1", "ft2", "ft3.safetensors", "merged"]


def test_the_temporaries_of_a_killed_merge_are_removed_by_the_next_one(models, tmp_path, monkeypatch):
    paths, _, _ = models
    seen, write_folder = [], merge_checkpoints.write_folder  # a temporary is named by its writer's process id
    monkeypatch.setattr(merge_checkpoints, "write_folder", lambda tmp, *rest: seen.append(tmp) or write_folder(tmp, *rest))
    (tmp_path / ".merged.999999999_abcd1234.tmp").mkdir()  # left by writers killed with -9
    (tmp_path / ".merged.safetensors.999999999_abcd1234.tmp").write_bytes(b"half a file")
    running = tmp_path / f".merged.{os.getppid()}_abcd1234.tmp"  # a writer still running is left alone
    running.mkdir()
    merge_checkpoints.main(paths + ["-o", str(tmp_path / "merged")])
    merge_checkpoints.main(paths + ["-o", str(tmp_path / "merged.safetensors")])
    assert re.fullmatch(rf"\.merged\.{os.getpid()}_\w+\.tmp", os.path.basename(seen[0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "base", "ft1", "ft2", "ft3.safetensors",
                                                          "merged", "merged.safetensors"]


def test_a_folder_replacement_interrupted_between_its_renames_keeps_the_old_folder(models, tmp_path, monkeypatch, capsys):
    paths, w0, ws = models
    out = tmp_path / "merged"
    merge_checkpoints.main(paths[:3] + ["-o", str(out)])  # two fine-tunes
    before = merge_checkpoints.load_state_dict(out)
    replace = os.replace

    def interrupted(src, dst):  # Ctrl-C as the new folder is renamed into place
        if str(dst) == str(out) and ".old" not in str(src):
            raise KeyboardInterrupt
        replace(src, dst)
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(SystemExit):
        cli.run(merge_checkpoints.main, merge_checkpoints.INTERRUPTED, paths + ["-o", str(out), "--force"])
    monkeypatch.setattr(os, "replace", replace)
    after = merge_checkpoints.load_state_dict(out)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft1", "ft2", "ft3.safetensors", "merged"]

    # Killed outright between the two renames: the old folder waits beside, as a .old temporary,
    # and the next merge to that output puts it back (so it still needs --force).
    aside = tmp_path / ".merged.999999999_abcd1234.old"
    replace(out, aside)
    (tmp_path / ".merged.999999999_efgh5678.tmp").mkdir()  # the new folder, never renamed
    capsys.readouterr()
    with pytest.raises(SystemExit):
        merge_checkpoints.main(paths + ["-o", str(out)])
    assert "exists; pass --force" in capsys.readouterr().err
    after = merge_checkpoints.load_state_dict(out)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft1", "ft2", "ft3.safetensors", "merged"]
    # Killed after the second rename (or the output made again since): the moved-aside folder
    # is never deleted unasked; each merge to that output says where it is.
    aside.mkdir()
    (aside / "notes.txt").write_text("precious")
    merge_checkpoints.main(paths + ["-o", str(out), "--force"])
    assert capsys.readouterr().err.count(f"warning: {aside} holds an earlier merged") == 1
    expected, _ = model_stock.merge(w0, ws)
    assert all(torch.equal(v, expected[k]) for k, v in merge_checkpoints.load_state_dict(out).items())
    assert (aside / "notes.txt").read_text() == "precious"


def test_ctrl_c_during_a_merge_is_one_line_and_leaves_no_output(models, tmp_path, capsys, monkeypatch):
    paths, _, _ = models
    merge_tensor = model_stock.merge_tensor
    calls = []

    def interrupted(*args):  # Ctrl-C while the third tensor is merged
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return merge_tensor(*args)
    monkeypatch.setattr(model_stock, "merge_tensor", interrupted)
    with pytest.raises(SystemExit) as exit_info:  # as the command line runs it
        cli.run(merge_checkpoints.main, merge_checkpoints.INTERRUPTED,
                paths + ["-o", str(tmp_path / "merged"), "--max-shard-size", "2KB"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "merge_checkpoints.py: interrupted; nothing was written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft1", "ft2", "ft3.safetensors"]


def test_nan_stops_the_merge_and_leaves_no_output(models, tmp_path):
    paths, w0, ws = models
    ws[2]["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(ws[2], paths[3])
    out = tmp_path / "merged"
    with pytest.raises(SystemExit) as exit_info:
        merge_checkpoints.main(paths + ["-o", str(out), "--max-shard-size", "2KB"])
    assert re.fullmatch(r"merge_checkpoints.py: error: key 'model.layers.1.mlp.up_proj.weight': "
                        r"\S*ft3.safetensors holds NaN or inf; refusing to merge it",
                        str(exit_info.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft1", "ft2", "ft3.safetensors"]


def _shard(folder, i):
    """The i-th shard (0-based) that the folder's index names."""
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return folder / sorted(set(weight_map.values()))[i]


def _drop_key_from_shard(folder):
    tensors = load_file(_shard(folder, 0))
    save_file({k: v for k, v in list(tensors.items())[1:]}, _shard(folder, 0))


def _truncate(folder):
    _shard(folder, 2).write_bytes(_shard(folder, 2).read_bytes()[:100])


@pytest.mark.parametrize("damage, message", [
    (lambda f: [os.remove(p) for p in f.glob("model*")], r"ft1: no model.safetensors or model.safetensors.index.json"),
    (lambda f: os.remove(_shard(f, 1)), r"ft1/model.safetensors.index.json names shard "
                                        r"model-00002-of-000\d\d.safetensors, which is missing from \S*ft1"),
    (_drop_key_from_shard, r"ft1/model-00001-of-000\d\d.safetensors lacks key '[\w.]+', which "
                           r"model.safetensors.index.json places there"),
    (_truncate, r"ft1/model-00003-of-000\d\d.safetensors: cannot be loaded \(.+\); expected a .safetensors file"),
    (lambda f: (f / "model.safetensors.index.json").write_text("{"), r"index.json: cannot be read"),
    (lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": [1, 2]}'),
     r"index.json: cannot be read \(its weight_map is not a mapping of key names to shard file names\)"),
    (lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": {"lm_head.weight": 5}}'),
     r"index.json: cannot be read \(its weight_map is not a mapping of key names to shard file names\)"),
])
def test_a_damaged_folder_is_one_error_naming_the_file(models, tmp_path, damage, message):
    paths, w0, ws = models
    damage(tmp_path / "ft1")
    with pytest.raises(SystemExit) as exit_info:
        merge_checkpoints.main(paths + ["-o", str(tmp_path / "merged")])
    assert re.search(message, str(exit_info.value)), exit_info.value
    assert "\n" not in str(exit_info.value) and not (tmp_path / "merged").exists()


def test_an_unreadable_shard_is_named_as_unreadable(models, tmp_path, monkeypatch):
    paths, _, _ = models
    shard = str(_shard(tmp_path / "ft1", 1))

    def refusing_open(file, *args, **kwargs):  # a file without read permission, even for root
        if str(file) == shard:
            raise PermissionError(13, "Permission denied", str(file))
        return open(file, *args, **kwargs)
    monkeypatch.setattr(merge_checkpoints, "open", refusing_open, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        merge_checkpoints.main(paths + ["--inspect"])
    assert str(exit_info.value) == f"merge_checkpoints.py: error: {shard}: cannot be loaded ([Errno 13] Permission " \
                                   f"denied: '{shard}'); expected a .safetensors file"


def test_keys_and_shapes_that_differ_name_the_file_and_key(models, tmp_path):
    paths, w0, ws = models
    save_file(ws[2] | {"model.norm.weight": torch.ones(17, dtype=torch.bfloat16)}, paths[3])
    with pytest.raises(SystemExit) as exit_info:
        merge_checkpoints.main(paths + ["--inspect"])
    assert re.search(r"key 'model.norm.weight': \S*ft3.safetensors has shape \(17,\), the pre-trained "
                     r"model \S*base \(16,\)", str(exit_info.value))
    save_file({k: v for k, v in ws[2].items() if k != "lm_head.weight"}, paths[3])
    with pytest.raises(SystemExit) as exit_info:
        merge_checkpoints.main(paths + ["--inspect"])
    assert re.search(r"ft3.safetensors lacks key 'lm_head.weight' of the pre-trained model", str(exit_info.value))


def test_mixed_kinds_and_dtypes_follow_the_first_finetune(tmp_path):
    """A .pt w0 in fp32, fine-tunes in bf16 (a folder) and fp32 (a DDP .pt): ws[0]'s dtypes."""
    w0 = llama_like(0, torch.float32)
    ws = [finetune(w0, 1), finetune(w0, 2)]
    ws[0] = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in ws[0].items()}
    torch.save(w0, tmp_path / "w0.pt")
    hf_folder(tmp_path / "ft1", ws[0], 2500)
    torch.save({"state_dict": {f"module.{k}": v for k, v in ws[1].items()}}, tmp_path / "ft2.pth")
    out = tmp_path / "merged.safetensors"
    merge_checkpoints.main([str(tmp_path / "w0.pt"), str(tmp_path / "ft1"), str(tmp_path / "ft2.pth"), "-o", str(out)])
    expected, _ = model_stock.merge(w0, ws)
    merged = load_file(out)
    assert all(torch.equal(merged[k], expected[k]) and merged[k].dtype == ws[0][k].dtype for k in expected)


def test_inspect_writes_nothing_and_json_keeps_every_row(models, tmp_path, capsys):
    paths, w0, ws = models
    before = sorted(os.listdir(tmp_path))
    merge_checkpoints.main(paths + ["--inspect", "--json", str(tmp_path / "table.json")])
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["table.json"])
    record = json.loads((tmp_path / "table.json").read_text())
    _, ts = model_stock.merge(w0, ws)
    assert {r["key"]: r["t"] for r in record["tensors"]} == pytest.approx(ts)
    assert record["copied"] == ["model.rotary.steps"] and record["finetuned"] == paths[1:]
    kinds = {r["key"]: r["kind"] for r in record["tensors"]}
    assert kinds["model.embed_tokens.weight"] == "embeddings" and kinds["lm_head.weight"] == "head matrices"
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == "attention matrices"
    assert kinds["model.layers.2.mlp.down_proj.weight"] == "MLP matrices"
    assert kinds["model.layers.1.input_layernorm.weight"] == kinds["model.norm.weight"] == "norms"
    text = capsys.readouterr().out
    assert f"mean t over {LAYERS * 2} attention matrices" in text and f"mean t over {LAYERS + 1} norms" in text


def test_clip_keys_get_their_kinds():
    kind = merge_checkpoints.tensor_kind
    assert kind("model.visual.transformer.resblocks.0.ln_1.weight", (768,)) == "norms"
    assert kind("model.visual.ln_post.bias", (768,)) == "norms"
    assert kind("model.visual.transformer.resblocks.3.attn.in_proj_weight", (2304, 768)) == "attention matrices"
    assert kind("model.visual.transformer.resblocks.3.attn.out_proj.bias", (768,)) == "attention vectors"
    assert kind("model.visual.transformer.resblocks.3.mlp.c_fc.weight", (3072, 768)) == "MLP matrices"
    assert kind("model.visual.positional_embedding", (50, 768)) == "embeddings"
    assert kind("classification_head.bias", (1000,)) == "head vectors"
    assert kind("model.visual.conv1.weight", (768, 3, 32, 32)) == "other matrices"


def test_a_long_table_shows_summaries_only(models, capsys):
    paths, _, _ = models
    w0, *ws = map(merge_checkpoints.Checkpoint, paths)
    rows = merge_checkpoints.merge_streamed(w0, ws)
    merge_checkpoints.print_table(rows, [], 3, max_rows=5)
    text = capsys.readouterr().out
    assert text.startswith(f"{len(rows)} floating tensors: per-tensor rows not shown (--json FILE writes them)")
    assert "by kind of tensor:" in text and not any(line.startswith("model.") for line in text.splitlines())


def test_pickles_are_refused_in_one_clean_line(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "obj": torch.nn.Linear(2, 2)}, evil)
    with pytest.raises(ValueError) as error:
        merge_checkpoints.load_state_dict(evil)
    message = str(error.value)
    assert "it pickles torch.nn.modules.linear.Linear, which weights_only=True refuses" in message
    assert "\n" not in message and "\x1b" not in message and "two options" not in message


def test_save_state_dict_by_suffix(tmp_path):
    state = llama_like(4)
    with pytest.raises(ValueError, match=r"merged.bin: unknown output suffix '.bin'"):
        merge_checkpoints.save_state_dict(state, tmp_path / "merged.bin")
    for name in ("a.safetensors", "a.pt", "a.pth", "a_folder"):
        merge_checkpoints.save_state_dict(state, tmp_path / name)
        loaded = merge_checkpoints.load_state_dict(tmp_path / name)
        assert list(loaded) == list(state) or name.endswith(".safetensors") or name == "a_folder"
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "a.pth", "a.safetensors", "a_folder"]


def test_save_state_dict_never_replaces_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="is a folder without a Hugging Face model; refusing to replace it"):
        merge_checkpoints.save_state_dict(llama_like(5), tmp_path)
    (tmp_path / "x.safetensors").mkdir()
    with pytest.raises(ValueError, match="x.safetensors is a folder; expected a file name"):
        merge_checkpoints.save_state_dict(llama_like(5), tmp_path / "x.safetensors")
    assert (tmp_path / "notes.txt").read_text() == "precious" and (tmp_path / "x.safetensors").is_dir()


def test_write_atomically_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "evaluation.json"
    merge_checkpoints.write_atomically(path, lambda f: f.write_text("first"))
    merge_checkpoints.write_atomically(path, lambda f: f.write_text("second"))
    assert path.read_text() == "second"

    def disk_full(self, text):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError):
        merge_checkpoints.write_atomically(path, lambda f: f.write_text("third"))
    monkeypatch.undo()
    assert path.read_text() == "second" and sorted(p.name for p in tmp_path.iterdir()) == ["evaluation.json"]
