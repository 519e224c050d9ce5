"""Size, save time and load time of train.py's checkpoint.pt: N classifiers and their AdamW moments.

The checkpoint holds every model's weights and both AdamW moments (3 fp32 copies per model).
train.py writes it in the training loop (merge_checkpoints.write_atomically: a temporary file,
then a rename) once per epoch, and every --save-every steps; this prints what one write costs
on this machine's disk.
No weights are downloaded: the architecture is built with random weights.

    python benchmarks/checkpoint.py                          # ViT-B/32, N = 2
    python benchmarks/checkpoint.py --model ViT-L-14-quickgelu --num-models 2 --folder /scratch
"""
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402
import evaluate  # noqa: E402
import merge_checkpoints  # noqa: E402


def checkpoint_of(model_name, num_models):
    """train.py's checkpoint record for num_models copies of the classifier after one AdamW step."""
    classifier, _ = evaluate.build_classifier(model_name, "openai", zero_shot=False, load_weights=False)
    models = [copy.deepcopy(classifier) for _ in range(num_models)]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=0.1) for m in models]
    for model, opt in zip(models, optimizers):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()  # creates both moments
    parameters = sum(p.numel() for p in classifier.parameters())
    return {"step": 1, "epoch_losses": [], "models": [m.state_dict() for m in models],
            "optimizers": [o.state_dict() for o in optimizers]}, parameters


def main():
    p = cli.Parser(prog="checkpoint.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32-quickgelu", help="open_clip model name or config .json")
    p.add_argument("--num-models", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--folder", default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args()
    if args.num_models < 1 or args.repeats < 1:
        p.error("--num-models and --repeats: expected 1 or more")
    try:
        model = evaluate.resolve_model(args.model)
    except ValueError as e:
        p.error(str(e))
    record, parameters = checkpoint_of(model, args.num_models)
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        path = Path(folder) / "checkpoint.pt"
        for _ in range(args.repeats):
            start = time.perf_counter()
            merge_checkpoints.write_atomically(path, lambda f: torch.save(record, f))
            os.sync()  # on the disk, not only in the page cache
            seconds = time.perf_counter() - start
            print(f"{args.model}, N = {args.num_models} ({parameters / 1e6:.1f}M parameters each): "
                  f"checkpoint {path.stat().st_size / 1e9:.2f} GB, written in {seconds:.1f} s")
        start = time.perf_counter()
        torch.load(path, map_location="cpu", weights_only=True)
        print(f"loaded to the CPU in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
