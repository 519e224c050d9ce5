"""Merges three synthetic sharded Hugging Face checkpoints with merge_checkpoints.py and
reports wall time against an I/O floor and peak anonymous memory against one model.

The models are Llama-shaped (hidden 2048, GQA, vocabulary 32000) in bf16, with as many
layers as --size-gb asks for, saved as shards cut at different places for each model. The
floor reads every input byte once and writes one model's bytes, in 64 MB blocks. Peak
memory is RssAnon sampled every 2 ms: pages of the memory-mapped inputs belong to the page
cache, which the kernel can drop, so they are not counted (RssFile). Linux only.

    python benchmarks/stream_merge.py                 # 3 x 1.5 GB; needs about 8 GB of disk
    python benchmarks/stream_merge.py --size-gb 4 --workdir /data/tmp
"""
import argparse
import contextlib
import ctypes
import io
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import merge_checkpoints  # noqa: E402

HIDDEN, KV, MLP, VOCAB = 2048, 512, 5632, 32000


def llama_shapes(size_bytes):
    """Shapes of a Llama-like decoder of about size_bytes in bf16."""
    layer = {"self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (KV, HIDDEN),
             "self_attn.v_proj.weight": (KV, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
             "mlp.gate_proj.weight": (MLP, HIDDEN), "mlp.up_proj.weight": (MLP, HIDDEN),
             "mlp.down_proj.weight": (HIDDEN, MLP), "input_layernorm.weight": (HIDDEN,),
             "post_attention_layernorm.weight": (HIDDEN,)}
    ends = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
            "lm_head.weight": (VOCAB, HIDDEN)}
    per_layer = 2 * sum(math.prod(s) for s in layer.values())
    layers = max(1, round((size_bytes - 2 * sum(math.prod(s) for s in ends.values())) / per_layer))
    shapes = {"model.embed_tokens.weight": ends["model.embed_tokens.weight"]}
    for i in range(layers):
        shapes |= {f"model.layers.{i}.{k}": s for k, s in layer.items()}
    return shapes | {k: s for k, s in ends.items() if k != "model.embed_tokens.weight"}


def tensor(key, shape, model):
    """w0 for model 0; fine-tune i adds a step shared by all fine-tunes and its own noise."""
    seed = int.from_bytes(key.encode()[-8:].rjust(8, b"\0"), "little") % 2**31
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    if model:
        w += 1e-3 * torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
        w += 1e-3 * torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1 + 7919 * model))
    return w.to(torch.bfloat16)


def write_model(folder, shapes, model, shard_bytes):
    """A Hugging Face folder: safetensors shards of about shard_bytes and their index."""
    folder.mkdir(parents=True)
    plan = merge_checkpoints.plan_shards({k: (s, torch.bfloat16) for k, s in shapes.items()}, shard_bytes)
    weight_map = {}
    for i, keys in enumerate(plan):
        name = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        save_file({k: tensor(k, shapes[k], model) for k in keys}, folder / name)
        weight_map |= dict.fromkeys(keys, name)
    index = {"metadata": {"total_size": sum(2 * math.prod(s) for s in shapes.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"hidden_size": HIDDEN, "model": model}))


def floor(inputs, output, model_bytes):
    """Reads every input file once and writes model_bytes, in 64 MB blocks."""
    block = bytearray(64 * 2**20)
    with open(output, "wb") as out:
        written = 0
        for folder in inputs:
            for file in sorted(Path(folder).glob("*.safetensors")):
                with open(file, "rb", buffering=0) as f:
                    while n := f.readinto(block):
                        if written < model_bytes:
                            out.write(memoryview(block)[: min(n, model_bytes - written)])
                            written += min(n, model_bytes - written)


def evict(folders):
    """Drops the files' pages from the page cache (fadvise on our own files only): both passes
    read from disk, as they do for models bigger than memory."""
    for file in (f for folder in folders for f in Path(folder).iterdir()):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def rss_anon():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024


@contextlib.contextmanager
def peak_rss_anon(result):
    """Samples RssAnon every 2 ms while the body runs; result["peak"] is the highest seen."""
    result["peak"] = rss_anon()
    done = threading.Event()

    def sample():
        while not done.wait(0.002):
            result["peak"] = max(result["peak"], rss_anon())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        result["peak"] = max(result["peak"], rss_anon())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.5, help="size of each model in bf16 (GB = 1e9 bytes)")
    parser.add_argument("--finetuned", type=int, default=2, help="fine-tuned models merged with the base")
    parser.add_argument("--max-shard-size", default="1GB", help="output shard size (merge_checkpoints.py's flag)")
    parser.add_argument("--threads", type=int, help="merge_checkpoints.py --threads (default: torch's choice)")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the checkpoints are written, then deleted")
    args = parser.parse_args()
    shapes = llama_shapes(args.size_gb * 1e9)
    model_bytes = sum(2 * math.prod(s) for s in shapes.values())
    largest = max(2 * math.prod(s) for s in shapes.values())
    work = Path(tempfile.mkdtemp(prefix="stream_merge.", dir=args.workdir))
    try:
        print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads on {os.cpu_count()} cores "
              f"(load average {os.getloadavg()[0]:.1f}); {len(shapes)} tensors, "
              f"{model_bytes / 1e9:.2f} GB per model in bf16, largest tensor {largest / 1e6:.0f} MB")
        start = time.perf_counter()
        inputs = []
        for model in range(1 + args.finetuned):  # shards cut at different places for each model
            inputs.append(work / f"model_{model}")
            write_model(inputs[-1], shapes, model, shard_bytes=(300 + 70 * model) * 10**6)
        print(f"wrote {len(inputs)} sharded checkpoints in {time.perf_counter() - start:.0f} s")
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the generator's memory back first

        evict(inputs)
        start, cpu = time.perf_counter(), time.process_time()
        floor(inputs, work / "floor.bin", model_bytes)
        t_floor, cpu_floor = time.perf_counter() - start, time.process_time() - cpu
        os.remove(work / "floor.bin")

        evict(inputs)
        memory = {}
        base = rss_anon()
        argv = [str(p) for p in inputs] + ["-o", str(work / "merged"), "--max-shard-size", args.max_shard_size]
        argv += ["--threads", str(args.threads)] if args.threads else []
        with peak_rss_anon(memory), contextlib.redirect_stdout(io.StringIO()) as log:
            start, cpu = time.perf_counter(), time.process_time()
            merge_checkpoints.main(argv)
            t_merge, cpu_merge = time.perf_counter() - start, time.process_time() - cpu
        shards = len(list((work / "merged").glob("*.safetensors")))
        extra = memory["peak"] - base
        print(f"floor, read every input once and write one model: {t_floor:6.2f} s (CPU {cpu_floor:6.2f} s)")
        print(f"merge_checkpoints.py, {shards} output shards:          {t_merge:6.2f} s (CPU {cpu_merge:6.2f} s), "
              f"{t_merge / t_floor:.2f} x the floor")
        print(f"peak RssAnon above the {base / 1e6:.0f} MB before the merge: {extra / 1e6:.0f} MB = "
              f"{extra / largest:.1f} x the largest tensor = {extra / model_bytes:.2f} x one model")
        print(log.getvalue().strip().splitlines()[-1])
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
