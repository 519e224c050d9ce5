"""Which limits evaluation: JPEG decoding on the CPU, or the model?

Writes photo-like JPEGs at ImageNet val sizes (500x375 and 375x500, about 100-150 KB) to a
temporary folder, then times evaluate.py's own data path (ImageFolder, PIL decode, resize to
224 bicubic, center crop, normalise) with several worker counts, and the ViT-B/32 classifier's
forward pass on the chosen device (random weights: the speed does not depend on them).
All six datasets hold about 167,000 images; the slower of the two rates sets the wall time.

    python benchmarks/eval_decode.py                        # 1 and 2 workers, CPU model
    python benchmarks/eval_decode.py --workers 1 8 16 --device cuda --images 2048
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402

ALL_IMAGES = 167_000  # ImageNet val, V2, Sketch, R, ObjectNet (used part), A


def write_jpegs(folder, count, seed=0):
    """`count` JPEGs in two class folders: smooth colour fields plus grain, like photographs
    (pure noise would compress badly and decode slower than real images)."""
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(count):
        width, height = (500, 375) if i % 3 else (375, 500)
        coarse = Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8))
        image = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
        image = (image + rng.normal(0, 18, image.shape)).clip(0, 255).astype(np.uint8)
        path = folder / f"class_{i % 2}" / f"{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path, quality=90)
        sizes.append(path.stat().st_size)
    return sum(sizes) / len(sizes)


def decode_rate(folder, workers, batch_size):
    """Images/s through evaluate.py's loader: decode + resize + crop + normalise, no model."""
    eval_set = evaluate.image_folder(folder, open_clip.image_transform(224, is_train=False))
    loader = torch.utils.data.DataLoader(eval_set.dataset, batch_size=batch_size, num_workers=workers)
    start = time.perf_counter()  # worker start-up included, as in an evaluation
    seen = sum(len(images) for images, _ in loader)
    return seen / (time.perf_counter() - start)


@torch.no_grad()
def model_rate(device, batch_size, batches):
    """Images/s of the ViT-B/32 classifier's forward on ready tensors (bf16 autocast on CUDA)."""
    classifier, _ = evaluate.build_classifier("ViT-B-32-quickgelu", None, zero_shot=False, device=device)
    classifier.eval()
    images = torch.randn(batch_size, 3, 224, 224, device=device)
    for step in range(batches + 1):
        if step == 1:  # the first batch warms up kernels and allocator
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            classifier(images).float().sum().item()  # .item() waits for the GPU
    return batches * batch_size / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=512, help="JPEGs to generate and decode")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model-batches", type=int, default=3, help="timed forward batches (0: skip)")
    args = p.parse_args()

    # 1. Photo-like JPEGs at ImageNet val sizes.
    with tempfile.TemporaryDirectory() as tmp:
        mean_bytes = write_jpegs(Path(tmp), args.images)
        print(f"{args.images} JPEGs of 500x375 / 375x500, {mean_bytes / 1e3:.0f} KB on average")

        # 2. CPU decode + preprocess rate, per worker count.
        for workers in args.workers:
            rate = decode_rate(Path(tmp), workers, args.batch_size)
            print(f"decode+resize+crop, {workers} worker(s): {rate:7.1f} images/s "
                  f"({ALL_IMAGES / rate / 60:.0f} min for all six datasets)")

    # 3. The model's rate on the same machine: the slower of the two limits evaluation.
    if args.model_batches:
        device = torch.device(args.device)
        batch_size = 256 if device.type == "cuda" else 32
        rate = model_rate(device, batch_size, args.model_batches)
        print(f"ViT-B/32 classifier forward on {device}: {rate:7.1f} images/s "
              f"({ALL_IMAGES / rate / 60:.0f} min for all six datasets)")


if __name__ == "__main__":
    main()
