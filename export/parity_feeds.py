"""The parity set and its tolerance, without torch: every door checks its graph on the same feeds."""
from __future__ import annotations

import numpy as np

from edge_pfm.bundle import MODALITIES
from edge_pfm.preprocess import PreprocessSpec, preprocess
from edge_pfm.synthetic import SCENES, render_pair

# lesion_map: probabilities in [0, 1], its own bound (sigmoid compresses logit errors, so 1e-4 is as strict)
TOLERANCE = {"max_abs_diff": 1e-4, "top1_agreement": 1.0, "lesion_map_max_abs_diff": 1e-4}


def parity_feeds(specs: dict[str, PreprocessSpec], n_random: int = 32, n_scenes: int = 32, batch: int = 8,
                 seed: int = 0, scene_size: tuple[int, int] = (640, 360)) -> list[dict[str, np.ndarray]]:
    """Feed dicts covering >= n_random + n_scenes pairs: random tensors, and synthetic scenes through
    the real preprocessing. The first feed is batch 1, the rest batch `batch`."""
    rng = np.random.default_rng(seed)
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(n_random):
        pairs.append(tuple(rng.standard_normal(specs[m].input_shape).astype(np.float32) for m in MODALITIES))
    for i in range(n_scenes):
        s = render_pair(SCENES[i % len(SCENES)], int(rng.integers(2**31)), scene_size)
        pairs.append((preprocess(s.white_light, specs["white_light"]), preprocess(s.fluorescence, specs["fluorescence"])))
    feeds = [{m: pairs[0][k][None] for k, m in enumerate(MODALITIES)}]
    for i in range(1, len(pairs), batch):
        chunk = pairs[i:i + batch]
        feeds.append({m: np.stack([p[k] for p in chunk]) for k, m in enumerate(MODALITIES)})
    return feeds
