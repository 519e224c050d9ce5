"""The output folder of a train.py run: how a run starts, resumes, is replaced, checkpoints, logs.

What --output-dir holds:
    args.json          the resolved arguments, the training set's fingerprint, the code version
    w0.safetensors     the merge anchor: the whole initial classifier (encoder + head)
    log.jsonl          one JSON record per line: epoch, merge, linear_probe, unreadable_image
    checkpoint.pt      every model and optimizer and the step, at each epoch (and --save-every)
    final.safetensors  the last merge; with --merge-every never, model_<i>.safetensors instead

What it guarantees:
- Nothing is written, and no old run removed, until every check of the command has passed:
  RunFolder() only reads; claim() is the first write.
- A run is continued only with --resume, with the same arguments (but MAY_CHANGE_ON_RESUME)
  and the same training images; replaced only with --overwrite; a folder holding files that
  train.py did not write is used only with --overwrite, which removes the run's own files and
  leaves the others.
- Every file is written whole or not at all (a temporary name, then a rename): after a kill
  at any point, --resume ends with the weights of an uninterrupted run, bit for bit.
- A checkpoint with NaN or inf weights is never written over a good one.

    run = run_folder.RunFolder(args)     # reads the folder: a fresh start or a resume
    run.claim(train_set)                 # once every check passed: the first write
    run.save(step, models, optimizers, losses); run.log({"event": "epoch", ...})
"""
import functools
import json
import math
import re
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import cli
import evaluate
import merge_checkpoints

fail = functools.partial(cli.fail, "train.py")

# Flags that do not change the trained weights, so a resumed run may differ in them.
# --skip-bad-images may be added: a run stops at the first unreadable image, before training on it.
MAY_CHANGE_ON_RESUME = {"resume", "overwrite", "workers", "save_every", "eval_every_epoch",
                        "data_location", "eval_dir", "cache_dir", "output_dir", "skip_bad_images"}


def unwrap(model):
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def all_finite(models):
    """True if every weight of every model is finite (one host sync)."""
    return bool(torch.stack([torch.isfinite(p).all()
                             for m in models for p in m.parameters()]).all())


class RunFolder:
    """One run's --output-dir, on every process: rank 0 reads and writes, the others follow."""

    def __init__(self, args, rank=0, world=1):
        self.args, self.rank, self.out = args, rank, Path(args.output_dir)
        plan = [plan_output(args, self.out) if rank == 0 else None]
        if world > 1:
            dist.broadcast_object_list(plan)  # every rank resumes, or none
        self.resume, self.has_checkpoint, self.saved = (
            plan[0]["resume"], plan[0]["checkpoint"], plan[0]["saved"])
        self.barrier = dist.barrier if world > 1 else (lambda: None)
        self.log_lines = []  # a resumed run's log, up to its checkpoint
        self.last_good = None  # (checkpoint, its step), once one holds this run

    # ---- before anything is written ----

    def check_training_set(self, train_set):
        """A resumed run must see the images it started with."""
        before = (self.saved or {}).get("train_set", train_set) if self.resume else train_set
        if before != train_set:
            fail(f"--resume with a different training set in {self.args.train_dir} "
                 f"({before.get('images')} images in {before.get('classes')} classes in the run, "
                 f"{train_set['images']} in {train_set['classes']} now, or other files); "
                 f"expected the images the run started with", cli.USAGE)

    def read_checkpoint(self, total_steps):
        """The checkpoint to resume (on the CPU), or None; keeps the log lines it covers."""
        state = (read_run_checkpoint(self.out / "checkpoint.pt", self.args, total_steps)
                 if self.has_checkpoint else None)
        if self.resume and self.rank == 0:
            self.log_lines = kept_log(self.out / "log.jsonl", state["step"] if state else 0)
        return state

    def has_w0(self):
        """Whether a resumed run brings its own w0 (else rank 0 builds it)."""
        return self.resume and (self.out / "w0.safetensors").exists()

    def check_models(self, classifier, state):
        """The checkpoint holds classifiers of this architecture, and the run's own w0 loads."""
        problem = state and evaluate.state_dict_mismatch(classifier.state_dict(),
                                                         state["models"][0])
        if problem:
            fail(f"{self.out / 'checkpoint.pt'} does not hold classifiers of this run's "
                 f"{self.args.model}: {problem}")
        if self.has_w0():
            try:
                evaluate.load_checkpoint(classifier, self.out / "w0.safetensors")
            except ValueError as error:
                fail(f"{error}; restore it, or pass --overwrite to start afresh")

    # ---- writing ----

    def claim(self, train_set):
        """Rank 0, once every check has passed: removes an old run (--overwrite, or a launch
        that never checkpointed) and stale temporary files, then writes args.json or the kept
        log."""
        out = self.out
        if self.rank != 0:
            return
        try:
            out.mkdir(parents=True, exist_ok=True)
            for path in out.iterdir():
                if is_temporary(path.name) or (not self.resume and is_run_file(path.name)):
                    path.unlink()
            if self.resume:
                text = "".join(line + "\n" for line in self.log_lines)
                merge_checkpoints.write_atomically(out / "log.jsonl", lambda f: f.write_text(text))
            else:
                record = {**vars(self.args), "train_set": train_set,
                          "code_version": evaluate.code_version()}
                merge_checkpoints.write_atomically(
                    out / "args.json", lambda f: f.write_text(json.dumps(record, indent=2)))
        except OSError as error:
            fail(f"--output-dir {out}: cannot write there ({error.strerror}); "
                 f"expected a writable folder")

    def log(self, record):
        """Appends one record to log.jsonl (rank 0)."""
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def log_skipped(self, skipped, step):
        """--skip-bad-images: each unreadable image, where it was replaced."""
        for i, path, reason in skipped:
            tqdm.write(f"model {i}, step {step}: skipped unreadable {path} ({reason})")
            self.log({"event": "unreadable_image", "step": step, "model": i, "file": path,
                      "error": reason})

    def save_w0(self, classifier):
        merge_checkpoints.save_state_dict(classifier.state_dict(), self.out / "w0.safetensors")

    def load_w0(self, classifier):
        """Every rank loads the one w0 that rank 0 wrote; returns it as a state dict on the
        classifier's device (merges never leave it)."""
        self.barrier()
        classifier.load_state_dict(evaluate.read_checkpoint(self.out / "w0.safetensors"))
        return {k: v.detach().clone() for k, v in classifier.state_dict().items()}

    def restore(self, state, models, optimizers, total_steps):
        """Loads a checkpoint into the models and optimizers; returns (step, this epoch's
        losses)."""
        if state is None:
            if self.resume:
                print(f"resumed {self.out} at step 0 (it had no checkpoint yet), with its w0")
            return 0, []
        for model, opt, model_state, opt_state in zip(models, optimizers, state["models"],
                                                      state["optimizers"]):
            unwrap(model).load_state_dict(model_state)
            opt.load_state_dict(opt_state)  # moves the moments to the parameters' device
        self.last_good = (self.out / "checkpoint.pt", state["step"])
        print(f"resumed {self.out} at step {state['step']} of {total_steps}")
        return state["step"], state["epoch_losses"]

    def stopped(self):
        """What a run that stops now keeps, in words."""
        if self.last_good is None:
            return "no checkpoint had been saved yet"
        path, step = self.last_good
        return (f"nothing after step {step} was saved: "
                f"the last good checkpoint is {path} (after step {step})")

    def save(self, step, models, optimizers, epoch_losses):
        """Checkpoints every model and optimizer at `step`, never over a good checkpoint with
        NaN or inf weights."""
        if not all_finite([unwrap(m) for m in models]):
            fail(f"a model holds NaN or inf weights after step {step}; {self.stopped()}")
        if self.rank == 0:
            record = {"step": step, "epoch_losses": epoch_losses,
                      "models": [unwrap(m).state_dict() for m in models],
                      "optimizers": [o.state_dict() for o in optimizers]}
            merge_checkpoints.write_atomically(self.out / "checkpoint.pt",
                                               lambda f: torch.save(record, f))
        self.barrier()
        self.last_good = (self.out / "checkpoint.pt", step)

    def write_results(self, models, merged):
        """Rank 0: the last merge as final.safetensors, or each model for a post-hoc merge."""
        if self.rank != 0:
            return
        out = self.out
        if merged:
            merge_checkpoints.save_state_dict(unwrap(models[0]).state_dict(),
                                              out / "final.safetensors")
            print(f"wrote {out / 'final.safetensors'} (Model Stock, N = {len(models)})")
            return
        names = [out / f"model_{i}.safetensors" for i in range(len(models))]
        for model, name in zip(models, names):
            merge_checkpoints.save_state_dict(unwrap(model).state_dict(), name)
        print(f"wrote {', '.join(map(str, names))}")
        if len(names) > 1:
            print(f"merge them: python {Path(merge_checkpoints.__file__).resolve()} "
                  f"{(out / 'w0.safetensors').resolve()} "
                  f"{' '.join(str(n.resolve()) for n in names)} "
                  f"-o {(out / 'merged.safetensors').resolve()}")


# ---- What a folder holds, and how a run starts ----

def check_args(args, error):
    """The flags' values, and the model and weights they name, checked before anything is
    built or written; `error(message)` ends the command (argparse's error: exit 2)."""
    minimum = {"--batch-size": (args.batch_size, 1), "--accum-steps": (args.accum_steps, 1),
               "--epochs": (args.epochs, 1), "--num-models": (args.num_models, 1),
               "--workers": (args.workers, 0), "--warmup": (args.warmup, 0),
               "--save-every": (args.save_every, 0)}
    for flag, (value, low) in minimum.items():
        if value < low:
            error(f"{flag} must be >= {low}, got {value}")
    if (not (math.isfinite(args.lr) and args.lr > 0)
            or not (math.isfinite(args.wd) and args.wd >= 0)):
        error(f"--lr must be > 0 and --wd >= 0 (finite), got {args.lr} and {args.wd}")
    if not (math.isfinite(args.mixup) and args.mixup >= 0):
        error(f"--mixup must be >= 0 (0 = off), got {args.mixup}")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        error(f"--crop-scale expects 0 < min <= max <= 1, "
              f"got {args.crop_scale[0]} {args.crop_scale[1]}")
    if not 0 <= args.flip <= 1:
        error(f"--flip is a probability between 0 and 1, got {args.flip}")
    if (args.merge_every not in ("epoch", "never")
            and not (args.merge_every.isdigit() and int(args.merge_every) > 0)):
        error(f"--merge-every must be 'epoch', 'never' or a positive number of steps, "
              f"got {args.merge_every!r}")
    if args.eval_dir and not args.eval_every_epoch:
        error(f"--eval-dir {args.eval_dir} is used by --eval-every-epoch; add it, or drop --eval-dir")
    if args.num_models == 1 and args.merge_every != "never":
        error("--num-models must be >= 2 to merge; "
              "vanilla fine-tuning is --num-models 1 --merge-every never")
    try:  # model names, config files and weights fail here, before anything is built or written
        args.model = evaluate.resolve_model(args.model)
        args.pretrained = evaluate.resolve_weights(args.model, args.pretrained)
    except ValueError as e:
        error(str(e))
    # Absolute paths: a resumed run is compared with the run it continues, from any folder.
    args.train_dir = str(Path(args.train_dir).expanduser().resolve())


def is_result(name):
    return (name in ("final.safetensors", "merged.safetensors")
            or re.fullmatch(r"model_\d+\.safetensors", name))


def is_temporary(name):
    """A temporary file left behind when killed mid-write (.checkpoint.pt.<pid>_<random>.tmp
    from merge_checkpoints' writers; checkpoint.pt.<pid>.tmp or checkpoint.pt.tmp from
    earlier versions)."""
    return re.fullmatch(r"\.?(args\.json|log\.jsonl|checkpoint\.pt|\w+\.safetensors)(\.\w+)?\.tmp",
                        name)


def is_run_file(name):
    return (name in ("args.json", "w0.safetensors", "log.jsonl", "checkpoint.pt")
            or is_result(name) or is_temporary(name))


def plan_output(args, out):
    """Reads what --output-dir holds and decides how the run starts (rank 0; writes nothing).

    Returns {"resume": continue the run in out, "checkpoint": from its checkpoint.pt (else from
    step 0, reusing its w0), "saved": its args.json}. A folder that holds no checkpoint and no
    result (a launch that failed a check, or was killed early) is reused without --overwrite.
    """
    fresh = {"resume": False, "checkpoint": False, "saved": None}
    problem = merge_checkpoints.unwritable_folder(f"--output-dir {out}", out)
    if problem:
        fail(problem, cli.USAGE)
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [n for n in names if not is_run_file(n)]
    if foreign and not args.overwrite:
        fail(f"--output-dir {out} holds files train.py did not write ({', '.join(foreign[:3])}); "
             f"expected a new or empty folder, or a run's folder", cli.USAGE)
    checkpoint, results = "checkpoint.pt" in names, [n for n in names if is_result(n)]
    if args.overwrite or not (args.resume or checkpoint or results):
        return fresh
    if not args.resume:
        fail(f"{out} already holds a run ({'checkpoint.pt' if checkpoint else results[0]}); "
             f"pass --resume to continue it, --overwrite to replace it", cli.USAGE)
    if results and not checkpoint:
        fail(f"{out} holds a finished run ({results[0]}) and no checkpoint.pt to continue from; "
             f"pass --overwrite to replace it", cli.USAGE)
    if "args.json" not in names:
        if checkpoint:
            fail(f"{out} has checkpoint.pt but no args.json, "
                 f"so --resume cannot check that it continues the same run; "
                 f"restore args.json, or pass --overwrite to start afresh")
        print(f"{out} holds no run yet: starting from step 0")
        return fresh
    try:
        saved = json.loads((out / "args.json").read_text())
    except (OSError, ValueError):
        fail(f"{out / 'args.json'} cannot be read as JSON; "
             f"restore it, or pass --overwrite to start afresh")
    for key, value in vars(args).items():
        if key not in MAY_CHANGE_ON_RESUME and saved.get(key) != json.loads(json.dumps(value)):
            fail(f"--resume with different --{key.replace('_', '-')} "
                 f"({saved.get(key)!r} in the run, {value!r} now)", cli.USAGE)
    return {"resume": True, "checkpoint": checkpoint, "saved": saved}


def read_run_checkpoint(path, args, total_steps):
    """The checkpoint to resume, loaded to the CPU (each rank; no second copy on the GPU) and
    checked against the run; its architecture is checked once the model is built."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated zip archive, a file of another kind
        fail(f"{path} is truncated or damaged ({evaluate.first_sentence(error)}); "
             f"delete it to resume from step 0, or pass --overwrite to start afresh")
    if (not isinstance(state, dict)
            or not {"step", "epoch_losses", "models", "optimizers"} <= state.keys()):
        fail(f"{path} is not a train.py checkpoint; "
             f"expected step, epoch_losses, models and optimizers")
    if (len(state["models"]) != args.num_models
            or len(state["optimizers"]) != args.num_models):
        fail(f"{path} holds {len(state['models'])} models, this run {args.num_models}: "
             f"it belongs to another run")
    if not 0 <= state["step"] <= total_steps:
        fail(f"{path} is at step {state['step']}, beyond this run's {total_steps} steps: "
             f"it belongs to another run")
    return state


def kept_log(path, step):
    """The lines of log.jsonl up to `step`, the checkpoint's; a last line torn by a kill is
    dropped."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if number < len(lines):
                fail(f"{path} line {number} is not JSON; expected one JSON record per line")
            # The last line, cut short by a kill while it was written. A record after the
            # checkpoint is written again when training passes its step; one the checkpoint
            # covers (a kill between the checkpoint and its log line) is not.
            torn = re.search(r'"step": (\d+)', line)
            lost = torn and int(torn.group(1)) <= step
            print(f"{path}: its last line was cut short by a kill and is dropped"
                  + (f"; its record (step {torn.group(1)}) is lost, "
                     f"the checkpoint being after it" if lost else ""))
            break
        if record.get("step", 0) <= step:
            kept.append(line)
    return kept

