"""How good a model is, in numbers with intervals: statistics (Wilson, paired change, McNemar) and the lesion
map's metrics. numpy only (no torch, no onnx): the trainer (export) and calibration both measure with it."""
