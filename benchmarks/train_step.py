"""Lockstep cost and merge cost of train.py's step, on generated batches.

Prints the step time with N = 2 divided by twice the step time with N = 1 (lockstep must
cost no more than training the two models one after the other: target <= 1.03), and the
time of one Model Stock merge as a fraction of one ImageNet epoch (1,281,167 images) at
that step time (target < 0.1%).

    python benchmarks/train_step.py                                   # tiny CLIP on the CPU
    python benchmarks/train_step.py --model ViT-B-32-quickgelu --batch-size 512   # on a GPU: bf16
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import model_stock  # noqa: E402
import train  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def step_seconds(models, batches, args, steps, bf16):
    """Mean seconds of one lockstep train_step over `steps`, after 2 warm-up steps."""
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=0.1) for m in models]
    for step in range(steps + 2):
        if step == 2:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
        # Each model gets another batch at every step, as in training: no input stays in cache.
        micro = [[batches[(step + i) % len(batches)]] for i in range(len(models))]
        train.train_step(models, optimizers, micro, 1e-5, step, args, bf16=bf16)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "tests" / "configs" / "tiny-clip-test.json"),
                        help="open_clip model name or config .json (default: the tests' tiny CLIP)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements; the best is kept")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda"
    name = args.model
    if name.endswith(".json"):
        import open_clip
        open_clip.add_model_config(name)
        name = Path(name).stem
    torch.manual_seed(0)
    classifier, _ = evaluate.build_classifier(name, None, [f"class {i}" for i in range(1000)], device=device)
    size = classifier.model.visual.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, size, size, generator=gen).to(device),
                torch.randint(0, 1000, (args.batch_size,), generator=gen).to(device)) for _ in range(3)]
    step_args = argparse.Namespace(seed=0)
    models = [copy.deepcopy(classifier).train() for _ in range(2)]
    w0 = {k: v.clone() for k, v in classifier.state_dict().items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    ones, twos = [], []
    for _ in range(args.repeats):  # interleaved, so that drifting machine load hits both alike
        ones.append(step_seconds(models[:1], batches, step_args, args.steps, bf16))
        twos.append(step_seconds(models, batches, step_args, args.steps, bf16))
    one, two = min(ones), min(twos)
    merges = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        model_stock.merge_models_(models, w0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        merges.append(time.perf_counter() - start)
    epoch = (IMAGENET_TRAIN // args.batch_size) * two
    params = sum(p.numel() for p in classifier.parameters()) / 1e6
    print(f"{name}, {params:.1f}M parameters, batch {args.batch_size}, {device.type}"
          f"{' bf16' if bf16 else ' fp32'}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"step N=1: {one * 1e3:.1f} ms ({args.batch_size / one:.0f} images/s per model)")
    print(f"step N=2: {two * 1e3:.1f} ms ({args.batch_size / two * 2:.0f} images/s in all, "
          f"{args.batch_size / two:.0f} per model)")
    print(f"lockstep ratio  step(N=2) / (2 x step(N=1)) = {two / (2 * one):.3f}   (target <= 1.03)")
    print(f"merge: {min(merges) * 1e3:.1f} ms = {100 * min(merges) / epoch:.4f}% of an ImageNet epoch "
          f"({epoch / 60:.1f} min at this step time; target < 0.1%)")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
