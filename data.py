"""Training data for train.py: every random draw a function of (seed, epoch, position).

A model's epoch is a permutation of the training images drawn from (its seed, epoch); each
sample's crop, flip and RandAugment are drawn under seed_of(its seed, epoch, position). So a
resumed run, or one with more data workers or processes, replays exactly the same samples,
crops and mixup ratios. (Mixup pairs images within a micro-batch, so the number of processes
and --accum-steps change which images are mixed; without mixup they change nothing but rounding.)
An unreadable image stops the run before it is trained on, or with --skip-bad-images is
replaced by the next readable one in folder order and reported.

    folder, classnames = data.training_set("~/data/imagenet/train")
    loader = DataLoader(data.SeededImages(folder, transform), collate_fn=data.collate,
                        batch_sampler=data.EpochBatches(len(folder), seed, args, steps))
"""
import functools
import hashlib
import os
import random
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from torchvision import transforms as T

import cli
import evaluate


fail = functools.partial(cli.fail, "train.py")


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
            fail(f"training image {path} cannot be read ({reason}); "
                 f"replace it and continue with --resume, "
                 f"or add --skip-bad-images to train past unreadable images")
        log(path, reason)
    if images is None:
        fail(f"{MAX_UNREADABLE_IN_A_ROW} training images in a row cannot be read "
             f"(the first: {unreadable[0][0]}); "
             f"expected readable images in --train-dir")


def epoch_batches(n_images, model_seed, epoch, args, steps, rank=0, world=1, start=0):
    """This rank's micro-batches of (index, seed) for one model and epoch, from step `start`.

    Global batch k is images perm[k*B:(k+1)*B]; rank r takes every world-th of them, cut into
    accum-steps micro-batches. Samples and their seeds do not depend on world or accum.
    """
    perm = torch.randperm(
        n_images, generator=torch.Generator().manual_seed(seed_of(model_seed, epoch))).tolist()
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
        self.n_images, self.model_seed, self.args, self.steps, self.rank, self.world = (
            n_images, model_seed, args, steps, rank, world)
        self.epoch = self.start = 0

    def __iter__(self):
        return iter(epoch_batches(self.n_images, self.model_seed, self.epoch, self.args, self.steps,
                                  self.rank, self.world, self.start))

    def __len__(self):
        return (self.steps - self.start) * self.args.accum_steps


def train_transform(classifier, args):
    """Random-resized crop (+ horizontal flip, + RandAugment), normalised like the pre-trained
    model's input."""
    cfg = classifier.model.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    steps = [T.RandomResizedCrop(size, scale=tuple(args.crop_scale),
                                 interpolation=T.InterpolationMode.BICUBIC)]
    if args.flip > 0:  # timm's order: crop, flip, RandAugment
        steps.append(T.RandomHorizontalFlip(args.flip))
    if args.randaug:
        from timm.data.auto_augment import rand_augment_transform
        mean = tuple(round(255 * m) for m in cfg["mean"])
        try:
            steps.append(rand_augment_transform(args.randaug, {"translate_const": int(size * 0.45),
                                                               "img_mean": mean}))
        except AssertionError:  # timm's word for a config it cannot parse
            fail(f"--randaug {args.randaug!r} is not a timm RandAugment config; "
                 f"expected e.g. rand-m10-n2, or none", cli.USAGE)
    steps += [T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])]  # the loader already gives RGB
    return T.Compose(steps)


def training_set(train_dir):
    """The image folder and its class names: ImageNet's for the 1000 wnids, else folder names.
    Labels follow evaluate.py's rule (sorted folders, hidden ones skipped), as do the names."""
    root = Path(train_dir).expanduser()
    if not root.is_dir():
        fail(f"--train-dir {root} {'is a file' if root.exists() else 'does not exist'}; expected a "
             f"folder with one folder of images per class", cli.USAGE)
    try:
        names = evaluate.folder_classnames(root)
        folders = evaluate.class_folders(root)
        folder = evaluate.LabelledFolder(root, {f: i for i, f in enumerate(folders)})
    except ValueError as e:  # its message starts with the folder
        fail(f"--train-dir {e}", cli.USAGE)
    except OSError as e:
        fail(f"--train-dir {root}: {e.strerror}; expected a readable folder of class folders",
             cli.USAGE)
    if len(folders) < 2:
        fail(f"--train-dir {root} has one class folder ({folders[0]}); "
             f"expected one folder of images per class, at least 2 classes", cli.USAGE)
    if folders == evaluate.timm_list("imagenet_synsets"):
        names = list(open_clip.IMAGENET_CLASSNAMES)
    return folder, names


def fingerprint(folder):
    """Images, classes and a hash of every (relative path, label): a resumed run must see the
    same training set, or its data order and labels would silently change."""
    # samples are root/class/file: the relative path, without os.path's cost
    start = len(str(folder.root)) + 1
    files = "\n".join(f"{path[start:]}:{label}" for path, label in folder.samples)
    return {"images": len(folder), "classes": len(folder.classes),
            "sha1": hashlib.sha1(files.encode()).hexdigest()}


def next_micro_batches(batches, args, device, skipped):
    """Model i's accum-steps micro-batches from its loader, on the device; unreadable images
    stop the run, or with --skip-bad-images go into `skipped` as (model, path, reason)."""
    micro = []
    for i, batch in enumerate(batches):
        micro.append([])
        for _ in range(args.accum_steps):
            images, labels, unreadable = next(batch)
            check_readable(images, unreadable, args,
                           lambda path, reason: skipped.append((i, path, reason)))
            micro[i].append((images.to(device, non_blocking=True),
                             labels.to(device, non_blocking=True)))
    return micro



def steps_per_epoch(n_images, args, world=1):
    """Optimizer steps in an epoch (the last partial batch is dropped), after checking that
    the training set and --batch-size allow the processes, accumulation and mixup asked for."""
    if n_images < args.batch_size:
        fail(f"--train-dir {args.train_dir} has {n_images} images, "
             f"fewer than one batch of {args.batch_size}", cli.USAGE)
    if args.batch_size % (world * args.accum_steps):
        fail(f"--batch-size {args.batch_size} is not divisible by "
             f"{world} processes x {args.accum_steps} accumulation steps", cli.USAGE)
    micro_size = args.batch_size // (world * args.accum_steps)
    if args.mixup > 0 and micro_size % 2:
        fail(f"mixup pairs images within a micro-batch; {micro_size} per process is odd", cli.USAGE)
    return n_images // args.batch_size


def loaders(folder, transform, args, steps, rank=0, world=1, pin_memory=False):
    """One DataLoader per model over the same images, each with its own EpochBatches sampler
    (its seed, its order); set a sampler's epoch and start step before iterating its loader."""
    dataset = SeededImages(folder, transform)
    samplers = [EpochBatches(len(folder), args.seed + i, args, steps, rank, world)
                for i in range(args.num_models)]
    loaders = [torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                                           collate_fn=collate, persistent_workers=args.workers > 0,
                                           pin_memory=pin_memory)
               for sampler in samplers]
    return loaders, samplers


def eval_sets(args, preprocess, classnames):
    """--eval-every-epoch's sets: --eval-dir, or the datasets found under --data-location;
    none without --eval-every-epoch. Their classes must be the training set's."""
    if not args.eval_every_epoch:
        return []
    try:
        if args.eval_dir:
            sets = [evaluate.image_folder(args.eval_dir, preprocess)]
        else:
            sets = evaluate.find_eval_sets(Path(args.data_location).expanduser(), preprocess)
    except ValueError as error:  # its message starts with the folder
        fail(f"{'--eval-dir' if args.eval_dir else '--data-location'} {error}", cli.USAGE)
    if not sets:
        fail(f"--eval-every-epoch: no evaluation set found under "
             f"--data-location {args.data_location}; "
             f"expected --eval-dir with a validation folder of the training classes, "
             f"or the datasets of docs/datasets.md", cli.USAGE)
    if args.eval_dir and evaluate.folder_classnames(args.eval_dir) != classnames:
        names = evaluate.folder_classnames(args.eval_dir)
        missing, extra = sorted(set(classnames) - set(names)), sorted(set(names) - set(classnames))
        fail(f"--eval-dir {args.eval_dir} has {len(names)} class folders, --train-dir "
             f"{len(classnames)}; {len(missing)} missing (first: {missing[0] if missing else '-'}), "
             f"{len(extra)} not in the training set (first: {extra[0] if extra else '-'}); "
             f"expected the training classes' validation folder", cli.USAGE)
    if not args.eval_dir and classnames != list(open_clip.IMAGENET_CLASSNAMES):
        fail(f"--eval-every-epoch scores ImageNet's 1000 classes under --data-location, "
             f"but --train-dir has {len(classnames)} other classes; "
             f"expected --eval-dir with a validation folder of them", cli.USAGE)
    return sets
