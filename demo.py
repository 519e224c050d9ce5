"""The paper in miniature: a tiny CLIP, a procedural image world, Model Stock on a laptop CPU.

A tiny open_clip CLIP is pre-trained contrastively on captioned shapes from five domains
(photo, fresh photo re-samples, sketches, paintings, hard cluttered photos), then fine-tuned
on photos only with train.py's own loop and scored on every domain with evaluate.py's code:
zero-shot, vanilla fine-tuning, a uniform average, Model Stock after and during training,
and WiSE-FT, as the rows of the paper's Table 2.

    python demo.py              # about 5 minutes on 2 CPU cores the first time, under 3 after that
    python demo.py --quick      # the mechanics in under a minute
    python demo.py --seed 1 --output demo_seed1.json
    python demo.py --summarize demo_seed*.json     # mean and spread over seeds
"""
import argparse
import contextlib
import hashlib
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import evaluate
import merge_checkpoints
import model_stock
import train

# ---- 1. The world: 10 shapes x 8 colours, rendered at 4x and downsampled to 32 px ----

SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon", "arrow", "crescent"]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 190), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (25, 25, 25)}
# In-distribution "photo" (the ImageNet analogue) and the four shifts, named as in the paper.
DOMAINS = {"photo": "ImageNet", "resampled": "ImageNet-V2", "sketch": "ImageNet-Sketch",
           "painting": "ImageNet-R", "hard": "ImageNet-A"}
SIZE, SCALE = 32, 4
WORLD_VERSION = 2  # bump when rendering changes: cached pre-trained models are keyed on it


def outline(shape, cx, cy, r, rot):
    """Polygon points of a shape (None for the round ones)."""
    def regular(n, offset=0.0):
        return [(cx + r * math.cos(rot + offset + 2 * math.pi * k / n),
                 cy + r * math.sin(rot + offset + 2 * math.pi * k / n)) for k in range(n)]
    if shape in ("square", "triangle", "hexagon"):
        return regular({"square": 4, "triangle": 3, "hexagon": 6}[shape], math.pi / 4 if shape == "square" else 0)
    if shape == "diamond":
        return [(cx + (x - cx) * (0.55 if k % 2 == 0 else 1), y) for k, (x, y) in enumerate(regular(4))]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(rot + math.pi * k / 5),
                 cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(rot + math.pi * k / 5)) for k in range(10)]
    w = 0.35 * r
    points = {"cross": [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)],
              "arrow": [(-r, -0.3 * r), (0.2 * r, -0.3 * r), (0.2 * r, -0.75 * r), (r, 0), (0.2 * r, 0.75 * r),
                        (0.2 * r, 0.3 * r), (-r, 0.3 * r)]}.get(shape)
    if points is None:
        return None
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def draw(canvas, shape, cx, cy, r, rot, fill, background, line=None, width=0):
    """Draws one shape; round shapes are ellipses (the crescent cut by a background disc)."""
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "ring":
        canvas.ellipse(box, outline=fill or line, width=max(int(0.35 * r), width))
        if line and not fill:  # a line drawing of a ring: two circles
            canvas.ellipse([cx - 0.6 * r, cy - 0.6 * r, cx + 0.6 * r, cy + 0.6 * r], outline=line, width=width)
    elif shape in ("circle", "crescent"):
        canvas.ellipse(box, fill=fill, outline=line, width=width)
        if shape == "crescent":
            ox, oy, q = cx + 0.5 * r * math.cos(rot), cy + 0.5 * r * math.sin(rot), 0.85 * r
            canvas.ellipse([ox - q, oy - q, ox + q, oy + q], fill=background)
    else:
        canvas.polygon(outline(shape, cx, cy, r, rot), fill=fill, outline=line, width=width)


def render(rng, domain):
    """One 32x32 RGB image (uint8 array), its class index and its colour word."""
    label = int(rng.integers(len(SHAPES)))
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    fill = COLOURS[colour]
    n = SIZE * SCALE
    if domain == "sketch":
        background, colour = (250, 250, 250), "black"
    elif domain == "painting":
        background = tuple(int(v) for v in rng.integers(150, 256, 3))
    else:
        while True:  # the object stands out from its background
            background = tuple(int(v) for v in rng.integers(0, 256, 3))
            if sum(abs(a - b) for a, b in zip(background, fill)) > 150:
                break
    image = Image.new("RGB", (n, n), background)
    canvas = ImageDraw.Draw(image)
    r = n * (rng.uniform(0.16, 0.24) if domain == "hard" else rng.uniform(0.22, 0.42))
    cx, cy = rng.uniform(r, n - r, 2)
    rot = rng.uniform(0, 2 * math.pi)
    if domain == "hard":  # clutter: small distractors, then an occluding bar after the object
        for _ in range(int(rng.integers(2, 5))):
            q = n * rng.uniform(0.04, 0.08)
            draw(canvas, SHAPES[rng.integers(len(SHAPES))], *rng.uniform(q, n - q, 2), q, rng.uniform(0, 6.3),
                 tuple(int(v) for v in rng.integers(0, 256, 3)), background)
    if domain == "sketch":
        draw(canvas, SHAPES[label], cx, cy, r, rot, None, background, line=(20, 20, 20), width=2 * SCALE)
    elif domain == "painting":  # stripes, then a patterned shape with a thick black outline
        for x in range(-n, n, 4 * SCALE):
            canvas.line([(x, 0), (x + n, n)], fill=tuple(max(0, v - 40) for v in background), width=SCALE)
        draw(canvas, SHAPES[label], cx, cy, r, rot, fill, background, line=(0, 0, 0), width=3 * SCALE)
    else:
        draw(canvas, SHAPES[label], cx, cy, r, rot, fill, background)
        if domain == "hard":
            x = rng.uniform(0, n)
            canvas.rectangle([x, 0, x + 0.08 * n, n], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(image.resize((SIZE, SIZE), Image.BILINEAR)).astype(np.float32)
    if domain in ("photo", "resampled", "hard"):  # camera noise; re-samples are a little noisier
        pixels += rng.normal(0, 16 if domain == "resampled" else 12, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8), label, colour


def write_folder(root, domain, count, seed):
    """count images of one domain as an ImageFolder tree (one folder per shape)."""
    rng = np.random.default_rng([seed, list(DOMAINS).index(domain), count])
    for shape in SHAPES:
        (root / shape).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels, label, _ = render(rng, domain)
        Image.fromarray(pixels).save(root / SHAPES[label] / f"{i:05d}.png")
    return root


# ---- 2. Pre-training: the CLIP analogue, cached ----

def clip_config(path):
    """A tiny ResNet CLIP; a CNN learns shapes at 32 px far faster than a ViT of its size."""
    config = {"embed_dim": 64, "quick_gelu": True,
              "vision_cfg": {"image_size": SIZE, "layers": [1, 1, 1, 1], "width": 32, "head_width": 32},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
    path.write_text(json.dumps(config, indent=1))
    open_clip.add_model_config(path)
    return path


# Words that tie OpenAI's ImageNet templates to each domain: captions name domain, colour, class.
DOMAIN_WORDS = {"photo": ["photo"], "resampled": ["photo"], "sketch": ["sketch", "drawing"],
                "painting": ["painting", "art", "rendition", "cartoon"],
                "hard": ["small", "cropped", "low resolution", "blurry", "jpeg"]}


def captioned_batch(rng, size, tokenizer, mean, std):
    """Images from every domain, each captioned by one of OpenAI's 80 ImageNet templates that
    names its domain, with the shape's name; half of the captions name its colour too."""
    templates = {d: [t for t in open_clip.OPENAI_IMAGENET_TEMPLATES if any(w in t("x") for w in words)]
                 for d, words in DOMAIN_WORDS.items()}
    images, captions = [], []
    for _ in range(size):
        domain = list(DOMAINS)[rng.integers(len(DOMAINS))]
        pixels, label, colour = render(rng, domain)
        name = f"{colour} {SHAPES[label]}" if rng.random() < 0.5 else SHAPES[label]
        images.append(pixels)
        captions.append(templates[domain][rng.integers(len(templates[domain]))](name))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float)
    return x, tokenizer(captions), same / same.sum(1, keepdim=True)


def pretrain(config, cache_dir, steps, batch_size=256, lr=2e-3, pool=120):
    """Contrastive pre-training; returns the weights file (reused if cached).

    The loss is CLIP's, except that images sharing one caption are all positives for it:
    with a few hundred distinct captions, a batch holds many duplicates."""
    key = hashlib.sha1(f"{WORLD_VERSION}|{config.read_text()}|{steps}|{batch_size}|{lr}|{pool}".encode()).hexdigest()[:12]
    weights = Path(cache_dir) / f"pretrained_{key}.safetensors"
    if weights.exists():
        print(f"pre-trained tiny CLIP: {weights} (cached; delete it to pre-train again)")
        return weights
    torch.manual_seed(0)
    model = open_clip.create_model(config.stem, pretrained=None)
    tokenizer = open_clip.get_tokenizer(config.stem)
    cfg = model.visual.preprocess_cfg
    rng = np.random.default_rng(0)
    batches = [captioned_batch(rng, batch_size, tokenizer, cfg["mean"], cfg["std"])
               for _ in tqdm(range(min(steps, pool)), desc="pre-training: rendering")]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    model.train()
    for step in tqdm(range(steps), desc="pre-training the tiny CLIP"):
        for group in opt.param_groups:
            group["lr"] = train.lr_at(step, lr, steps // 10, steps)
        x, text, target = batches[step % len(batches)]
        image_f = F.normalize(model.encode_image(x), dim=-1)
        text_f = F.normalize(model.encode_text(text), dim=-1)
        logits = model.logit_scale.exp() * image_f @ text_f.T
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights.parent.mkdir(parents=True, exist_ok=True)
    merge_checkpoints.save_state_dict(model.state_dict(), weights)
    print(f"pre-trained tiny CLIP saved to {weights}")
    return weights


# ---- 3. Fine-tuning with train.py, scoring with evaluate.py ----

def finetune(run_dir, data, config, weights, cache_dir, args, extra):
    """train.main on the photo training set, its chatter kept out of the demo's output."""
    argv = ["--train-dir", str(data / "train"), "--output-dir", str(run_dir), "--model", str(config),
            "--pretrained", str(weights), "--lr", str(args.lr), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--workers", "0",
            "--cache-dir", str(cache_dir), "--seed", str(args.seed * 100), "--mixup", str(args.mixup), "--overwrite", *extra]
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(argv)
    return run_dir


def flat(state):
    return torch.cat([v.flatten().double() for v in state.values() if v.is_floating_point()])


def observation_1(w0, fts):
    """Per layer: mean and std over pairs of the angle between task vectors, and of |d_i|."""
    rows = {}
    for key, v0 in w0.items():
        if not v0.is_floating_point() or v0.numel() < 2:
            continue
        d = torch.stack([(f[key] - v0).flatten().double() for f in fts])
        norms = d.norm(dim=1)
        i, j = torch.triu_indices(len(fts), len(fts), 1)
        angles = torch.rad2deg(torch.arccos(((d[i] * d[j]).sum(1) / (norms[i] * norms[j])).clamp(-1, 1)))
        rows[key] = {"angle_mean": angles.mean().item(), "angle_std": angles.std().item(),
                     "norm_mean": norms.mean().item(), "norm_std": norms.std().item(), "matrix": v0.ndim >= 2}
    return rows


def plot(record, path):
    """ImageNet vs Avg. shifts per row (the paper's Fig. 1) and per-layer t of the last merge
    (Appendix F), if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("pip install matplotlib for the plots; every figure is in the JSON")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in record["results"].items():
        left.scatter(r["ImageNet"], r["Avg. shifts"], label=name)
    left.set(xlabel="in-distribution top-1 (%)", ylabel="Avg. shifts top-1 (%)", title="rows of the table")
    left.legend(fontsize=7)
    ts = record["last_merge"]["t"]
    ndim = {k: v["matrix"] for k, v in record["observation_1"].items()}
    keys = [k for k in ts if k in ndim]
    right.bar(range(len(keys)), [ts[k] for k in keys], color=["tab:red" if ndim[k] else "tab:blue" for k in keys])
    right.set(xlabel="tensor (state-dict order)", ylabel="t", title="t of the last merge: matrices red, vectors blue")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved the plots to {path}")


def summarize(paths):
    """Mean and spread (std over runs) of every row and column of several demo JSON files."""
    runs = [json.loads(Path(p).read_text())["results"] for p in paths]
    columns = list(DOMAINS.values()) + ["Avg. shifts", "distance to center"]
    print(f"{len(runs)} runs: mean ± std\n| row | cost | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for row in runs[0]:
        cells = [np.array([r[row][c] for r in runs]) for c in columns]
        print(f"| {row} | {runs[0][row]['cost']} | " + " | ".join(f"{v.mean():.1f} ± {v.std():.1f}" for v in cells) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--summarize", nargs="+", metavar="JSON", help="print mean ± std over finished runs' JSON files, then stop")
    p.add_argument("--quick", action="store_true", help="a reduced run that shows the mechanics in under a minute")
    p.add_argument("--seed", type=int, default=0, help="seeds the test sets and the fine-tunes (not the pre-training)")
    p.add_argument("--cache-dir", default="~/.cache/model_stock/demo", help="the pre-trained tiny CLIP lives here")
    p.add_argument("--work-dir", default=None, help="images and runs (default: a folder under --cache-dir)")
    p.add_argument("--output", default="demo.json", help="every figure, as JSON; plots go beside it")
    p.add_argument("--models", type=int, default=5, help="independent fine-tunes for Observation 1 and the center")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning; like train.py's flags, the same for every row")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--mixup", type=float, default=0.0, help="train.py's --mixup (the paper's recipe: 0.5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args(argv)
    if args.summarize:
        return summarize(args.summarize)
    if args.quick:
        args.models, args.epochs = 3, 1
    pretrain_steps, train_images, test_images = (40, 256, 100) if args.quick else (500, 2000, 600)
    start = time.perf_counter()
    cache = Path(args.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or cache / f"work_seed{args.seed}{'_quick' if args.quick else ''}")

    # 1. The CLIP analogue and the world's folders.
    config = clip_config(cache / "model-stock-demo-clip.json")
    weights = pretrain(config, cache, pretrain_steps)
    print("rendering the world: photo training set and five test domains")
    write_folder(work / "data" / "train", "photo", train_images, 1000 + args.seed)
    tests = {d: write_folder(work / "data" / d, d, test_images, args.seed) for d in DOMAINS}

    # 2. Fine-tunes on photos: independent ones (vanilla FT, averages, post-hoc merge, the
    #    center) and one Model Stock run with periodic merging (N = 2, every epoch).
    print(f"fine-tuning {args.models} independent models and one Model Stock pair (train.py)")
    t0 = time.perf_counter()
    ind = finetune(work / "independent", work / "data", config, weights, cache, args,
                   ["--num-models", str(args.models), "--merge-every", "never"])
    stock = finetune(work / "stock", work / "data", config, weights, cache, args,
                     ["--num-models", "2", "--merge-every", "epoch"])
    finetune_s = time.perf_counter() - t0
    w0 = merge_checkpoints.load_state_dict(ind / "w0.safetensors")
    fts = [merge_checkpoints.load_state_dict(ind / f"model_{i}.safetensors") for i in range(args.models)]

    # 3. The rows of the table, each a state dict of the same classifier.
    posthoc, _ = model_stock.merge(w0, fts[:2])
    rows = {"zero-shot": w0, "vanilla FT": fts[0],
            "uniform average (2 FT)": {k: (a + b) / 2 if a.is_floating_point() else a
                                       for (k, a), b in zip(fts[0].items(), fts[1].values())},
            "Model Stock, post-training": posthoc,
            "Model Stock, periodic": merge_checkpoints.load_state_dict(stock / "final.safetensors"),
            "WiSE-FT (alpha 0.5)": evaluate.wise_ft(w0, fts[0], 0.5)}
    costs = {"zero-shot": 0, "vanilla FT": 1, "uniform average (2 FT)": 2, "Model Stock, post-training": 2,
             "Model Stock, periodic": 2, "WiSE-FT (alpha 0.5)": 1}

    # 4. Scores with evaluate.py: the zero-shot classifier's code path, one EvalSet per domain.
    classifier, preprocess = evaluate.build_classifier(config.stem, str(weights), SHAPES, cache_dir=cache)
    eval_sets = [evaluate.image_folder(tests[d], preprocess)._replace(name=DOMAINS[d]) for d in DOMAINS]
    results = {}
    for name, state in rows.items():
        evaluate.load_checkpoint(classifier, state)
        scores = {s.name: evaluate.evaluate(classifier, s)["top1"] for s in eval_sets}
        shifts = [v for k, v in scores.items() if k != "ImageNet"]
        results[name] = {**scores, "Avg. shifts": sum(shifts) / len(shifts), "cost": costs[name]}

    # 5. Geometry: Observation 1 across the independent fine-tunes, distance to a center
    #    estimated from the fine-tunes not used by any row, and the last periodic merge's t.
    obs = observation_1(w0, fts)
    held_out = fts[2:] if len(fts) > 3 else fts
    center = torch.stack([flat(f) for f in held_out]).mean(0)
    for name, state in rows.items():
        results[name]["distance to center"] = (flat(state) - center).norm().item()
    last_merge = [json.loads(line) for line in (stock / "log.jsonl").read_text().splitlines()
                  if json.loads(line)["event"] == "merge"][-1]

    # 6. The report.
    print(f"\n{'':28}{'cost':>5}" + "".join(f"{n:>17}" for n in list(DOMAINS.values()) + ["Avg. shifts", "|w - center|"]))
    for name, r in results.items():
        cells = [r[n] for n in DOMAINS.values()] + [r["Avg. shifts"], r["distance to center"]]
        print(f"{name:28}{r['cost']:>5}" + "".join(f"{c:>17.2f}" for c in cells))
    for kind, matrix in (("matrices", True), ("vectors (biases, norms)", False)):
        sel = [v for v in obs.values() if v["matrix"] == matrix]
        print(f"Observation 1, {len(sel)} {kind}: angle {np.mean([v['angle_mean'] for v in sel]):.1f} deg "
              f"(std across pairs {np.mean([v['angle_std'] for v in sel]):.2f}), |d| std/mean "
              f"{np.mean([v['norm_std'] / max(v['norm_mean'], 1e-12) for v in sel]):.3f}")
    summary = last_merge["t_summary"]
    print("t of the last periodic merge: " + ", ".join(f"{g} {v['mean']:.3f} (min {v['min']:.3f})" for g, v in summary.items()))
    print(f"center estimated from {len(held_out)} fine-tunes; fine-tuning took {finetune_s:.0f} s; "
          f"total {time.perf_counter() - start:.0f} s")
    record = {"results": results, "observation_1": obs, "last_merge": last_merge, "args": vars(args),
              "pretrained": str(weights), "seconds": time.perf_counter() - start, "code_version": evaluate.code_version()}
    Path(args.output).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.output}")
    plot(record, Path(args.output).with_suffix(".png"))
    return record


if __name__ == "__main__":
    main()
