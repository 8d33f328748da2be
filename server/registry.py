"""The models a server serves: each loaded once, checked, warmed up, with its runner and its description."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxplain.kernels import graph
from onnxplain.kernels.images import Preprocessing
from onnxplain.kernels.runtime import Passes, Runner, pick_providers

from .config import ConfigError, Limits, ModelConfig

log = logging.getLogger("onnxplain.server")


@dataclass
class ModelEntry:
    name: str
    description: str
    model: onnx.ModelProto
    runner: Runner
    preprocessing: Preprocessing
    labels: list[str]
    num_classes: int
    layers: list = field(default_factory=list)      # kernels.graph.Layer, candidate layers
    default_layer: object = None                    # kernels.graph.Layer or None

    def layer(self, name: str):
        """The candidate layer called `name` (the default layer when empty); None when there is none."""
        if not name:
            return self.default_layer
        return next((layer for layer in self.layers if layer.name == name), None)

    @functools.cached_property
    def tensor_names(self) -> set[str]:
        return {name for node in self.model.graph.node for name in node.output}

    def label(self, class_id: int) -> str:
        return self.labels[class_id] if class_id < len(self.labels) else ""


def _preprocessing(table: dict, shape: tuple, detected_layout: str, name: str) -> Preprocessing:
    layout = table.get("layout", detected_layout)
    dims = shape[1:] if layout == "NCHW" else (shape[3], shape[1], shape[2])
    channels, height, width = dims
    if not all(isinstance(d, int) and d > 0 for d in dims):
        height = table.get("input_height", height)
        width = table.get("input_width", width)
        if not all(isinstance(d, int) and d > 0 for d in (channels, height, width)):
            raise ConfigError(f"model {name}: input shape {shape} has symbolic image dimensions; "
                              "set preprocessing.input_height and input_width")
    keys = {"fit", "resize_shorter", "scale", "mean", "std", "channel_order"}
    unknown = set(table) - keys - {"layout", "input_height", "input_width"}
    if unknown:
        raise ConfigError(f"model {name}: unknown preprocessing keys {sorted(unknown)}")
    kwargs = {k: (tuple(float(x) for x in v) if k in ("mean", "std") else v) for k, v in table.items() if k in keys}
    if channels == 1:
        kwargs.setdefault("mean", (0.5,))
        kwargs.setdefault("std", (0.5,))
    try:
        return Preprocessing(height=height, width=width, layout=layout, channels=channels, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model {name}: {exc}") from None


def load_entry(config: ModelConfig, limits: Limits, provider: str = "auto", threads: int = 0) -> ModelEntry:
    """Load, check and warm up one model; ConfigError with a clear message when it cannot be served."""
    try:
        model = graph.load_model(str(config.path), max_bytes=limits.max_model_bytes)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model {config.name} ({config.path}): {exc}") from None
    input_name, shape, layout = graph.input_spec(model)
    if len(shape) != 4:
        raise ConfigError(f"model {config.name}: input {input_name} has shape {shape}; an image classifier "
                          "takes a 4-D batch (NCHW or NHWC)")
    pre = _preprocessing(config.preprocessing, shape, layout, config.name)
    score = graph.score_tensor(model)
    served = model if score in {o.name for o in model.graph.output} else graph.expose(model, [score])
    max_batch = 1 if shape[0] == 1 else limits.max_batch   # a fixed batch of 1 cannot be batched
    runner = Runner(served, score, input_name, max_batch=max_batch, providers=pick_providers(provider),
                    threads=threads)
    try:
        scores = runner.scores(np.zeros((1, *pre.sample_shape), np.float32), Passes())
    except Exception as exc:
        raise ConfigError(f"model {config.name}: a test run on a zero input failed: {exc}") from None
    if scores.ndim != 2:
        raise ConfigError(f"model {config.name}: score tensor {score} has shape {list(scores.shape)}; "
                          "a classifier returns [batch, classes]")
    num_classes = scores.shape[1]
    labels = []
    if config.labels is not None:
        try:
            labels = config.labels.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"model {config.name}: labels file: {exc}") from None
        labels = [line.strip() for line in labels if line.strip()]
        if len(labels) != num_classes:
            raise ConfigError(f"model {config.name}: labels file {config.labels} has {len(labels)} names for "
                              f"{num_classes} classes")
    layers = graph.candidate_layers(model)
    try:
        default = graph.default_layer(model)
    except ValueError:
        default = None
    entry = ModelEntry(config.name, config.description, model, runner, pre, labels, num_classes, layers, default)
    log.info("model %s loaded from %s on %s: %d classes, %d candidate layers", config.name, config.path,
             runner.provider, num_classes, len(layers))
    return entry


class Registry:
    def __init__(self, entries: list[ModelEntry]):
        self.entries = {e.name: e for e in entries}

    def get(self, name: str) -> ModelEntry | None:
        return self.entries.get(name)

    @property
    def names(self) -> list[str]:
        return sorted(self.entries)


def load_registry(models: tuple[ModelConfig, ...], limits: Limits, provider: str = "auto",
                  threads: int = 0) -> Registry:
    return Registry([load_entry(m, limits, provider, threads) for m in models])
