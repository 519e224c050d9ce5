"""model_stock.py: the ratio, the geometry, merging state dicts and the decisions of derivation.md."""
import copy
import math
import re
from pathlib import Path

import pytest
import torch

from model_stock import cosine, merge, merge_models_, ratio

ROOT = Path(__file__).resolve().parents[1]


def state(seed, shapes=((8, 6), (6,), (3, 4, 5)), scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return {f"k{i}": scale * torch.randn(s, generator=gen) for i, s in enumerate(shapes)}


def finetunes(w0, n, seed=1, step=0.1):
    """n 'fine-tuned' state dicts: w0 plus a shared direction plus per-model noise."""
    gen = torch.Generator().manual_seed(seed)
    shared = {k: torch.randn(v.shape, generator=gen) for k, v in w0.items()}
    return [{k: v + step * (shared[k] + torch.randn(v.shape, generator=gen)) for k, v in w0.items()}
            for _ in range(n)]


# ---- ratio (Eq. 2, Eq. 3) ----

@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_ratio_endpoints_and_two_model_form(n):
    assert ratio(1.0, n) == 1.0 and ratio(0.0, n) == 0.0
    assert ratio(0.5, 2) == pytest.approx(2 * 0.5 / 1.5)  # Eq. (2)
    assert ratio(0.5, n) == pytest.approx(n * 0.5 / (1 + (n - 1) * 0.5))  # Eq. (3)


def test_ratio_clamps_cos_to_unit_interval():
    # The unclamped formula gives t < 0, and a pole at cos = -1/(n-1).
    assert ratio(-0.5, 3) == 0.0 and ratio(-1.0, 2) == 0.0 and ratio(1.0 + 1e-6, 2) == 1.0
    t = ratio(torch.tensor([-1.0, -0.5, 0.25, 1.5]), 3)
    assert torch.equal(t, torch.tensor([0.0, 0.0, 0.5, 1.0]))


def test_ratio_is_monotone_and_grows_with_n():
    cos = torch.linspace(0, 1, 101)
    for n in range(2, 9):
        t = ratio(cos, n)
        assert (t.diff() > 0).all() and (t >= cos - 1e-7).all()  # t >= cos: leans on the fine-tunes
        assert (ratio(cos[1:-1], n + 1) > t[1:-1]).all()  # Fig. D(b): t -> 1 as N grows


# ---- cosine ----

def test_cosine_is_mean_of_pairwise_cosines():
    w0 = torch.zeros(3)
    ws = [torch.tensor([1.0, 0, 0]), torch.tensor([1.0, 1, 0]), torch.tensor([0.0, 0, 2])]
    pairs = [1 / math.sqrt(2), 0.0, 0.0]  # (0,1), (0,2), (1,2)
    assert cosine(w0, ws) == pytest.approx(sum(pairs) / 3)
    assert cosine(w0, ws[::-1]) == pytest.approx(sum(pairs) / 3)


def test_cosine_uses_task_vectors_not_raw_weights():
    w0 = torch.tensor([10.0, 10.0])
    ws = [torch.tensor([11.0, 10.0]), torch.tensor([10.0, 11.0])]  # raw weights nearly parallel
    assert cosine(w0, ws) == pytest.approx(0.0, abs=1e-7)


def test_zero_task_vector_counts_as_cos_zero():
    w0 = torch.tensor([1.0, 2.0, 3.0])
    ws = [w0.clone(), w0 + torch.tensor([1.0, 0, 0]), w0 + torch.tensor([2.0, 0, 0])]
    assert cosine(w0, ws) == pytest.approx(1 / 3)  # pairs: 0, 0, 1


# ---- limiting cases (derivation.md §8) ----

def test_parallel_task_vectors_give_the_plain_average():
    """cos = 1: t = 1, w_h = w_avg."""
    w0 = state(0)
    direction = state(1)
    ws = [{k: w0[k] + s * direction[k] for k in w0} for s in (0.5, 1.0, 2.0)]
    w_h, ts = merge(w0, ws)
    assert all(t == pytest.approx(1.0) for t in ts.values())
    for k in w0:
        torch.testing.assert_close(w_h[k], torch.stack([w[k] for w in ws]).mean(0))


def test_orthogonal_task_vectors_give_w0():
    """cos = 0: t = 0, w_h = w0."""
    w0 = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    ws = [{"w": w0["w"] + torch.tensor([1.0, 0, 0, 0])}, {"w": w0["w"] + torch.tensor([0, 3.0, 0, 0])}]
    w_h, ts = merge(w0, ws)
    assert ts["w"] == 0.0 and torch.equal(w_h["w"], w0["w"])


def test_identical_models_merge_to_themselves():
    w0 = state(0)
    w1 = finetunes(w0, 1)[0]
    w_h, ts = merge(w0, [w1, copy.deepcopy(w1), copy.deepcopy(w1)])
    assert all(t == pytest.approx(1.0) for t in ts.values())
    for k in w0:
        torch.testing.assert_close(w_h[k], w1[k])


def test_order_of_the_finetuned_models_does_not_matter():
    w0 = state(0)
    ws = finetunes(w0, 4)
    w_h, ts = merge(w0, ws)
    for perm in ([3, 2, 1, 0], [1, 3, 0, 2]):
        w_p, ts_p = merge(w0, [ws[i] for i in perm])
        assert ts_p == pytest.approx(ts, abs=1e-6)
        for k in w0:
            torch.testing.assert_close(w_p[k], w_h[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-4, 0.3, 50.0])
def test_scaling_all_task_vectors_keeps_t_and_scales_the_step(scale):
    # float64: a float32 weight near 1 cannot even store a step of 1e-5 to better than 1%.
    w0 = {k: v.double() for k, v in state(0).items()}
    ws = finetunes(w0, 3)
    scaled = [{k: w0[k] + scale * (w[k] - w0[k]) for k in w0} for w in ws]
    w_h, ts = merge(w0, ws)
    w_s, ts_s = merge(w0, scaled)
    assert ts_s == pytest.approx(ts, abs=1e-9)
    for k in w0:
        torch.testing.assert_close(w_s[k] - w0[k], scale * (w_h[k] - w0[k]), rtol=1e-7, atol=1e-9 * scale)


# ---- decisions (derivation.md §7) ----

def test_negative_cos_gives_w0_not_nan():
    w0 = {"w": torch.tensor([1.0, 1.0, 1.0])}
    d = torch.tensor([0.5, -1.0, 2.0])
    w_h, ts = merge(w0, [{"w": w0["w"] + d}, {"w": w0["w"] - 0.7 * d}])
    assert ts["w"] == 0.0 and torch.equal(w_h["w"], w0["w"])


def test_the_pole_of_the_unclamped_formula_is_harmless():
    """Three task vectors at 120 degrees: cos = -1/2 = -1/(N-1), where Eq. (3) unclamped divides by 0."""
    w0 = {"w": torch.zeros(2)}
    ws = [{"w": torch.tensor([math.cos(a), math.sin(a)])} for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    assert cosine(w0["w"], [w["w"] for w in ws]) == pytest.approx(-0.5)
    w_h, ts = merge(w0, ws)
    assert ts["w"] == 0.0 and torch.equal(w_h["w"], w0["w"])


def test_scalar_tensors_are_all_or_nothing():
    """A 1-element task vector has cos +1 or -1: the plain average, or w0."""
    w0 = {"same": torch.tensor(2.0), "opposite": torch.tensor([2.0])}
    ws = [{"same": torch.tensor(3.0), "opposite": torch.tensor([3.0])},
          {"same": torch.tensor(2.5), "opposite": torch.tensor([1.0])}]
    w_h, ts = merge(w0, ws)
    assert ts == {"same": pytest.approx(1.0), "opposite": 0.0}
    torch.testing.assert_close(w_h["same"], torch.tensor(2.75))
    assert torch.equal(w_h["opposite"], w0["opposite"])


def test_untrained_tensors_stay_w0():
    w0 = state(0)
    ws = [copy.deepcopy(w0) for _ in range(3)]
    ws[0]["k0"] = ws[0]["k0"] + 1.0  # one model trained one tensor; the rest are untouched
    w_h, ts = merge(w0, ws)
    assert ts["k1"] == 0.0 and torch.equal(w_h["k1"], w0["k1"])
    assert ts["k0"] == 0.0 and torch.equal(w_h["k0"], w0["k0"])  # pairs (0,1), (0,2), (1,2): all 0


def test_integer_and_bool_tensors_are_copied_from_the_first_model():
    w0 = {"w": torch.ones(4), "steps": torch.tensor(0), "ids": torch.arange(4), "mask": torch.zeros(3, dtype=torch.bool)}
    ws = [{"w": torch.ones(4) * 2, "steps": torch.tensor(7), "ids": torch.arange(4) + 1, "mask": torch.ones(3, dtype=torch.bool)},
          {"w": torch.ones(4) * 3, "steps": torch.tensor(9), "ids": torch.arange(4) + 2, "mask": torch.zeros(3, dtype=torch.bool)}]
    w_h, ts = merge(w0, ws)
    assert set(ts) == {"w"}
    for k in ("steps", "ids", "mask"):
        assert w_h[k].dtype == ws[0][k].dtype and torch.equal(w_h[k], ws[0][k])
        assert w_h[k].data_ptr() != ws[0][k].data_ptr()  # a copy, not an alias


def test_inputs_are_never_modified():
    w0 = state(0)
    ws = finetunes(w0, 3)
    before = copy.deepcopy((w0, ws))
    merge(w0, ws)
    for a, b in zip([w0] + ws, [before[0]] + before[1]):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_inputs_never_produce_nan_or_inf():
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(2, 6, (1,), generator=gen))
        numel = int(torch.randint(1, 5, (1,), generator=gen))
        scale = 10.0 ** float(torch.randint(-15, 16, (1,), generator=gen))  # |d|^2 fits float32
        w0 = {"w": torch.randn(numel, generator=gen)}
        ws = [{"w": w0["w"] + scale * torch.randn(numel, generator=gen) * (torch.rand(1, generator=gen) > 0.2)}
              for _ in range(n)]
        w_h, ts = merge(w0, ws)
        assert torch.isfinite(w_h["w"]).all() and 0.0 <= ts["w"] <= 1.0, (trial, ws)


# ---- dtypes and devices ----

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_is_preserved_and_geometry_is_accurate(dtype):
    w0 = {k: v.to(dtype) for k, v in state(0, shapes=((64, 64), (64,))).items()}
    ws = [{k: v.to(dtype) for k, v in w.items()} for w in finetunes(w0, 2, step=0.01)]
    w_h, ts = merge(w0, ws)
    # Reference: the same low-precision values, merged in float64.
    ref_h, ref_ts = merge({k: v.double() for k, v in w0.items()}, [{k: v.double() for k, v in w.items()} for w in ws])
    for k in w0:
        assert w_h[k].dtype == dtype and w_h[k].shape == w0[k].shape
        assert ts[k] == pytest.approx(ref_ts[k], abs=1e-5)
        torch.testing.assert_close(w_h[k], ref_h[k].to(dtype))


def test_output_follows_the_finetuned_models_when_w0_differs():
    w0 = state(0)
    ws = [{k: v.to(torch.bfloat16) for k, v in w.items()} for w in finetunes(w0, 2)]
    w_h, _ = merge(w0, ws)
    assert all(v.dtype == torch.bfloat16 for v in w_h.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_stay_on_the_gpu():
    w0 = {k: v.cuda() for k, v in state(0).items()}
    ws = [{k: v.cuda().to(torch.bfloat16) for k, v in w.items()} for w in finetunes(w0, 2)]
    w_h, ts = merge(w0, ws)
    assert all(v.is_cuda and v.dtype == torch.bfloat16 for v in w_h.values())
    ref_h, ref_ts = merge({k: v.cpu() for k, v in w0.items()}, [{k: v.cpu() for k, v in w.items()} for w in ws])
    assert ts == pytest.approx(ref_ts, abs=1e-5)


# ---- bad input: one clear error, naming what is wrong ----

@pytest.mark.parametrize("mutate, message", [
    (lambda w0, ws: ws.pop(), r"at least 2 fine-tuned models, got 1"),
    (lambda w0, ws: ws[1].pop("k1"), r"ws\[1\] lacks key 'k1'"),
    (lambda w0, ws: ws[1].update(extra=torch.ones(1)), r"ws\[1\] has key 'extra', absent"),
    (lambda w0, ws: ws[0].update(k1=torch.ones(7)), r"key 'k1': ws\[0\] has shape \(7,\), the pre-trained model \(6,\)"),
    (lambda w0, ws: ws[1].update(k1=torch.ones(6, dtype=torch.long)), r"key 'k1': ws\[1\] is torch.int64, the pre-trained model torch.float32"),
    (lambda w0, ws: ws[1]["k2"].__setitem__((0, 0, 0), float("nan")), r"key 'k2': ws\[1\] holds NaN or inf"),
    (lambda w0, ws: ws[0]["k0"].__setitem__((1, 1), float("inf")), r"key 'k0': ws\[0\] holds NaN or inf"),
    (lambda w0, ws: w0["k1"].__setitem__(2, float("nan")), r"key 'k1': the pre-trained model holds NaN or inf"),
])
def test_bad_input_raises_a_clear_error(mutate, message):
    w0 = state(0)
    ws = finetunes(w0, 2)
    mutate(w0, ws)
    with pytest.raises(ValueError, match=message):
        merge(w0, ws)


@pytest.mark.parametrize("big", [[3e38, 2e38], [1e19, 1e-3]])  # both, or only one |d|^2 overflows
def test_overflowing_dot_products_are_reported(big):
    w0 = {"w": torch.zeros(4)}
    ws = [{"w": torch.full((4,), x)} for x in big]
    with pytest.raises(ValueError, match="key 'w': task-vector dot products overflow"):
        merge(w0, ws)


def test_cosine_needs_two_models():
    with pytest.raises(ValueError, match="at least 2 fine-tuned tensors, got 1"):
        cosine(torch.zeros(3), [torch.ones(3)])


# ---- an independent oracle: element by element, in Python floats ----

def slow_model_stock(w0, ws):
    """Eq. (3) from scratch for one tensor: lists of Python floats, math.fsum, no torch."""
    v0 = w0.double().flatten().tolist()
    ds = [[a - b for a, b in zip(w.double().flatten().tolist(), v0)] for w in ws]
    n = len(ds)
    cos_pairs = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = math.fsum(a * b for a, b in zip(ds[i], ds[j]))
            norm_i = math.sqrt(math.fsum(a * a for a in ds[i]))
            norm_j = math.sqrt(math.fsum(b * b for b in ds[j]))
            cos_pairs.append(dot / (norm_i * norm_j) if norm_i * norm_j else 0.0)
    cos = min(max(math.fsum(cos_pairs) / len(cos_pairs), 0.0), 1.0)
    t = n * cos / (1 + (n - 1) * cos)
    return [x + t * math.fsum(d[e] for d in ds) / n for e, x in enumerate(v0)], t


@pytest.mark.parametrize("n", [2, 3, 5])
def test_merge_matches_the_element_by_element_oracle(n):
    w0 = state(3, shapes=((5, 7), (7,), (2, 3, 4)))
    ws = finetunes(w0, n, seed=n)
    w_h, ts = merge(w0, ws)
    for k in w0:
        expected, t = slow_model_stock(w0[k], [w[k] for w in ws])
        assert ts[k] == pytest.approx(t, abs=1e-6)
        torch.testing.assert_close(w_h[k].flatten().double(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-6)


# ---- derivation.md's worked example ----

def worked_example():
    """The `name = value  # comment` lines of the block after '<!-- worked-example -->' in derivation.md."""
    text = (ROOT / "derivation.md").read_text()
    block = text.split("<!-- worked-example -->", 1)[1].split("```")[1]
    values = {}
    for line in block.splitlines()[1:]:
        if "=" in line:
            name, value = (s.strip() for s in line.split("#")[0].split("=", 1))
            values[name] = torch.tensor([float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", value)], dtype=torch.float64)
    return values


def test_worked_example_of_the_derivation():
    ex = worked_example()
    w0, w1, w2 = ex["w0"], ex["w1"], ex["w2"]
    d1, d2 = w1 - w0, w2 - w0
    assert torch.equal(d1, ex["d1"]) and torch.equal(d2, ex["d2"])
    assert (d1 @ d1, d2 @ d2, d1 @ d2) == (ex["d1.d1"], ex["d2.d2"], ex["d1.d2"])
    cos = cosine(w0, [w1, w2])
    assert cos == pytest.approx(ex["cos"].item(), abs=1e-4)
    assert math.degrees(math.acos(cos)) == pytest.approx(ex["angle"].item(), abs=1e-3)
    w_h, ts = merge({"w": w0}, [{"w": w1}, {"w": w2}])
    assert ts["w"] == pytest.approx(ex["t"].item(), abs=1e-5)
    torch.testing.assert_close((w1 + w2) / 2, ex["w_avg"])
    torch.testing.assert_close(w_h["w"], ex["w_h"], atol=1e-5, rtol=0)
    # Eq. (2)'s form t w_avg + (1 - t) w0 lands on the same point.
    torch.testing.assert_close(ts["w"] * ex["w_avg"] + (1 - ts["w"]) * w0, ex["w_h"], atol=1e-5, rtol=0)


# ---- periodic merging in place ----

def test_merge_models_overwrites_every_model_and_keeps_w0():
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3)) for _ in range(3)]
    w0 = copy.deepcopy(models[0].state_dict())
    for i, m in enumerate(models):  # "fine-tune": a shared step plus a per-model step
        m.load_state_dict(w0)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 + 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        m.train()(torch.randn(8, 6))  # BatchNorm running stats and its integer step counter move
    w0_before = copy.deepcopy(w0)
    expected, expected_ts = merge(w0, [m.state_dict() for m in models])
    ts = merge_models_(models, w0)
    assert ts == expected_ts
    for m in models:
        for k, v in m.state_dict().items():
            assert torch.equal(v, expected[k]), k
    assert all(torch.equal(w0[k], w0_before[k]) for k in w0)
    assert all(p.requires_grad for m in models for p in m.parameters())


def test_merge_models_leaves_the_models_alone_on_bad_input():
    models = [torch.nn.Linear(4, 3) for _ in range(2)]
    w0 = copy.deepcopy(models[0].state_dict())
    with torch.no_grad():
        models[1].bias[1] = float("nan")
    before = [copy.deepcopy(m.state_dict()) for m in models]
    with pytest.raises(ValueError, match=r"key 'bias': ws\[1\] holds NaN"):
        merge_models_(models, w0)
    for m, b in zip(models, before):
        assert all(torch.equal(v, b[k]) or torch.isnan(v).any() and torch.equal(v.isnan(), b[k].isnan())
                   for k, v in m.state_dict().items())
    assert torch.equal(models[0].weight, before[0]["weight"])


# ---- a real open_clip model ----

def test_merged_clip_state_dict_loads_strictly_and_runs(tiny_clip_name):
    import open_clip
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_clip_name, pretrained=None)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    ws = finetunes(w0, 2, step=0.01)
    w_h, ts = merge(w0, ws)
    assert set(ts) == {k for k, v in w0.items() if v.is_floating_point()}
    fresh = open_clip.create_model(tiny_clip_name, pretrained=None)
    fresh.load_state_dict(w_h, strict=True)
    features = fresh.encode_image(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 32) and torch.isfinite(features).all()
    # Periodic merging straight on the modules, in bf16.
    models = [open_clip.create_model(tiny_clip_name, pretrained=None).to(torch.bfloat16) for _ in range(2)]
    for m, w in zip(models, ws):
        m.load_state_dict(w)
    merge_models_(models, w0)
    for k, v in models[0].state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, models[1].state_dict()[k])
        torch.testing.assert_close(v, w_h[k].to(torch.bfloat16), atol=2e-2, rtol=2e-2)
