"""The models a server serves: each loaded once, checked, warmed up, with its runner and its description.

Before a model file is read it must resolve (symlinks and `..` followed) inside the model directories, be no
larger than `limits.max_model_bytes` (with its external data), keep its external data inside its own directory,
and use no operator domain beyond ai.onnx / ai.onnx.ml unless the configuration allows it.

The registry is swapped, not mutated: a call takes its `ModelEntry` once and keeps it to the end, so a reload
(new entry under the same name) or an unload never changes the model under a running call; the old entry (its
onnxruntime session) is freed when the last call holding it ends.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import threading
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from onnxplain.kernels import graph
from onnxplain.kernels.images import Preprocessing
from onnxplain.kernels.runtime import Passes, Runner, pick_providers

from .config import ConfigError, Limits, ModelConfig, check_model_name, model_from_table, tomllib

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


STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


def confined(path: pathlib.Path, roots, what: str) -> pathlib.Path:
    """`path` resolved (symlinks, `..`); ConfigError unless the result lies inside one of `roots`."""
    resolved = pathlib.Path(os.path.abspath(path)).resolve()
    real_roots = [pathlib.Path(r).resolve() for r in roots]
    if not any(resolved == r or resolved.is_relative_to(r) for r in real_roots):
        raise ConfigError(f"{what} {path} resolves to {resolved}, outside the model directories "
                          f"{[str(r) for r in real_roots]}")
    return resolved


def _graphs(g: onnx.GraphProto):
    yield g
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs(sub)


def _tensors(model: onnx.ModelProto):
    """Every tensor that may carry external data: initializers and tensor attributes, in every (sub)graph and
    local function."""
    nodes = [n for f in model.functions for n in f.node]
    for g in _graphs(model.graph):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        nodes.extend(g.node)
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors


def external_data_bytes(model: onnx.ModelProto, directory: pathlib.Path, name: str) -> int:
    """The bytes of external data the model refers to; ConfigError for a location outside `directory`."""
    directory = directory.resolve()
    files: dict[pathlib.Path, int] = {}
    for tensor in _tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (directory / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(directory) or target == directory:
            raise ConfigError(f"model {name}: tensor {tensor.name!r} keeps its data at {location!r}, outside the "
                              f"model's directory {directory}; external data must stay next to the model")
        if not target.is_file():
            raise ConfigError(f"model {name}: tensor {tensor.name!r}: external data file {location!r} does not exist")
        files[target] = target.stat().st_size
    return sum(files.values())


def custom_domains(model: onnx.ModelProto) -> set[str]:
    """Operator domains beyond the ONNX standard ones that a node uses, in the graph, its subgraphs or a function
    (a model's own local functions are its code, not an operator library: their domains do not count). An opset
    import alone runs nothing: onnxruntime's saved models import every domain it knows."""
    local = {f.domain for f in model.functions}
    used = {n.domain for g in _graphs(model.graph) for n in g.node}
    used |= {n.domain for f in model.functions for n in f.node}
    return used - STANDARD_DOMAINS - local


def read_model(config: ModelConfig, limits: Limits, roots, allowed_domains=()) -> onnx.ModelProto:
    """Confinement and size checks, kernels.graph's parse/check/shape inference, then the domain check."""
    path = confined(config.path, roots, f"model {config.name}: file")
    if not path.is_file():
        raise ConfigError(f"model {config.name}: model file {str(config.path)!r} does not exist")
    size = path.stat().st_size
    if size > limits.max_model_bytes:
        raise ConfigError(f"model {config.name}: model file {path} is {size} bytes, more than limits.max_model_bytes "
                          f"= {limits.max_model_bytes}")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError or RuntimeError
        raise ConfigError(f"model {config.name}: {path} is not a valid ONNX model (protobuf parse failed: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    external = external_data_bytes(model, path.parent, config.name)
    if size + external > limits.max_model_bytes:
        raise ConfigError(f"model {config.name}: {path} with its external data is {size + external} bytes, more than "
                          f"limits.max_model_bytes = {limits.max_model_bytes}")
    if external:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # noqa: BLE001 - any failure here is a bad model
            raise ConfigError(f"model {config.name}: cannot load its external data: {exc}") from None
    try:
        model = graph.load_model(model, max_bytes=limits.max_model_bytes)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model {config.name} ({path}): {exc}") from None
    # Checked on the model as served: the QOperator format's com.microsoft operators (QLinearAdd, QGemm, ...) are
    # written as standard operators by then, and onnxruntime never sees them.
    refused = custom_domains(model) - set(allowed_domains)
    if refused:
        raise ConfigError(f"model {config.name}: uses custom operator domains {sorted(refused)}; allow them in the "
                          "server config ([security] allowed_domains) if you trust them")
    return model


def load_entry(config: ModelConfig, limits: Limits, provider: str = "auto", threads: int = 0, *,
               roots=None, allowed_domains=()) -> ModelEntry:
    """Load, check and warm up one model; ConfigError with a clear message when it cannot be served.
    `roots`: the model directories (None: the model's own directory)."""
    roots = [pathlib.Path(os.path.abspath(config.path)).parent] if roots is None else roots
    model = read_model(config, limits, roots, allowed_domains)
    try:
        input_name, shape, layout = graph.input_spec(model)
    except ValueError as exc:
        raise ConfigError(f"model {config.name}: {exc}") from None
    if len(shape) != 4:
        raise ConfigError(f"model {config.name}: input {input_name} has shape {shape}; an image classifier "
                          "takes a 4-D batch (NCHW or NHWC)")
    pre = _preprocessing(config.preprocessing, shape, layout, config.name)
    if None in shape[1:]:     # served at the configured size: fixed, so that layer discovery sees map sizes
        model = graph.with_input_size(model, pre.height, pre.width)
    score, probabilities = _scores(model, config)
    served = model if score in {o.name for o in model.graph.output} else graph.expose(model, [score])
    # A fixed batch of 1 cannot be batched. A dynamically quantized model computes one scale per tensor over the
    # whole batch it runs, so a sample batched with others (SmoothGrad's noisy copies, integrated gradients' steps,
    # other images) would be quantized with their range: it runs alone, as each image is a function of itself.
    # Its targets still share a run (one forward, a seed row each): copies of one sample have that sample's range.
    coupled = any(n.op_type == "DynamicQuantizeLinear" for n in model.graph.node)
    max_batch = 1 if shape[0] == 1 or coupled else limits.max_batch
    try:
        runner = Runner(served, score, input_name, max_batch=max_batch,
                        max_rows=1 if shape[0] == 1 else limits.max_batch, providers=pick_providers(provider),
                        threads=threads, probabilities=probabilities)
    except Exception as exc:    # noqa: BLE001 - a model the checker passes can still fail onnxruntime's type checks
        raise ConfigError(f"model {config.name}: onnxruntime cannot load it: {exc}") from None
    try:
        scores = runner.scores(np.zeros((1, *pre.sample_shape), np.float32), Passes())
    except Exception as exc:
        raise ConfigError(f"model {config.name}: a test run on a zero input failed: {exc}") from None
    if scores.ndim != 2 or scores.dtype.kind != "f":
        raise ConfigError(f"model {config.name}: score tensor {score} is {scores.dtype} of shape "
                          f"{list(scores.shape)}; a classifier returns floats [batch, classes]")
    num_classes = scores.shape[1]
    labels = []
    if config.labels is not None:
        labels_path = confined(config.labels, roots, f"model {config.name}: labels file")
        try:
            labels = labels_path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"model {config.name}: labels file: {exc}") from None
        labels = [line.strip() for line in labels if line.strip()]
        if len(labels) != num_classes:
            raise ConfigError(f"model {config.name}: labels file {config.labels} has {len(labels)} names for "
                              f"{num_classes} classes")
    if config.gradient_graph is not None:
        runner.supplied.append(_gradient_graph(config, limits, roots, allowed_domains, runner, pre))
    layers = graph.candidate_layers(model, score)
    try:
        default = graph.default_layer(model, score)
    except ValueError:
        default = None
    entry = ModelEntry(config.name, config.description, model, runner, pre, labels, num_classes, layers, default)
    log.info("model %s loaded from %s on %s: %d classes, %d candidate layers", config.name, config.path,
             runner.provider, num_classes, len(layers))
    return entry


def _scores(model, config: ModelConfig) -> tuple[str, str]:
    """(the tensor to explain, "softmax" or "sigmoid"): the configuration's `scores` and `probabilities` where set,
    else graph.scores_of's choice. A configured tensor must be one the graph computes (load_entry's test run then
    checks that it is float [batch, classes]); set alone, its probabilities are sigmoid where a graph output is its
    Sigmoid, else softmax."""
    score, probabilities = graph.scores_of(model)
    if config.scores and config.scores != score:
        outputs = [o.name for o in model.graph.output]
        if config.scores not in {o for n in model.graph.node for o in n.output}:
            raise ConfigError(f"model {config.name}: scores {config.scores!r} is not a tensor the graph computes (its "
                              f"outputs: {outputs}; the automatic choice: {score!r})")
        score = config.scores
        probabilities = "sigmoid" if any(n.op_type == "Sigmoid" and n.input[0] == score and n.output[0] in outputs
                                         for n in model.graph.node) else "softmax"
    return score, probabilities if config.probabilities == "auto" else config.probabilities


def _gradient_graph(config: ModelConfig, limits: Limits, roots, allowed_domains, runner, pre):
    """The model's user-supplied gradient graph, read with the model's own checks (confinement, size, external
    data, domains) and checked against the model (kernels.supplied)."""
    from onnxplain.kernels import supplied

    what = dataclasses.replace(config, name=f"{config.name} (gradient_graph)", path=config.gradient_graph)
    model = read_model(what, limits, roots, allowed_domains)
    model.graph.name = str(config.gradient_graph)
    try:
        return supplied.load(model, runner, pre.sample_shape, config.gradient_rule)
    except supplied.GradientGraphError as exc:
        raise ConfigError(f"model {config.name}: {exc}") from None


class Registry:
    """The served models by name. Readers take `entries` (a dict that is replaced, never mutated) without a lock;
    load/reload/unload build the new entry first, then swap the dict under a lock."""

    def __init__(self, entries: list[ModelEntry], configs: dict[str, ModelConfig] | None = None, *,
                 limits: Limits | None = None, provider: str = "auto", threads: int = 0, roots=None,
                 allowed_domains=()):
        self.entries = {e.name: e for e in entries}
        self.configs = dict(configs or {})
        self.failed: dict[str, str] = {}           # models that could not be loaded at start-up: the reason
        self.limits = limits or Limits()
        self.provider, self.threads = provider, threads
        self.roots = tuple(roots) if roots else ()
        self.allowed_domains = tuple(allowed_domains)
        self._lock = threading.Lock()              # one change at a time (a load takes long; readers never wait)
        self._changing: set[str] = set()

    def get(self, name: str) -> ModelEntry | None:
        return self.entries.get(name)

    @property
    def names(self) -> list[str]:
        return sorted(self.entries)

    def _roots(self, config: ModelConfig):
        return self.roots or [pathlib.Path(os.path.abspath(config.path)).parent]

    def _build(self, config: ModelConfig) -> ModelEntry:
        if config.error:   # its file could not be read (config.models_in_directory): fails like a bad model
            raise ConfigError(config.error)
        return load_entry(config, self.limits, self.provider, self.threads, roots=self._roots(config),
                          allowed_domains=self.allowed_domains)

    def _swap(self, name: str, entry: ModelEntry | None, config: ModelConfig | None) -> None:
        entries, configs = dict(self.entries), dict(self.configs)
        if entry is None:
            entries.pop(name, None)
            configs.pop(name, None)
        else:
            entries[name], configs[name] = entry, config
        self.entries, self.configs = entries, configs

    def _claim(self, name: str) -> None:
        with self._lock:
            if name in self._changing:
                raise RegistryBusy(f"model {name!r} is being changed by another call; try again")
            self._changing.add(name)

    def _release(self, name: str) -> None:
        with self._lock:
            self._changing.discard(name)

    def model_config(self, path: str, name: str = "") -> ModelConfig:
        """The ModelConfig for a path given by an admin: an ONNX file or a model TOML, relative to a model
        directory (the first where it exists) or absolute; confined to the model directories."""
        if not path:
            raise ConfigError("path is empty: give an .onnx or model .toml file inside a model directory")
        if "\0" in path:   # the OS cannot take it (ValueError deep in pathlib)
            raise ConfigError(f"path {path[:200]!r} contains a NUL byte; give an .onnx or model .toml file name")
        if name:
            check_model_name(name, "name")
        roots = self.roots or sorted({pathlib.Path(os.path.abspath(c.path)).parent for c in self.configs.values()})
        if not roots:
            raise ConfigError("no model directory is configured (model_dirs / --model-dir)")
        try:
            candidate = pathlib.Path(path)
            if not candidate.is_absolute():
                candidate = next((r / path for r in roots if (r / path).exists()), roots[0] / path)
            resolved = confined(candidate, roots, "path")
            is_file = resolved.is_file()
        except OSError as exc:    # e.g. a name too long for the file system
            raise ConfigError(f"path {path[:200]!r} cannot be used: {exc.strerror or exc}") from None
        if not is_file:
            raise ConfigError(f"path {path!r} is not a file in the model directories")
        if resolved.suffix == ".toml":
            try:
                with open(resolved, "rb") as f:
                    table = tomllib.load(f)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"{path}: {exc}") from None
            config = model_from_table(table, resolved.parent, path)
        else:
            labels = candidate.with_suffix(".txt")
            stem = name or check_model_name(candidate.stem, f"name (the stem of {path!r}; or give a name)")
            config = ModelConfig(stem, candidate, labels if labels.exists() else None)
        return dataclasses.replace(config, name=name) if name else config

    def load(self, config: ModelConfig, replace: bool = False) -> ModelEntry:
        """Serve a new model (ValueError when the name is taken and not `replace`)."""
        self._claim(config.name)
        try:
            if config.name in self.entries and not replace:
                raise ModelExists(f"model {config.name!r} is already served; reload it, or load with replace")
            entry = self._build(config)
            with self._lock:
                self._swap(config.name, entry, config)
            log.info("model %s loaded by an admin call", config.name)
            return entry
        finally:
            self._release(config.name)

    def reload(self, name: str) -> ModelEntry:
        """Load the model again from its configuration and swap it in; running calls finish on the old one."""
        self._claim(name)
        try:
            config = self.configs.get(name)
            if config is None or name not in self.entries:
                raise KeyError(name)
            entry = self._build(config)
            with self._lock:
                self._swap(name, entry, config)
            log.info("model %s reloaded", name)
            return entry
        finally:
            self._release(name)

    def unload(self, name: str) -> ModelEntry:
        """Stop serving `name`: new calls get NOT_FOUND, running calls finish on the entry they hold."""
        self._claim(name)
        try:
            with self._lock:
                entry = self.entries.get(name)
                if entry is None:
                    raise KeyError(name)
                self._swap(name, None, None)
            log.info("model %s unloaded", name)
            return entry
        finally:
            self._release(name)


class ModelExists(ValueError):
    pass


class RegistryBusy(RuntimeError):
    pass


def load_registry(models: tuple[ModelConfig, ...], limits: Limits, provider: str = "auto", threads: int = 0, *,
                  roots=(), allowed_domains=(), fail_fast: bool = False) -> Registry:
    """Load every configured model. A model that cannot be loaded is reported (log, `Registry.failed`) and the
    others are served; with `fail_fast` the first failure raises ConfigError. No model loaded at all raises too."""
    registry = Registry([], limits=limits, provider=provider, threads=threads, roots=roots,
                        allowed_domains=allowed_domains)
    entries, configs = [], {}
    for config in models:
        try:
            entries.append(registry._build(config))
            configs[config.name] = config
        except ConfigError as exc:
            if fail_fast:
                raise
            registry.failed[config.name] = str(exc)
            log.error("not serving model %s: %s", config.name, exc)
    if models and not entries:
        raise ConfigError("no model could be loaded: " + "; ".join(registry.failed.values()))
    registry.entries = {e.name: e for e in entries}
    registry.configs = configs
    return registry
