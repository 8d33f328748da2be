"""Thin client of onnxplain: grpcio, protobuf, numpy and Pillow; never onnxruntime."""

from .client import Accepted, ClassScore, Client, Done, Geometry, MapResult, Prediction, Progress

__all__ = ["Accepted", "ClassScore", "Client", "Done", "Geometry", "MapResult", "Prediction", "Progress"]
