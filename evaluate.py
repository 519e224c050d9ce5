"""Evaluate a CLIP image classifier on ImageNet and five distribution shifts (Model Soups protocol).

The classifier is an open_clip image encoder, L2-normalised features and a linear head:
    logits = W f(x) / |f(x)|,   zero-shot W = exp(logit_scale) * class text embeddings, bias 0,
scored top-1 on ImageNet, -V2, -Sketch, -R, ObjectNet and -A as the paper's Table 2 was.

    python evaluate.py --data-location ~/data                                 # zero-shot ViT-B/32
    python evaluate.py --checkpoint ft.safetensors --wise-ft 0,0.5,1 --data-location ~/data
    python evaluate.py --data-dir my_images/val --checkpoint merged.safetensors  # your own classes
    from evaluate import build_classifier, load_checkpoint, find_eval_sets, evaluate
"""
import argparse
import contextlib
import hashlib
import json
import logging
import os
import pkgutil
import re
import subprocess
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader
from tqdm import tqdm

import cli
import merge_checkpoints

# ---------------------------------------------------------------------------- the classifier


class ImageClassifier(torch.nn.Module):
    """CLIP image tower -> L2-normalised features -> linear head.

    State-dict keys are `model.visual.*` and `classification_head.*`, as in Model Soups'
    ModelWrapper, so checkpoints move between this code, Model Soups and Model Stock.
    """

    def __init__(self, visual, head_weight, arch=""):
        super().__init__()
        self.model = torch.nn.ModuleDict({"visual": visual})
        num_classes, dim = head_weight.shape
        self.classification_head = torch.nn.Linear(dim, num_classes)
        with torch.no_grad():
            self.classification_head.weight.copy_(head_weight)
            self.classification_head.bias.zero_()
        self.arch = arch  # for error messages only; not part of the state dict

    def forward(self, images):
        features = F.normalize(self.model.visual(images).float(), dim=-1)
        # The head runs in fp32 even under bf16 autocast: bf16 rounds logits of about 30
        # (cosine x logit scale 100) to steps of 0.125-0.25, enough to tie or swap close classes.
        with torch.autocast(features.device.type, enabled=False):
            return self.classification_head(features)


def zero_shot_head(clip, tokenizer, classnames, templates, device="cpu", cache=None):
    """(num_classes, dim) head: each class's unit-norm mean of unit-norm template embeddings,
    times exp(logit_scale) (100 for OpenAI weights); read from / written to the file `cache`.
    1000 classes x 80 templates = 80,000 text encodings: minutes on a GPU, hours on a CPU."""
    saved = read_cache(cache, "the zero-shot head")
    if saved is not None:
        return saved["weight"]
    print(f"building the zero-shot head: {len(classnames)} classes x {len(templates)} templates")
    embeddings = open_clip.build_zero_shot_classifier(
        clip, tokenizer, classnames, templates, device=device, use_tqdm=True)  # (dim, classes)
    head = clip.logit_scale.exp().item() * embeddings.T.float()
    if cache and write_cache({"weight": head}, cache, "the zero-shot head"):
        print(f"cached the zero-shot head in {cache}")
    return head


def read_cache(path, what):
    """The tensors cached in the file `path`, or None if there is none or it cannot be read:
    a cache only saves time, so a damaged one is rebuilt, not fatal."""
    if not path or not Path(path).exists():
        return None
    try:
        return load_file(path)
    except Exception as error:
        print(f"rebuilding {what}: cannot read {path} ({type(error).__name__})")
        return None


def write_cache(tensors, path, what):
    """Writes `tensors` to the cache file `path` (atomically: a kill leaves no half file);
    False, with one line saying so, if it cannot be written."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        merge_checkpoints.save_state_dict(tensors, path)
        return True
    except OSError as error:
        print(f"could not cache {what} in {path} ({error.strerror}); continuing")
        return False


def weights_key(pretrained):
    """The pretrained tag, or for a local weights file its path, size and mtime: a changed
    file is new weights for every cache keyed on it."""
    if pretrained and os.path.isfile(pretrained):
        stat = os.stat(pretrained)
        return f"{pretrained}:{stat.st_size}:{stat.st_mtime_ns}"
    return str(pretrained)


def _head_cache_file(cache_dir, model_name, pretrained, classnames, templates):
    """Cache file named by model and weights, hashed over everything the head depends on."""
    key = [model_name, weights_key(pretrained), *classnames, *(t("{}") if callable(t) else t for t in templates)]
    digest = hashlib.sha1("\n".join(key).encode()).hexdigest()[:12]
    tag = Path(pretrained).stem if os.path.isfile(pretrained) else pretrained
    name = re.sub(r"[^\w.-]", "_", f"head_{model_name}_{tag}_{digest}")  # hf-hub:org/name
    return Path(cache_dir) / f"{name}.safetensors"


def resolve_model(model_name):
    """An open_clip model name, or a config .json registered under its file name; ValueError
    naming what was expected when it is neither."""
    if model_name.endswith(".json"):
        path = Path(model_name).expanduser()
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not valid JSON"
            raise ValueError(f"--model {model_name}: cannot read it ({reason}); expected an open_clip "
                             f"model config .json") from None
        if not isinstance(config, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= config.keys():
            raise ValueError(f"--model {model_name}: expected an open_clip model config with "
                             f"embed_dim, vision_cfg and text_cfg")
        open_clip.add_model_config(path)
        return path.stem
    if model_name not in open_clip.list_models() and not model_name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"--model {model_name!r} is not an open_clip model name (e.g. ViT-B-32-quickgelu, "
                         f"ViT-B-16, ViT-L-14; open_clip.list_models() lists them) nor a config .json")
    return model_name


def resolve_weights(model_name, pretrained):
    """None for random weights ('none'), a local file as an absolute path, or a pretrained tag
    of model_name; ValueError naming the choices otherwise. Nothing is downloaded here."""
    if pretrained is None or pretrained.lower() == "none":
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path.resolve())
    if path.is_dir():
        raise ValueError(f"--pretrained {pretrained} is a folder; expected a weights file (.safetensors, .pt, "
                         f".pth) in it, a pretrained tag or 'none'")
    if path.exists() or os.sep in pretrained or path.suffix in (".pt", ".pth", ".bin", ".safetensors"):
        raise ValueError(f"--pretrained {pretrained}: no such file; expected a weights file, a pretrained "
                         f"tag or 'none'")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags and not model_name.startswith(("hf-hub:", "local-dir:")):
        known = f"its tags: {', '.join(tags)}" if tags else "it has no pretrained tags"
        raise ValueError(f"--pretrained {pretrained!r} is neither a weights file nor a pretrained tag of "
                         f"{model_name} ({known}); 'none' gives random weights")
    return pretrained


def first_sentence(error, limit=200):
    """An exception's gist for a one-line message: its first sentence, at most `limit` characters
    (a first line ending in ':' is joined to the next: "Error(s) in loading state_dict: ...")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    text = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    text = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


@torch.no_grad()
def _feature_dim(visual):
    """Width of the image features; open_clip's timm towers (its ConvNeXt CLIPs) do not store it."""
    if hasattr(visual, "output_dim"):
        return visual.output_dim
    size = visual.preprocess_cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    return visual(torch.zeros(1, 3, *size, device=next(visual.parameters()).device)).shape[-1]


def build_classifier(model_name="ViT-B-32-quickgelu", pretrained="openai", classnames=None, templates=None,
                     cache_dir="~/.cache/model_stock", device="cpu", zero_shot=True, load_weights=True):
    """(classifier, preprocess) for any open_clip model name and pretrained tag or weights file.

    The head is zero-shot from `classnames` x `templates` (ImageNet's 1000 names and the 80
    OpenAI templates by default) and cached in `cache_dir`; with zero_shot=False it is left
    at zero, a skeleton for load_checkpoint. pretrained=None gives random weights (tests);
    load_weights=False builds the architecture `pretrained` implies without loading (or
    downloading) anything: a skeleton for a checkpoint. Weights that cannot be loaded or
    downloaded are a one-line ValueError. `preprocess` is the evaluation transform;
    `classifier.model.visual.preprocess_cfg` holds its size, mean and std for training.
    """
    classnames = list(classnames or open_clip.IMAGENET_CLASSNAMES)
    templates = list(templates or open_clip.OPENAI_IMAGENET_TEMPLATES)
    # OpenAI weights were trained with QuickGELU; open_clip's plain `ViT-B-32` would only warn.
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
    quick_gelu = bool(tag_cfg.get("quick_gelu"))
    if quick_gelu and "quickgelu" not in model_name and load_weights:
        print(f"{model_name} with '{pretrained}' weights: using QuickGELU, as they were trained")
    logging.disable(logging.ERROR)  # open_clip logs what it then raises, and "initialized randomly"
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained if load_weights else None, device=device, force_quick_gelu=quick_gelu)
    except Exception as error:  # a failed download, or weights of another architecture
        reason = first_sentence(error)
        where = "a local weights file" if pretrained and os.path.isfile(pretrained) else f"the {pretrained!r} weights"
        raise ValueError(f"cannot build {model_name} with {where} ({type(error).__name__}: {reason}); expected "
                         f"open_clip CLIP weights of that model (a trained classifier goes to --checkpoint); "
                         f"offline, pass a local weights file") from None
    finally:
        logging.disable(logging.NOTSET)
    clip.eval()
    head = torch.zeros(len(classnames), _feature_dim(clip.visual))
    if zero_shot:
        # Random weights (pretrained=None) are not cached: the head would belong to another init.
        cache = pretrained and _head_cache_file(
            Path(cache_dir).expanduser(), model_name, pretrained, classnames, templates)
        tokenizer = open_clip.get_tokenizer(model_name)
        head = zero_shot_head(clip, tokenizer, classnames, templates, device, cache)
    # Only the image tower is kept; the text tower is freed with `clip`.
    return ImageClassifier(clip.visual, head.to(device), arch=model_name).to(device), preprocess


# ---------------------------------------------------------------------------- checkpoints


def read_checkpoint(path):
    """Classifier state dict from a .safetensors or .pt/.pth file (merge_checkpoints.load_state_dict:
    weights_only=True, a "state_dict" entry unwrapped, a "module." prefix stripped), without
    the text-tower tensors Model Soups checkpoints keep (model.token_embedding...)."""
    state_dict = merge_checkpoints.load_state_dict(path)
    return {k: v for k, v in state_dict.items()
            if not k.startswith("model.") or k.startswith("model.visual.")}


def state_dict_mismatch(expected, state_dict):
    """The first difference between two state dicts' keys and shapes, in words; None if none."""
    problem = next((f"key {k} is missing" for k in expected if k not in state_dict), None)
    problem = problem or next((f"{k} has shape {tuple(state_dict[k].shape)}, the model "
                               f"{tuple(v.shape)}" for k, v in expected.items()
                               if state_dict[k].shape != v.shape), None)
    return problem or next((f"unexpected key {k}" for k in state_dict if k not in expected), None)


def load_checkpoint(classifier, checkpoint, name=None):
    """Loads a checkpoint file or state dict into `classifier` (strict); returns classifier.

    A checkpoint of another architecture is a one-line ValueError naming the first mismatch
    (and the checkpoint: `name`, else its path or "state dict").
    """
    source = name or (checkpoint if isinstance(checkpoint, (str, Path)) else "state dict")
    state_dict = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    problem = state_dict_mismatch(classifier.state_dict(), state_dict)
    if problem:
        raise ValueError(f"{source} is not a checkpoint of this {classifier.arch} classifier: "
                         f"{problem}; pass the --model it was trained with")
    classifier.load_state_dict(state_dict, strict=True)
    return classifier


def wise_ft(w0, w, alpha):
    """WiSE-FT interpolation (1 - alpha) * w0 + alpha * w of floating tensors; others from w.

    alpha = 0 gives w0 and alpha = 1 gives w exactly (the zero-shot and fine-tuned ends).
    """
    if w0.keys() != w.keys():
        first = sorted(w0.keys() ^ w.keys())[0]
        raise ValueError(f"WiSE-FT needs the same keys in both models; first difference: {first}")
    return {k: (1 - alpha) * w0[k].to(v.dtype) + alpha * v if v.is_floating_point() else v
            for k, v in w.items()}


# ---------------------------------------------------------------------------- datasets


class EvalSet(NamedTuple):
    """A dataset to score: images with labels, and how 1000-way logits map onto its classes."""
    name: str
    folder: str
    dataset: torch.utils.data.Dataset
    project: Optional[Callable] = None  # (B, 1000) logits -> (B, classes); None: as they are


UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises on a bad file


class UnreadableImage(ValueError):
    """An image file that PIL cannot decode (truncated, empty, not an image), named by its path."""


class LabelledFolder(ImageFolder):
    """An ImageFolder whose folder -> label map is given, not read: other folders are skipped."""

    def __init__(self, root, class_to_idx, transform=None, loader=default_loader):
        self.given = dict(class_to_idx)
        try:
            super().__init__(root, transform=transform, loader=loader)
        except FileNotFoundError as error:  # a class folder without images
            raise ValueError(f"{root}: {error}") from None

    def find_classes(self, directory):
        return sorted(self.given, key=self.given.get), self.given

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except UNREADABLE as error:
            raise UnreadableImage(f"image {self.samples[index][0]} cannot be read ({type(error).__name__}: "
                                  f"{first_sentence(error, 120)}); expected readable images: replace or remove it") from None


@lru_cache
def timm_list(name):
    """Lines of a list timm ships: the 1000 sorted ImageNet wnids, the R/A subsets."""
    return pkgutil.get_data("timm.data", f"_info/{name}.txt").decode().split()


def class_folders(root):
    """Sub-folder names of root, sorted; hidden ones (.ipynb_checkpoints) are not classes."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _check_folders(root, expected, what, allow_extra=False):
    """Fails naming the first missing (and unexpected) class folder under root."""
    if not Path(root).is_dir():
        raise ValueError(f"{root} is not a folder; expected {what} there")
    found = set(class_folders(root))
    missing, extra = sorted(set(expected) - found), sorted(found - set(expected))
    if missing or (extra and not allow_extra):
        raise ValueError(f"{root}: expected {what}; {len(missing)} missing (first: {missing[:1]}), "
                         f"{len(extra)} unexpected (first: {extra[:1]})")


def imagenet_folder(root, transform):
    """ImageNet val or ImageNet-Sketch: 1000 wnid folders; sorted order = standard labels."""
    wnids = timm_list("imagenet_synsets")
    _check_folders(root, wnids, "1000 wnid folders (n01440764, ...; val images sorted into "
                                "class folders, e.g. by pytorch/examples' extract_ILSVRC.sh)")
    return LabelledFolder(root, {w: i for i, w in enumerate(wnids)}, transform), None


def imagenet_v2(root, transform):
    """ImageNet-V2: folders 0..999, label = int(folder) (string order would put 10 before 2)."""
    _check_folders(root, [str(i) for i in range(1000)], "1000 folders named 0..999")
    return LabelledFolder(root, {str(i): i for i in range(1000)}, transform), None


def imagenet_subset(root, transform, subset):
    """ImageNet-R or -A: 200 wnid folders, scored on those 200 columns of the 1000-way logits."""
    wnids = timm_list(f"{subset}_synsets")  # the lists behind every published number
    _check_folders(root, wnids, f"the 200 wnid folders of {subset.replace('_', '-')}")
    folders = sorted(wnids)
    columns = torch.tensor([timm_list("imagenet_synsets").index(w) for w in folders])
    dataset = LabelledFolder(root, {w: i for i, w in enumerate(folders)}, transform)
    return dataset, lambda logits: logits[:, columns.to(logits.device)]


def objectnet_classes(mappings):
    """{folder: [ImageNet indices]} for the 113 ObjectNet folders that map to ImageNet, sorted,
    read from the `mappings/` folder of the ObjectNet 1.0 download."""
    files = ["folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json",
             "pytorch_to_imagenet_2012_id.json", "imagenet_to_label_2012_v2"]
    missing = [Path(mappings) / f for f in files if not (Path(mappings) / f).is_file()]
    if missing:
        raise ValueError(f"ObjectNet mapping file {missing[0]} is missing "
                         f"(expected the 4 files of objectnet-1.0/mappings/: {', '.join(files)})")
    folders, imagenet_names, ids, lines = [(Path(mappings) / f).read_text() for f in files]
    folder_of = {label: folder for folder, label in json.loads(folders).items()}
    index_of_id = {i: int(p) for p, i in json.loads(ids).items()}
    # Line i names ImageNet 2012 id i; ids and PyTorch (sorted-wnid) indices differ.
    index_of_name = {line.strip(): index_of_id[i] for i, line in enumerate(lines.splitlines())}
    classes = {folder_of[label]: [index_of_name[n] for n in names.split("; ")]
               for label, names in json.loads(imagenet_names).items()}
    return dict(sorted(classes.items()))  # label = position in this order


def crop_border(image, pixels=2):
    """Removes the thin frame ObjectNet images carry (the crop Model Soups meant to apply)."""
    return image.crop((pixels, pixels, image.width - pixels, image.height - pixels))


def load_without_border(path):
    """The image loader with --objectnet-crop (a module-level function: workers pickle it)."""
    return crop_border(default_loader(path))


def objectnet(root, transform, crop=False):
    """ObjectNet 1.0: images/ (313 folders, 113 used) and mappings/; class score = max over
    its ImageNet classes' logits, label = index among the sorted mapped folder names."""
    classes = objectnet_classes(Path(root) / "mappings")
    _check_folders(Path(root) / "images", classes, "the 113 class folders that map to ImageNet",
                   allow_extra=True)
    folders = list(classes)
    # Pad every class's index list with its own first index: max is unchanged, one gather.
    width = max(len(v) for v in classes.values())
    index = torch.tensor([classes[f] + classes[f][:1] * (width - len(classes[f])) for f in folders])
    labels = {f: i for i, f in enumerate(folders)}
    loader = load_without_border if crop else default_loader
    dataset = LabelledFolder(Path(root) / "images", labels, transform, loader)
    return dataset, lambda logits: logits[:, index.to(logits.device)].amax(dim=-1)


# name: (folders tried under --data-location, reference image count, builder)
DATASETS = {
    "ImageNet": (("imagenet/val_in_folder", "imagenet/val"), 50_000, imagenet_folder),
    "ImageNet-V2": (("imagenetv2-matched-frequency-format-val", "ImageNetV2-matched-frequency"),
                    10_000, imagenet_v2),
    "ImageNet-Sketch": (("sketch", "imagenet-sketch"), 50_889, imagenet_folder),
    "ImageNet-R": (("imagenet-r",), 30_000, lambda r, t: imagenet_subset(r, t, "imagenet_r")),
    "ObjectNet": (("objectnet-1.0",), 18_574, objectnet),
    "ImageNet-A": (("imagenet-a",), 7_500, lambda r, t: imagenet_subset(r, t, "imagenet_a")),
}
SHIFTS = ["ImageNet-V2", "ImageNet-Sketch", "ImageNet-R", "ObjectNet", "ImageNet-A"]


def find_eval_sets(data_location, transform, objectnet_crop=False, names=tuple(DATASETS)):
    """EvalSets for the datasets found under data_location; a missing one is skipped with one
    line, a malformed one raises, an unexpected image count warns."""
    eval_sets = []
    for name in names:
        candidates, reference, build = DATASETS[name]
        paths = [Path(data_location) / c for c in candidates]
        root = next((p for p in paths if p.is_dir()), None)
        if root is None:
            print(f"{name}: skipped, not found at {' or '.join(map(str, paths))}")
            continue
        extra = {"crop": objectnet_crop} if name == "ObjectNet" else {}
        dataset, project = build(root, transform, **extra)
        if len(dataset) != reference:
            warnings.warn(f"{name}: {len(dataset):,} images in {root}, the reference has "
                          f"{reference:,}; an incomplete download changes the score")
        eval_sets.append(EvalSet(name, str(root), dataset, project))
    return eval_sets


SPLITS = {"train", "training", "val", "valid", "validation", "dev", "test", "testing"}


def folder_classnames(root):
    """Class names of an ImageFolder tree: sorted folder names, underscores to spaces. A tree
    whose folders are all dataset splits (train/, val/) is refused: it is one level too high.
    Errors are a ValueError that starts with `root` (callers put their flag in front)."""
    folders = class_folders(root) if Path(root).is_dir() else []
    if not folders:
        files = sorted(os.listdir(root))[:1] if Path(root).is_dir() else []
        found = f"found files ({files[0]}, ...) but no folders" if files else "found none"
        raise ValueError(f"{root}: expected one folder of images per class, {found}")
    if all(f.lower() in SPLITS for f in folders):
        held = " and ".join(", ".join(f"{f}/" for f in folders).rsplit(", ", 1))  # "test/, train/ and val/"
        splits = "dataset splits, not classes" if len(folders) > 1 else "a dataset split, not a class"
        paths = " or ".join(str(Path(root) / f) for f in folders)
        raise ValueError(f"{root} holds {held}: {splits}; expected the folder of one split, {paths}")
    return [f.replace("_", " ") for f in folders]


def image_folder(root, transform):
    """A user's own ImageFolder tree as an EvalSet, labels in folder_classnames' order."""
    folder_classnames(root)  # fails in our words on a folder without class folders
    folders = class_folders(root)
    dataset = LabelledFolder(root, {f: i for i, f in enumerate(folders)}, transform)
    return EvalSet(Path(root).name, str(root), dataset)


# ---------------------------------------------------------------------------- scoring


@torch.no_grad()
def evaluate(model, eval_set, batch_size=256, workers=0, device="cpu", bf16=False):
    """Top-1 accuracy (%) of `model` (images -> logits, 1000-way for ImageNet) on one EvalSet.

    Returns {"top1", "images", "images_per_s"}; images/s counts decoding and the model.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(eval_set.dataset, batch_size=batch_size,
                                         num_workers=workers, pin_memory=cuda)
    model.eval()
    correct, seen, start = torch.zeros((), dtype=torch.long, device=device), 0, time.perf_counter()
    try:
        for images, labels in tqdm(loader, desc=eval_set.name, leave=False, disable=len(loader) < 10):
            # channels_last helps convolutional towers and costs a ViT's patch embedding nothing.
            images = images.to(device, non_blocking=True,
                               memory_format=torch.channels_last if cuda else torch.preserve_format)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(images).float()
            if eval_set.project is not None:
                logits = eval_set.project(logits)
            correct += (logits.argmax(dim=1) == labels.to(device, non_blocking=True)).sum()
            seen += len(labels)
    except UnreadableImage as error:
        # From a data worker the message carries the worker's traceback; its last line is ours.
        last = str(error).strip().splitlines()[-1]
        raise ValueError(f"{eval_set.name}: {last.split('UnreadableImage: ', 1)[-1]}") from None
    seconds = time.perf_counter() - start
    return {"top1": 100 * correct.item() / max(seen, 1), "images": seen,
            "images_per_s": round(seen / seconds, 1)}


def avg_shifts(results):
    """Unweighted mean top-1 of the five shifts; None unless all five were evaluated."""
    if not all(name in results for name in SHIFTS):
        return None
    return sum(results[name]["top1"] for name in SHIFTS) / len(SHIFTS)


# ---------------------------------------------------------------------------- command line


def alpha_list(text):
    """'0,0.5,1' -> [0.0, 0.5, 1.0], for --wise-ft."""
    try:
        return [float(a) for a in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0,0.5,1, got {text!r}") from None


def parse_args(argv=None):
    examples = [line for line in __doc__.splitlines() if line.lstrip().startswith("python ")]
    p = cli.Parser(prog="evaluate.py", description=__doc__.split("\n")[0],
                   epilog="examples:\n" + "\n".join(examples))
    add = p.add_argument
    add("--checkpoint", nargs="*",
        help="classifier state dicts (.safetensors/.pt, as train.py writes); none: the zero-shot model")
    add("--model", default="ViT-B-32-quickgelu",
        help="open_clip model name (paper: ViT-B-32-quickgelu; also ViT-B-16, ViT-L-14) or a config .json")
    add("--pretrained", default="openai",
        help="open_clip pretrained tag, a local .safetensors/.pt state dict, or 'none' (random); for "
             "OpenAI weights use the tag 'openai', not their TorchScript .pt")
    add("--data-location", default="~/data",
        help="the folder holding the six datasets, laid out as docs/datasets.md says")
    add("--data-dir", help="score your own ImageFolder tree instead, one split (e.g. my_images/val); "
                           "folders = class names")
    add("--wise-ft", type=alpha_list, help="alphas, e.g. 0,0.2,0.4,0.6,0.8,1: evaluate (1-a)*zero-shot + "
                                           "a*checkpoint (the WiSE-FT curve of the paper's Fig. 1)")
    add("--objectnet-crop", action="store_true",
        help="crop ObjectNet's border; the published numbers did not (a no-op bug)")
    add("--batch-size", type=int, default=256, help="does not change the accuracy")
    add("--workers", type=int, default=os.cpu_count(),
        help="data loading processes; JPEG decoding is the bottleneck, so use every core")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda or cuda:N; cuda where a GPU is found")
    add("--fp32", action="store_true",
        help="no bf16 autocast on CUDA; the published numbers were computed in fp32")
    add("--cache-dir", default="~/.cache/model_stock", help="zero-shot heads are cached here")
    add("--output", default="evaluation.json", help="results (.json); the WiSE-FT plot goes beside")
    args = p.parse_args(argv)
    args.checkpoint = args.checkpoint or []
    if args.batch_size < 1 or args.workers < 0:
        p.error(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")
    if args.wise_ft and not args.checkpoint:
        p.error("--wise-ft interpolates towards a fine-tuned model: give it --checkpoint")
    if Path(args.output).suffix != ".json":
        p.error(f"--output {args.output}: expected a file name ending in .json")
    try:
        args.model = resolve_model(args.model)
        args.pretrained = resolve_weights(args.model, args.pretrained)
    except ValueError as error:
        p.error(str(error).splitlines()[0])
    try:
        device = torch.device(args.device)
    except RuntimeError:  # torch's word for a bad device string
        p.error(f"--device {args.device}: not a torch device; expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here; expected --device cpu")
    return args


def fail(message, status):
    cli.fail("evaluate.py", message, status)


@contextlib.contextmanager
def exit_on_error(status, flag=""):
    """The library's ValueErrors (one line each) end the program with exit status `status`,
    `flag` in front (their messages start with the flag's path); an OSError with exit 1."""
    try:
        yield
    except ValueError as error:
        fail(f"{flag}{error}", status)
    except OSError as error:  # a file or folder that cannot be read: not the command's fault
        fail(f"{error.filename or 'a file'}: cannot be read ({error.strerror or error}); expected readable "
             f"files and folders", cli.FAILURE)


def check_paths(args):
    """The paths of the command, before any work: a mistake is one line and exit 2."""
    output = Path(args.output)
    parent = output.resolve().parent
    if not parent.is_dir():
        fail(f"--output {args.output}: its folder does not exist", cli.USAGE)
    if output.is_dir():
        fail(f"--output {args.output} is a folder; expected a file name ending in .json", cli.USAGE)
    problem = merge_checkpoints.unwritable(f"--output {args.output}", parent)
    if problem:
        fail(problem, cli.USAGE)
    if args.data_dir and not Path(args.data_dir).is_dir():
        fail(f"--data-dir {args.data_dir} is not a folder; expected one folder of images per class",
             cli.USAGE)
    missing = next((c for c in args.checkpoint if not os.path.exists(c)), None)
    if missing:
        fail(f"--checkpoint {missing}: no such file; expected a classifier state dict (.safetensors, .pt)",
             cli.USAGE)


def check_checkpoint(skeleton, checkpoint, data_dir):
    """Reads a --checkpoint (exit 1 if it cannot be) and checks that it fits the model and the
    classes scored (exit 2 if not): a head of another class count is named as such, before
    load_checkpoint names a difference of architecture."""
    with exit_on_error(cli.FAILURE):
        state_dict = read_checkpoint(checkpoint)
    ours, theirs = skeleton.classification_head.weight, state_dict.get("classification_head.weight")
    if theirs is not None and theirs.dim() == 2 and len(theirs) != len(ours):
        # Were the head resized to theirs, would everything else fit? Then only the classes differ.
        resized = {**skeleton.state_dict(), "classification_head.bias": ours.new_empty(len(theirs)),
                   "classification_head.weight": ours.new_empty(len(theirs), ours.shape[1])}
        if state_dict_mismatch(resized, state_dict) is None:
            fail(f"checkpoint {checkpoint} has a head of {len(theirs)} classes, " + (
                f"--data-dir {data_dir} has {len(ours)} class folders; expected the validation folder of the "
                f"classes it was trained on" if data_dir else
                "not ImageNet's 1000; expected a 1000-class ImageNet classifier (for your own classes, pass "
                "--data-dir with their validation folder)"), cli.USAGE)
    with exit_on_error(cli.USAGE):
        load_checkpoint(skeleton, state_dict, name=checkpoint)


def describe(args, eval_sets, device):
    """The run in one line: what is scored, with which model and weights, where, on what, to where."""
    weights = {None: "random weights"}.get(args.pretrained) or f"{Path(args.pretrained).name} weights"
    what = f"the zero-shot {args.model} ({weights})"
    if args.checkpoint:
        names = ", ".join(Path(c).name for c in args.checkpoint)
        alphas = f" at WiSE-FT alphas {','.join(f'{a:g}' for a in args.wise_ft)}" if args.wise_ft else ""
        what = f"{names}{alphas} ({args.model}, {weights})"
    if args.data_dir:
        data = f"--data-dir {args.data_dir} ({len(eval_sets[0].dataset.classes)} classes, " \
               f"{len(eval_sets[0].dataset):,} images)"
    else:
        data = f"{', '.join(s.name for s in eval_sets)} under {args.data_location}"
    return f"scoring {what} on {device}: {data} -> {args.output}"


def code_version():
    """`git describe` of this file's repository, or 'unknown' outside a git checkout."""
    git = ["git", "describe", "--always", "--dirty"]
    try:
        out = subprocess.run(git, capture_output=True, text=True, cwd=Path(__file__).parent, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # no git, or no commit yet
        return "unknown"


def print_table(runs, names):
    """One row per dataset plus Avg. shifts, one column per evaluated model, top-1 in %."""
    width = max(14, *(len(run["label"]) + 2 for run in runs))
    print("\n" + f"{'top-1 (%)':<16}" + "".join(f"{run['label']:>{width}}" for run in runs))
    shifts = any(run["avg_shifts"] is not None for run in runs)  # all five shifts were evaluated
    for name in names + ["Avg. shifts"] * shifts:
        cells = [run["avg_shifts"] if name == "Avg. shifts" else run["datasets"][name]["top1"]
                 for run in runs]
        print(f"{name:<16}" + "".join(f"{'-' if c is None else f'{c:.2f}':>{width}}" for c in cells))


def pyplot(what):
    """matplotlib.pyplot drawing to files, or None (saying how to get `what`) without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"pip install matplotlib for {what}")
        return None
    return plt


def plot_wise_ft(runs, path):
    """ImageNet top-1 against Avg. shifts along alpha, one curve per checkpoint (paper Fig. 1)."""
    if any(run["avg_shifts"] is None or "ImageNet" not in run["datasets"] for run in runs):
        print("no WiSE-FT plot: it needs ImageNet and all five shifts; the numbers are in the JSON")
        return
    plt = pyplot("the WiSE-FT plot; the numbers are in the JSON")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for checkpoint in dict.fromkeys(run["checkpoint"] for run in runs):
        curve = [run for run in runs if run["checkpoint"] == checkpoint]
        x = [run["datasets"]["ImageNet"]["top1"] for run in curve]
        y = [run["avg_shifts"] for run in curve]
        ax.plot(x, y, "o-", label=Path(checkpoint).name)
        for run, xy in zip(curve, zip(x, y)):
            ax.annotate(f"{run['alpha']:g}", xy, fontsize=7)
    ax.set(xlabel="ImageNet top-1 (%)", ylabel="Avg. top-1 on 5 shifts (%)",
           title="WiSE-FT (points labelled with alpha)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, bbox_inches="tight", dpi=150)
    print(f"saved the WiSE-FT plot to {path}")


def main(argv=None):
    """The command line: a mistake in it is one line and exit 2, a failure while scoring exit 1."""
    return run(parse_args(argv))


def run(args):
    # 1. Paths, checked before any work (the other arguments were, by parse_args). Everything
    #    that can fail on the user's input is checked before the long work starts: exit 2.
    warnings.formatwarning = lambda message, category, *_: f"{category.__name__}: {message}\n"
    alphas = args.wise_ft
    check_paths(args)
    device = torch.device(args.device)

    # 2. The datasets, scanned once and shared by every model below; before the model is
    #    built, so that a malformed folder fails in seconds. Their transform comes in step 3.
    if args.data_dir:
        with exit_on_error(cli.USAGE, flag="--data-dir "):
            eval_sets = [image_folder(args.data_dir, None)]
    else:
        with exit_on_error(cli.USAGE):
            eval_sets = find_eval_sets(Path(args.data_location).expanduser(), None, args.objectnet_crop)
    if not eval_sets:
        fail(f"no dataset found under --data-location {args.data_location}; expected the folders of "
             f"docs/datasets.md, or --data-dir with a folder of your own classes", cli.USAGE)
    print(describe(args, eval_sets, device))  # the arguments themselves go into the JSON

    # 3. The classifier: zero-shot head from ImageNet's or the --data-dir folders' class names.
    #    Each checkpoint is read and checked against the architecture and the classes first, on a
    #    skeleton that loads no weights: an unreadable file, another --model or other classes
    #    fail in seconds, before any download or text encoding. Weights that cannot be
    #    downloaded or loaded fail as in train.py (exit 1).
    #    A checkpoint replaces the head, so only the zero-shot model and WiSE-FT need it built.
    classnames = folder_classnames(args.data_dir) if args.data_dir else None
    if args.checkpoint:
        with exit_on_error(cli.FAILURE):
            skeleton, _ = build_classifier(args.model, args.pretrained, classnames, zero_shot=False,
                                           load_weights=False)
        for checkpoint in args.checkpoint:
            check_checkpoint(skeleton, checkpoint, args.data_dir)
        del skeleton
    with exit_on_error(cli.FAILURE):
        classifier, preprocess = build_classifier(
            args.model, args.pretrained, classnames, cache_dir=args.cache_dir, device=device,
            zero_shot=not args.checkpoint or bool(alphas))
    for eval_set in eval_sets:
        eval_set.dataset.transform = preprocess  # the model's resize, crop and normalisation
    w0 = {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()}
    if device.type == "cuda":
        classifier = classifier.to(memory_format=torch.channels_last)

    # 4. The models: the zero-shot one, each checkpoint, or each (checkpoint, alpha).
    models = [("zero-shot", None, None)]
    if args.checkpoint:
        models = [(Path(c).name + (f" a={a:g}" if alphas else ""), c, a)
                  for c in args.checkpoint for a in alphas or [None]]

    # 5. Evaluate every model on every dataset; an unreadable image or file is exit 1.
    runs = []
    for label, checkpoint, alpha in models:
        with exit_on_error(cli.FAILURE):
            if checkpoint:
                load_checkpoint(classifier, checkpoint)
                if alpha is not None:
                    w = {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()}
                    load_checkpoint(classifier, wise_ft(w0, w, alpha))
            results = {}
            for eval_set in eval_sets:
                r = evaluate(classifier, eval_set, args.batch_size, args.workers, device,
                             bf16=device.type == "cuda" and not args.fp32)
                results[eval_set.name] = {**r, "folder": eval_set.folder}
                print(f"{label} | {eval_set.name}: {r['top1']:.2f}% of {r['images']:,} images, "
                      f"{r['images_per_s']:.0f} images/s")
        runs.append({"label": label, "checkpoint": checkpoint or "zero-shot", "alpha": alpha,
                     "datasets": results, "avg_shifts": avg_shifts(results)})
    print_table(runs, [s.name for s in eval_sets])

    # 6. Results (and the WiSE-FT plot) beside each other. If --output cannot be written after
    #    all, the results go to a temporary file, named in the one line of exit 1.
    output = Path(args.output)
    record = {"runs": runs, "args": vars(args), "code_version": code_version()}
    elsewhere = merge_checkpoints.write_results(output, json.dumps(record, indent=1))
    if elsewhere:
        fail(elsewhere, cli.FAILURE)
    print(f"\nwrote {output}")
    if alphas:
        plot_wise_ft(runs, output.with_name(output.stem + "_wise_ft.png"))
    return runs


if __name__ == "__main__":
    cli.run(main, "evaluate.py: interrupted; no results were written")
