"""Server configuration: limits with safe defaults, and the models to serve (TOML files and/or directories).

A model's TOML (a `[[models]]` table of the server config, or a `<name>.toml` file in a model directory):

    name = "efficientnet"                 # defaults to the ONNX file's stem
    path = "efficientnet_lite0.onnx"      # relative to the TOML file
    labels = "imagenet_labels.txt"        # optional; one class name per line
    description = "..."                   # optional
    gradient_graph = "model.grad.onnx"    # optional: a gradient graph to use instead of building one
    gradient_rule = "standard"            #   (standard | guided | deconvnet; see kernels/supplied.py)
    scores = "logits"                     # optional: the tensor to explain (default: kernels.graph.score_tensor)
    probabilities = "auto"                # optional: softmax | sigmoid (multi-label) | auto (kernels.graph.scores_of)
    [preprocessing]                       # all optional; see kernels.images.Preprocessing
    fit = "center_crop"                   # stretch | center_crop | shorter_side
    resize_shorter = 256                  # shorter_side only
    scale = 0.00392156862745098           # pixel * scale, then (… - mean) / std
    mean = [0.485, 0.456, 0.406]
    std = [0.229, 0.224, 0.225]
    channel_order = "RGB"                 # or BGR
    layout = "NCHW"                       # or NHWC; detected from the input shape when omitted

A directory serves every `*.toml` model file in it, and every `*.onnx` that no TOML names, with default
preprocessing (ImageNet's mean/std, centre crop) and the labels in `<stem>.txt` when that file exists. A model
file there that cannot be read (TOML syntax, a missing path, a bad name) is a model that cannot be loaded: the
registry reports it and serves the others (or stops the server with fail_fast), as for a corrupt ONNX file.

Model names (a TOML's `name`, else the file's stem) are 1 to 128 characters of [A-Za-z0-9._-], starting with a
letter or digit (MODEL_NAME): they are written into log lines, metric labels and file names.

Model files are confined to the model directories (`ServerConfig.model_dirs`: `model_dirs` and `--model-dir`,
plus the server TOML's own directory when it lists `[[models]]`, plus its `model_roots` — directories its
`[[models]]` may point into without their other models being served — plus the shipped default model's directory
when that is served): a model path, after `..` and symlinks are resolved, must lie inside one of them
(server/registry.py checks it, and confines ONNX external data to the model's own directory).

The server TOML's `[security]` section (see server/security.py):

    [security]
    tls_cert = "server.crt"               # PEM; with tls_key, the port speaks TLS
    tls_key = "server.key"
    tls_client_ca = "clients-ca.crt"      # optional: clients must present a certificate signed by it (mTLS)
    tokens_file = "tokens.txt"            # optional: `token role[,role]` lines; auth is off without tokens
    allowed_domains = ["com.microsoft"]   # custom operator domains a model may use (default: none)

The server TOML's `[connections]` section: the gRPC server's HTTP/2 connection management (Connections; times in
milliseconds, 0 leaves gRPC's own default: keepalive every 2 hours, no idle or age limit):

    [connections]                         # all optional; these are the defaults
    keepalive_time_ms = 60000             # ping a connection that has calls after 60 s without reading from it,
    keepalive_timeout_ms = 20000          #   and close it (its calls end) when the ping is not answered in 20 s
    keepalive_permit_without_calls = true # clients may send keepalive pings on a connection without calls,
    min_ping_interval_without_data_ms = 10000   # at most one per 10 s (more often: GOAWAY "too_many_pings")
    max_connection_idle_ms = 300000       # a connection without calls for 5 minutes is closed (GOAWAY)
    max_connection_age_ms = 1800000       # after 30 minutes (+-10%) clients are asked to reconnect (GOAWAY)...
    # max_connection_age_grace_ms         # ...and the calls still open on it are cut after this much longer;
                                          #   default limits.max_call_seconds + 10 s, so that no call is cut
                                          #   before its own cap
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import pathlib
import re
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


# Names end up in text log lines, Prometheus labels, file names and URLs: a newline in one forged log lines.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MODEL_NAME_RULE = "1 to 128 characters of [A-Za-z0-9._-], starting with a letter or digit"


def check_model_name(name: Any, field: str) -> str:
    """`name` when it follows MODEL_NAME; ConfigError naming `field` and the rule otherwise."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        shown = name[:64] + "..." if isinstance(name, str) and len(name) > 64 else name
        raise ConfigError(f"{field} must be {MODEL_NAME_RULE}, got {shown!r}")
    return name


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
    # The longest a call may run when its client set no deadline, or a longer one: then the server ends it with
    # DEADLINE_EXCEEDED (service.CallCap), as if the client's deadline had passed. A client that stops reading an
    # Explain stream holds a server thread and the job's undelivered maps until then.
    max_call_seconds: int = 600
    # Reflection streams open at once. Each holds a server thread for as long as its client keeps it; past this they
    # are refused with RESOURCE_EXHAUSTED, so that they cannot take the threads jobs and short calls are served on.
    # (Health Watch streams hold no thread and need no limit.)
    max_reflection_streams: int = 16


@dataclass(frozen=True)
class ModelConfig:
    name: str
    path: pathlib.Path
    labels: pathlib.Path | None = None
    description: str = ""
    preprocessing: dict[str, Any] = field(default_factory=dict)
    gradient_graph: pathlib.Path | None = None   # user-supplied gradient graph (kernels/supplied.py)
    gradient_rule: str = "standard"              # the backward rule that graph implements
    scores: str = ""                             # the tensor to explain; "": kernels.graph.score_tensor's choice
    probabilities: str = "auto"                  # softmax | sigmoid | auto (kernels.graph.scores_of)
    # Set for a model file that could not be read: the registry reports this as the model's load failure.
    error: str = ""


@dataclass(frozen=True)
class Security:
    tls_cert: pathlib.Path | None = None
    tls_key: pathlib.Path | None = None
    tls_client_ca: pathlib.Path | None = None   # set: mutual TLS, clients need a certificate signed by this CA
    tokens_file: pathlib.Path | None = None     # and/or ONNXPLAIN_TOKENS; no token at all: auth off
    allowed_domains: tuple[str, ...] = ()       # custom operator domains allowed beyond ai.onnx and ai.onnx.ml


PROBABILITIES = ("auto", "softmax", "sigmoid")   # a model's `probabilities`
GRPC_INT_MAX = 2 ** 31 - 1   # gRPC channel arguments are C ints


@dataclass(frozen=True)
class Connections:
    """HTTP/2 connection management, as the gRPC server's channel arguments (milliseconds; 0 leaves gRPC's own
    default). A call's own limits (limits.max_call_seconds) cannot reclaim a connection whose peer vanished without
    closing it, or one kept open for ever: keepalive pings find the first, the age limit ends the second (and makes
    clients reconnect, e.g. to replicas added since), the idle limit closes connections nobody uses."""

    keepalive_time_ms: int = 60_000              # grpc.keepalive_time_ms
    keepalive_timeout_ms: int = 20_000           # grpc.keepalive_timeout_ms
    keepalive_permit_without_calls: bool = True  # grpc.keepalive_permit_without_calls (clients' pings, ours)
    min_ping_interval_without_data_ms: int = 10_000   # grpc.http2.min_ping_interval_without_data_ms
    max_connection_idle_ms: int = 300_000        # grpc.max_connection_idle_ms
    max_connection_age_ms: int = 1_800_000       # grpc.max_connection_age_ms
    max_connection_age_grace_ms: int | None = None   # grpc.max_connection_age_grace_ms; None: max_call_seconds + 10 s

    def options(self, limits: "Limits") -> list[tuple[str, int]]:
        """The gRPC server options (keys whose value is 0 are left out: gRPC's default)."""
        grace = self.max_connection_age_grace_ms
        if grace is None:
            grace = min((limits.max_call_seconds + 10) * 1000, GRPC_INT_MAX)
        values = {"grpc.keepalive_time_ms": self.keepalive_time_ms,
                  "grpc.keepalive_timeout_ms": self.keepalive_timeout_ms,
                  # gRPC (1.85) times a sent ping, keepalive's included, out after this instead of
                  # keepalive_timeout_ms: without it a vanished peer's connection was closed only after 60 s
                  "grpc.http2.ping_timeout_ms": self.keepalive_timeout_ms,
                  "grpc.http2.min_ping_interval_without_data_ms": self.min_ping_interval_without_data_ms,
                  "grpc.max_connection_idle_ms": self.max_connection_idle_ms,
                  "grpc.max_connection_age_ms": self.max_connection_age_ms,
                  "grpc.max_connection_age_grace_ms": grace}
        options = [(key, value) for key, value in values.items() if value]
        return options + [("grpc.keepalive_permit_without_calls", int(self.keepalive_permit_without_calls))]


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    limits: Limits = Limits()
    models: tuple[ModelConfig, ...] = ()
    provider: str = "auto"                 # auto (CUDA when available) | cpu
    threads: int = 0                       # onnxruntime intra-op threads; 0 = onnxruntime's default
    security: Security = Security()
    connections: Connections = Connections()
    model_dirs: tuple[pathlib.Path, ...] = ()   # confinement roots; empty: each model's own directory
    fail_fast: bool = False                # a model that cannot be loaded at start-up stops the server
    metrics_port: int = 0                  # Prometheus /metrics on this port (host: `host`); 0 = off


def model_from_table(table: dict[str, Any], base: pathlib.Path, origin: str) -> ModelConfig:
    unknown = set(table) - {"name", "path", "labels", "description", "preprocessing", "gradient_graph",
                            "gradient_rule", "scores", "probabilities"}
    if unknown:
        raise ConfigError(f"{origin}: unknown model keys {sorted(unknown)}")
    if "path" not in table:
        raise ConfigError(f"{origin}: a model needs a path")
    for key in ("path", "labels", "gradient_graph", "description", "gradient_rule", "scores", "probabilities"):
        if key in table and not isinstance(table[key], str):
            raise ConfigError(f"{origin}: {key} must be a string, got {table[key]!r}")
    if table.get("probabilities", "auto") not in PROBABILITIES:
        raise ConfigError(f"{origin}: probabilities must be one of {list(PROBABILITIES)}, got "
                          f"{table['probabilities']!r}")
    if not table["path"]:
        raise ConfigError(f"{origin}: path must be a file name, got an empty string")
    if not isinstance(table.get("preprocessing", {}), dict):
        raise ConfigError(f"{origin}: preprocessing must be a table, got {table['preprocessing']!r}")
    # Not resolved here: the registry resolves (symlinks, `..`) and checks the result against the model directories.
    path = base / table["path"]
    labels = base / table["labels"] if table.get("labels") else None
    gradient_graph = base / table["gradient_graph"] if table.get("gradient_graph") else None
    name = check_model_name(table.get("name") or path.stem,
                            f"{origin}: name" if "name" in table else f"{origin}: name (the stem of path)")
    return ModelConfig(name=name, path=path, labels=labels, description=table.get("description", ""),
                       preprocessing=dict(table.get("preprocessing", {})), gradient_graph=gradient_graph,
                       gradient_rule=table.get("gradient_rule", "standard"), scores=table.get("scores", ""),
                       probabilities=table.get("probabilities", "auto"))


def unreadable(path: pathlib.Path, reason: str) -> ModelConfig:
    """A model file that could not be read, named after its file (made to follow the name rule, so that the
    report of it cannot forge log lines either)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)[:128]
    return ModelConfig(name if MODEL_NAME.fullmatch(name) else f"model_{name}"[:128], path, error=reason)


def models_in_directory(directory: pathlib.Path) -> list[ModelConfig]:
    """The models a directory serves. A file that cannot be read is kept as a ModelConfig with `error` set, so
    that it is reported like any model that cannot be loaded and the directory's other models are served."""
    if not directory.is_dir():
        raise ConfigError(f"model directory {directory} does not exist")
    models, named, broken = [], set(), set()
    for toml_path in sorted(directory.glob("*.toml")):
        try:
            with open(toml_path, "rb") as f:
                table = tomllib.load(f)
            model = model_from_table(table, directory, str(toml_path))
            named.add(model.path.resolve())
        except ConfigError as exc:
            model = unreadable(toml_path, str(exc))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            model = unreadable(toml_path, f"{toml_path}: {exc}")
        if model.error:
            # its ONNX file (most likely <stem>.onnx) must not be served with default preprocessing instead
            broken.add(toml_path.stem)
        models.append(model)
    for onnx_path in sorted(directory.glob("*.onnx")):
        if onnx_path.resolve() in named or onnx_path.stem in broken:
            continue
        labels = onnx_path.with_suffix(".txt")
        try:
            name = check_model_name(onnx_path.stem, f"{onnx_path}: name (the file's stem)")
        except ConfigError as exc:
            models.append(unreadable(onnx_path, f"{exc}; rename the file or give it a model TOML with a name"))
            continue
        models.append(ModelConfig(name, onnx_path, labels if labels.exists() else None))
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
    unknown = set(table) - {"server", "limits", "models", "model_dirs", "model_roots", "security", "connections"}
    if unknown:
        raise ConfigError(f"{config_path}: unknown sections {sorted(unknown)}")
    server = dict(table.get("server", {}))
    limits_table = dict(table.get("limits", {}))
    security_table = dict(table.get("security", {}))
    limit_names = {f.name for f in dataclasses.fields(Limits)}
    security_names = {f.name for f in dataclasses.fields(Security)}
    for key, value in overrides.items():
        if value is None or value == () or value == []:
            continue
        if key in security_names and key != "allowed_domains":
            value = pathlib.Path(value).resolve()   # a command-line path is relative to the working directory
        (limits_table if key in limit_names else security_table if key in security_names else server)[key] = value
    bad = set(limits_table) - limit_names
    if bad:
        raise ConfigError(f"unknown limits {sorted(bad)}; known: {sorted(limit_names)}")
    for key, value in limits_table.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"limits.{key} must be a positive integer, got {value!r}")
    security = security_from_table(security_table, base, str(config_path or "options"))
    connections = connections_from_table(dict(table.get("connections", {})), str(config_path or "options"))
    models = [model_from_table(t, base, f"{config_path}: models[{i}]") for i, t in enumerate(table.get("models", []))]
    roots = [base] if models else []
    # model_roots: directories the [[models]] paths may point into, without serving their other models
    roots += [(base / d).resolve() for d in table.get("model_roots", [])]
    for directory in [*(base / d for d in table.get("model_dirs", [])), *model_dirs]:
        roots.append(pathlib.Path(directory).resolve())
        models.extend(models_in_directory(roots[-1]))
    if not models:
        with open(DEFAULT_MODEL_TOML, "rb") as f:
            models.append(model_from_table(tomllib.load(f), DEFAULT_MODEL_TOML.parent, str(DEFAULT_MODEL_TOML)))
        roots.append(DEFAULT_MODEL_TOML.parent.resolve())
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"model names must be unique; repeated: {duplicates}")
    unknown_server = set(server) - {"host", "port", "provider", "threads", "fail_fast", "metrics_port"}
    if unknown_server:
        raise ConfigError(f"unknown server keys {sorted(unknown_server)}")
    return ServerConfig(limits=Limits(**limits_table), models=tuple(models), security=security,
                        connections=connections, model_dirs=tuple(dict.fromkeys(roots)), **server)


def security_from_table(table: dict[str, Any], base: pathlib.Path, origin: str) -> Security:
    names = {f.name for f in dataclasses.fields(Security)}
    unknown = set(table) - names
    if unknown:
        raise ConfigError(f"{origin}: unknown security keys {sorted(unknown)}; known: {sorted(names)}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "allowed_domains":
            if isinstance(value, str) or not all(isinstance(d, str) and d for d in value):
                raise ConfigError(f"{origin}: security.allowed_domains must be a list of domain names")
            values[key] = tuple(value)
        else:
            values[key] = (base / value).resolve()
    return Security(**values)


def connections_from_table(table: dict[str, Any], origin: str) -> Connections:
    names = {f.name for f in dataclasses.fields(Connections)}
    unknown = set(table) - names
    if unknown:
        raise ConfigError(f"{origin}: unknown connections keys {sorted(unknown)}; known: {sorted(names)}")
    for key, value in table.items():
        if key == "keepalive_permit_without_calls":
            if not isinstance(value, bool):
                raise ConfigError(f"{origin}: connections.{key} must be true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= GRPC_INT_MAX:
            raise ConfigError(f"{origin}: connections.{key} must be an integer in [0, {GRPC_INT_MAX}] "
                              f"(milliseconds; 0: gRPC's default), got {value!r}")
    return Connections(**table)
