"""Model Stock: merge N fine-tuned models with their pre-trained base, layer by layer.

For every tensor (a "layer") of the state dicts, with task vectors d_i = w_i - w0:
    w_h = w0 + t * mean_i(d_i),   t = N cos / (1 + (N - 1) cos)        (paper Eq. 2, 3)
where cos is the mean cosine between the task vectors. derivation.md derives it.

    import model_stock
    w_h, ts = model_stock.merge(w0, [w1, w2])            # state dicts in, state dict out
    ts = model_stock.merge_models_([model_a, model_b], w0)  # periodic merging, in place
    python merge_checkpoints.py pretrained.pt ft1.pt ft2.pt -o merged.safetensors  # files
"""
import torch


CHUNK = 1 << 20  # elements: 4 MB of fp32, a piece that stays in the CPU cache between steps


def _chunks(*tensors):
    """Matching pieces of flat tensors, for the elementwise steps: on CPU a mixed-dtype op
    (bf16 weights, fp32 math) makes temporaries of one piece, not of the whole tensor, and
    each piece is still in cache for the next step. One dtype, or a GPU: a single piece.
    Elementwise steps, so the result is the same either way."""
    mixed = tensors[0].device.type == "cpu" and len({t.dtype for t in tensors}) > 1
    return zip(*(t.split(CHUNK if mixed else max(1, t.numel())) for t in tensors))


def _task_vectors(w0, ws, workspace=None):
    """Stacks the flattened d_i = w_i - w0 as rows of an (N, numel) matrix in fp32 or wider.

    `workspace` (a dict) keeps one buffer per device and dtype across calls: a fresh
    allocation of N copies of a large tensor per key costs more than the math on CPU.
    """
    acc = torch.promote_types(torch.promote_types(w0.dtype, ws[0].dtype), torch.float32)
    v0 = w0.reshape(-1).to(ws[0].device)  # in w0's own dtype: no fp32 copy of the whole tensor
    workspace = {} if workspace is None else workspace
    buf = workspace.get((v0.device, acc))
    if buf is None or buf.numel() < len(ws) * v0.numel():
        buf = torch.empty(len(ws) * v0.numel(), dtype=acc, device=v0.device)
        workspace[(v0.device, acc)] = buf
    d = buf[: len(ws) * v0.numel()].view(len(ws), -1)
    flat = [w.reshape(-1).to(v0.device) for w in ws]
    for v0_c, *pieces in _chunks(v0, *flat, *d):
        # The subtraction runs in `acc`: bf16 - bf16 rounded in bf16 loses d.
        v0_c = v0_c.to(acc)  # converted once per piece, used by all N rows
        for w_c, d_c in zip(pieces[: len(ws)], pieces[len(ws):]):
            d_c.copy_(w_c).sub_(v0_c)  # copy_ converts w exactly, with no temporary
    return d


def mean_cos(gram):
    """Mean over pairs i < j of d_i.d_j / (|d_i| |d_j|), from the Gram matrix of the d_i."""
    norms = gram.diagonal().sqrt()
    denom = torch.outer(norms, norms)
    # A zero task vector (an untrained tensor) makes its pairs 0/0: count them as cos 0.
    # `denom == 0`, not `denom > 0`, so that NaN from a non-finite input stays NaN.
    cos = torch.where(denom == 0, torch.zeros_like(gram), gram / denom)
    i, j = torch.triu_indices(len(gram), len(gram), offset=1, device=gram.device)
    # A non-finite Gram entry (NaN/inf input, or |d|^2 overflowing) must not pass as cos 0.
    return torch.where(torch.isfinite(gram).all(), cos[i, j].mean(), torch.nan)


def cosine(w0, ws):
    """Mean pairwise cosine between the task vectors of one tensor, in [-1, 1]."""
    if len(ws) < 2:
        raise ValueError(f"a cosine needs at least 2 fine-tuned tensors, got {len(ws)}")
    d = _task_vectors(w0, ws)
    return mean_cos(d @ d.T).item()


def ratio(cos, n):
    """Model Stock's interpolation ratio t for n fine-tuned models; float or tensor in and out.

    cos is clamped to [0, 1] first: for cos <= 0 the thin-shell geometry puts the center at
    w0 (t = 0), and the unclamped formula has a pole at cos = -1/(n-1).
    """
    cos = cos.clamp(0, 1) if torch.is_tensor(cos) else min(max(cos, 0.0), 1.0)
    return n * cos / (1 + (n - 1) * cos)  # Eq. (3); Eq. (2) for n = 2


def merge_tensor(w0, ws, workspace=None):
    """w_h = w0 + t * mean(d) for one floating tensor: merge's per-key step, which
    merge_checkpoints.py reuses on streamed files. Returns (w_h, t, gram) with t a 0-dim
    tensor and gram the (N, N) matrix of d_i . d_j (|d_i|^2 on its diagonal)."""
    d = _task_vectors(w0, ws, workspace)
    gram = d @ d.T
    t = ratio(mean_cos(gram), len(ws))
    scale = t / len(ws)
    w_h = torch.empty(ws[0].shape, dtype=ws[0].dtype, device=ws[0].device)
    for out_c, w0_c, *d_c in _chunks(w_h.view(-1), w0.reshape(-1).to(w_h.device), *d):
        step = d_c[0]  # t * mean_i(d_i), summed in place in the workspace: no new buffer
        for d_i in d_c[1:]:
            step.add_(d_i)
        # w0 + step computed in `acc`, rounded once into the output's dtype.
        torch.add(w0_c, step.mul_(scale), out=out_c)
    return w_h, t, gram


def check(w0, ws, names=None):
    """Fails before any work if the state dicts cannot be merged key by key. `names` are what
    messages call w0 and each of ws (default: the pre-trained model, ws[0], ...); any values
    with a shape and a dtype will do, meta tensors included."""
    if len(ws) < 2:
        raise ValueError(f"Model Stock needs at least 2 fine-tuned models, got {len(ws)}")
    name0, *names = names or _names(ws)
    for name, w in zip(names, ws):
        missing, extra = sorted(w0.keys() - w.keys()), sorted(w.keys() - w0.keys())
        if missing:
            raise ValueError(f"{name} lacks key {missing[0]!r} of {name0}")
        if extra:
            raise ValueError(f"{name} has key {extra[0]!r}, absent from {name0}")
        for key, v0 in w0.items():
            v = w[key]
            if v.shape != v0.shape:
                raise ValueError(f"key {key!r}: {name} has shape {tuple(v.shape)}, "
                                 f"{name0} {tuple(v0.shape)}")
            if v.is_floating_point() != v0.is_floating_point() or v.is_complex() or v0.is_complex():
                raise ValueError(f"key {key!r}: {name} is {v.dtype}, {name0} {v0.dtype}; "
                                 f"expected both floating or both integer/bool")


def _names(ws):
    return ["the pre-trained model"] + [f"ws[{i}]" for i in range(len(ws))]


def raise_non_finite(key, tensors, names):
    """Names the input (of w0 and ws) that made t NaN: a non-finite value, or a dot product
    overflowing."""
    for name, v in zip(names, tensors):
        if not torch.isfinite(v).all():
            raise ValueError(f"key {key!r}: {name} holds NaN or inf; refusing to merge it")
    raise ValueError(f"key {key!r}: task-vector dot products overflow the accumulation dtype")


def merge(w0, ws):
    """Layer-wise Model Stock of n >= 2 fine-tuned state dicts `ws` around the pre-trained `w0`.

    Returns (w_h, ts): the merged state dict, each tensor in the dtype and on the device of
    the first fine-tuned model's, and {key: t} for every floating tensor. Integer and bool
    tensors (step counters, ids) are copied from ws[0]. Inputs are never modified.

    Example:
        >>> w0 = {"w": torch.tensor([1., 2., 3.])}
        >>> ws = [{"w": torch.tensor([3., 2., 4.])}, {"w": torch.tensor([1., 4., 4.])}]
        >>> w_h, ts = merge(w0, ws)   # cos = 0.2, t = 1/3 (derivation.md's worked example)
        >>> w_h["w"]
        tensor([1.3333, 2.3333, 3.3333])
    """
    check(w0, ws)
    w_h, ts, workspace = {}, {}, {}
    for key, v0 in w0.items():  # key by key: peak extra memory is a few copies of one tensor
        vs = [w[key] for w in ws]
        if v0.is_floating_point():
            w_h[key], ts[key], _ = merge_tensor(v0, vs, workspace)
        else:
            w_h[key] = vs[0].clone()
    # One device-to-host copy for all t (no sync per key on CUDA); NaN t means bad input.
    t_values = torch.stack([t.to(torch.float64) for t in ts.values()]).tolist() if ts else []
    for key, t in zip(list(ts), t_values):
        if t != t:
            raise_non_finite(key, [w0[key]] + [w[key] for w in ws], _names(ws))
        ts[key] = t
    return w_h, ts


@torch.no_grad()
def merge_models_(models, w0):
    """Periodic merging: overwrites every model in `models` with Model Stock around `w0`.

    `models` are nn.Modules of one architecture (all on one device), `w0` the pre-trained
    state dict, ideally on that device too. Everything is computed before anything is
    written, so bad input raises and leaves the models as they were. Returns {key: t}.
    """
    states = [m.state_dict() for m in models]  # tensors alias the models' own storage
    w_h, ts = merge(w0, states)
    for state in states:
        for key, value in w_h.items():
            state[key].copy_(value)
    return ts
