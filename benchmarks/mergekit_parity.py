"""Merges the same small sharded Llama checkpoints with merge_checkpoints.py and with mergekit's
model_stock, and compares the two outputs tensor by tensor.

mergekit is not a dependency: give the path of its `mergekit-yaml` (it may live in another
virtual environment). Where mergekit's mean cosine is in (0, 1] both compute the same
formula and must agree to float tolerance; below 0 mergekit extrapolates (t < 0) where
Model Stock keeps w0 (derivation.md §6), so those tensors are only counted.

    python benchmarks/mergekit_parity.py --mergekit-yaml /path/to/venv/bin/mergekit-yaml
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import merge_checkpoints  # noqa: E402

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
          "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 128,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32"}


def llama_state(seed, shared_seed=None, step=0.02):
    """A Llama state dict (CONFIG's shapes); with shared_seed, a fine-tune of seed 0's weights."""
    h, m, kv = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["hidden_size"] // 2
    shapes = {"model.embed_tokens.weight": (CONFIG["vocab_size"], h), "model.norm.weight": (h,),
              "lm_head.weight": (CONFIG["vocab_size"], h)}
    for i in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                   p + "mlp.down_proj.weight": (h, m), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    gen = torch.Generator().manual_seed(0)
    w0 = {k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}
    if shared_seed is None:
        return w0
    shared, own = torch.Generator().manual_seed(shared_seed), torch.Generator().manual_seed(seed)
    # The shared step varies in size by tensor, so the cosines spread over (-, 1).
    return {k: v + step * (torch.rand(1, generator=shared) * torch.randn(v.shape, generator=shared)
                           + torch.randn(v.shape, generator=own)) for k, v in w0.items()}


def write_models(root, n=2):
    """Base and n fine-tunes as Hugging Face folders, each cut into shards at different places."""
    states = [llama_state(0)] + [llama_state(seed, shared_seed=99) for seed in range(1, n + 1)]
    paths = []
    for i, state in enumerate(states):
        path = root / ("base" if i == 0 else f"ft{i}")
        merge_checkpoints.save_state_dict(state, f"{path}/", max_shard_size=90_000 + 40_000 * i)
        (path / "config.json").write_text(json.dumps(CONFIG))
        paths.append(path)
    return paths


def run_mergekit(mergekit_yaml, paths, out):
    config = {"merge_method": "model_stock", "base_model": str(paths[0]), "dtype": "float32",
              "models": [{"model": str(p)} for p in paths[1:]]}
    (out.parent / "mergekit.json").write_text(json.dumps(config))  # YAML is a superset of JSON
    result = subprocess.run([str(mergekit_yaml), str(out.parent / "mergekit.json"), str(out), "--quiet",
                             "--no-copy-tokenizer"], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed:\n{result.stderr[-3000:]}")


def compare(mergekit_yaml, root):
    """Returns (rows, mergekit's merge, ours): rows of (key, cos, max |difference|)."""
    paths = write_models(root)
    run_mergekit(mergekit_yaml, paths, root / "mergekit_out")
    checkpoints = [merge_checkpoints.Checkpoint(p) for p in paths]
    table = merge_checkpoints.merge_streamed(checkpoints[0], checkpoints[1:], root / "ours")
    theirs = merge_checkpoints.load_state_dict(root / "mergekit_out")
    ours = merge_checkpoints.load_state_dict(root / "ours")
    rows = [(r["key"], r["cos"], (theirs[r["key"]].float() - ours[r["key"]].float()).abs().max().item())
            for r in table]
    return rows, theirs, ours


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit-yaml", default=shutil.which("mergekit-yaml"),
                        help="mergekit's command (default: the one on PATH)")
    args = parser.parse_args()
    if not args.mergekit_yaml:
        sys.exit("mergekit_parity.py: error: mergekit-yaml not found; pass --mergekit-yaml PATH")
    with tempfile.TemporaryDirectory() as tmp:
        rows, theirs, ours = compare(args.mergekit_yaml, Path(tmp))
    inside = [r for r in rows if 0 < r[1] <= 1]
    print(f"{'key':<44} {'cos':>7} {'max |ours - mergekit|':>22}")
    for key, cos, diff in rows:
        print(f"{key:<44} {cos:7.4f} {diff:22.3g}")
    print(f"{len(inside)} of {len(rows)} tensors with cos in (0, 1]: max difference "
          f"{max(r[2] for r in inside):.3g}; the other {len(rows) - len(inside)} differ by design "
          f"(mergekit: t < 0; Model Stock here: w0)")
    print(f"same keys: {theirs.keys() == ours.keys()}")


if __name__ == "__main__":
    main()
