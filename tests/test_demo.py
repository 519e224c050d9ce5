"""demo.py --quick: the mechanics of the miniature (not its outcome), in well under a minute."""
import json

import pytest

import demo
from merge_checkpoints import load_state_dict


def test_quick_demo_runs_every_row(tmp_path):
    record = demo.main(["--quick", "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "demo.json")])
    assert json.loads((tmp_path / "demo.json").read_text())["results"] == record["results"]
    rows = record["results"]
    assert list(rows) == ["zero-shot", "vanilla FT", "uniform average (2 FT)", "Model Stock, post-training",
                          "Model Stock, periodic", "WiSE-FT (alpha 0.5)"]
    for r in rows.values():
        assert set(demo.DOMAINS.values()) <= set(r) and all(0 <= r[d] <= 100 for d in demo.DOMAINS.values())
        assert r["Avg. shifts"] == pytest.approx(sum(r[d] for d in list(demo.DOMAINS.values())[1:]) / 4)
    assert [r["cost"] for r in rows.values()] == [0, 1, 2, 2, 2, 1]
    # Fine-tuning moved the weights; averaging and merging land nearer the center than one fine-tune.
    assert rows["zero-shot"]["distance to center"] > rows["vanilla FT"]["distance to center"] > 0
    assert rows["uniform average (2 FT)"]["distance to center"] < rows["vanilla FT"]["distance to center"]
    assert record["observation_1"] and all(0 <= v["angle_mean"] <= 180 for v in record["observation_1"].values())
    assert set(record["last_merge"]["t_summary"]) == {"matrices", "vectors", "head"}
    # The pre-trained model is cached: a second run reuses it.
    assert load_state_dict(record["pretrained"])
    assert list((tmp_path / "cache").glob("pretrained_*.safetensors")) == [demo.Path(record["pretrained"])]


def test_the_world_is_deterministic_and_covers_every_class():
    import numpy as np
    a = [demo.render(np.random.default_rng(3), "hard") for _ in range(1)][0]
    b = [demo.render(np.random.default_rng(3), "hard") for _ in range(1)][0]
    assert (a[0] == b[0]).all() and a[1:] == b[1:] and a[0].shape == (32, 32, 3)
    rng = np.random.default_rng(0)
    for domain in demo.DOMAINS:
        labels = {demo.render(rng, domain)[1] for _ in range(200)}
        assert labels == set(range(len(demo.SHAPES)))
