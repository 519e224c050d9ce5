"""Shared test set-up: no network, the repository root on sys.path, a tiny CLIP config."""
import os
import sys
from pathlib import Path

import pytest

# Tests never touch the network: open_clip and huggingface_hub must fail fast offline.
os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY_CLIP = "tiny-clip-test"  # tests/configs/tiny-clip-test.json: 32 px images, 2+2 layers


@pytest.fixture(scope="session")
def tiny_clip_name():
    """Registers the tiny open_clip config once and returns its model name."""
    import open_clip

    open_clip.add_model_config(Path(__file__).parent / "configs" / f"{TINY_CLIP}.json")
    return TINY_CLIP
