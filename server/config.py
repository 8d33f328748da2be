"""Server configuration: limits with safe defaults, and the models to serve (TOML files and/or directories).

A model's TOML (a `[[models]]` table of the server config, or a `<name>.toml` file in a model directory):

    name = "efficientnet"                 # defaults to the ONNX file's stem
    path = "efficientnet_lite0.onnx"      # relative to the TOML file
    labels = "imagenet_labels.txt"        # optional; one class name per line
    description = "..."                   # optional
    [preprocessing]                       # all optional; see kernels.images.Preprocessing
    fit = "center_crop"                   # stretch | center_crop | shorter_side
    resize_shorter = 256                  # shorter_side only
    scale = 0.00392156862745098           # pixel * scale, then (… - mean) / std
    mean = [0.485, 0.456, 0.406]
    std = [0.229, 0.224, 0.225]
    channel_order = "RGB"                 # or BGR
    layout = "NCHW"                       # or NHWC; detected from the input shape when omitted

A directory serves every `*.toml` model file in it, and every `*.onnx` that no TOML names, with default
preprocessing (ImageNet's mean/std, centre crop) and the labels in `<stem>.txt` when that file exists.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import pathlib
import sys
from dataclasses import dataclass, field
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_MODEL_TOML = pathlib.Path(str(importlib.resources.files("onnxplain.default_model") / "model.toml"))


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Limits:
    max_image_pixels: int = 40_000_000     # one decoded image (a 40-megapixel photo)
    max_images: int = 64                   # per request
    max_methods: int = 16                  # per request
    max_targets: int = 16                  # per image
    max_batch: int = 32                    # samples per model run
    max_concurrent_jobs: int = 2           # jobs computing at once
    max_queued_jobs: int = 8               # jobs waiting for a slot; more are refused with RESOURCE_EXHAUSTED
    max_message_bytes: int = 64 * 1024 * 1024
    max_model_bytes: int = 2 * 1024 ** 3
    # Caps on the work one method may ask for (its parameters' own bounds are wider):
    max_masks: int = 10_000                # rise.masks
    max_steps: int = 256                   # integrated_gradients.steps, smoothgrad.samples
    max_iterations: int = 200              # opticam.iterations
    # Estimated memory of one job (validation.job_bytes: images, one batch of inputs per pass kind, the maps
    # held); a request over it is refused with RESOURCE_EXHAUSTED before any work.
    max_job_bytes: int = 2 * 1024 ** 3


@dataclass(frozen=True)
class ModelConfig:
    name: str
    path: pathlib.Path
    labels: pathlib.Path | None = None
    description: str = ""
    preprocessing: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    limits: Limits = Limits()
    models: tuple[ModelConfig, ...] = ()
    provider: str = "auto"                 # auto (CUDA when available) | cpu
    threads: int = 0                       # onnxruntime intra-op threads; 0 = onnxruntime's default
    metrics_port: int = 0                  # Prometheus /metrics on this port (host: `host`); 0 = off


def model_from_table(table: dict[str, Any], base: pathlib.Path, origin: str) -> ModelConfig:
    unknown = set(table) - {"name", "path", "labels", "description", "preprocessing"}
    if unknown:
        raise ConfigError(f"{origin}: unknown model keys {sorted(unknown)}")
    if "path" not in table:
        raise ConfigError(f"{origin}: a model needs a path")
    path = (base / table["path"]).resolve()
    labels = (base / table["labels"]).resolve() if table.get("labels") else None
    return ModelConfig(name=str(table.get("name") or path.stem), path=path, labels=labels,
                       description=str(table.get("description", "")),
                       preprocessing=dict(table.get("preprocessing", {})))


def models_in_directory(directory: pathlib.Path) -> list[ModelConfig]:
    if not directory.is_dir():
        raise ConfigError(f"model directory {directory} does not exist")
    models, named = [], set()
    for toml_path in sorted(directory.glob("*.toml")):
        with open(toml_path, "rb") as f:
            model = model_from_table(tomllib.load(f), directory, str(toml_path))
        models.append(model)
        named.add(model.path)
    for onnx_path in sorted(directory.glob("*.onnx")):
        if onnx_path.resolve() not in named:
            labels = onnx_path.with_suffix(".txt")
            models.append(ModelConfig(onnx_path.stem, onnx_path.resolve(), labels if labels.exists() else None))
    return models


def load(config_path: pathlib.Path | None = None, model_dirs: list[pathlib.Path] = (),
         **overrides: Any) -> ServerConfig:
    """The configuration from a TOML file (optional), extra model directories and overrides (None = keep).
    With no model at all, the shipped default model is served."""
    table: dict[str, Any] = {}
    base = pathlib.Path.cwd()
    if config_path is not None:
        with open(config_path, "rb") as f:
            table = tomllib.load(f)
        base = config_path.resolve().parent
    unknown = set(table) - {"server", "limits", "models", "model_dirs"}
    if unknown:
        raise ConfigError(f"{config_path}: unknown sections {sorted(unknown)}")
    server = dict(table.get("server", {}))
    limits_table = dict(table.get("limits", {}))
    limit_names = {f.name for f in dataclasses.fields(Limits)}
    for key, value in overrides.items():
        if value is None:
            continue
        (limits_table if key in limit_names else server)[key] = value
    bad = set(limits_table) - limit_names
    if bad:
        raise ConfigError(f"unknown limits {sorted(bad)}; known: {sorted(limit_names)}")
    for key, value in limits_table.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"limits.{key} must be a positive integer, got {value!r}")
    models = [model_from_table(t, base, f"{config_path}: models[{i}]") for i, t in enumerate(table.get("models", []))]
    for directory in [*(base / d for d in table.get("model_dirs", [])), *model_dirs]:
        models.extend(models_in_directory(pathlib.Path(directory).resolve()))
    if not models:
        with open(DEFAULT_MODEL_TOML, "rb") as f:
            models.append(model_from_table(tomllib.load(f), DEFAULT_MODEL_TOML.parent, str(DEFAULT_MODEL_TOML)))
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"model names must be unique; repeated: {duplicates}")
    unknown_server = set(server) - {"host", "port", "provider", "threads", "metrics_port"}
    if unknown_server:
        raise ConfigError(f"unknown server keys {sorted(unknown_server)}")
    return ServerConfig(limits=Limits(**limits_table), models=tuple(models), **server)
