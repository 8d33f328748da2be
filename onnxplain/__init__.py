"""onnxplain: saliency maps for any ONNX image classifier, served over gRPC.

Subpackages: `onnxplain.v1` (the contract's generated stubs), `onnxplain.kernels` (numeric core),
`onnxplain.server` (gRPC front), `onnxplain.client` (thin client and CLI).
"""

__version__ = "0.1.0"
