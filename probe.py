"""The linear probe for Model Stock*: the head fitted on frozen image features.

The head (W, b) is fitted by full-batch L-BFGS on mean cross-entropy + l2 * mean_k |w_k|^2,
from the zero-shot head, on L2-normalised features of every training image (evaluation
transform, no augmentation). At the optimum the mean row norm is at most (1 - p) / l2, p the
mean probability of the right class, whatever the number of classes: the penalty bounds the
head's scale. l2 is chosen on a fixed held-out tenth of the images (w0 must not depend on
--seed). Features are cached in --cache-dir in the precision the probe fits them in (fp32),
so a run with a warm cache builds the same w0 as a fresh one.

    report = probe.init_head(classifier, folder, preprocess, args, device)  # sets the head
"""
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
import data
import evaluate


@torch.no_grad()
def probe_features(classifier, folder, preprocess, args, device, bf16=False):
    """L2-normalised fp32 features of every training image (evaluation transform: no
    augmentation), and labels; computed once (under bf16 autocast if `bf16`) and cached in
    --cache-dir, keyed by model, weights, images and precision, exactly as the fit uses them."""
    files = "\n".join(f"{path}:{label}" for path, label in folder.samples)
    precision = "bf16" if bf16 else "fp32"
    key = f"{args.model}|{evaluate.weights_key(args.pretrained)}|{precision}|fp32 cache|{files}"
    cache = (Path(args.cache_dir).expanduser()
             / f"lp_features_{hashlib.sha1(key.encode()).hexdigest()[:16]}.safetensors")
    saved = evaluate.read_cache(cache, "the linear-probe features")
    if saved is not None:
        return saved["features"], saved["labels"]
    loader = torch.utils.data.DataLoader(data.SeededImages(folder, preprocess), batch_size=256,
                                         num_workers=args.workers, collate_fn=data.collate,
                                         sampler=[(i, 0) for i in range(len(folder))])
    feats, labels = [], []
    for images, y, unreadable in tqdm(loader, desc="linear probe: features"):
        data.check_readable(
            images, unreadable, args,
            lambda path, reason: tqdm.write(f"linear probe: skipped {path} ({reason})"))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            feats.append(F.normalize(classifier.model.visual(images.to(device)).float(),
                                     dim=-1).cpu())
        labels.append(y)
    features, labels = torch.cat(feats), torch.cat(labels)
    if args.pretrained:  # random weights (tests) are not worth caching
        evaluate.write_cache({"features": features, "labels": labels}, cache,
                             "the linear-probe features")
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
            part = F.cross_entropy(x[i:i + chunk] @ w.T + b, y[i:i + chunk],
                                   reduction="sum") / len(y)
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
    """Fits the head (W, b) on frozen features, starting from the zero-shot head, and
    returns a report.

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
    (x_held, y_held), (x_fit, y_fit) = [(x[part], y[part])
                                        for part in (order[:n_held], order[n_held:])]
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
            "zero_shot": {"heldout_accuracy": zero_shot_accuracy,
                          "row_norm": w0.norm(dim=1).mean().item()},
            "probe": {"heldout_accuracy": best["heldout_accuracy"],
                      "train_accuracy": _head_scores(w, b, x, y)[0],
                      "row_norm": w.norm(dim=1).mean().item()}}



def init_head(classifier, folder, preprocess, args, device):
    """Model Stock*'s w0: replaces the classifier's zero-shot head with the linear probe,
    prints the choice in one line and returns fit_linear_probe's report."""
    try:
        bf16 = device.type == "cuda" and not args.fp32
        report = fit_linear_probe(
            classifier, *probe_features(classifier, folder, preprocess, args, device, bf16))
    except ValueError as e:
        cli.fail("train.py", f"--init lp: {e}")
    zs, lp = report["zero_shot"], report["probe"]
    print(f"linear probe: l2 {report['l2']:g} chosen on "
          f"{report['heldout_images']} held-out images; "
          f"held-out accuracy {lp['heldout_accuracy']:.2f}% "
          f"(zero-shot head {zs['heldout_accuracy']:.2f}%), "
          f"mean row norm {lp['row_norm']:.1f} (zero-shot head {zs['row_norm']:.1f})")
    return report
