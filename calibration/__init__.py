"""Build-machine calibration: paired data -> one set of symmetric activation ranges -> INT8 Q/DQ ONNX
and a TensorRT calibration cache, with INT8/FP16 accuracy measured on ONNX Runtime CPU.

    python -m calibration --bundle BUNDLE --synthetic 512
"""
