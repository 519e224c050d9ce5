"""Merge fine-tuned checkpoints with Model Stock after training, one tensor at a time.

Inputs are files (.safetensors, or .pt/.pth state dicts read with weights_only=True) or
Hugging Face folders (model.safetensors, or shards with model.safetensors.index.json). They
are opened lazily (memory-mapped); each tensor is merged by model_stock's own per-tensor code
as it is read and written straight into its output shard, so the merge never holds a whole
model in memory. Also the checkpoint I/O of train.py, evaluate.py and demo.py.

    python merge_checkpoints.py pretrained.safetensors ft1.pt ft2.pt -o merged.safetensors
    python merge_checkpoints.py base/ ft1/ ft2/ -o merged/          # Hugging Face folders
    python merge_checkpoints.py base/ ft1/ ft2/ --inspect --json layers.json
"""
import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import cli
import model_stock

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files of a Hugging Face folder that hold weights; everything else (config, tokenizer) is copied.
WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx)$|.*\.index\.json$")
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ---- 1. Reading: a file or a Hugging Face folder, tensors on demand ----

def _reason(error):
    """One clean line out of a library's exception: no ANSI codes, no multi-line advice."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:  # torch's weights_only refusal: name the class, drop its "two options" advice
        return f"it pickles {refused.group(1)}, which weights_only=True refuses to run"
    if "Weights only load failed" in text:
        return "it holds pickled objects that weights_only=True refuses to run"
    return (text.strip().splitlines() or [type(error).__name__])[0][:200]


def _natural(key):
    """Sort key that puts layers.2 before layers.10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)]


class Checkpoint:
    """One model on disk: keys and their (shape, dtype) from the headers, tensors on demand.

    .safetensors files (alone or as a folder's shards) are memory-mapped: a tensor's pages
    are read when used and belong to the page cache, not to this process. .pt/.pth files are
    loaded with mmap=True where their format allows it. A "module." prefix (DDP) is stripped.
    """

    def __init__(self, path):
        self.path, self.specs, self._where, self._open, self._ranges = str(path), {}, {}, {}, {}
        if os.path.isdir(path):
            self._read_folder(Path(path))
        elif str(path).endswith(".safetensors"):
            self._read_safetensors(str(path))
        else:
            self._read_torch(path)  # keeps the state dict's own (module) order
        if self._open:  # safetensors headers are sorted by dtype: order keys as layers (2 < 10)
            self.specs = dict(sorted(self.specs.items(), key=lambda item: _natural(item[0])))

    def _read_folder(self, folder):
        if (folder / INDEX).is_file():
            try:
                weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("its weight_map is not a mapping of key names to shard file names")
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{folder / INDEX}: cannot be read ({_reason(e)}); expected "
                                 f"the JSON of a Hugging Face index with a 'weight_map'") from None
            for shard in dict.fromkeys(weight_map.values()):
                if not (folder / shard).is_file():
                    raise ValueError(f"{folder / INDEX} names shard {shard}, which is missing "
                                     f"from {folder}")
                names = self._read_safetensors(str(folder / shard))
                wanted = [k for k, s in weight_map.items() if s == shard]
                missing = next((k for k in wanted if k not in names), None)
                if missing:
                    raise ValueError(f"{folder / shard} lacks key {missing!r}, which {INDEX} "
                                     f"places there")
        elif (folder / SINGLE).is_file():
            self._read_safetensors(str(folder / SINGLE))
        else:
            raise ValueError(f"{folder}: no {SINGLE} or {INDEX}; expected a Hugging Face model "
                             f"folder with safetensors weights")

    def _read_safetensors(self, file):
        """Adds a file's keys from its header (no tensor data is read); returns its names."""
        from safetensors import safe_open
        try:  # open() first: safetensors reports an unreadable file as "No such file or directory"
            with open(file, "rb") as f:
                handle = self._open[file] = safe_open(file, framework="pt")
                names = list(handle.keys())
                specs = {n: (tuple(handle.get_slice(n).get_shape()), handle.get_slice(n).get_dtype())
                         for n in names}
                size = int.from_bytes(f.read(8), "little")  # where each tensor's bytes lie, for prefetch
                header = json.loads(f.read(size))
        except Exception as e:
            raise ValueError(f"{file}: cannot be loaded ({_reason(e)}); expected a "
                             f".safetensors file") from None
        for name, (shape, dtype) in specs.items():
            if dtype not in DTYPES:
                raise ValueError(f"{file}: key {name!r} has dtype {dtype}, which is not supported")
            self._add(name, shape, DTYPES[dtype], (file, name))
            begin, end = header[name]["data_offsets"]
            self._ranges[name.removeprefix("module.")] = (file, 8 + size + begin, end - begin)
        return names

    def _read_torch(self, path):
        try:
            try:  # memory-mapped: only the zip format of torch.save (the default since 1.6) allows it
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only: a TorchScript archive or an arbitrary pickle is refused
            raise ValueError(f"{path}: cannot be loaded ({_reason(e)}); expected a .safetensors "
                             f"file, a Hugging Face folder or a .pt/.pth state dict readable "
                             f"with weights_only=True") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v)
                                                  for k, v in state.items()):
            raise ValueError(f"{path}: expected a state dict (str -> Tensor), or a dict holding "
                             f"one under 'state_dict'")
        for name, tensor in state.items():
            self._add(name, tuple(tensor.shape), tensor.dtype, tensor)

    def _add(self, name, shape, dtype, where):
        key = name.removeprefix("module.")  # checkpoints saved from DistributedDataParallel
        if key in self.specs:
            raise ValueError(f"{self.path}: key {key!r} appears twice")
        self.specs[key], self._where[key] = (shape, dtype), where

    def prefetch(self, key):
        """Asks the kernel to start reading a tensor's bytes from disk (it is needed next)."""
        if key in self._ranges and hasattr(os, "posix_fadvise"):
            file, start, length = self._ranges[key]
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def get(self, key):
        where = self._where[key]
        if torch.is_tensor(where):
            return where
        file, name = where
        try:
            return self._open[file].get_tensor(name)
        except Exception as e:
            raise ValueError(f"{file}: key {name!r} cannot be read ({_reason(e)})") from None


def load_state_dict(path):
    """A state dict from a .safetensors file, a .pt/.pth file (weights_only=True) or a Hugging
    Face folder; safetensors tensors are memory-mapped."""
    checkpoint = Checkpoint(path)
    return {key: checkpoint.get(key) for key in checkpoint.specs}


# ---- 2. Writing: safetensors shard by shard, into a temporary path renamed when complete ----

def output_kind(path):
    """'safetensors', 'torch' or 'folder' by the name; anything else is a ValueError."""
    name = str(path)
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith((".pt", ".pth")):
        return "torch"
    if name.endswith(os.sep) or os.path.isdir(name) or not Path(name).suffix:
        return "folder"
    raise ValueError(f"{name}: unknown output suffix {Path(name).suffix!r}; expected .safetensors, "
                     f".pt, .pth, or a folder name (no suffix, or ending in /)")


def _umask():
    """The process umask, read without changing it (os.umask alone would set it)."""
    with contextlib.suppress(OSError, StopIteration):
        line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith("Umask:"))
        return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _running(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # it exists, run by another user
        pass
    return True


def _resolved(path):
    """The absolute path that writing `path` replaces: its parent folder resolved as the system
    resolves it (links, then ..), its last name kept, since a link there is replaced, not
    followed ("." and ".." are resolved too)."""
    raw = os.path.join(os.getcwd(), path).rstrip(os.sep) or os.sep
    if os.path.basename(raw) in (".", ".."):
        return os.path.realpath(raw)
    return os.path.join(os.path.realpath(os.path.dirname(raw)), os.path.basename(raw))


def _remove(path):
    """Removes a file, a link (not what it points to) or a folder."""
    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def _remove_stale_temporaries(parent, name, warn=True):
    """Removes the temporaries of earlier writes of `name` whose process is gone (killed with -9).
    A folder that such a write had moved aside (`.old`) is put back if `name` is missing (a kill
    between the two renames of a folder replacement), and otherwise left, with a warning."""
    try:
        entries = sorted(os.listdir(parent), key=lambda e: not e.endswith(".old"))
    except OSError:
        return
    for entry in entries:
        match = re.fullmatch(rf"\.{re.escape(name)}\.(\d+)_\w+\.(tmp|old)", entry)
        if match and not _running(int(match.group(1))):
            stale, target = os.path.join(parent, entry), os.path.join(parent, name)
            with contextlib.suppress(OSError):
                if match.group(2) == "tmp":
                    _remove(stale)
                elif not os.path.lexists(target):
                    os.replace(stale, target)
                elif warn:
                    print(f"warning: {stale} holds an earlier {name} that an interrupted merge had moved "
                          f"aside; delete it if it is not needed", file=sys.stderr)


@contextlib.contextmanager
def _atomically(path, folder):
    """Yields a temporary file or folder beside `path`, renamed onto it once the body succeeds.

    A crash or an error in the body leaves `path` as it was and no temporary behind; the
    temporaries of a process killed outright are cleared by the next write of the same path
    (which first puts back a replaced folder that the kill left outside `path`).
    """
    path = _resolved(path)  # as the system resolves it ("link/.." included), as main checked it
    parent, name = os.path.dirname(path), os.path.basename(path)
    _remove_stale_temporaries(parent, name, warn=False)  # main has warned already
    # A unique temporary name in the same folder, with the writer's process id: concurrent
    # writers never share one, and a later write knows whether its writer is still running.
    prefix = f".{name}.{os.getpid()}_"
    if folder:
        tmp = tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent)
    else:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=parent)
        os.close(fd)
    try:
        yield tmp
        # mkstemp/mkdtemp create 0600/0700: give the output the mode a plain open() would.
        os.chmod(tmp, (0o777 if folder else 0o666) & ~_umask())
        if folder and os.path.lexists(path):  # a folder cannot be replaced in one rename: move it aside first
            old = os.path.join(parent, f"{prefix}{secrets.token_hex(4)}.old")
            try:
                os.replace(path, old)
                os.replace(tmp, path)
            except BaseException:  # an error or Ctrl-C before the new one is in place: put the old one back
                if os.path.lexists(old) and not os.path.lexists(path):
                    os.replace(old, path)
                raise
            try:
                _remove(old)
            except OSError as e:  # the new one is in place; only the old copy is left over
                print(f"warning: {old}, the previous {name}, could not be removed ({e.strerror}); "
                      f"delete it", file=sys.stderr)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def write_atomically(path, write):
    """write(a temporary Path beside `path`), then rename it onto `path`: a kill never leaves
    half a file there, and an error leaves `path` as it was."""
    with _atomically(path, folder=False) as tmp:
        write(Path(tmp))


def cannot_write_in(folder):
    """Why no file can be created in `folder` (a missing folder, permissions, a read-only or
    special file system), or None: os.access first, then tried with a temporary file, since
    os.access says yes to root everywhere, /sys included."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "permission denied" if os.path.isdir(folder) else "no such folder"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write_check.", suffix=".tmp", dir=folder)
    except OSError as error:
        return (error.strerror or type(error).__name__).lower()
    os.close(fd)
    os.remove(tmp)
    return None


def unwritable(what, folder):
    """The one-line complaint `what: cannot write in folder (reason); ...` if no file can be
    created in `folder`, else None: every script's check of its output folders."""
    reason = cannot_write_in(folder)
    return reason and f"{what}: cannot write in {folder} ({reason}); expected a writable folder"


def unwritable_folder(what, folder):
    """The one-line complaint if `folder` cannot be an output folder (it is a file, or the nearest
    folder on its path that exists fails unwritable), else None; makes nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return f"{what} is a file; expected a folder"
    return unwritable(what, next(p for p in [folder.absolute(), *folder.absolute().parents] if p.exists()))


def write_results(path, text):
    """Writes the text `text` to `path` atomically; if that fails, to a new file in the
    temporary folder, so that results are never lost. Returns None, or a line saying where
    they went instead."""
    try:
        write_atomically(path, lambda f: f.write_text(text))
        return None
    except OSError as error:
        fd, kept = tempfile.mkstemp(prefix=f"{Path(path).stem}.", suffix=Path(path).suffix or ".txt")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return f"cannot write {path} ({error.strerror or error}); the results are in {kept}"


def holds_model(folder):
    return any(os.path.isfile(os.path.join(folder, name)) for name in (SINGLE, INDEX))


def write_order(specs):
    """The order of the tensors in a safetensors file: widest dtype first, so all are aligned."""
    return sorted(specs, key=lambda k: -specs[k][1].itemsize)


def write_safetensors(file, specs, tensor_of):
    """Writes a .safetensors file without holding it in memory: the header first (every shape
    and dtype is known), then each tensor's bytes as tensor_of(key) produces them."""
    keys = write_order(specs)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key in keys:
        shape, dtype = specs[key]
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for key in keys:
            tensor = tensor_of(key).detach().cpu().contiguous()
            if (tuple(tensor.shape), tensor.dtype) != specs[key]:  # the header is written already
                raise ValueError(f"key {key!r}: got {tuple(tensor.shape)} {tensor.dtype}, "
                                 f"planned {specs[key][0]} {specs[key][1]}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor  # before the next one is computed: one output tensor in memory at a time


def plan_shards(specs, max_shard_size):
    """Keys in order, cut into shards of at most max_shard_size bytes (a bigger tensor alone)."""
    shards, size = [[]], 0
    for key, (shape, dtype) in specs.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def write_folder(folder, specs, tensor_of, max_shard_size, log=lambda line: None):
    """The Hugging Face layout: model.safetensors, or shards and model.safetensors.index.json."""
    shards = plan_shards(specs, max_shard_size)
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                              for i in range(len(shards))]
    for i, (name, keys) in enumerate(zip(names, shards)):
        write_safetensors(os.path.join(folder, name), {k: specs[k] for k in keys}, tensor_of)
        log(f"wrote shard {i + 1}/{len(shards)}: {name} ({len(keys)} tensors)")
    if len(shards) > 1:
        total = sum(math.prod(s) * d.itemsize for s, d in specs.values())
        weight_map = {k: name for name, keys in zip(names, shards) for k in sorted(keys)}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        Path(folder, INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_checkpoint(path, specs, tensor_of, max_shard_size=5 * 10**9, log=lambda line: None,
                     extra_files=()):
    """Writes tensor_of(key) for every key of specs {key: (shape, dtype)} to path, by its kind,
    atomically; a folder also gets copies of extra_files. Only a .pt/.pth output is gathered
    in memory first (torch.save needs it whole)."""
    kind = output_kind(path)
    if kind == "folder" and os.path.isdir(path) and not holds_model(path):
        raise ValueError(f"{path} is a folder without a Hugging Face model; refusing to replace it")
    if kind != "folder" and os.path.isdir(path):
        raise ValueError(f"{path} is a folder; expected a file name, or a folder name for a "
                         f"Hugging Face layout")
    with _atomically(path, folder=kind == "folder") as tmp:
        if kind == "folder":
            write_folder(tmp, specs, tensor_of, max_shard_size, log)
            for file in extra_files:
                shutil.copyfile(file, os.path.join(tmp, os.path.basename(file)))
        elif kind == "safetensors":
            write_safetensors(tmp, specs, tensor_of)
        else:
            torch.save({k: tensor_of(k).detach().cpu().contiguous() for k in specs}, tmp)


def save_state_dict(state, path, max_shard_size=5 * 10**9):
    """Writes a state dict as .safetensors, .pt/.pth or a Hugging Face folder (by the name),
    via a temporary file or folder and a rename, so a crash never leaves half a checkpoint."""
    specs = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    write_checkpoint(path, specs, state.__getitem__, max_shard_size)


# ---- 3. The streamed merge: one key at a time, with model_stock's own per-tensor code ----

def check_mergeable(w0, ws):
    """Fails before any tensor is read if the Checkpoints cannot be merged key by key:
    model_stock's own check, on meta tensors of the headers' shapes and dtypes."""
    def meta(checkpoint):
        return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in checkpoint.specs.items()}
    names = [f"the pre-trained model {w0.path}"] + [str(w.path) for w in ws]
    model_stock.check(meta(w0), [meta(w) for w in ws], names)


def merge_streamed(w0, ws, output=None, max_shard_size=5 * 10**9, log=lambda line: None,
                   extra_files=()):
    """Model Stock of the Checkpoints ws around w0, key by key, written to output if given.

    Equals model_stock.merge bit for bit on the same tensors. Each tensor is read once, merged
    and written; NaN/inf stops the merge before anything is renamed into place. Returns the
    per-tensor rows of the table (key, kind, shape, cos, angle, t, norms), in w0's key order.
    """
    check_mergeable(w0, ws)
    rows, workspace = {}, {}  # workspace: one buffer of N x the largest tensor, reused
    specs = {k: (shape, ws[0].specs[k][1]) for k, (shape, _) in w0.specs.items()}  # ws[0]'s dtypes
    # The order the writer asks for tensors in, so that the next one is read while this one merges.
    kind = output_kind(output) if output else None
    shards = plan_shards(specs, max_shard_size) if kind == "folder" else [list(specs)]
    safetensors = kind in ("folder", "safetensors")
    order = [k for keys in shards for k in (write_order({k: specs[k] for k in keys}) if safetensors else keys)]
    following = dict(zip(order, order[1:]))
    reader = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # prefetch off the main thread

    def merged(key):
        for checkpoint in (w0, *ws):
            reader.submit(checkpoint.prefetch, following.get(key))
        v0, vs = w0.get(key), [w.get(key) for w in ws]
        if not v0.is_floating_point():
            return vs[0]  # integer and bool tensors are copied from ws[0], as merge does
        w_h, t, gram = model_stock.merge_tensor(v0, vs, workspace)
        if t.isnan():
            model_stock.raise_non_finite(key, [v0, *vs], [str(c.path) for c in (w0, *ws)])
        rows[key] = table_row(key, v0.shape, t.item(), gram)
        return w_h

    try:
        if output:
            write_checkpoint(output, specs, merged, max_shard_size, log, extra_files)
        else:
            for key in specs:
                merged(key)
    finally:
        reader.shutdown(cancel_futures=True)
    return [rows[k] for k in specs if k in rows]


# ---- 4. The per-layer table: the paper's Observation 1 and Appendix F on your models ----

KINDS = [  # the first pattern that matches a key names its kind; norms first (input_layernorm)
    ("norms", r"norm|(^|[._])ln"),
    ("embeddings", r"embed|(^|\.)(wte|wpe)(\.|$)"),
    ("head", r"lm_head|(^|\.)head(\.|$)|classif"),
    ("attention", r"attn|attention|(^|[._])[qkvo]_?proj"),
    ("MLP", r"mlp|ffn|feed_forward|(^|[._])(c_)?fc\d?([._]|$)|(gate|up|down)_proj|(^|\.)w[123](\.|$)"),
]
KIND_ORDER = ["embeddings", "attention matrices", "attention vectors", "MLP matrices", "MLP vectors",
              "norms", "head matrices", "head vectors", "other matrices", "other vectors"]
MAX_ROWS = 500  # more floating tensors than this: summaries only on screen, every row in --json


def tensor_kind(key, shape):
    kind = next((name for name, pattern in KINDS if re.search(pattern, key.lower())), "other")
    return kind if kind in ("norms", "embeddings") else f"{kind} {'matrices' if len(shape) >= 2 else 'vectors'}"


def table_row(key, shape, t, gram):
    """One tensor's geometry from the Gram matrix of its task vectors."""
    cos = model_stock.mean_cos(gram).item()
    return {"key": key, "kind": tensor_kind(key, shape), "shape": list(shape), "cos": cos,
            "angle": math.degrees(math.acos(min(max(cos, -1.0), 1.0))), "t": t,
            "norms": gram.diagonal().sqrt().tolist()}


def _summary(label, rows):
    ts = [r["t"] for r in rows]
    return (f"mean t over {len(ts)} {label}: {sum(ts) / len(ts):.3f} "
            f"(min {min(ts):.3f}, max {max(ts):.3f})")


def print_table(rows, copied, n, max_rows=MAX_ROWS):
    """Per tensor: mean cos, angle, t and |d_i|; then t by kind of tensor (Appendix F)."""
    if len(rows) <= max_rows:
        width = max([len(r["key"]) for r in rows] + [3])
        print(f"{'key':<{width}} {'cos':>7} {'angle':>7} {'t':>6} " + " ".join(f"{f'|d{i}|':>9}" for i in range(n)))
        for r in rows:
            norms = " ".join(f"{x:9.3g}" for x in r["norms"])
            print(f"{r['key']:<{width}} {r['cos']:7.4f} {r['angle']:7.2f} {r['t']:6.3f} {norms}")
    else:
        print(f"{len(rows)} floating tensors: per-tensor rows not shown (--json FILE writes them)")
    if copied:
        shown = ", ".join(copied[:20]) + (f", ... ({len(copied)} in all)" if len(copied) > 20 else "")
        print(f"copied from ws[0] (integer/bool): {shown}")
    # Appendix F: matrices (attention, MLP) lean on w0 more than biases, norms and the head.
    for label, keep in [("matrices (ndim >= 2)", lambda r: len(r["shape"]) >= 2),
                        ("vectors (biases, norms)", lambda r: len(r["shape"]) < 2)]:
        if any(map(keep, rows)):
            print(_summary(label, [r for r in rows if keep(r)]))
    kinds = sorted({r["kind"] for r in rows}, key=KIND_ORDER.index)
    if len(kinds) > 1:
        print("by kind of tensor:")
        for kind in kinds:
            print("  " + _summary(kind, [r for r in rows if r["kind"] == kind]))


def warn_if_not_the_anchor(rows, pretrained, finetuned):
    """Fine-tunes of one pre-trained model move apart from it at acute angles (the paper's
    Observation 1: about 40-80 degrees); task vectors pointing apart in most matrices say the
    first argument is unlikely to be the model they started from. (The weights cannot always
    tell: a fine-tune listed first among its siblings can look like an anchor.)"""
    for i, path in enumerate(finetuned):
        if rows and all(r["norms"][i] == 0 for r in rows):
            print(f"warning: ws[{i}], {path}, equals w0 in every floating tensor (|d| = 0), which pulls t "
                  f"to 0: the merge is w0; expected fine-tuned models after the pre-trained one")
    matrices = [r for r in rows if len(r["shape"]) >= 2]
    apart = sum(r["cos"] < 0 for r in matrices)
    if matrices and apart > len(matrices) / 2:
        print(f"warning: in {apart} of {len(matrices)} matrices the task vectors point apart (cos < 0: t = 0, "
              f"the layer stays at w0), which fine-tunes of one pre-trained model rarely do; check that "
              f"the first argument, {pretrained}, is the model every fine-tune started from")


# ---- 5. The command line ----

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text):
    """Bytes from '5GB', '500MB', '2GiB' or a plain number (Hugging Face's units: GB = 1e9)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Z]*)\s*", text.upper())
    if not match or match.group(2) not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; expected e.g. 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def non_weight_files(path):
    """The files of a Hugging Face folder that are not weights: config, tokenizer, ..."""
    if not os.path.isdir(path):
        return []
    return sorted(str(p) for p in Path(path).iterdir() if p.is_file() and not WEIGHT_FILE.fullmatch(p.name))


def _inside(path, folder):
    """Whether the absolute `path` is `folder` or lies inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _overlaps(model, target):
    """Whether writing `target` would replace the input `model` or a file it reads: `target` is
    the model, or lies inside its folder, or holds it (links resolved, in folders too)."""
    real = os.path.realpath(model)
    read = [real]
    with contextlib.suppress(OSError):  # a folder that cannot be listed fails later, when opened
        read += [os.path.realpath(os.path.join(real, e)) for e in os.listdir(real)] if os.path.isdir(real) else []
    return any(_inside(f, target) for f in read) or (os.path.isdir(real) and _inside(target, real))


INTERRUPTED = "merge_checkpoints.py: interrupted; nothing was written"  # Ctrl-C: the temporary output is removed


def fail(message, status=cli.FAILURE):
    cli.fail("merge_checkpoints.py", message, status)


def main(argv=None):
    parser = cli.Parser(prog="merge_checkpoints.py", description="Merge fine-tuned checkpoints with "
                        "Model Stock, tensor by tensor.", epilog="examples:\n" + __doc__.split("\n\n")[-1])
    parser.add_argument("pretrained", help="w0, the model every fine-tune started from: a "
                        ".safetensors or .pt/.pth file, or a Hugging Face folder")
    parser.add_argument("finetuned", nargs="+", help="two or more fine-tuned models (ws[0], ws[1], "
                        "...), each a file or a folder; a folder output copies ws[0]'s config and tokenizer")
    parser.add_argument("-o", "--output", help="where to write the merge: NAME.safetensors, NAME.pt, "
                        "or a folder (Hugging Face layout, sharded by --max-shard-size)")
    parser.add_argument("--max-shard-size", type=parse_size, default="5GB",
                        help="largest shard of a folder output (as Hugging Face's)")
    parser.add_argument("--inspect", action="store_true", help="print the per-layer table, write no model")
    parser.add_argument("--json", metavar="FILE", help=f"also write every row of the table to FILE "
                        f"(the screen shows only summaries above {MAX_ROWS} tensors)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument("--threads", type=int, help="CPU threads for the math (default: torch's, one "
                        "per core); on a machine shared with other jobs, 1 is often faster")
    args = parser.parse_args(argv)
    # 1. Every argument checked before any work.
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: expected 1 or more")
    if len(args.finetuned) < 2:
        parser.error(f"Model Stock needs at least 2 fine-tuned models, got {len(args.finetuned)}")
    if not args.inspect and not args.output:
        parser.error("give -o/--output, or --inspect to only print the table")
    output = None if args.inspect else args.output

    def clashes(path):  # the input that writing `path` would replace or write into, even through a link
        return next((p for p in [args.pretrained, *args.finetuned] if _overlaps(p, path) or _resolved(p) == path),
                    None)
    target = json_target = None  # the paths that writing replaces, resolved once, checked and written
    if output:
        try:
            kind = output_kind(output)
        except ValueError as e:
            parser.error(str(e))
        target = _resolved(output)
        parent = os.path.dirname(target)
        if not os.path.isdir(parent):
            parser.error(f"-o {output}: its parent folder does not exist")
        problem = unwritable(f"-o {output}", parent)
        if problem:
            parser.error(problem)
        _remove_stale_temporaries(parent, os.path.basename(target))  # first: it may put a folder back
        if kind != "folder" and os.path.isdir(target):
            parser.error(f"-o {output} is a folder; expected a file name, or a folder name for a "
                         f"Hugging Face layout")
        if os.path.lexists(target) and not args.force and not clashes(target):  # "notes/" names a file too
            parser.error(f"{output} exists; pass --force to overwrite it")
        if kind == "folder" and os.path.lexists(target) and not os.path.isdir(target):
            parser.error(f"-o {output} is a file; expected a folder name for a Hugging Face layout, "
                         f"or NAME.safetensors / NAME.pt for one file")
        if os.path.isdir(target) and not holds_model(target):
            parser.error(f"-o {output} is a folder without a Hugging Face model; refusing to replace it")
    if args.json:
        if args.json.endswith(os.sep):
            parser.error(f"--json {args.json} names a folder; expected a file name")
        json_target = _resolved(args.json)
        if target and _inside(json_target, target):
            parser.error(f"--json {args.json} would overwrite the merge's own output {output}; expected another name")
        parent = os.path.dirname(json_target)
        if not os.path.isdir(parent):
            parser.error(f"--json {args.json}: its parent folder does not exist")
        if os.path.isdir(json_target):
            parser.error(f"--json {args.json} is a folder; expected a file name")
        problem = unwritable(f"--json {args.json}", parent)
        if problem:
            parser.error(problem)
        if os.path.lexists(json_target) and not args.force and not clashes(json_target):
            parser.error(f"--json {args.json} exists; pass --force to overwrite it")
    for flag, name, path in (("-o", output, target), ("--json", args.json, json_target)):
        clash = path and clashes(path)
        if clash:
            parser.error(f"{flag} {name} would write over or inside the input {clash}; expected a path outside the inputs")
    if len(set(os.path.abspath(os.path.normpath(p)) for p in args.finetuned)) < len(args.finetuned):
        print("warning: the same fine-tuned file is given twice; identical models merge with t = 1")
    # 2. Open every model (headers only), then merge key by key, writing as it goes.
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # inputs that cannot be read or merged are a mistake in the command: nothing is written
        w0 = Checkpoint(args.pretrained)
        ws = [Checkpoint(p) for p in args.finetuned]
        check_mergeable(w0, ws)
    except (ValueError, OSError) as e:
        fail(e, cli.USAGE)
    print(f"w0, the pre-trained model every fine-tune started from (the first argument): {args.pretrained}")
    for i, p in enumerate(args.finetuned):
        print(f"ws[{i}], fine-tuned from w0: {p}")
    try:
        extra = non_weight_files(args.finetuned[0]) if output and output_kind(output) == "folder" else []
        written = target + os.sep if output and output.endswith(os.sep) else target  # "name/": a folder
        rows = merge_streamed(w0, ws, written, args.max_shard_size, print, extra)
    except (ValueError, OSError) as e:
        fail(e)
    # 3. The table, and what was written.
    copied = [k for k, (_, dtype) in w0.specs.items() if not dtype.is_floating_point]
    print_table(rows, copied, len(ws))
    warn_if_not_the_anchor(rows, args.pretrained, args.finetuned)
    if args.json:
        record = {"pretrained": args.pretrained, "finetuned": args.finetuned, "tensors": rows, "copied": copied}
        try:
            problem = write_results(json_target, json.dumps(record, indent=1) + "\n")
        except KeyboardInterrupt:
            raise cli.Exit(f"merge_checkpoints.py: interrupted; {args.json} was not written"
                           + (f" ({output} was)" if output else ""), cli.INTERRUPTED) from None
        if problem:
            fail(f"--json {args.json}: {problem}" + (f" ({output} was written)" if output else ""))
        print(f"wrote {args.json} ({len(rows)} rows)")
    if output:
        print(f"wrote {output} ({len(w0.specs)} tensors)")


if __name__ == "__main__":  # Ctrl-C: the temporary output is removed, the output left as it was
    cli.run(main, INTERRUPTED)
