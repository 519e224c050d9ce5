"""The closed-form t against the truth on synthetic Gaussian weight shells (derivation.md §7).

Fine-tuned weights are drawn as w_i = mu + sigma * eps_i in dimension n = 1e5, with the
offset a = mu - w0 orthogonal to every eps_i. The center mu is known, so the best ratio
on the line w0 -> w_avg is known too: t* = a.(w_avg - w0) / |w_avg - w0|^2.
"""
import math

import pytest
import torch

import model_stock

DIM = 100_000


def gaussian_shell(n_models, cos, seed, dim=DIM, sigma=0.01):
    """(w0, ws, mu) with E[cos(d_i, d_j)] = cos, in float64."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(n_models, dim, generator=gen, dtype=torch.float64)
    a = torch.randn(dim, generator=gen, dtype=torch.float64)
    a -= eps.T @ torch.linalg.solve(eps @ eps.T, eps @ a)  # a orthogonal to span(eps_i)
    # d_i = a + sigma eps_i, so cos = A / (A + S) with A = |a|^2, S = sigma^2 dim.
    noise_energy = sigma**2 * dim
    a *= math.sqrt(cos / (1 - cos) * noise_energy) / a.norm()
    mu = 0.05 * torch.randn(dim, generator=gen, dtype=torch.float64)
    return mu - a, [mu + sigma * e for e in eps], mu


def oracle_t(w0, ws, mu):
    """argmin_t |t w_avg + (1 - t) w0 - mu|: the foot of mu on the line w0 -> w_avg."""
    d_avg = torch.stack(ws).mean(0) - w0
    return ((mu - w0) @ d_avg / (d_avg @ d_avg)).item()


def tolerance(t_star, n_models, cos, dim=DIM, sigmas=5.0):
    """5 standard deviations of t - t* (derivation.md §7).

    To first order, t - t* = -t*(1 - t*) (N + (1 - cos)/cos) g, where g is the mean over
    pairs of eps_i.eps_j / |eps|^2, of standard deviation sqrt(2 / (N (N - 1) dim)).
    Fluctuations of the norms |eps_i| cancel between the two to first order.
    """
    spread = math.sqrt(2 / (n_models * (n_models - 1) * dim))
    return sigmas * t_star * (1 - t_star) * (n_models + (1 - cos) / cos) * spread


@pytest.mark.parametrize("n_models", range(2, 9))
@pytest.mark.parametrize("cos", [0.1, 0.5, 0.9])
def test_closed_form_t_matches_oracle(n_models, cos):
    w0, ws, mu = gaussian_shell(n_models, cos, seed=10 * n_models + int(10 * cos))
    w_h, ts = model_stock.merge({"w": w0.float()}, [{"w": w.float()} for w in ws])
    t_star = oracle_t(w0, ws, mu)
    tol = tolerance(t_star, n_models, cos)
    assert abs(ts["w"] - t_star) <= tol
    # The check is sharp enough to reject the two-model rule used for N > 2.
    if n_models > 2:
        assert abs(model_stock.ratio(cos, 2) - t_star) > 2 * tol

    # w_h is closer to the center than the plain average and than every fine-tuned model.
    dist = lambda w: (w.double() - mu).norm().item()  # noqa: E731
    w_avg = torch.stack(ws).mean(0)
    assert dist(w_h["w"]) < dist(w_avg)
    assert all(dist(w_h["w"]) < dist(w) for w in ws)


def test_shell_geometry_matches_the_model():
    """The generator really produces the thin shell of paper Eq. (1) with the requested cos."""
    w0, ws, mu = gaussian_shell(4, 0.3, seed=0)
    assert model_stock.cosine(w0, ws) == pytest.approx(0.3, abs=0.01)
    norms = torch.stack([(w - w0).norm() for w in ws])
    assert (norms.std() / norms.mean()).item() < 0.01  # equal |d_i|: a thin shell
    assert abs((mu - w0) @ (ws[0] - mu)).item() < 1e-9 * (mu - w0).norm() * (ws[0] - mu).norm()
