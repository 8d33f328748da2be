"""onnxruntime sessions for one model: the plain forward and the graphs that methods compose around it.

A `Runner` is shared by every job on a model (onnxruntime sessions are safe to run from several threads);
the per-job bookkeeping (how many samples went through the model) lives in a `Passes` that each call gets.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def pick_providers(prefer: str = "auto") -> list[str]:
    """CUDA when onnxruntime offers it (onnxruntime-gpu on a machine with a GPU), else CPU."""
    available = ort.get_available_providers()
    if prefer == "cpu" or CUDA not in available:
        return [CPU]
    return [CUDA, CPU]


@dataclass
class Passes:
    """What one job asked of the model: samples forward only, samples forward+backward, and runs."""

    forward_samples: int = 0
    backward_samples: int = 0
    runs: int = 0
    seconds: float = 0.0    # inside onnxruntime's run: the model passes alone
    # Told of every run as it ends, (samples, backward, seconds): lets a server count passes live (metrics).
    observer: Callable[[int, bool, float], None] | None = field(default=None, repr=False, compare=False)


class Runner:
    """Runs a model and graphs composed around it, in batches of at most `max_batch` samples, and at most
    `max_rows` seed rows (targets) on one sample's forward (sample_gradients, head_gradients; default max_batch).
    A model whose batch couples its samples (dynamic quantization: one scale over the whole batch) runs one sample
    per run, but its rows on one sample still share a run: copies of one sample have one range."""

    def __init__(self, model: onnx.ModelProto, score_name: str, input_name: str, *,
                 max_batch: int = 32, max_rows: int | None = None, providers: list[str] | None = None,
                 threads: int = 0, spinning: bool = False, probabilities: str = "softmax"):
        self.model = model
        self.score_name = score_name
        self.probabilities = probabilities      # how scores become class probabilities: "softmax" or "sigmoid"
        self.input_name = input_name
        self.max_batch = max_batch
        self.max_rows = max_rows or max_batch
        _quiet_blas()
        self._options = ort.SessionOptions()
        self._options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # onnxruntime's intra-op threads spin after each run by default; between two runs of a method numpy works
        # (masks, accumulation, eigen-decompositions) and its BLAS threads then fight the spinning ones for the
        # same cores, as do the other jobs' sessions. Without spinning, on 2 cores: EigenCAM 16 -> 8 ms, Opti-CAM
        # (10 steps) 304 -> 244 ms, Score-CAM 6.9 -> 6.5 s, one EfficientNet gradient 30 -> 22 ms.
        if not spinning:
            self._options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            self._options.intra_op_num_threads = threads
        self._providers = providers or pick_providers()
        self._cache: dict[str, object] = {}
        self._lock = threading.Lock()
        self.session = self._session(model)
        self.provider = self.session.get_providers()[0]
        cuda = self.session.get_provider_options().get(CUDA) if self.provider == CUDA else None
        self._device = ("cuda", int(cuda.get("device_id", 0))) if cuda is not None else ("cpu", 0)
        self._num_classes: int | None = None
        self.supplied: list = []        # kernels.supplied.GradientGraph: user-supplied gradient graphs

    @property
    def num_classes(self) -> int:
        """Width of the score tensor (from one run on a zero input, the first time it is asked)."""
        if self._num_classes is None:
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in self._input_shape()]
            self._num_classes = int(self.session.run([self.score_name], {
                self.input_name: np.zeros(shape, np.float32)})[0].shape[-1])
        return self._num_classes

    def _input_shape(self) -> list:
        return next(i.shape for i in self.session.get_inputs() if i.name == self.input_name)

    def _session(self, model: onnx.ModelProto) -> ort.InferenceSession:
        return ort.InferenceSession(model.SerializeToString(), self._options, providers=self._providers)

    def graph(self, key: str, build: Callable[[], onnx.ModelProto]) -> ort.InferenceSession:
        """A session for a graph composed around the model, built once per key and reused."""
        return self.cached(f"session/{key}", lambda: self._session(build()))

    def cached(self, key: str, build: Callable[[], object]):
        """Anything derived from the model alone (sessions, head weights), built once per key and reused."""
        with self._lock:
            value = self._cache.get(key)
        if value is None:
            value = build()
            with self._lock:
                value = self._cache.setdefault(key, value)
        return value

    def scores(self, x: np.ndarray, passes: Passes) -> np.ndarray:
        """Scores of a batch of samples, run in chunks of max_batch."""
        return np.concatenate([
            self.run(self.session, [self.score_name], {self.input_name: x[i:i + self.max_batch]}, passes)[0]
            for i in range(0, len(x), self.max_batch)])

    def forward(self, x: np.ndarray, outputs: tuple[str, ...], passes: Passes) -> dict[str, np.ndarray]:
        """Scores and intermediate tensors of a batch, in chunks of max_batch (the exposing graph is cached)."""
        from . import graph

        outputs = tuple(dict.fromkeys((self.score_name, *outputs)))
        session = self.graph("forward/" + "|".join(outputs), lambda: graph.expose(self.model, list(outputs)))
        chunks = [self.run(session, list(outputs), {self.input_name: x[i:i + self.max_batch]}, passes)
                  for i in range(0, len(x), self.max_batch)]
        return _joined(outputs, chunks)

    def gradient_session(self, layers: tuple[str, ...] = (), rule: str = "standard", wrt_input: bool = True,
                         composed: tuple[str, Callable[[onnx.ModelProto], onnx.ModelProto]] | None = None,
                         layer_rule: str | None = None) -> ort.InferenceSession:
        """The session of the gradient graph for (layers, rule, wrt_input, layer_rule): a user-supplied one
        (kernels.supplied) when one covers the request, else the one kernels.autodiff builds, once per key, without
        the model's own outputs (no method reads them there, and the forward nodes only they need are left out). With
        `composed` = (name, compose): the session of compose(that graph), built once per name and graph.
        A supplied graph has one rule, so it never covers a `layer_rule` other than `rule`."""
        from . import autodiff

        layers = tuple(layers)
        layer_rule = layer_rule if layer_rule != rule else None
        supplied = next((g for g in self.supplied if layer_rule is None and g.covers(layers, rule, wrt_input)), None)
        if supplied is not None:
            key, build = f"supplied/{id(supplied)}", lambda: supplied.model
        else:
            key = f"gradients/{rule}/{layer_rule or rule}/{int(wrt_input)}/" + "|".join(layers)

            def build():
                return autodiff.augment(self.model, layers, wrt_input=wrt_input, rule=rule, scores=self.score_name,
                                        layer_rule=layer_rule, keep_outputs=False)
        if composed is not None:
            name, compose = composed
            return self.graph(f"{name}/{key}", lambda: compose(build()))
        return supplied.session if supplied is not None else self.graph(key, build)

    def gradients(self, x: np.ndarray, seed: np.ndarray, passes: Passes, layers: tuple[str, ...] = (),
                  rule: str = "standard", wrt_input: bool = True, layer_rule: str | None = None
                  ) -> dict[str, np.ndarray]:
        """One forward+backward per sample: each layer's activation and gradient (`<layer>__grad`, under
        `layer_rule` when given) and the input gradient (`<input>__grad`) of sum(seed * scores), run in chunks of
        max_batch (gradient_session picks the graph)."""
        layers = tuple(layers)
        session = self.gradient_session(layers, rule, wrt_input, layer_rule=layer_rule)
        names = [*layers, *(f"{name}__grad" for name in layers)]
        if wrt_input:
            names.append(f"{self.input_name}__grad")
        chunks = [self.run(session, names, {self.input_name: x[i:i + self.max_batch], "seed": seed[i:i + self.max_batch]},
                           passes, backward=True) for i in range(0, len(x), self.max_batch)]
        return _joined(names, chunks)

    def sample_gradients(self, sample: np.ndarray, seed: np.ndarray, passes: Passes, layers: tuple[str, ...] = (),
                         rule: str = "standard", layer_rule: str | None = None) -> dict[str, np.ndarray] | None:
        """Many seed rows on one sample [1, ...]: what `gradients` gives for one copy of the sample per row (each
        layer's activation, once here, [1, ...]; per row its gradient and the input gradient), from one forward
        of the sample per max_rows rows instead of one per row (autodiff.share_forward of the gradient graph
        `gradients` runs). A lone row runs that graph itself: the shared one's forward has a static batch of one
        and its backward K rows, so onnxruntime keeps fewer of the backward's element-wise products in its blocked
        layout, and at one row it is slower (ResNet-50 79 -> 87 ms, EfficientNet-Lite0 20 -> 25 ms on 2 cores;
        at two rows it is already faster: 154 -> 131 ms). None when a supplied gradient graph covers the request
        (it is used as it is) or autodiff.share_forward refuses the graph (a backward that reads the batch in a
        way it cannot repeat for the rows): the caller then repeats the sample (shared_session)."""
        layers = tuple(layers)
        if any(g.covers(layers, rule, True) for g in self.supplied):     # before any run, as the None below
            return None
        grads = [*(f"{name}__grad" for name in layers), f"{self.input_name}__grad"]
        chunks, once = [], []
        for i in range(0, len(seed), self.max_rows):
            rows = seed[i:i + self.max_rows]
            if len(rows) == 1:
                out = self.gradients(sample, rows, passes, layers, rule, layer_rule=layer_rule)
                out = [out[name] for name in (*layers, *grads)]
            else:       # the first chunk, if any has several rows: None comes before any run
                session = self.shared_session(layers, rule, layer_rule)
                if session is None:
                    return None
                out = self.run(session, [*layers, *grads], {self.input_name: sample, "seed": rows}, passes,
                               samples=len(rows), backward=True)
            once = out[:len(layers)]
            chunks.append(out[len(layers):])
        return {**dict(zip(layers, once)), **_joined(grads, chunks)}

    def shared_session(self, layers: tuple[str, ...] = (), rule: str = "standard", layer_rule: str | None = None,
                       composed: tuple[str, Callable[[onnx.ModelProto], onnx.ModelProto]] | None = None
                       ) -> ort.InferenceSession | None:
        """The session of autodiff.share_forward of the gradient graph for (layers, rule, layer_rule) with respect to
        the input: one sample in, K seed rows, one forward for them all; with `composed` = (name, compose), of
        compose(that graph). Built once; None when a supplied gradient graph covers the request (it is used as it
        is) or autodiff.share_forward refuses the graph."""
        from . import autodiff

        layers = tuple(layers)
        if any(g.covers(layers, rule, True) for g in self.supplied):
            return None
        name, compose = composed or (None, lambda graph: graph)
        tag = "shared" if name is None else f"shared-{name}"    # never gradient_session's key for compose alone

        def build():
            try:
                return (self.gradient_session(layers, rule, True, layer_rule=layer_rule, composed=(
                    tag, lambda graph: compose(autodiff.share_forward(graph)))),)
            except autodiff.AutodiffError:
                return ()
        built = self.cached(f"{tag}/{rule}/{layer_rule or rule}/" + "|".join(layers), build)
        return built[0] if built else None

    def body(self, sample: np.ndarray, passes: Passes, layer: str) -> list[np.ndarray] | None:
        """The layer's activation and the other tensors its head reads (each [1, ...]), from one run of the model's
        body (inputs -> layer), which `head_gradients` can take instead of running it again; None when the model
        cannot be cut at the layer."""
        cut = self.cached(f"body/{layer}", lambda: self._cut(layer))
        if not cut:
            return None
        session, _, extras = cut
        return self.run(session, [layer, *extras], {self.input_name: sample}, passes)

    def head_gradients(self, sample: np.ndarray, seed: np.ndarray, passes: Passes, layer: str,
                       body: list[np.ndarray] | None = None) -> dict[str, np.ndarray] | None:
        """Many seed rows on one sample: the layer's activation [1, ...] and `<layer>__grad` per seed row, from one
        run of the model's body (inputs -> layer; or `body`, what `body` gave for this sample) and runs of its
        head's gradient graph (layer -> scores) only, max_rows rows at a time. A layer's gradient for T targets
        then costs one forward of the body instead of T (`gradients` repeats the sample once per target). None
        when a supplied gradient graph covers the layer (it is used as it is), or when the model cannot be cut at
        the layer or its head cannot be differentiated (`gradients` then runs the whole model per row, or says why
        it cannot)."""
        if any(g.covers((layer,), "standard", False) for g in self.supplied):
            return None
        head = self.cached(f"head-gradients/{layer}", lambda: self._head_gradient_session(layer))
        if not head:
            return None
        names = [layer, *self.cached(f"body/{layer}", lambda: self._cut(layer))[2]]
        tensors = body if body is not None else self.body(sample, passes, layer)
        chunks = []
        for i in range(0, len(seed), self.max_rows):
            rows = seed[i:i + self.max_rows]
            feeds = {name: np.repeat(value, len(rows), axis=0) for name, value in zip(names, tensors)}
            chunks.append(self.run(head[0], [f"{layer}__grad"], {**feeds, "seed": rows}, passes, backward=True))
        return {layer: tensors[0], **_joined([f"{layer}__grad"], chunks)}

    def _cut(self, layer: str) -> tuple:
        """(session of the model's body up to `layer`, its head, the other tensors the head reads) or () when the
        model cannot be cut at `layer`."""
        from . import graph

        try:
            body, head = graph.cut(self.model, layer, self.score_name)
        except ValueError:
            return ()
        return self._session(body), head, [i.name for i in head.graph.input][1:]

    def _head_gradient_session(self, layer: str) -> tuple:
        """(session of the gradient graph of the model's head after `layer`,) or () when the model cannot be cut
        at `layer` or its head cannot be differentiated."""
        from . import autodiff

        cut = self.cached(f"body/{layer}", lambda: self._cut(layer))
        if not cut:
            return ()
        try:
            gradient = autodiff.differentiate(cut[1], self.score_name, [layer], keep_outputs=False)
        except ValueError:      # AutodiffError is one
            return ()
        return (self._session(gradient),)

    def resident(self, array: np.ndarray) -> ort.OrtValue:
        """`array` placed once where this runner's sessions run, to feed many runs: a method's constant inputs (the
        image, its activations, a baseline) then cross to a CUDA device once per job instead of once per run. On
        the CPU the OrtValue reads the array's own memory (no copy)."""
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), *self._device)

    def run(self, session: ort.InferenceSession, outputs: list[str], feeds: dict[str, np.ndarray | ort.OrtValue],
            passes: Passes, samples: int | None = None, backward: bool = False) -> list[np.ndarray]:
        """One onnxruntime run, counted in `passes` (samples defaults to the first feed's batch size). Feeds are
        numpy arrays or OrtValues from `resident`."""
        start = time.perf_counter()
        out = session.run(outputs, feeds)
        seconds = time.perf_counter() - start
        passes.seconds += seconds
        if samples is None:
            first = next(iter(feeds.values()))
            samples = first.shape()[0] if isinstance(first, ort.OrtValue) else len(first)
        passes.runs += 1
        if backward:
            passes.backward_samples += samples
        else:
            passes.forward_samples += samples
        if passes.observer is not None:
            passes.observer(samples, backward, seconds)
        return out


def _joined(names, chunks: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Each output's chunks joined along the batch (a single chunk is handed on as it is, not copied)."""
    if len(chunks) == 1:
        return dict(zip(names, chunks[0]))
    return {name: np.concatenate([chunk[j] for chunk in chunks]) for j, name in enumerate(names)}


_blas_limited = False


def _quiet_blas() -> None:
    """Keep numpy's BLAS (OpenBLAS) to one thread in a process that runs models: after each call its idle
    threads busy-wait for a while, and onnxruntime's next run, which owns the cores, then shares them with
    spinning threads. One small QR per Opti-CAM step made each following batch of 17 EfficientNet forwards
    ~40% slower (88 -> 125 ms on 2 cores). numpy's own work here is small (maps, accumulations, eigenvectors of
    a few dozen positions), so one thread costs it nothing measurable. Process-wide and idempotent."""
    global _blas_limited
    if not _blas_limited:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")
        _blas_limited = True
