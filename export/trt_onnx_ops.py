"""ONNX operators the TensorRT ONNX parser supports: the one place this list lives.

Source: onnx/onnx-tensorrt `docs/operators.md` (the "Y" rows of the 8.6 and 10.x tables; TensorRT
10.0 parses opsets 9-20). Ops that are supported only from 10.x (Gelu, the opset-20 form) are in
TRT10_ONLY: a graph using them would not parse on JetPack 6.0's TensorRT 8.6.
"""
from __future__ import annotations

TRT_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather
GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
GridSample GroupNormalization HardSigmoid HardSwish Identity If InstanceNormalization IsInf IsNaN LRN
LSTM LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool MatMul
Max MaxPool Mean Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or PRelu Pad Pow
QuantizeLinear RNN RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal
ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RoiAlign Round Scan ScatterElements ScatterND Selu
Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze
Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor Gelu
""".split())

TRT10_ONLY = frozenset({"Gelu"})

# Supported, but not in a deployable PFM graph: ScatterND means in-place slice assignment leaked
# into the export (slow on TensorRT/ORT). BatchNormalization is allowed: TensorRT parses it; the ONNX door folds
# the ones after a Conv, and only those after a Linear or an Add stay.
FORBIDDEN_OPS = {
    "ScatterND": "in-place slice assignment was exported; write PConv as split + concat",
}
