"""derivation.md's identities, each on weights built with the exact geometry of the model, and its figure.

Exact geometry (paper Eq. (1) and Appendix B to the letter): m = mu - w0 and the e_i = w_i - mu
are mutually orthogonal, |m|^2 = l^2 cos and |e_i|^2 = l^2 (1 - cos), so d_i = m + e_i has
|d_i| = l and cos(d_i, d_j) = cos.
"""
import importlib.util
import math
import re

import pytest
import torch

import model_stock
from conftest import ROOT


def exact_geometry(n_models, cos, l2=3.0, dim=40, seed=0):
    """(w0, ws, mu) in float64 with the model's geometry exact, in a random orientation."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, n_models + 1, generator=gen, dtype=torch.float64))
    m = math.sqrt(l2 * cos) * q[:, 0]
    w0 = torch.randn(dim, generator=gen, dtype=torch.float64)
    ws = [w0 + m + math.sqrt(l2 * (1 - cos)) * q[:, i + 1] for i in range(n_models)]
    return w0, ws, w0 + m


def merged(w0, ws):
    w_h, ts = model_stock.merge({"w": w0}, [{"w": w} for w in ws])
    return w_h["w"], ts["w"]


@pytest.mark.parametrize("cos", [0.05, 0.2, 0.5, 0.9])
def test_w_h_is_the_orthocenter_of_the_triangle(cos):
    """Appendix D's remark: (w_H - w1).(w2 - w0) = 0, and likewise for w2 and for w0, exactly
    when t = 2 cos / (1 + cos). It needs Eq. (1) only, not the center."""
    w0, (w1, w2), _ = exact_geometry(2, cos, seed=int(100 * cos))
    w_h, t = merged(w0, [w1, w2])
    scale = ((w1 - w0) @ (w1 - w0)).item()  # l^2
    for a, b, c in [(w1, w2, w0), (w2, w1, w0), (w0, w1, w2)]:  # the altitude from each vertex
        assert abs((w_h - a) @ (b - c)) < 1e-12 * scale
    # (w_H - w1).(w2 - w0) = l^2 (t (1 + cos) / 2 - cos) is linear in t: any other ratio misses.
    for other in (t - 0.05, t + 0.05, 1.0):
        w_other = w0 + other * ((w1 + w2) / 2 - w0)
        assert ((w_other - w1) @ (w2 - w0)).item() == pytest.approx(scale * (other * (1 + cos) / 2 - cos), rel=1e-9)
        assert abs((w_other - w1) @ (w2 - w0)) > 1e-3 * scale


@pytest.mark.parametrize("n_models", [2, 3, 5])
@pytest.mark.parametrize("cos", [0.1, 0.5, 0.9])
def test_distance_to_the_center_shrinks_by_t(n_models, cos):
    """|w_H - mu|^2 = l^2 cos (1 - t) = t |w_avr - mu|^2, and |w_avr - mu|^2 = l^2 (1 - cos) / N."""
    l2 = 3.0
    w0, ws, mu = exact_geometry(n_models, cos, l2=l2, seed=n_models)
    w_h, t = merged(w0, ws)
    w_avr = torch.stack(ws).mean(0)
    to_avr, to_h = (w_avr - mu) @ (w_avr - mu), (w_h - mu) @ (w_h - mu)
    assert to_avr.item() == pytest.approx(l2 * (1 - cos) / n_models, rel=1e-9)
    assert to_h.item() == pytest.approx(l2 * cos * (1 - t), rel=1e-9)
    assert (to_h / to_avr).item() == pytest.approx(t, rel=1e-9)
    # And w_H is the point of the line w0 -> w_avr closest to mu (Eq. 8): the residual is orthogonal.
    assert abs((mu - w_h) @ (w_avr - w0)) < 1e-12 * l2


def test_reading_t_off_the_papers_table_7():
    """derivation.md §5: Table 7's distances give t = (|w_H - mu| / |w_avr - mu|)^2, and back the cosine."""
    table_7 = {2: (9.19, 7.62), 3: (7.44, 6.49), 4: (5.63, 5.16)}  # N: (|w_avr - mu|, |w_H - mu|)
    cosines = {}
    for n, (to_avr, to_h) in table_7.items():
        t = (to_h / to_avr) ** 2
        cosines[n] = t / (n - (n - 1) * t)  # Eq. (3) solved for cos
        assert model_stock.ratio(cosines[n], n) == pytest.approx(t)
    assert [round(cosines[n], 2) for n in (2, 3, 4)] == [0.52, 0.51, 0.57]
    t = (5.16 / 5.63) ** 2  # the last row's distances are Table 1's average of five
    assert round(t / (5 - 4 * t), 2) == 0.51


def test_table_1_distances_count_the_members_inside_the_center():
    """derivation.md §1: an average of N of the 50 models is r sqrt(1/N - 1/50) from their mean."""
    single = 13.133
    predicted = [single * math.sqrt((1 / n - 1 / 50) / (1 - 1 / 50)) for n in (2, 3, 5)]
    assert [round(x, 2) for x in predicted] == [9.19, 7.43, 5.63]
    measured, spread = [9.192, 7.439, 5.633], [0.003, 0.025, 0.014]  # Table 1: mean +- spread
    assert all(abs(p - m) <= s for p, m, s in zip(predicted, measured, spread))


def worked_example():
    """The `name = value  # comment` lines of derivation.md's worked-example block, as float64 tensors."""
    block = (ROOT / "derivation.md").read_text().split("<!-- worked-example -->", 1)[1].split("```")[1]
    rows = (line.split("#")[0].split("=", 1) for line in block.splitlines() if "=" in line)
    return {name.strip(): torch.tensor([float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", value)], dtype=torch.float64)
            for name, value in rows}


def test_the_worked_example_has_an_exact_center():
    """derivation.md §10: its mu satisfies the model to the letter, and its distances are the code's."""
    ex = worked_example()
    w0, w1, w2, mu = ex["w0"], ex["w1"], ex["w2"], ex["mu"]
    m, e1, e2 = mu - w0, w1 - mu, w2 - mu
    assert (m @ e1, m @ e2, e1 @ e2) == (0, 0, 0)  # Propositions 2 and 3
    assert (m @ m, e1 @ e1, e2 @ e2) == (1, 4, 4)  # l^2 cos = 1 and l^2 (1 - cos) = 4, l^2 = 5
    w_h, t = merged(w0, [w1, w2])
    w_avg = (w1 + w2) / 2
    assert ((w_h - mu) @ (w_h - mu)).item() == pytest.approx(ex["wh_mu2"].item(), abs=1e-6)
    assert ((w_avg - mu) @ (w_avg - mu)).item() == pytest.approx(ex["avg_mu2"].item())
    assert ((w_h - w1) @ (w2 - w0)).item() == pytest.approx(ex["ortho"].item(), abs=1e-12)


def test_the_figure_is_the_output_of_its_script():
    spec = importlib.util.spec_from_file_location("triangle", ROOT / "figures" / "triangle.py")
    triangle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(triangle)
    assert (ROOT / "figures" / "triangle.svg").read_text() == triangle.svg()
    points, t = triangle.model_points(0.2)
    torch.testing.assert_close(points["mu"], torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    assert t == pytest.approx(1 / 3)


def quadratic_error(w0, m, alpha_star, kappa):
    """derivation.md Eq. (15) with A = 1: |m|^2 (alpha - alpha*)^2 + kappa |e|^2, where
    w - w0 = alpha m + e with e orthogonal to m."""
    mm = m @ m

    def error(w):
        alpha = (w - w0) @ m / mm
        e = (w - w0) - alpha * m
        return (mm * (alpha - alpha_star) ** 2 + kappa * (e @ e)).item()
    return error


def best_on_line(error, start, direction):
    """The best point s of error(start + s direction), exact for a quadratic: the parabola
    through s = 0, 1, 2."""
    e0, e1, e2 = (error(start + s * direction) for s in (0.0, 1.0, 2.0))
    curvature = (e0 - 2 * e1 + e2) / 2
    return 1 - (e2 - e0) / (4 * curvature), curvature


def test_the_condition_predicts_which_wins_on_a_quadratic():
    """derivation.md §11 on exact shells (§9's oracle) with the error (15): Eq. (13) to rounding,
    the lines' best points (16)-(17), the estimate (19) of kappa rho, and the sign from (18)."""
    from test_shells import shell

    signs = {True: 0, False: 0}
    for n, cos, seed in [(2, 0.3, 0), (2, 0.55, 1), (2, 0.8, 2), (3, 0.55, 3)]:
        w0, ws, mu, m, _ = shell(n, cos, seed, orthogonal=True, dim=50_000)
        d_bar = torch.stack(ws).mean(0) - w0
        merged, ts = model_stock.merge({"w": w0}, [{"w": w} for w in ws])
        t = ts["w"]
        c = model_stock.cosine(w0, ws)
        rho = (1 - c) / c
        for alpha_star in (0.7, 0.85, 1.0, 1.1):
            for kappa in (0.05, 0.3, 1.0):
                error = quadratic_error(w0, m, alpha_star, kappa)
                gain = error(w0 + d_bar) - error(merged["w"])  # Model Stock over the plain average
                beta_star, curvature = best_on_line(error, w0, d_bar)
                assert gain == pytest.approx(curvature * (1 - t) * (1 + t - 2 * beta_star), rel=1e-9)  # (13)
                alpha_1, _ = best_on_line(error, w0, ws[0] - w0)
                kr = kappa * rho
                assert alpha_1 == pytest.approx(alpha_star / (1 + kr), rel=0.02)  # (16)
                assert beta_star == pytest.approx(alpha_star / (1 + kr / n), rel=0.02)  # (17)
                rise = error(ws[0]) - error(w0 + alpha_1 * (ws[0] - w0))
                g = (error(ws[0]) - error(w0 + d_bar)) / rise
                estimate = g * (1 - alpha_1) ** 2 / ((1 - 1 / n) - g * (1 - alpha_1) ** 2)
                assert estimate == pytest.approx(kr, rel=0.1, abs=0.01)  # (19)
                alpha_max = (1 + t) * (1 + kr / n) / (2 * (1 + kr))  # (18)
                if abs(alpha_1 - alpha_max) > 0.02:
                    assert (alpha_1 < alpha_max) == (gain > 0), (n, cos, alpha_star, kappa)
                    signs[gain > 0] += 1
    assert signs[True] >= 5 and signs[False] >= 5, signs  # both outcomes occur: the test can fail
