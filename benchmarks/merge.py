"""Times model_stock.merge against the memory floor on CLIP-shaped fp32 state dicts.

The floor is the least any merge must do: one sum that reads every input tensor and
writes one output per key. merge/floor says how much the geometry costs on top of that.
"peak extra" is the resident memory merge adds at its peak, in copies of one model
(the output is one; Linux only).

    python benchmarks/merge.py                      # ViT-B-32 and ViT-L-14, n = 2 and 5
    python benchmarks/merge.py --models ViT-B-32 --n 2 --repeats 5
"""
import argparse
import ctypes
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model_stock  # noqa: E402


def classifier_shapes(model_name, num_classes=1000):
    """Shapes of the CLIP classifier's state dict (image tower + linear head), built on 'meta'."""
    import open_clip
    with torch.device("meta"):  # shapes only: no memory, no random init
        model = open_clip.create_model(model_name, pretrained=None, device="meta")
    shapes = {f"model.visual.{k}": v.shape for k, v in model.visual.state_dict().items()}
    shapes["classification_head.weight"] = torch.Size([num_classes, model.visual.output_dim])
    shapes["classification_head.bias"] = torch.Size([num_classes])
    return shapes


def floor(w0, ws):
    """w0 + sum(ws), key by key: reads every input once, writes one output per key."""
    out = {}
    for key, v0 in w0.items():
        acc = v0 + ws[0][key]
        for w in ws[1:]:
            acc += w[key]
        out[key] = acc
    return out


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _proc_status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])


def peak_extra_bytes(fn):
    """Peak resident memory above the current level while fn() runs (Linux), in bytes."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back: count it again if reused
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    except OSError:
        return float("nan")
    base = _proc_status_kb("VmRSS")
    fn()
    return (_proc_status_kb("VmHWM") - base) * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    parser.add_argument("--n", nargs="+", type=int, default=[2, 5], help="fine-tuned models merged")
    parser.add_argument("--repeats", type=int, default=3, help="timings per case; the best is kept")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU")
    print(f"{'model':<10} {'n':>2} {'params':>8} {'merge s':>8} {'floor s':>8} {'ratio':>6} {'peak extra':>11}")
    gen = torch.Generator().manual_seed(0)
    for name in args.models:
        shapes = classifier_shapes(name)
        w0 = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        for n in args.n:
            # Fine-tunes sit close to w0, as real ones do; the timing does not depend on it.
            ws = [{k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in w0.items()}
                  for _ in range(n)]
            model_bytes = sum(v.numel() * v.element_size() for v in w0.values())
            extra = peak_extra_bytes(lambda: model_stock.merge(w0, ws)) / model_bytes
            # The best of repeats + 1 runs: the first pays page faults for fresh memory.
            t_merge = best_time(lambda: model_stock.merge(w0, ws), args.repeats + 1)
            t_floor = best_time(lambda: floor(w0, ws), args.repeats + 1)
            params = sum(v.numel() for v in w0.values()) / 1e6
            print(f"{name:<10} {n:>2} {params:>7.1f}M {t_merge:>8.3f} {t_floor:>8.3f} {t_merge / t_floor:>6.2f}"
                  f" {extra:>9.2f} x")
            ws = None  # frees the fine-tunes before the next n is drawn


if __name__ == "__main__":
    main()
