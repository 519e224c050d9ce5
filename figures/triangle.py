"""Draws derivation.md's figure: the triangle w0 w1 w2, the center mu and the merge w_H (paper Fig. 6 / C).

Two fine-tuned models whose task vectors have exactly the geometry of paper Eq. (1) and
Appendix B (|d_i| = l, cos(d_1, d_2) = cos, e_i = w_i - mu orthogonal to each other and to
m = mu - w0), for cos = 0.2 (derivation.md's worked example: l^2 = 5, mu = [1, 2, 4]) and
cos = 0.8. w_H comes from model_stock.merge; the points are projected onto the page in the
frame of the triangle. Needs only torch; the tests check that the checked-in SVG is this output.

    python figures/triangle.py          # rewrites figures/triangle.svg
"""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model_stock  # noqa: E402

OUTPUT = Path(__file__).with_suffix(".svg")
PANEL_W, PANEL_H, SCALE = 340, 330, 105  # pixels per panel; pixels per unit of weight space


def model_points(cos, l2=5.0, w0=(1.0, 2.0, 3.0)):
    """w0, w1, w2 and mu in R^3 with Eq. (1) and Propositions 1-3 exact, and w_H, t from the code."""
    l, x, y, z = math.sqrt(l2), *torch.eye(3, dtype=torch.float64)
    w0 = torch.tensor(w0, dtype=torch.float64)
    m = l * math.sqrt(cos) * z  # mu - w0: |m|^2 = l^2 cos (Lemma)
    w1 = w0 + m + l * math.sqrt(1 - cos) * x  # e_1 = w1 - mu, orthogonal to m and e_2
    w2 = w0 + m + l * math.sqrt(1 - cos) * y
    merged, ts = model_stock.merge({"w": w0}, [{"w": w1}, {"w": w2}])
    return {"w0": w0, "w1": w1, "w2": w2, "w12": (w1 + w2) / 2, "mu": w0 + m, "wH": merged["w"]}, ts["w"]


def frame_coordinates(points):
    """Each point as (u, v, n): u along w0 -> w12, v along w1 -> w2, n normal to the triangle."""
    u = points["w12"] - points["w0"]
    u = u / u.norm()
    v = points["w2"] - points["w1"]
    v = v / v.norm()
    n = torch.linalg.cross(u, v)
    if (points["mu"] - points["w0"]) @ n < 0:
        n = -n
    return {k: tuple(((p - points["w0"]) @ axis).item() for axis in (u, v, n)) for k, p in points.items()}


def to_page(uvn, left, top):
    """An oblique view of the triangle's plane from above: v recedes up and to the right."""
    u, v, n = uvn
    return left + 45 + SCALE * (u + 0.4 * v), top + 160 - SCALE * (0.55 * v + n)


def foot_on_line(p, a, b):
    """The foot of the perpendicular from p on the line a -> b (torch vectors)."""
    return a + ((p - a) @ (b - a)) / ((b - a) @ (b - a)) * (b - a)


def label(name):
    """SVG text for a point's name: w0, w_H, mu... with a lowered subscript."""
    if name == "mu":
        return "\u03bc"
    sub = {"w12": "avr", "wH": "H"}.get(name, name[1:])
    return f'w<tspan dy="4" font-size="11">{sub}</tspan>'


def panel(cos, left):
    points, t = model_points(cos)
    # The orthocenter remark: the altitude from w1 onto w0 w2 passes through w_H.
    points["foot1"] = foot_on_line(points["w1"], points["w0"], points["w2"])
    frame = frame_coordinates(points)
    u_h, s = frame["wH"][0], 0.12  # a right-angle mark at w_H, in the plane of w0, w_H and mu
    frame.update(mark_a=(u_h - s, 0, 0), mark_b=(u_h - s, 0, s), mark_c=(u_h, 0, s))
    page = {k: to_page(c, left, 0) for k, c in frame.items()}
    xy = lambda k: f"{page[k][0]:.1f},{page[k][1]:.1f}"  # noqa: E731
    line = lambda a, b, style: (f'<line x1="{page[a][0]:.1f}" y1="{page[a][1]:.1f}" x2="{page[b][0]:.1f}" '  # noqa: E731
                                f'y2="{page[b][1]:.1f}" {style}/>')
    angle = math.degrees(math.acos(cos))
    out = [f'<polygon points="{xy("w0")} {xy("w1")} {xy("w2")}" fill="#e8e8e8" stroke="#555" stroke-width="1.5"/>',
           line("w0", "w12", 'stroke="#555" stroke-dasharray="5,4"'),
           line("w1", "foot1", 'stroke="#777" stroke-dasharray="4,3"'),
           f'<polyline points="{xy("mark_a")} {xy("mark_b")} {xy("mark_c")}" fill="none" stroke="#c33"/>',
           *(line("mu", k, 'stroke="#c33" stroke-width="1" stroke-dasharray="2,3"') for k in ("w0", "w1", "w2")),
           line("mu", "wH", 'stroke="#c33" stroke-width="1.5"')]
    offsets = {"w0": (-26, 6), "w1": (-8, 22), "w2": (7, -6), "w12": (8, 16), "mu": (-5, -10), "wH": (-30, 16)}
    for k, (dx, dy) in offsets.items():
        colour = "#c33" if k in ("mu", "wH") else "#222"
        out.append(f'<circle cx="{page[k][0]:.1f}" cy="{page[k][1]:.1f}" r="3.5" fill="{colour}"/>')
        out.append(f'<text x="{page[k][0] + dx:.1f}" y="{page[k][1] + dy:.1f}" fill="{colour}">{label(k)}</text>')
    squared = {k: (points[k] - points["mu"]).pow(2).sum().item() for k in ("wH", "w12")}
    caption = [f"cos \u03b8 = {cos:g} (\u03b8 = {angle:.1f}\u00b0), t = {t:.3f}",
               f"|{label('wH')} \u2212 \u03bc|\u00b2 = {squared['wH']:.3f}, "
               f"|{label('w12')} \u2212 \u03bc|\u00b2 = {squared['w12']:.3f}"]
    out += [f'<text x="{left + 20}" y="{PANEL_H - 42 + 20 * i}" font-size="13">{c}</text>' for i, c in enumerate(caption)]
    return out


def svg():
    body = [*panel(0.2, 0), *panel(0.8, PANEL_W)]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * PANEL_W}" height="{PANEL_H}" '
            f'viewBox="0 0 {2 * PANEL_W} {PANEL_H}" font-family="sans-serif" font-size="15">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n")


if __name__ == "__main__":
    OUTPUT.write_text(svg())
    print(f"wrote {OUTPUT}")
