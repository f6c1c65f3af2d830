"""Data loader script for polygraphy on a TensorRT machine: our data, our preprocessing.

    EDGE_PFM_BUNDLE=BUNDLE EDGE_PFM_CALIB_DATA=DATASET \
    polygraphy convert BUNDLE/model.onnx --int8 --data-loader-script calibration/data_loader.py \
        --calibration-cache BUNDLE/polygraphy.cache -o model.int8.engine

Environment: EDGE_PFM_BUNDLE (bundle directory, required), and EDGE_PFM_CALIB_DATA (paired dataset
directory) or EDGE_PFM_CALIB_SYNTHETIC (number of synthetic pairs, default 64).
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np


def load_data() -> Iterator[dict[str, np.ndarray]]:
    """Feed dicts {input name: (1, C, H, W) float32}, preprocessed exactly as the device does."""
    from calibration.data import PairReader, dataset_pairs, synthetic_pairs
    from edge_pfm.bundle import Bundle

    root = os.environ.get("EDGE_PFM_BUNDLE")
    if not root:
        raise RuntimeError("set EDGE_PFM_BUNDLE to the bundle directory (and EDGE_PFM_CALIB_DATA to a paired dataset)")
    bundle = Bundle.load(root)
    data = os.environ.get("EDGE_PFM_CALIB_DATA")
    if data:
        pairs, _ = dataset_pairs(data, bundle.classes)
    else:
        pairs = synthetic_pairs(int(os.environ.get("EDGE_PFM_CALIB_SYNTHETIC", "64")), seed=1)
    yield from PairReader(pairs, bundle.preprocessing, bundle.input_names)
