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
import copy
import datetime
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
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


def fail(message):
    """The end of a run on a user's error: one line on stderr, exit status 1."""
    raise SystemExit(f"train.py: error: {message}")


# Flags that do not change the trained weights, so a resumed run may differ in them.
# --skip-bad-images may be added: a run stops at the first unreadable image, before training on it.
MAY_CHANGE_ON_RESUME = {"resume", "overwrite", "workers", "save_every", "eval_every_epoch", "data_location", "eval_dir",
                        "cache_dir", "output_dir", "skip_bad_images"}


def parse_args(argv=None):
    p = merge_checkpoints.OneLineParser(prog="train.py", description=__doc__.splitlines()[0])  # errors: one line, no usage
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
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir (from step 0 if it has no checkpoint yet)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --output-dir (once the new one has passed its checks)")
    p.add_argument("--skip-bad-images", action="store_true", help="train past unreadable images (each is logged and "
                   "replaced by the next readable one) instead of stopping at the first")
    p.add_argument("--eval-every-epoch", action="store_true", help="evaluate the (merged) model after every epoch")
    p.add_argument("--data-location", default="~/data", help="evaluation datasets (see evaluate.py)")
    p.add_argument("--eval-dir", help="an ImageFolder validation set with the training classes, for --eval-every-epoch")
    p.add_argument("--cache-dir", default="~/.cache/model_stock", help="zero-shot heads and linear-probe features")
    args = p.parse_args(argv)
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.randaug = None if args.randaug in (None, "none") else args.randaug
    minimum = {"--batch-size": (args.batch_size, 1), "--accum-steps": (args.accum_steps, 1), "--epochs": (args.epochs, 1),
               "--num-models": (args.num_models, 1), "--workers": (args.workers, 0), "--warmup": (args.warmup, 0),
               "--save-every": (args.save_every, 0)}
    for flag, (value, low) in minimum.items():
        if value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0) or not (math.isfinite(args.wd) and args.wd >= 0):
        p.error(f"--lr must be > 0 and --wd >= 0 (finite), got {args.lr} and {args.wd}")
    if not (math.isfinite(args.mixup) and args.mixup >= 0):
        p.error(f"--mixup must be >= 0 (0 = off), got {args.mixup}")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        p.error(f"--crop-scale expects 0 < min <= max <= 1, got {args.crop_scale[0]} {args.crop_scale[1]}")
    if not 0 <= args.flip <= 1:
        p.error(f"--flip is a probability between 0 and 1, got {args.flip}")
    if args.merge_every not in ("epoch", "never") and not (args.merge_every.isdigit() and int(args.merge_every) > 0):
        p.error(f"--merge-every must be 'epoch', 'never' or a positive number of steps, got {args.merge_every!r}")
    if args.num_models == 1 and args.merge_every != "never":
        p.error("--num-models must be >= 2 to merge; vanilla fine-tuning is --num-models 1 --merge-every never")
    try:  # model names, config files and weights fail here, before anything is built or written
        args.model = evaluate.resolve_model(args.model)
        args.pretrained = evaluate.resolve_weights(args.model, args.pretrained)
    except ValueError as error:
        p.error(str(error))
    # Absolute paths: a resumed run is compared with the run it continues, from any folder.
    args.train_dir = str(Path(args.train_dir).expanduser().resolve())
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


def seed_transforms(seed):
    """Seeds the CPU generators that torchvision's and timm's transforms draw from. (Not
    torch.manual_seed: it also seeds every accelerator, which costs about 0.15 ms a call, a
    fifth of decoding and transforming a small image, and transforms never draw there.)"""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


# ---- Data: every random draw is a function of (seed, epoch, position), so a resumed run, or
# ---- one with more data workers, replays exactly the same samples, crops and mixup ratios.
# ---- (Mixup pairs images within a micro-batch, so the number of processes and --accum-steps
# ---- change which images are mixed; without mixup they change nothing but rounding.)

MAX_UNREADABLE_IN_A_ROW = 64


def unreadable_reason(path, error):
    """Why PIL could not read an image file, in a few words."""
    if isinstance(error, Image.UnidentifiedImageError):
        return "an empty file" if os.path.getsize(path) == 0 else "not an image format PIL can read"
    return f"{type(error).__name__}: {str(error)[:120]}"


class SeededImages(torch.utils.data.Dataset):
    """ImageFolder samples addressed by (index, seed): the transform runs under that seed.

    An unreadable file is replaced by the next readable one in folder order (a pure function
    of the folder, so resume and data workers see the same images) and reported: each sample
    is (image, label, [(unreadable path, reason), ...]). train.py stops on a report unless
    --skip-bad-images; image is None after MAX_UNREADABLE_IN_A_ROW unreadable files.
    """

    def __init__(self, folder, transform):
        self.folder, self.transform = folder, transform

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, item):
        index, seed = item
        unreadable = []
        for k in range(min(MAX_UNREADABLE_IN_A_ROW, len(self.folder))):
            path, label = self.folder.samples[(index + k) % len(self.folder)]
            try:
                image = self.folder.loader(path)
            except evaluate.UNREADABLE as error:
                unreadable.append((path, unreadable_reason(path, error)))
                continue
            seed_transforms(seed)
            return self.transform(image), label, unreadable
        return None, None, unreadable


def collate(samples):
    """A batch of SeededImages samples: (images, labels, every unreadable (path, reason)),
    images None if a sample found no readable image."""
    images, labels, unreadable = zip(*samples)
    bad = [u for us in unreadable for u in us]
    if any(image is None for image in images):
        return None, None, bad
    return torch.stack(images), torch.tensor(labels), bad


def check_readable(images, unreadable, args, log):
    """Stops on the first unreadable training image of a batch unless --skip-bad-images, which
    hands each one to `log(path, reason)` and goes on; images None (no readable image in a
    row of MAX_UNREADABLE_IN_A_ROW) stops the run in any case."""
    for path, reason in unreadable:
        if not args.skip_bad_images:
            fail(f"training image {path} cannot be read ({reason}); replace it and continue with --resume, "
                 f"or add --skip-bad-images to train past unreadable images")
        log(path, reason)
    if images is None:
        fail(f"{MAX_UNREADABLE_IN_A_ROW} training images in a row cannot be read (the first: {unreadable[0][0]}); "
             f"expected readable images in --train-dir")


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


class EpochBatches:
    """One model's batch sampler: epoch_batches for the epoch and start step last set. It lets
    one DataLoader with persistent workers serve every epoch: each model's workers are forked
    once per run, not once per epoch."""

    def __init__(self, n_images, model_seed, args, steps, rank=0, world=1):
        self.n_images, self.model_seed, self.args, self.steps, self.rank, self.world = n_images, model_seed, args, steps, rank, world
        self.epoch = self.start = 0

    def __iter__(self):
        return iter(epoch_batches(self.n_images, self.model_seed, self.epoch, self.args, self.steps,
                                  self.rank, self.world, self.start))

    def __len__(self):
        return (self.steps - self.start) * self.args.accum_steps


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
    except ValueError as e:  # its message starts with the folder
        fail(f"--train-dir {e}")
    except OSError as e:
        fail(f"--train-dir {root}: {e.strerror}; expected a readable folder of class folders")
    if len(folders) < 2:
        fail(f"--train-dir {root} has one class folder ({folders[0]}); expected one folder of images per class, "
             f"at least 2 classes")
    if folders == evaluate.timm_list("imagenet_synsets"):
        names = list(open_clip.IMAGENET_CLASSNAMES)
    return folder, names


def fingerprint(folder):
    """Images, classes and a hash of every (relative path, label): a resumed run must see the
    same training set, or its data order and labels would silently change."""
    start = len(str(folder.root)) + 1  # samples are root/class/file: the relative path, without os.path's cost
    files = "\n".join(f"{path[start:]}:{label}" for path, label in folder.samples)
    return {"images": len(folder), "classes": len(folder.classes), "sha1": hashlib.sha1(files.encode()).hexdigest()}


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
        try:
            saved = load_file(cache)
            return saved["features"].float(), saved["labels"]
        except Exception as error:  # a damaged cache file is rebuilt, not fatal
            print(f"rebuilding the linear-probe features: cannot read {cache} ({type(error).__name__})")
    loader = torch.utils.data.DataLoader(SeededImages(folder, preprocess), batch_size=256, num_workers=args.workers,
                                         sampler=[(i, 0) for i in range(len(folder))], collate_fn=collate)
    feats, labels = [], []
    for images, y, unreadable in tqdm(loader, desc="linear probe: features"):
        check_readable(images, unreadable, args, lambda path, reason: tqdm.write(f"linear probe: skipped {path} ({reason})"))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            feats.append(F.normalize(classifier.model.visual(images.to(device)).float(), dim=-1).cpu())
        labels.append(y)
    features, labels = torch.cat(feats), torch.cat(labels)
    if args.pretrained:  # random weights (tests) are not worth caching
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            merge_checkpoints.save_state_dict({"features": features.half() if bf16 else features, "labels": labels}, cache)
        except OSError as error:  # the cache only saves time
            print(f"could not cache the linear-probe features in {cache} ({error.strerror}); continuing")
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
    A model whose loss or gradient norm is NaN or inf raises FloatingPointError before its
    optimizer step, so its weights stay as they were.
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
            total = total + loss.detach() / len(batches)  # stays on the device: no sync per micro-batch
        # The norm that clipping computes covers every gradient: a finite loss can still
        # overflow a gradient (large lr, bf16). One host sync per model and step.
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        loss_value, norm_value = torch.stack([total.float(), norm.float().to(total.device)]).tolist()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"model {i} has a non-finite loss ({loss_value}) at step {step}")
        if not math.isfinite(norm_value):
            raise FloatingPointError(f"model {i} has a non-finite gradient norm ({norm_value}) at step {step}, "
                                     f"loss {loss_value:.4g}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_value)
    return losses


def all_finite(models):
    """True if every weight of every model is finite (one host sync)."""
    return bool(torch.stack([torch.isfinite(p).all() for m in models for p in m.parameters()]).all())


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

def is_result(name):
    return name in ("final.safetensors", "merged.safetensors") or re.fullmatch(r"model_\d+\.safetensors", name)


def is_temporary(name):
    """A temporary file left behind when killed mid-write (.checkpoint.pt.<pid>_<random>.tmp
    from merge_checkpoints' writers; checkpoint.pt.<pid>.tmp from earlier versions)."""
    return re.fullmatch(r"\.?(args\.json|log\.jsonl|checkpoint\.pt|\w+\.safetensors)\.\w+\.tmp", name)


def is_run_file(name):
    return name in ("args.json", "w0.safetensors", "log.jsonl", "checkpoint.pt") or is_result(name) or is_temporary(name)


def plan_output(args, out):
    """Reads what --output-dir holds and decides how the run starts (rank 0; writes nothing).

    Returns {"resume": continue the run in out, "checkpoint": from its checkpoint.pt (else from
    step 0, reusing its w0), "saved": its args.json}. A folder that holds no checkpoint and no
    result (a launch that failed a check, or was killed early) is reused without --overwrite.
    """
    fresh = {"resume": False, "checkpoint": False, "saved": None}
    if out.exists() and not out.is_dir():
        fail(f"--output-dir {out} is a file; expected a folder")
    existing = next(p for p in [out.absolute(), *out.absolute().parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        fail(f"--output-dir {out}: cannot write in {existing} (permission denied); expected a writable folder")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [n for n in names if not is_run_file(n)]
    if foreign and not args.overwrite:
        fail(f"--output-dir {out} holds files train.py did not write ({', '.join(foreign[:3])}); "
             f"expected a new or empty folder, or a run's folder")
    checkpoint, results = "checkpoint.pt" in names, [n for n in names if is_result(n)]
    if args.overwrite or not (args.resume or checkpoint or results):
        return fresh
    if not args.resume:
        fail(f"{out} already holds a run ({'checkpoint.pt' if checkpoint else results[0]}); "
             f"pass --resume to continue it, --overwrite to replace it")
    if results and not checkpoint:
        fail(f"{out} holds a finished run ({results[0]}) and no checkpoint.pt to continue from; "
             f"pass --overwrite to replace it")
    if "args.json" not in names:
        if checkpoint:
            fail(f"{out} has checkpoint.pt but no args.json, so --resume cannot check that it continues the "
                 f"same run; restore args.json, or pass --overwrite to start afresh")
        print(f"{out} holds no run yet: starting from step 0")
        return fresh
    try:
        saved = json.loads((out / "args.json").read_text())
    except (OSError, ValueError):
        fail(f"{out / 'args.json'} cannot be read as JSON; restore it, or pass --overwrite to start afresh")
    for key, value in vars(args).items():
        if key not in MAY_CHANGE_ON_RESUME and saved.get(key) != json.loads(json.dumps(value)):
            fail(f"--resume with different --{key.replace('_', '-')} ({saved.get(key)!r} in the run, {value!r} now)")
    return {"resume": True, "checkpoint": checkpoint, "saved": saved}


def read_run_checkpoint(path, args, total_steps):
    """The checkpoint to resume, loaded to the CPU (each rank; no second copy on the GPU) and
    checked against the run; its architecture is checked once the model is built."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated zip archive, a file of another kind
        fail(f"{path} is truncated or damaged ({evaluate.first_sentence(error)}); delete it to resume from step 0, "
             f"or pass --overwrite to start afresh")
    if not isinstance(state, dict) or not {"step", "epoch_losses", "models", "optimizers"} <= state.keys():
        fail(f"{path} is not a train.py checkpoint; expected step, epoch_losses, models and optimizers")
    if len(state["models"]) != args.num_models or len(state["optimizers"]) != args.num_models:
        fail(f"{path} holds {len(state['models'])} models, this run {args.num_models}: it belongs to another run")
    if not 0 <= state["step"] <= total_steps:
        fail(f"{path} is at step {state['step']}, beyond this run's {total_steps} steps: it belongs to another run")
    return state


def kept_log(path, step):
    """The lines of log.jsonl up to `step`, the checkpoint's; a last line torn by a kill is dropped."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break  # cut short by a kill while it was written
            fail(f"{path} line {number} is not JSON; expected one JSON record per line")
        if record.get("step", 0) <= step:
            kept.append(line)
    return kept


def claim_output(args, out, plan, train_set, log_lines):
    """Rank 0, once every check has passed: removes an old run (--overwrite, or a launch that
    never checkpointed) and stale temporary files, then writes args.json or the kept log."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for path in out.iterdir():
            if is_temporary(path.name) or (not plan["resume"] and is_run_file(path.name)):
                path.unlink()
        if plan["resume"]:
            merge_checkpoints.write_atomically(out / "log.jsonl", lambda f: f.write_text("".join(line + "\n" for line in log_lines)))
        else:
            record = {**vars(args), "train_set": train_set, "code_version": evaluate.code_version()}
            merge_checkpoints.write_atomically(out / "args.json", lambda f: f.write_text(json.dumps(record, indent=2)))
    except OSError as error:
        fail(f"--output-dir {out}: cannot write there ({error.strerror}); expected a writable folder")


def log_line(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def restore(state, models, optimizers):
    """Loads models and optimizers from a checkpoint on the CPU; returns (step, this epoch's
    losses so far)."""
    for model, opt, model_state, opt_state in zip(models, optimizers, state["models"], state["optimizers"]):
        unwrap(model).load_state_dict(model_state)
        opt.load_state_dict(opt_state)  # moves the moments to the parameters' device
    return state["step"], state["epoch_losses"]


def next_micro_batches(batches, args, device, skipped):
    """Model i's accum-steps micro-batches from its loader, on the device; unreadable images
    stop the run, or with --skip-bad-images go into `skipped` as (model, path, reason)."""
    micro = []
    for i, batch in enumerate(batches):
        micro.append([])
        for _ in range(args.accum_steps):
            images, labels, unreadable = next(batch)
            check_readable(images, unreadable, args, lambda path, reason: skipped.append((i, path, reason)))
            micro[i].append((images.to(device, non_blocking=True), labels.to(device, non_blocking=True)))
    return micro


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

    # 2. The run's folder decides a fresh start or a resume. Nothing is written (nor an old
    #    run removed) until every check below has passed.
    out = Path(args.output_dir)
    plan = [plan_output(args, out) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(plan)  # every rank resumes, or none
    plan = plan[0]
    if rank == 0:
        print(json.dumps(vars(args)))

    # 3. Data, and the batch arithmetic it must allow.
    folder, classnames = training_set(args.train_dir)
    train_set = fingerprint(folder)
    if plan["resume"] and plan["saved"].get("train_set", train_set) != train_set:
        before = plan["saved"].get("train_set") or {}
        fail(f"--resume with a different training set in {args.train_dir} ({before.get('images')} images in "
             f"{before.get('classes')} classes in the run, {train_set['images']} in {train_set['classes']} now, "
             f"or other files); expected the images the run started with")
    if len(folder) < args.batch_size:
        fail(f"--train-dir {args.train_dir} has {len(folder)} images, fewer than one batch of {args.batch_size}")
    if args.batch_size % (world * args.accum_steps):
        fail(f"--batch-size {args.batch_size} is not divisible by {world} processes x {args.accum_steps} "
             f"accumulation steps")
    micro_size = args.batch_size // (world * args.accum_steps)
    if args.mixup > 0 and micro_size % 2:
        fail(f"mixup pairs images within a micro-batch; {micro_size} per process is odd")
    steps_per_epoch = len(folder) // args.batch_size  # the last partial batch is dropped
    total_steps = args.epochs * steps_per_epoch
    merge_period = int(args.merge_every) if args.merge_every.isdigit() else {"epoch": steps_per_epoch, "never": None}[args.merge_every]
    state = read_run_checkpoint(out / "checkpoint.pt", args, total_steps) if plan["checkpoint"] else None
    log_lines = kept_log(out / "log.jsonl", state["step"] if state else 0) if plan["resume"] and rank == 0 else []

    # 4. w0: the whole initial classifier (encoder + zero-shot or linear-probe head), the merge
    #    anchor. Rank 0 builds and saves it (unless the run being resumed has it); every rank
    #    then loads that file, so all hold one w0. The others build only the architecture.
    torch.manual_seed(0)  # random weights (--pretrained none): the same w0 in every run, whatever --seed
    build = rank == 0 and not (plan["resume"] and (out / "w0.safetensors").exists())
    try:
        classifier, preprocess = evaluate.build_classifier(args.model, args.pretrained, classnames, cache_dir=args.cache_dir,
                                                           device=device, zero_shot=build, load_weights=build)
    except ValueError as error:  # weights that cannot be downloaded or do not fit the model
        fail(error)
    problem = state and evaluate.state_dict_mismatch(classifier.state_dict(), state["models"][0])
    if problem:
        fail(f"{out / 'checkpoint.pt'} does not hold classifiers of this run's {args.model}: {problem}")
    if plan["resume"] and (out / "w0.safetensors").exists():  # the run's own w0, checked before the folder changes
        try:
            evaluate.load_checkpoint(classifier, out / "w0.safetensors")
        except ValueError as error:
            fail(f"{error}; restore it, or pass --overwrite to start afresh")
    try:
        transform = train_transform(classifier, args)
    except AssertionError:  # timm's word for a config it cannot parse
        fail(f"--randaug {args.randaug!r} is not a timm RandAugment config; expected e.g. rand-m10-n2, or none")
    eval_sets = []
    if args.eval_every_epoch and rank == 0:
        try:
            eval_sets = [evaluate.image_folder(args.eval_dir, preprocess)] if args.eval_dir else \
                evaluate.find_eval_sets(Path(args.data_location).expanduser(), preprocess)
        except ValueError as error:
            fail(error)
    if rank == 0:
        claim_output(args, out, plan, train_set, log_lines)
    if build:
        if args.init == "lp":
            try:
                probe = fit_linear_probe(classifier, *probe_features(classifier, folder, preprocess, args, device))
            except ValueError as e:
                fail(f"--init lp: {e}")
            zs, lp = probe["zero_shot"], probe["probe"]
            print(f"linear probe: l2 {probe['l2']:g} chosen on {probe['heldout_images']} held-out images; held-out "
                  f"accuracy {lp['heldout_accuracy']:.2f}% (zero-shot head {zs['heldout_accuracy']:.2f}%), "
                  f"mean row norm {lp['row_norm']:.1f} (zero-shot head {zs['row_norm']:.1f})")
            log_line(out / "log.jsonl", {"event": "linear_probe", "step": 0, **probe})
        merge_checkpoints.save_state_dict(classifier.state_dict(), out / "w0.safetensors")
    barrier()
    classifier.load_state_dict(evaluate.read_checkpoint(out / "w0.safetensors"))
    w0 = {k: v.detach().clone() for k, v in classifier.state_dict().items()}  # on the device: merges never leave it

    # 5. N models and optimizers (AdamW on every parameter), one shared schedule.
    models = [copy.deepcopy(classifier).train() for _ in range(args.num_models)]
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        models = [torch.nn.parallel.DistributedDataParallel(m, device_ids=ids) for m in models]
    # foreach: each update op runs once over all tensors (torch's default on a GPU; on a CPU it
    # is not, and the per-tensor loop costs 6.3 ms a step against 3.9 for the demo's tower).
    optimizers = [torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=args.wd, foreach=True) for m in models]
    step, epoch_losses, last_good = 0, [], None  # last_good: (checkpoint, its step), once one holds this run
    if state:
        step, epoch_losses = restore(state, models, optimizers)
        last_good = (out / "checkpoint.pt", step)
        print(f"resumed {out} at step {step} of {total_steps}")
        del state
    elif plan["resume"]:
        print(f"resumed {out} at step 0 (it had no checkpoint yet), with its w0")
    from timm.data import Mixup
    mixup = Mixup(mixup_alpha=args.mixup, label_smoothing=0.0, num_classes=len(classnames)) if args.mixup > 0 else None
    dataset = SeededImages(folder, transform)
    samplers = [EpochBatches(len(folder), args.seed + i, args, steps_per_epoch, rank, world) for i in range(args.num_models)]
    loaders = [torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers, collate_fn=collate,
                                           persistent_workers=args.workers > 0, pin_memory=device.type == "cuda")
               for sampler in samplers]
    del classifier

    def good_checkpoint():
        if last_good is None:
            return "no checkpoint had been saved yet"
        return f"nothing after step {last_good[1]} was saved: the last good checkpoint is {last_good[0]} (step {last_good[1]})"

    def save(step, epoch_losses):
        nonlocal last_good
        if not all_finite([unwrap(m) for m in models]):  # never over a good checkpoint
            fail(f"a model holds NaN or inf weights at step {step}; {good_checkpoint()}")
        if rank == 0:
            record = {"step": step, "epoch_losses": epoch_losses, "models": [unwrap(m).state_dict() for m in models],
                      "optimizers": [o.state_dict() for o in optimizers]}
            merge_checkpoints.write_atomically(out / "checkpoint.pt", lambda f: torch.save(record, f))
        barrier()
        last_good = (out / "checkpoint.pt", step)

    # 6. Epochs of lockstep steps: merge, checkpoint and evaluate at their points.
    while step < total_steps:
        epoch, start = divmod(step, steps_per_epoch)
        for sampler in samplers:
            sampler.epoch, sampler.start = epoch, start
        batches = [iter(loader) for loader in loaders]
        losses, seen, t_epoch = epoch_losses if start else [], 0, time.perf_counter()
        bar = tqdm(range(start, steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=rank != 0)
        for _ in bar:
            skipped = []
            micro = next_micro_batches(batches, args, device, skipped)
            lr = lr_at(step, args.lr, args.warmup, total_steps)
            try:
                losses.append(train_step(models, optimizers, micro, lr, step, args, mixup, len(classnames), bf16))
            except FloatingPointError as e:
                fail(f"{e}; {good_checkpoint()}; expected finite values (a lower --lr or --fp32 usually avoids this)")
            step += 1
            seen += args.batch_size
            bar.set_postfix(loss=" ".join(f"{x:.3f}" for x in losses[-1]), img_s=f"{seen / (time.perf_counter() - t_epoch):.0f}")
            for i, path, reason in skipped:  # --skip-bad-images: logged where they were replaced
                tqdm.write(f"model {i}, step {step}: skipped unreadable {path} ({reason})")
                if rank == 0:
                    log_line(out / "log.jsonl", {"event": "unreadable_image", "step": step, "model": i, "file": path,
                                                 "error": reason})
            if merge_period and (step % merge_period == 0 or step == total_steps):  # the last step always merges
                try:
                    ts = model_stock.merge_models_([unwrap(m) for m in models], w0)
                except ValueError as e:  # a NaN that got past the step's check
                    fail(f"the merge at step {step} failed: {e}; {good_checkpoint()}")
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
            try:
                results = {s.name: evaluate.evaluate(unwrap(models[0]), s, workers=args.workers, device=device, bf16=bf16)
                           for s in eval_sets}
            except ValueError as e:  # an unreadable evaluation image
                fail(f"--eval-every-epoch: {e}; {good_checkpoint()}; continue with --resume")
            record["eval"] = {**{name: r["top1"] for name, r in results.items()}, "Avg. shifts": evaluate.avg_shifts(results)}
            unwrap(models[0]).train()
            print(" ".join(f"{k}: {v:.2f}" for k, v in record["eval"].items() if v is not None))
        if rank == 0:
            log_line(out / "log.jsonl", record)
        save(step, [])

    # 7. The result: the last merge; or each model, for a post-hoc merge (Table 7) or vanilla fine-tuning.
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
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: checkpoints are written atomically, so the last one is whole
        print("train.py: interrupted; rerun the same command with --resume to continue from the last checkpoint",
              file=sys.stderr)
        sys.exit(130)
