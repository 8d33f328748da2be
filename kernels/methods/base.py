"""What every method shares: the declaration of its typed parameters, the job it runs on, and the events it
yields. The server derives its validation and its ListMethods answer from these declarations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from ..runtime import Passes, Runner


class ParamError(ValueError):
    """A parameter value outside its declared type or bounds; the message names the field and the range."""


@dataclass(frozen=True)
class Param:
    name: str
    type: str                       # "int" | "float" | "bool" | "enum" | "tensor"
    default: Any
    description: str
    minimum: float | None = None    # inclusive
    maximum: float | None = None    # inclusive
    choices: tuple[str, ...] = ()

    def check(self, method: str, value: Any) -> Any:
        field_name = f"{method}.{self.name}"
        if self.type == "enum":
            if value not in self.choices:
                raise ParamError(f"{field_name} must be one of {list(self.choices)}, got {value!r}")
            return value
        if self.type == "bool":
            return bool(value)
        if self.type == "tensor":
            value = np.asarray(value)
            if value.dtype != np.float32 or not np.isfinite(value).all():
                raise ParamError(f"{field_name} must be a finite float32 tensor")
            return value
        if self.type == "float" and not math.isfinite(value):
            raise ParamError(f"{field_name} must be finite{self._range()}, got {value}")
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            raise ParamError(f"{field_name} must be{self._range()}, got {value}")
        return int(value) if self.type == "int" else float(value)

    def _range(self) -> str:
        return f" in [{self._bound(self.minimum, '-inf')}, {self._bound(self.maximum, 'inf')}]"

    def _bound(self, value: float | None, unbounded: str) -> str:
        if value is None:
            return unbounded
        # integer bounds exactly (%g would print 2^31 - 1 as 2.14748e+09); float bounds short, as declared
        return str(int(value)) if self.type == "int" else f"{value:g}"


@dataclass
class Job:
    """One method on one image: everything a method needs, nothing about gRPC."""

    runner: Runner
    sample: np.ndarray              # one preprocessed input sample, [C, H, W] (NCHW) or [H, W, C] (NHWC)
    targets: np.ndarray             # class ids to explain, int64 [T]
    params: dict[str, Any]          # checked, defaults filled in
    layout: str = "NCHW"
    layer: Any = None               # kernels.graph.Layer for layer methods
    passes: Passes = field(default_factory=Passes)
    partial_every: int = 0          # yield a partial map every this many batches (0: none)
    preprocessing: Any = None       # kernels.images.Preprocessing of the model (e.g. for a black baseline)
    scores: np.ndarray | None = None  # the model's scores for the sample when the caller has them already
    # Shared by the jobs of one sample (the methods of one request on one image): what one method computed and
    # another may reuse instead of running the model again (a layer's activations and its targets' gradients).
    shared: dict = field(default_factory=dict)

    def remember(self, key: tuple, value: np.ndarray) -> np.ndarray:
        """`value` kept in `shared` under `key` for the request's other methods on this sample, read-only: a method
        that wrote into it would change what the others read."""
        value.flags.writeable = False
        self.shared[key] = value
        return value

    def sample_scores(self) -> np.ndarray:
        """The model's scores for the sample [classes] (one forward, unless the caller passed them)."""
        if self.scores is None:
            self.scores = self.runner.scores(self.sample[None], self.passes)[0]
        return self.scores

    @property
    def spatial(self) -> tuple[int, int]:
        return self.sample.shape[1:] if self.layout == "NCHW" else self.sample.shape[:2]

    @property
    def channel_axis(self) -> int:
        """The channel axis of a batch of samples."""
        return 1 if self.layout == "NCHW" else 3


@dataclass
class Progress:
    done: int
    total: int
    stage: str = ""


@dataclass
class Maps:
    """One map per target, [T, h, w] float32, raw values; final or an anytime partial map."""

    maps: np.ndarray
    final: bool
    attribution: np.ndarray | None = None      # [T, *sample.shape] for pixel-level methods
    stats: list[dict[str, float]] | None = None
    step: int = 0


Event = Progress | Maps


@dataclass(frozen=True)
class Method:
    name: str
    family: str                     # "perturbation" | "gradient" | "cam"
    description: str
    reference: str
    params: tuple[Param, ...]
    run: Callable[[Job], Iterator[Event]]
    uses_layer: bool = False
    uses_gradients: bool = False
    # Checks that depend on the model (e.g. a window no larger than the input): (params, (H, W)) -> None.
    check_for_input: Callable[[dict[str, Any], tuple[int, int]], None] | None = None
    # Checks that depend on the model's graph around the layer (e.g. CAM's head): (runner, layer) -> None.
    check_for_layer: Callable[[Runner, Any], None] | None = None
    # Checks that need the whole shape of one input sample, [C, H, W] or [H, W, C] (e.g. a baseline tensor):
    # (params, sample_shape) -> None.
    check_for_sample: Callable[[dict[str, Any], tuple[int, ...]], None] | None = None

    def resolve(self, given: dict[str, Any], spatial: tuple[int, int],
                sample_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
        """Defaults for what is not given, every value checked against its declaration (and against the model's
        sample shape when it is given: the server always gives it, so that nothing is refused mid-run)."""
        unknown = set(given) - {p.name for p in self.params}
        if unknown:
            raise ParamError(f"{self.name} has no parameter {sorted(unknown)}; it takes {[p.name for p in self.params]}")
        params = {p.name: p.check(self.name, given[p.name]) if p.name in given else p.default for p in self.params}
        if self.check_for_input:
            self.check_for_input(params, spatial)
        if self.check_for_sample and sample_shape is not None:
            self.check_for_sample(params, tuple(sample_shape))
        return params
