"""Build-machine side of edge-pfm: the PFM model, checkpoints, training and ONNX export.

Run from a checkout: `python -m export --checkpoint CKPT --out BUNDLE`, `python -m export.train ...`.
"""
