"""Fine-tune N CLIP classifiers in lockstep and merge them with Model Stock every epoch.

All N models start from the same pre-trained classifier w0 (image encoder + zero-shot or
linear-probe head), each with its own seed (data order, augmentation, mixup). Every step
runs one batch through every model; at every merge point all of them are overwritten with
model_stock.merge_models_ against w0 (paper §3 "Periodic merging", Fig. 7).

    python train.py --train-dir ~/data/imagenet/train --output-dir runs/stock   # Model Stock
    python train.py --recipe stock-star --train-dir ~/data/imagenet/train --output-dir runs/star
    python train.py --num-models 1 --merge-every never ...                      # vanilla FT
    torchrun --nproc_per_node=8 train.py --train-dir ... --output-dir ...       # more GPUs

The data (data.py), the linear probe (probe.py) and the output folder (run_folder.py: resume,
checkpoints, logs) sit behind one call each; this file is the method.
"""
import copy
import datetime
import functools
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import cli
import data
import evaluate
import model_stock
import probe
import run_folder
from run_folder import unwrap

fail = functools.partial(cli.fail, "train.py")

# Appendix G and §4.1; shared by both: AdamW, weight decay 0.1, batch 512, 500 warm-up steps.
# The paper names no flip; "stock-star" follows Model Soups' LP-init training, whose timm
# transform flips horizontally with p = 0.5.
RECIPES = {
    "stock": dict(lr=3e-5, epochs=10, crop_scale=(0.9, 1.0), flip=0.0, mixup=0.5, randaug=None,
                  init="zeroshot"),
    "stock-star": dict(lr=2e-5, epochs=16, crop_scale=(0.08, 1.0), flip=0.5, mixup=0.0,
                       randaug="rand-m10-n2", init="lp"),
}


def parse_args(argv=None):
    intro, _, examples = __doc__.split("\n\n")[:3]
    p = cli.Parser(prog="train.py", description=intro, epilog="examples:\n" + examples)
    add = p.add_argument
    add("--train-dir", default="~/data/imagenet/train",
        help="ImageFolder training set: one folder of images per class")
    add("--output-dir", required=True, help="checkpoints, w0, final model, log.jsonl, args.json")
    add("--recipe", choices=RECIPES, default="stock",
        help="paper's 'Model Stock' or 'Model Stock*'; flags below override it")
    add("--model", default="ViT-B-32-quickgelu",
        help="open_clip model name (paper: ViT-B/32, B/16, L/14) or a config .json")
    add("--pretrained", default="openai",
        help="open_clip pretrained tag or weights file; 'none' for random weights")
    add("--num-models", type=int, default=2,
        help="N fine-tuned in lockstep (paper: 2; Table 5: 2-4)")
    add("--merge-every", default="epoch",
        help="'epoch', a number of steps (Table 6: 1000, 5000), or 'never'")
    add("--reset-optimizer", action="store_true",
        help="clear AdamW's moments after every merge (the paper is silent; kept by default)")
    add("--init", choices=["zeroshot", "lp"],
        help="head: zero-shot text embeddings or a linear probe (recipe: stock / stock-star)")
    add("--lr", type=float, help="peak learning rate (recipe: 3e-5 / 2e-5)")
    add("--epochs", type=int, help="recipe: 10 / 16")
    add("--batch-size", type=int, default=512,
        help="global batch per model (paper: 512; 64 for ViT-L/14)")
    add("--accum-steps", type=int, default=1, help="gradient accumulation: same batch, less memory")
    add("--wd", type=float, default=0.1, help="AdamW weight decay, on every parameter (paper: 0.1)")
    add("--warmup", type=int, default=500, help="linear warm-up steps, then cosine decay to 0")
    add("--crop-scale", type=float, nargs=2,
        help="random-resized-crop scale (recipe: 0.9 1 / 0.08 1)")
    add("--flip", type=float, help="horizontal-flip probability, 0 = off (recipe: 0 / 0.5)")
    add("--mixup", type=float, help="mixup alpha, 0 = off (recipe: 0.5 / 0)")
    add("--randaug", help="timm RandAugment config, 'none' = off (recipe: none / rand-m10-n2)")
    add("--seed", type=int, default=0, help="model i uses seed + i")
    add("--workers", type=int, default=min(8, os.cpu_count() or 1),
        help="data loading processes per model")
    add("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    add("--save-every", type=int, default=0,
        help="also checkpoint every this many steps (0: at each epoch's end only)")
    add("--resume", action="store_true",
        help="continue the run in --output-dir (from step 0 if it has no checkpoint yet)")
    add("--overwrite", action="store_true",
        help="replace the run in --output-dir (once the new one has passed its checks)")
    add("--skip-bad-images", action="store_true", help="train past unreadable images (each is "
        "logged and replaced by the next readable one) instead of stopping at the first")
    add("--eval-every-epoch", action="store_true",
        help="evaluate the (merged) model after every epoch, on --eval-dir or --data-location")
    add("--data-location", default="~/data", help="evaluation datasets (see evaluate.py)")
    add("--eval-dir", help="an ImageFolder validation set with the training classes")
    add("--cache-dir", default="~/.cache/model_stock",
        help="zero-shot heads and linear-probe features")
    args = p.parse_args(argv)
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.randaug = None if args.randaug in (None, "none") else args.randaug
    run_folder.check_args(args, p.error)
    return args


# ---- The schedule and the lockstep step ----

def lr_at(step, base_lr, warmup, total):
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


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


def train_step(models, optimizers, micro_batches, lr, step, args, mixup=None, num_classes=None,
               bf16=False):
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
            torch.manual_seed(data.seed_of(args.seed + i, "step", step, a))  # dropout etc., if any
            sync = a == len(batches) - 1 or not hasattr(model, "no_sync")
            with (torch.enable_grad() if sync else model.no_sync()):
                seed = data.seed_of(args.seed + i, "mixup", step, a)
                loss = loss_of(model, images, labels, mixup, seed, num_classes, bf16)
                (loss / len(batches)).backward()
            total = total + loss.detach() / len(batches)  # on the device: no sync per micro-batch
        # The norm that clipping computes covers every gradient: a finite loss can still
        # overflow a gradient (large lr, bf16). One host sync per model and step.
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        values = torch.stack([total.float(), norm.float().to(total.device)])
        loss_value, norm_value = values.tolist()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"model {i} has a non-finite loss ({loss_value}) in step "
                                     f"{step + 1}")
        if not math.isfinite(norm_value):
            raise FloatingPointError(f"model {i} has a non-finite gradient norm ({norm_value}) in "
                                     f"step {step + 1}, loss {loss_value:.4g}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_value)
    return losses


# ---- The merge's log ----

def merge_summary(ts, w0, n):
    """Mean/min/max t over the encoder's matrices, over its vectors (biases, norms) and over
    the head (Appendix F); per-layer t and angle (degrees, from t: cos = t / (n - (n - 1) t),
    90 where t = 0, cos <= 0)."""
    groups = {"matrices": [], "vectors": [], "head": []}
    for key, t in ts.items():
        groups[group_of(key, w0[key])].append(t)
    summary = {g: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)}
               for g, v in groups.items() if v}
    angles = {k: math.degrees(math.acos(min(1.0, t / (n - (n - 1) * t)))) for k, t in ts.items()}
    return {"t_summary": summary, "t": ts, "angle": angles}


def group_of(key, v0):
    """The merge log's groups: the head, the encoder's matrices, its vectors (biases, norms)."""
    if key.startswith("classification_head."):
        return "head"
    return "matrices" if v0.ndim >= 2 else "vectors"


def evaluate_model(model, eval_sets, args, device, bf16, run):
    """--eval-every-epoch: top-1 of `model` on each set (and Avg. shifts), printed."""
    try:
        results = {s.name: evaluate.evaluate(model, s, workers=args.workers, device=device,
                                             bf16=bf16) for s in eval_sets}
    except ValueError as e:  # an unreadable evaluation image
        fail(f"--eval-every-epoch: {e}; {run.stopped()}; continue with --resume")
    model.train()
    scores = {name: r["top1"] for name, r in results.items()}
    scores["Avg. shifts"] = evaluate.avg_shifts(results)
    print(" ".join(f"{k}: {v:.2f}" for k, v in scores.items() if v is not None))
    return scores


def main(argv=None):
    args = parse_args(argv)
    # 1. Processes and devices: torchrun sets WORLD_SIZE; one process otherwise.
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:  # a long timeout: the other ranks wait while rank 0 evaluates or writes w0
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(hours=3))
    rank = dist.get_rank() if world > 1 else 0
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    bf16 = cuda and not args.fp32

    # 2. The run's folder decides a fresh start or a resume. Nothing is written (nor an old
    #    run removed) until every check below has passed.
    run = run_folder.RunFolder(args, rank, world)

    # 3. Data, and the batch arithmetic it must allow.
    folder, classnames = data.training_set(args.train_dir)
    train_set = data.fingerprint(folder)
    run.check_training_set(train_set)
    steps_per_epoch = data.steps_per_epoch(len(folder), args, world)
    if rank == 0:  # one line; every argument goes to args.json
        print(f"train.py: {args.num_models} x {args.model} on {world} x {device.type}, recipe "
              f"{args.recipe}, {'resuming' if run.resume else 'writing'} {args.output_dir}")
    total_steps = args.epochs * steps_per_epoch
    merge_period = int(args.merge_every) if args.merge_every.isdigit() else \
        {"epoch": steps_per_epoch, "never": None}[args.merge_every]
    state = run.read_checkpoint(total_steps)

    # 4. w0: the whole initial classifier (encoder + zero-shot or linear-probe head), the merge
    #    anchor. Rank 0 builds and saves it (unless the run being resumed has it); every rank
    #    then loads that file, so all hold one w0. The others build only the architecture.
    torch.manual_seed(0)  # random weights (--pretrained none): one w0 in every run, whatever --seed
    build = rank == 0 and not run.has_w0()
    try:
        classifier, preprocess = evaluate.build_classifier(
            args.model, args.pretrained, classnames, cache_dir=args.cache_dir, device=device,
            zero_shot=build, load_weights=build)
    except ValueError as error:  # weights that cannot be downloaded or do not fit the model
        fail(error)
    run.check_models(classifier, state)
    transform = data.train_transform(classifier, args)
    eval_sets = data.eval_sets(args, preprocess, classnames) if rank == 0 else []
    run.claim(train_set)
    if build:
        if args.init == "lp":
            report = probe.init_head(classifier, folder, preprocess, args, device)
            run.log({"event": "linear_probe", "step": 0, **report})
        run.save_w0(classifier)
    w0 = run.load_w0(classifier)  # on the device: merges never leave it

    # 5. N models and optimizers (AdamW on every parameter), one shared schedule.
    models = [copy.deepcopy(classifier).train() for _ in range(args.num_models)]
    if world > 1:
        ids = [device.index] if cuda else None
        models = [torch.nn.parallel.DistributedDataParallel(m, device_ids=ids) for m in models]
    # foreach: each update op runs once over all tensors (torch's default on a GPU; on a CPU it
    # is not, and the per-tensor loop costs 6.3 ms a step against 3.9 for the demo's tower).
    optimizers = [torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=args.wd, foreach=True)
                  for m in models]
    step, epoch_losses = run.restore(state, models, optimizers, total_steps)
    del state, classifier
    from timm.data import Mixup
    mixup = Mixup(mixup_alpha=args.mixup, label_smoothing=0.0, num_classes=len(classnames)) \
        if args.mixup > 0 else None
    loaders, samplers = data.loaders(folder, transform, args, steps_per_epoch, rank, world, cuda)

    # 6. Epochs of lockstep steps: merge, checkpoint and evaluate at their points.
    while step < total_steps:
        epoch, start = divmod(step, steps_per_epoch)
        for sampler in samplers:
            sampler.epoch, sampler.start = epoch, start
        batches = [iter(loader) for loader in loaders]
        losses, seen, t_epoch = epoch_losses if start else [], 0, time.perf_counter()
        bar = tqdm(range(start, steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=rank != 0)
        for _ in bar:
            skipped = []  # --skip-bad-images: (model, path, reason) of each unreadable image
            micro = data.next_micro_batches(batches, args, device, skipped)
            lr = lr_at(step, args.lr, args.warmup, total_steps)
            try:
                losses.append(train_step(models, optimizers, micro, lr, step, args, mixup,
                                         len(classnames), bf16))
            except FloatingPointError as e:
                fail(f"{e}; {run.stopped()}; expected finite values (a lower --lr or --fp32 "
                     f"usually avoids this)")
            step += 1
            seen += args.batch_size
            bar.set_postfix({f"loss (model {', '.join(map(str, range(args.num_models)))})":
                             " ".join(f"{x:.3f}" for x in losses[-1]),
                             "images/s": f"{seen / (time.perf_counter() - t_epoch):.0f}"})
            run.log_skipped(skipped, step)
            # Merge every merge_period steps, and always after the last step.
            if merge_period and (step % merge_period == 0 or step == total_steps):
                try:
                    ts = model_stock.merge_models_([unwrap(m) for m in models], w0)
                except ValueError as e:  # a NaN that got past the step's check
                    fail(f"the merge after step {step} failed: {e}; {run.stopped()}")
                if args.reset_optimizer:
                    for opt in optimizers:
                        opt.state.clear()
                run.log({"event": "merge", "step": step, "epoch": step / steps_per_epoch,
                         **merge_summary(ts, w0, args.num_models)})
            if args.save_every and step % args.save_every == 0 and step % steps_per_epoch:
                run.save(step, models, optimizers, losses)
        record = {"event": "epoch", "step": step, "epoch": step // steps_per_epoch, "lr": lr,
                  "loss": [sum(x[i] for x in losses) / len(losses) for i in range(args.num_models)],
                  "images_per_s_per_model": round(seen / (time.perf_counter() - t_epoch), 1)}
        if eval_sets:
            record["eval"] = evaluate_model(unwrap(models[0]), eval_sets, args, device, bf16, run)
        run.log(record)
        run.save(step, models, optimizers, [])

    # 7. The result: the last merge; or each model, for a post-hoc merge (Table 7) or vanilla FT.
    run.write_results(models, merged=bool(merge_period))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":  # checkpoints are written atomically: after Ctrl-C the last one is whole
    cli.run(main, "train.py: interrupted; rerun the same command with --resume to continue "
                  "from the last checkpoint")
