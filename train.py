"""Fine-tune N CLIP classifiers in lockstep and merge them with Model Stock every epoch.

All N models start from the same pre-trained classifier w0 (image encoder + zero-shot or
linear-probe head), each with its own seed (data order, augmentation, mixup). Every step
runs one batch through every model; at every merge point all of them are overwritten with
model_stock.merge_models_ against w0 (paper §3 "Periodic merging", Fig. 7).

    python train.py --train-dir ~/data/imagenet/train --output-dir runs/stock          # paper's Model Stock
    python train.py --recipe stock-star --train-dir ~/data/imagenet/train --output-dir runs/star
    python train.py --num-models 1 --merge-every never ...                                # vanilla fine-tuning
    torchrun --nproc_per_node=8 train.py --train-dir ... --output-dir ...                 # more GPUs
"""
import argparse
import copy
import datetime
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision import transforms as T
from tqdm import tqdm

import evaluate
import merge_checkpoints
import model_stock

# Appendix G and §4.1; shared by both: AdamW, weight decay 0.1, batch 512, 500 warm-up steps.
# The paper names no flip; "stock-star" follows Model Soups' LP-init training, whose timm
# transform flips horizontally with p = 0.5.
RECIPES = {
    "stock": dict(lr=3e-5, epochs=10, crop_scale=(0.9, 1.0), flip=0.0, mixup=0.5, randaug=None, init="zeroshot"),
    "stock-star": dict(lr=2e-5, epochs=16, crop_scale=(0.08, 1.0), flip=0.5, mixup=0.0, randaug="rand-m10-n2", init="lp"),
}


# Flags that do not change the trained weights, so a resumed run may differ in them.
MAY_CHANGE_ON_RESUME = {"resume", "overwrite", "workers", "save_every", "eval_every_epoch", "data_location", "eval_dir", "cache_dir"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-dir", default="~/data/imagenet/train", help="ImageFolder training set (one folder per class)")
    p.add_argument("--output-dir", required=True, help="checkpoints, w0, final model, log.jsonl, args.json")
    p.add_argument("--recipe", choices=RECIPES, default="stock", help="paper's 'Model Stock' or 'Model Stock*'; flags below override it")
    p.add_argument("--model", default="ViT-B-32-quickgelu", help="open_clip model name (paper: ViT-B/32, B/16, L/14) or a config .json")
    p.add_argument("--pretrained", default="openai", help="open_clip pretrained tag or weights file; 'none' for random weights")
    p.add_argument("--num-models", type=int, default=2, help="N fine-tuned in lockstep (paper: 2; Table 5: 2-4)")
    p.add_argument("--merge-every", default="epoch", help="'epoch', a number of steps (Table 6: 1000, 5000), or 'never'")
    p.add_argument("--reset-optimizer", action="store_true", help="clear AdamW's moments after every merge (paper is silent; default keeps them)")
    p.add_argument("--init", choices=["zeroshot", "lp"], help="head: zero-shot text embeddings or a linear probe (recipe: stock / stock-star)")
    p.add_argument("--lr", type=float, help="peak learning rate (recipe: 3e-5 / 2e-5)")
    p.add_argument("--epochs", type=int, help="recipe: 10 / 16")
    p.add_argument("--batch-size", type=int, default=512, help="global batch per model (paper: 512; 64 for ViT-L/14)")
    p.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation: same batch, less memory")
    p.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay, on every parameter (paper: 0.1)")
    p.add_argument("--warmup", type=int, default=500, help="linear warm-up steps, then cosine decay to 0")
    p.add_argument("--crop-scale", type=float, nargs=2, help="random-resized-crop scale (recipe: 0.9 1 / 0.08 1)")
    p.add_argument("--flip", type=float, help="horizontal-flip probability, 0 = off (recipe: 0 / 0.5)")
    p.add_argument("--mixup", type=float, help="mixup alpha, 0 = off (recipe: 0.5 / 0)")
    p.add_argument("--randaug", help="timm RandAugment config, 'none' = off (recipe: none / rand-m10-n2)")
    p.add_argument("--seed", type=int, default=0, help="model i uses seed + i")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loading processes per model")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every this many steps (0: every epoch only)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --output-dir has a run")
    p.add_argument("--eval-every-epoch", action="store_true", help="evaluate the (merged) model after every epoch")
    p.add_argument("--data-location", default="~/data", help="evaluation datasets (see evaluate.py)")
    p.add_argument("--eval-dir", help="an ImageFolder validation set with the training classes, for --eval-every-epoch")
    p.add_argument("--cache-dir", default="~/.cache/model_stock", help="zero-shot heads and linear-probe features")
    args = p.parse_args(argv)
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.randaug = None if args.randaug in (None, "none") else args.randaug
    if not 0 <= args.flip <= 1:
        p.error(f"--flip is a probability between 0 and 1, got {args.flip}")
    if args.model.endswith(".json"):  # a custom open_clip config: registered under its file name
        open_clip.add_model_config(args.model)
        args.model = Path(args.model).stem
    args.pretrained = None if args.pretrained.lower() == "none" else args.pretrained
    if args.merge_every not in ("epoch", "never") and not (args.merge_every.isdigit() and int(args.merge_every) > 0):
        p.error(f"--merge-every must be 'epoch', 'never' or a positive number of steps, got {args.merge_every!r}")
    if args.num_models < 1 or (args.num_models == 1 and args.merge_every != "never"):
        p.error("--num-models must be >= 2 to merge; vanilla fine-tuning is --num-models 1 --merge-every never")
    return args


# ---- Schedule and seeds ----

def lr_at(step, base_lr, warmup, total):
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


def seed_of(*parts):
    """A 63-bit seed that is a pure function of `parts` (model seed, epoch, position...)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def seed_everything(seed):
    """Seeds the generators that torchvision, timm and model code draw from."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- Data: every random draw is a function of (seed, epoch, position), so a resumed run, or
# ---- one with more data workers, replays exactly the same samples, crops and mixup ratios.
# ---- (Mixup pairs images within a micro-batch, so the number of processes and --accum-steps
# ---- change which images are mixed; without mixup they change nothing but rounding.)

class SeededImages(torch.utils.data.Dataset):
    """ImageFolder samples addressed by (index, seed): the transform runs under that seed."""

    def __init__(self, folder, transform):
        self.folder, self.transform = folder, transform

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, item):
        index, seed = item
        path, label = self.folder.samples[index]
        seed_everything(seed)
        return self.transform(self.folder.loader(path)), label


def epoch_batches(n_images, model_seed, epoch, args, steps, rank=0, world=1, start=0):
    """This rank's micro-batches of (index, seed) for one model and epoch, from step `start`.

    Global batch k is images perm[k*B:(k+1)*B]; rank r takes every world-th of them, cut into
    accum-steps micro-batches. Samples and their seeds do not depend on world or accum.
    """
    perm = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed_of(model_seed, epoch))).tolist()
    micro = []
    for k in range(start, steps):
        positions = range(k * args.batch_size + rank, (k + 1) * args.batch_size, world)
        share = [(perm[p], seed_of(model_seed, epoch, p)) for p in positions]
        size = len(share) // args.accum_steps
        micro += [share[a * size:(a + 1) * size] for a in range(args.accum_steps)]
    return micro


def train_transform(classifier, args):
    """Random-resized crop (+ horizontal flip, + RandAugment), normalised like the pre-trained model's input."""
    cfg = classifier.model.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    steps = [T.RandomResizedCrop(size, scale=tuple(args.crop_scale), interpolation=T.InterpolationMode.BICUBIC)]
    if args.flip > 0:  # timm's order: crop, flip, RandAugment
        steps.append(T.RandomHorizontalFlip(args.flip))
    if args.randaug:
        from timm.data.auto_augment import rand_augment_transform
        mean = tuple(round(255 * m) for m in cfg["mean"])
        steps.append(rand_augment_transform(args.randaug, {"translate_const": int(size * 0.45), "img_mean": mean}))
    steps += [T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])]  # the loader already gives RGB
    return T.Compose(steps)


def training_set(train_dir):
    """The image folder and its class names: ImageNet's for the 1000 wnids, else folder names.
    Labels follow evaluate.py's rule (sorted folders, hidden ones skipped), as do the names."""
    root = Path(train_dir).expanduser()
    try:
        names = evaluate.folder_classnames(root)
        folders = evaluate._class_folders(root)
        folder = evaluate.LabelledFolder(root, {f: i for i, f in enumerate(folders)})
    except (ValueError, OSError) as e:
        raise SystemExit(f"train.py: error: --train-dir {root}: {e}; expected one folder of images per class")
    if folders == evaluate.timm_list("imagenet_synsets"):
        names = list(open_clip.IMAGENET_CLASSNAMES)
    return folder, names


# ---- The linear probe (Model Stock* init) ----

@torch.no_grad()
def probe_features(classifier, folder, preprocess, args, device):
    """L2-normalised features of every training image (evaluation transform: no augmentation),
    and labels; computed once and cached in --cache-dir, keyed by model, weights, images and precision
    (bf16 autocast on CUDA, stored in fp16; with --fp32, fp32 throughout)."""
    bf16 = device.type == "cuda" and not args.fp32
    files = "\n".join(f"{path}:{label}" for path, label in folder.samples)
    precision = "bf16" if bf16 else "fp32"
    key = hashlib.sha1(f"{args.model}|{evaluate.weights_key(args.pretrained)}|{precision}|{files}".encode()).hexdigest()[:16]
    cache = Path(args.cache_dir).expanduser() / f"lp_features_{key}.safetensors"
    if cache.exists():
        from safetensors.torch import load_file
        saved = load_file(cache)
        return saved["features"].float(), saved["labels"]
    loader = torch.utils.data.DataLoader(SeededImages(folder, preprocess), batch_size=256, num_workers=args.workers,
                                         sampler=[(i, 0) for i in range(len(folder))])
    feats, labels = [], []
    for images, y in tqdm(loader, desc="linear probe: features"):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            feats.append(F.normalize(classifier.model.visual(images.to(device)).float(), dim=-1).cpu())
        labels.append(y)
    features, labels = torch.cat(feats), torch.cat(labels)
    if args.pretrained:  # random weights (tests) are not worth caching
        cache.parent.mkdir(parents=True, exist_ok=True)
        merge_checkpoints.save_state_dict({"features": features.half() if bf16 else features, "labels": labels}, cache)
    return features, labels


# The penalty is l2 * (mean squared row norm of W). At the optimum of mean cross-entropy plus this
# penalty the mean row norm is at most (1 - p) / l2, p the mean probability of the right class,
# whatever the number of classes. sklearn's LogisticRegression (C = 1), the usual probe, is
# l2 = classes / (2 C images), about 4e-4 on ImageNet; the grid spans a decade or more either side.
PROBE_L2_GRID = (1e-2, 1e-3, 1e-4, 1e-5)


def _fit_head(w, b, x, y, l2, iterations, chunk=2**16):
    """Full-batch L-BFGS on mean cross-entropy + l2 * mean_k |w_k|^2, from (w, b); returns the fit.
    The loss is summed over chunks of images: ImageNet's 1.28M x 1000 logits never exist at once."""
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = l2 * w.pow(2).sum(1).mean()
        loss.backward()
        total = loss.detach()
        for i in range(0, len(y), chunk):
            part = F.cross_entropy(x[i:i + chunk] @ w.T + b, y[i:i + chunk], reduction="sum") / len(y)
            part.backward()
            total += part.detach()
        return total
    opt.step(closure)
    return w.detach(), b.detach()


@torch.no_grad()
def _head_scores(w, b, x, y, chunk=2**16):
    """Top-1 accuracy (%) and mean cross-entropy of the head (w, b) on features x, labels y."""
    correct, loss = 0, 0.0
    for i in range(0, len(y), chunk):
        logits = x[i:i + chunk] @ w.T + b
        correct += (logits.argmax(1) == y[i:i + chunk]).sum().item()
        loss += F.cross_entropy(logits, y[i:i + chunk], reduction="sum").item()
    return 100 * correct / len(y), loss / len(y)


def fit_linear_probe(classifier, features, labels, grid=PROBE_L2_GRID, holdout=0.1, iterations=200):
    """Fits the head (W, b) on frozen features, starting from the zero-shot head, and returns a report.

    The penalty l2 is chosen on a held-out `holdout` fraction of the features (a fixed split:
    w0 must not depend on --seed): the best held-out accuracy wins, then the lower held-out loss.
    The head is then refitted on all features with that l2. The logit scale stays inside W, as in
    the zero-shot head. The report gives both heads' mean row norm and held-out accuracy (the
    probe's from its fit without the held-out images) and every trial of the grid.
    """
    head = classifier.classification_head
    device = head.weight.device
    x, y = features.to(device), labels.to(device)
    w0, b0 = head.weight.detach().float().clone(), head.bias.detach().float().clone()
    if len(y) < 2:
        raise ValueError(f"the linear probe needs 2 images or more to hold one out, got {len(y)}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).to(device)
    n_held = min(len(y) - 1, max(1, round(holdout * len(y))))
    (x_held, y_held), (x_fit, y_fit) = [(x[part], y[part]) for part in (order[:n_held], order[n_held:])]
    zero_shot_accuracy, _ = _head_scores(w0, b0, x_held, y_held)
    trials = []
    for l2 in grid:
        w, b = _fit_head(w0, b0, x_fit, y_fit, l2, iterations)
        accuracy, loss = _head_scores(w, b, x_held, y_held)
        trials.append({"l2": l2, "heldout_accuracy": accuracy, "heldout_loss": loss})
    best = max(trials, key=lambda r: (r["heldout_accuracy"], -r["heldout_loss"]))
    w, b = _fit_head(w0, b0, x, y, best["l2"], iterations)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    return {"l2": best["l2"], "heldout_images": n_held, "trials": trials,
            "zero_shot": {"heldout_accuracy": zero_shot_accuracy, "row_norm": w0.norm(dim=1).mean().item()},
            "probe": {"heldout_accuracy": best["heldout_accuracy"], "train_accuracy": _head_scores(w, b, x, y)[0],
                      "row_norm": w.norm(dim=1).mean().item()}}


# ---- One lockstep step ----

def loss_of(model, images, labels, mixup, seed, num_classes, bf16):
    """Cross-entropy of one micro-batch; with mixup, against the mixed soft labels."""
    if mixup is not None:
        state = np.random.get_state()  # timm's Mixup draws from numpy's global generator
        np.random.seed(seed % 2**32)
        images, labels = mixup(images, labels)
        np.random.set_state(state)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(images).float()
    if labels.ndim == 2:
        return torch.sum(-labels * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, labels)


def train_step(models, optimizers, micro_batches, lr, step, args, mixup=None, num_classes=None, bf16=False):
    """One optimizer step of every model on its own batch; returns the N losses (floats).

    micro_batches[i] is model i's list of accum-steps (images, labels) pairs on the device.
    """
    losses = []
    for i, (model, opt, batches) in enumerate(zip(models, optimizers, micro_batches)):
        for group in opt.param_groups:
            group["lr"] = lr
        total = 0.0
        for a, (images, labels) in enumerate(batches):
            torch.manual_seed(seed_of(args.seed + i, "step", step, a))  # dropout etc., if any
            sync = a == len(batches) - 1 or not hasattr(model, "no_sync")
            with (torch.enable_grad() if sync else model.no_sync()):
                loss = loss_of(model, images, labels, mixup, seed_of(args.seed + i, "mixup", step, a), num_classes, bf16)
                (loss / len(batches)).backward()
            total += loss.item() / len(batches)
        if not math.isfinite(total):
            raise FloatingPointError(f"model {i} has a non-finite loss ({total}) at step {step}")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


# ---- Merging and its log ----

def merge_summary(ts, w0, n):
    """Mean/min/max t over the encoder's matrices, over its vectors (biases, norms) and over
    the head (Appendix F); per-layer t and angle (degrees, from t: cos = t / (n - (n - 1) t),
    90 where t = 0, cos <= 0)."""
    groups = {"matrices": [], "vectors": [], "head": []}
    for key, t in ts.items():
        group = "head" if key.startswith("classification_head.") else "matrices" if w0[key].ndim >= 2 else "vectors"
        groups[group].append(t)
    summary = {g: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)} for g, v in groups.items() if v}
    angles = {k: math.degrees(math.acos(min(1.0, t / (n - (n - 1) * t)))) for k, t in ts.items()}
    return {"t_summary": summary, "t": ts, "angle": angles}


def unwrap(model):
    return model.module if hasattr(model, "module") else model


# ---- The run's folder: a run is continued with --resume, replaced with --overwrite, never clobbered ----

def prepare_output(args, out):
    """Checks and sets up --output-dir (rank 0); returns True if a checkpoint is resumed."""
    resuming = args.resume and (out / "checkpoint.pt").exists()
    if out.exists() and any(out.iterdir()) and not (resuming or args.overwrite):
        reason = "no checkpoint.pt to resume from" if args.resume else "already holds a run"
        raise SystemExit(f"train.py: error: {out} {reason}; pass --resume to continue a run, "
                         f"--overwrite to start afresh")
    out.mkdir(parents=True, exist_ok=True)
    if resuming:
        saved = json.loads((out / "args.json").read_text())
        for key, value in vars(args).items():
            if key not in MAY_CHANGE_ON_RESUME and saved.get(key) != json.loads(json.dumps(value)):
                raise SystemExit(f"train.py: error: --resume with different --{key.replace('_', '-')} "
                                 f"({saved.get(key)!r} in the run, {value!r} now)")
        return True
    if args.resume:
        print(f"{out} is empty: starting the run from step 0")
    for old in ["log.jsonl", "checkpoint.pt", "final.safetensors", "merged.safetensors",
                *(p.name for p in out.glob("model_*.safetensors"))]:
        (out / old).unlink(missing_ok=True)
    (out / "args.json").write_text(json.dumps({**vars(args), "code_version": evaluate.code_version()}, indent=2))
    return False


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a kill never leaves half a checkpoint."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def log_line(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def restore(checkpoint_path, models, optimizers, device, log_path):
    """Loads models and optimizers; drops log lines written after the checkpoint.
    Returns (step, this epoch's losses so far)."""
    state = torch.load(checkpoint_path, map_location=device, weights_only=True)
    for model, opt, model_state, opt_state in zip(models, optimizers, state["models"], state["optimizers"]):
        unwrap(model).load_state_dict(model_state)
        opt.load_state_dict(opt_state)
    if log_path.exists():
        lines = log_path.read_text().splitlines()
        log_path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= state["step"]))
    return state["step"], state["epoch_losses"]


def main(argv=None):
    args = parse_args(argv)
    # 1. Processes and devices: torchrun sets WORLD_SIZE; one process otherwise.
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:  # a long timeout: the other ranks wait while rank 0 evaluates or writes w0
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(hours=3))
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    bf16 = device.type == "cuda" and not args.fp32
    barrier = dist.barrier if world > 1 else (lambda: None)
    out = Path(args.output_dir)
    decision = [prepare_output(args, out) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(decision)  # every rank resumes, or none
    resuming = decision[0]
    if rank == 0:
        print(json.dumps(vars(args)))

    # 2. Data, and the batch arithmetic it must allow.
    folder, classnames = training_set(args.train_dir)
    if len(folder) < args.batch_size:
        raise SystemExit(f"train.py: error: {args.train_dir} has {len(folder)} images, fewer than one batch of {args.batch_size}")
    if args.batch_size % (world * args.accum_steps):
        raise SystemExit(f"train.py: error: --batch-size {args.batch_size} is not divisible by "
                         f"{world} processes x {args.accum_steps} accumulation steps")
    micro_size = args.batch_size // (world * args.accum_steps)
    if args.mixup > 0 and micro_size % 2:
        raise SystemExit(f"train.py: error: mixup pairs images within a micro-batch; {micro_size} per process is odd")
    steps_per_epoch = len(folder) // args.batch_size  # the last partial batch is dropped
    total_steps = args.epochs * steps_per_epoch
    merge_period = int(args.merge_every) if args.merge_every.isdigit() else {"epoch": steps_per_epoch, "never": None}[args.merge_every]

    # 3. w0: the whole initial classifier (encoder + zero-shot or linear-probe head), the merge
    #    anchor. Rank 0 builds and saves it; every rank then loads that file, so all hold one w0.
    torch.manual_seed(0)  # random weights (--pretrained none): the same w0 in every run, whatever --seed
    build = rank == 0 and not resuming
    classifier, preprocess = evaluate.build_classifier(args.model, args.pretrained, classnames, cache_dir=args.cache_dir,
                                                       device=device, zero_shot=build)
    if build:
        if args.init == "lp":
            try:
                probe = fit_linear_probe(classifier, *probe_features(classifier, folder, preprocess, args, device))
            except ValueError as e:
                raise SystemExit(f"train.py: error: --init lp: {e}")
            zs, lp = probe["zero_shot"], probe["probe"]
            print(f"linear probe: l2 {probe['l2']:g} chosen on {probe['heldout_images']} held-out images; held-out "
                  f"accuracy {lp['heldout_accuracy']:.2f}% (zero-shot head {zs['heldout_accuracy']:.2f}%), "
                  f"mean row norm {lp['row_norm']:.1f} (zero-shot head {zs['row_norm']:.1f})")
            log_line(out / "log.jsonl", {"event": "linear_probe", "step": 0, **probe})
        merge_checkpoints.save_state_dict(classifier.state_dict(), out / "w0.safetensors")
    barrier()
    classifier.load_state_dict(evaluate.read_checkpoint(out / "w0.safetensors"))
    w0 = {k: v.detach().clone() for k, v in classifier.state_dict().items()}  # on the device: merges never leave it

    # 4. N models and optimizers (AdamW on every parameter), one shared schedule.
    models = [copy.deepcopy(classifier).train() for _ in range(args.num_models)]
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        models = [torch.nn.parallel.DistributedDataParallel(m, device_ids=ids) for m in models]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=args.wd) for m in models]
    step, epoch_losses = 0, []
    if resuming:
        step, epoch_losses = restore(out / "checkpoint.pt", models, optimizers, device, out / "log.jsonl")
        print(f"resumed {out} at step {step} of {total_steps}")
    from timm.data import Mixup
    mixup = Mixup(mixup_alpha=args.mixup, label_smoothing=0.0, num_classes=len(classnames)) if args.mixup > 0 else None
    dataset = SeededImages(folder, train_transform(classifier, args))
    eval_sets = []
    if args.eval_every_epoch and rank == 0:
        eval_sets = [evaluate.image_folder(args.eval_dir, preprocess)] if args.eval_dir else \
            evaluate.find_eval_sets(Path(args.data_location).expanduser(), preprocess)
    del classifier

    def save(step, epoch_losses):
        if rank == 0:
            save_atomic({"step": step, "epoch_losses": epoch_losses, "models": [unwrap(m).state_dict() for m in models],
                         "optimizers": [o.state_dict() for o in optimizers]}, out / "checkpoint.pt")
        barrier()

    # 5. Epochs of lockstep steps: merge, checkpoint and evaluate at their points.
    while step < total_steps:
        epoch, start = divmod(step, steps_per_epoch)
        loaders = [iter(torch.utils.data.DataLoader(
            dataset, num_workers=args.workers, pin_memory=device.type == "cuda",
            batch_sampler=epoch_batches(len(folder), args.seed + i, epoch, args, steps_per_epoch, rank, world, start)))
            for i in range(args.num_models)]
        losses, seen, t_epoch = epoch_losses if start else [], 0, time.perf_counter()
        bar = tqdm(range(start, steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0)
        for _ in bar:
            micro = [[tuple(x.to(device, non_blocking=True) for x in next(loader)) for _ in range(args.accum_steps)]
                     for loader in loaders]
            lr = lr_at(step, args.lr, args.warmup, total_steps)
            try:
                losses.append(train_step(models, optimizers, micro, lr, step, args, mixup, len(classnames), bf16))
            except FloatingPointError as e:
                raise SystemExit(f"train.py: error: {e}; the last good checkpoint is {out / 'checkpoint.pt'}")
            step += 1
            seen += args.batch_size
            bar.set_postfix(loss=" ".join(f"{x:.3f}" for x in losses[-1]), img_s=f"{seen / (time.perf_counter() - t_epoch):.0f}")
            if merge_period and (step % merge_period == 0 or step == total_steps):  # the last step always merges
                ts = model_stock.merge_models_([unwrap(m) for m in models], w0)
                if args.reset_optimizer:
                    for opt in optimizers:
                        opt.state.clear()
                if rank == 0:
                    log_line(out / "log.jsonl", {"event": "merge", "step": step, "epoch": step / steps_per_epoch,
                                                 **merge_summary(ts, w0, args.num_models)})
            if args.save_every and step % args.save_every == 0 and step % steps_per_epoch:
                save(step, losses)
        record = {"event": "epoch", "step": step, "epoch": step // steps_per_epoch, "lr": lr,
                  "loss": [sum(x[i] for x in losses) / len(losses) for i in range(args.num_models)],
                  "images_per_s_per_model": round(seen / (time.perf_counter() - t_epoch), 1)}
        if eval_sets:
            results = {s.name: evaluate.evaluate(unwrap(models[0]), s, workers=args.workers, device=device, bf16=bf16)
                       for s in eval_sets}
            record["eval"] = {**{name: r["top1"] for name, r in results.items()}, "Avg. shifts": evaluate.avg_shifts(results)}
            unwrap(models[0]).train()
            print(" ".join(f"{k}: {v:.2f}" for k, v in record["eval"].items() if v is not None))
        if rank == 0:
            log_line(out / "log.jsonl", record)
        save(step, [])

    # 6. The result: the last merge; or each model, for a post-hoc merge (Table 7) or vanilla fine-tuning.
    if rank == 0:
        if merge_period:
            merge_checkpoints.save_state_dict(unwrap(models[0]).state_dict(), out / "final.safetensors")
            print(f"wrote {out / 'final.safetensors'} (Model Stock, N = {args.num_models})")
        else:
            names = [out / f"model_{i}.safetensors" for i in range(args.num_models)]
            for model, name in zip(models, names):
                merge_checkpoints.save_state_dict(unwrap(model).state_dict(), name)
            print(f"wrote {', '.join(map(str, names))}")
            if len(names) > 1:
                print(f"merge them: python {Path(merge_checkpoints.__file__).resolve()} {(out / 'w0.safetensors').resolve()} "
                      f"{' '.join(str(n.resolve()) for n in names)} -o {(out / 'merged.safetensors').resolve()}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
