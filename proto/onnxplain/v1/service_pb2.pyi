from onnxplain.v1 import tensor_pb2 as _tensor_pb2
from onnxplain.v1 import methods_pb2 as _methods_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "num_classes", "execution_provider", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_classes: int
    execution_provider: str
    description: str
    def __init__(self, name: _Optional[str] = ..., num_classes: _Optional[int] = ..., execution_provider: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("fit", "resize_shorter", "scale", "mean", "std", "channel_order", "layout", "input_height", "input_width")
    FIT_FIELD_NUMBER: _ClassVar[int]
    RESIZE_SHORTER_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ORDER_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    fit: str
    resize_shorter: int
    scale: float
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    channel_order: str
    layout: str
    input_height: int
    input_width: int
    def __init__(self, fit: _Optional[str] = ..., resize_shorter: _Optional[int] = ..., scale: _Optional[float] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., channel_order: _Optional[str] = ..., layout: _Optional[str] = ..., input_height: _Optional[int] = ..., input_width: _Optional[int] = ...) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("name", "shape", "kind", "grid_height", "grid_width", "prefix_tokens", "is_default", "op_type")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    GRID_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    GRID_WIDTH_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    OP_TYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    kind: str
    grid_height: int
    grid_width: int
    prefix_tokens: int
    is_default: bool
    op_type: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., kind: _Optional[str] = ..., grid_height: _Optional[int] = ..., grid_width: _Optional[int] = ..., prefix_tokens: _Optional[int] = ..., is_default: _Optional[bool] = ..., op_type: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_image_pixels", "max_images", "max_methods", "max_targets", "max_batch", "max_concurrent_jobs", "max_queued_jobs", "max_message_bytes", "max_masks", "max_steps", "max_iterations", "max_job_bytes", "max_call_seconds", "max_reflection_streams", "device")
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_METHODS_FIELD_NUMBER: _ClassVar[int]
    MAX_TARGETS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_JOBS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_JOBS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MASKS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_JOB_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_REFLECTION_STREAMS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    max_image_pixels: int
    max_images: int
    max_methods: int
    max_targets: int
    max_batch: int
    max_concurrent_jobs: int
    max_queued_jobs: int
    max_message_bytes: int
    max_masks: int
    max_steps: int
    max_iterations: int
    max_job_bytes: int
    max_call_seconds: int
    max_reflection_streams: int
    device: str
    def __init__(self, max_image_pixels: _Optional[int] = ..., max_images: _Optional[int] = ..., max_methods: _Optional[int] = ..., max_targets: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_concurrent_jobs: _Optional[int] = ..., max_queued_jobs: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_masks: _Optional[int] = ..., max_steps: _Optional[int] = ..., max_iterations: _Optional[int] = ..., max_job_bytes: _Optional[int] = ..., max_call_seconds: _Optional[int] = ..., max_reflection_streams: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "description", "inputs", "outputs", "score_tensor", "preprocessing", "num_classes", "labels", "layers", "execution_provider", "limits", "probabilities")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    SCORE_TENSOR_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    score_tensor: str
    preprocessing: Preprocessing
    num_classes: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    execution_provider: str
    limits: Limits
    probabilities: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., score_tensor: _Optional[str] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., num_classes: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., execution_provider: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., probabilities: _Optional[str] = ...) -> None: ...

class ListMethodsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListMethodsResponse(_message.Message):
    __slots__ = ("methods", "limits")
    METHODS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    methods: _containers.RepeatedCompositeFieldContainer[_methods_pb2.MethodInfo]
    limits: Limits
    def __init__(self, methods: _Optional[_Iterable[_Union[_methods_pb2.MethodInfo, _Mapping]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "images", "top_k")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Image]
    top_k: int
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_tensor_pb2.Image, _Mapping]]] = ..., top_k: _Optional[int] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("class_id", "label", "logit", "probability")
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    class_id: int
    label: str
    logit: float
    probability: float
    def __init__(self, class_id: _Optional[int] = ..., label: _Optional[str] = ..., logit: _Optional[float] = ..., probability: _Optional[float] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("image_index", "image_name", "top", "geometry")
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    IMAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    image_name: str
    top: _containers.RepeatedCompositeFieldContainer[ClassScore]
    geometry: _tensor_pb2.ImageGeometry
    def __init__(self, image_index: _Optional[int] = ..., image_name: _Optional[str] = ..., top: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., geometry: _Optional[_Union[_tensor_pb2.ImageGeometry, _Mapping]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions",)
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ...) -> None: ...

class Targets(_message.Message):
    __slots__ = ("class_ids", "class_names", "top_k")
    CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    class_ids: _containers.RepeatedScalarFieldContainer[int]
    class_names: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    def __init__(self, class_ids: _Optional[_Iterable[int]] = ..., class_names: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "images", "targets", "methods", "output", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Image]
    targets: Targets
    methods: _containers.RepeatedCompositeFieldContainer[_methods_pb2.MethodSpec]
    output: _methods_pb2.OutputOptions
    request_id: str
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_tensor_pb2.Image, _Mapping]]] = ..., targets: _Optional[_Union[Targets, _Mapping]] = ..., methods: _Optional[_Iterable[_Union[_methods_pb2.MethodSpec, _Mapping]]] = ..., output: _Optional[_Union[_methods_pb2.OutputOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ExplainEvent(_message.Message):
    __slots__ = ("accepted", "progress", "map", "done")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    accepted: Accepted
    progress: Progress
    map: MapResult
    done: Done
    def __init__(self, accepted: _Optional[_Union[Accepted, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., map: _Optional[_Union[MapResult, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ...) -> None: ...

class Accepted(_message.Message):
    __slots__ = ("job_id", "request_id", "model", "execution_provider", "images", "total_maps")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MAPS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    request_id: str
    model: str
    execution_provider: str
    images: _containers.RepeatedCompositeFieldContainer[ImageTargets]
    total_maps: int
    def __init__(self, job_id: _Optional[str] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., execution_provider: _Optional[str] = ..., images: _Optional[_Iterable[_Union[ImageTargets, _Mapping]]] = ..., total_maps: _Optional[int] = ...) -> None: ...

class ImageTargets(_message.Message):
    __slots__ = ("image_index", "image_name", "geometry", "targets")
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    IMAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    image_name: str
    geometry: _tensor_pb2.ImageGeometry
    targets: _containers.RepeatedCompositeFieldContainer[ClassScore]
    def __init__(self, image_index: _Optional[int] = ..., image_name: _Optional[str] = ..., geometry: _Optional[_Union[_tensor_pb2.ImageGeometry, _Mapping]] = ..., targets: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("image_index", "method", "done", "total", "stage")
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    method: str
    done: int
    total: int
    stage: str
    def __init__(self, image_index: _Optional[int] = ..., method: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., stage: _Optional[str] = ...) -> None: ...

class MapResult(_message.Message):
    __slots__ = ("image_index", "image_name", "method", "class_id", "label", "final", "layer", "map", "attribution", "stats", "step")
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    IMAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    image_name: str
    method: str
    class_id: int
    label: str
    final: bool
    layer: str
    map: _tensor_pb2.Tensor
    attribution: _tensor_pb2.Tensor
    stats: _containers.ScalarMap[str, float]
    step: int
    def __init__(self, image_index: _Optional[int] = ..., image_name: _Optional[str] = ..., method: _Optional[str] = ..., class_id: _Optional[int] = ..., label: _Optional[str] = ..., final: _Optional[bool] = ..., layer: _Optional[str] = ..., map: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., attribution: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., stats: _Optional[_Mapping[str, float]] = ..., step: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "preprocess_ms", "compute_ms", "total_ms", "model_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    preprocess_ms: float
    compute_ms: float
    total_ms: float
    model_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., preprocess_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., model_ms: _Optional[float] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("timings", "forward_samples", "backward_samples", "model_runs", "maps")
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MODEL_RUNS_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    timings: Timings
    forward_samples: int
    backward_samples: int
    model_runs: int
    maps: int
    def __init__(self, timings: _Optional[_Union[Timings, _Mapping]] = ..., forward_samples: _Optional[int] = ..., backward_samples: _Optional[int] = ..., model_runs: _Optional[int] = ..., maps: _Optional[int] = ...) -> None: ...

class MetricOptions(_message.Message):
    __slots__ = ("steps", "blur_sigma", "return_curves", "boxes")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BLUR_SIGMA_FIELD_NUMBER: _ClassVar[int]
    RETURN_CURVES_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    steps: int
    blur_sigma: float
    return_curves: bool
    boxes: _containers.RepeatedCompositeFieldContainer[Box]
    def __init__(self, steps: _Optional[int] = ..., blur_sigma: _Optional[float] = ..., return_curves: _Optional[bool] = ..., boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("image_index", "x0", "y0", "x1", "y1", "original_pixels")
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_PIXELS_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    x0: float
    y0: float
    x1: float
    y1: float
    original_pixels: bool
    def __init__(self, image_index: _Optional[int] = ..., x0: _Optional[float] = ..., y0: _Optional[float] = ..., x1: _Optional[float] = ..., y1: _Optional[float] = ..., original_pixels: _Optional[bool] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("model", "images", "targets", "methods", "maps", "metrics", "options", "return_maps")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    RETURN_MAPS_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Image]
    targets: Targets
    methods: _containers.RepeatedCompositeFieldContainer[_methods_pb2.MethodSpec]
    maps: _containers.RepeatedCompositeFieldContainer[_methods_pb2.Map]
    metrics: _containers.RepeatedScalarFieldContainer[_methods_pb2.Metric]
    options: MetricOptions
    return_maps: bool
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_tensor_pb2.Image, _Mapping]]] = ..., targets: _Optional[_Union[Targets, _Mapping]] = ..., methods: _Optional[_Iterable[_Union[_methods_pb2.MethodSpec, _Mapping]]] = ..., maps: _Optional[_Iterable[_Union[_methods_pb2.Map, _Mapping]]] = ..., metrics: _Optional[_Iterable[_Union[_methods_pb2.Metric, str]]] = ..., options: _Optional[_Union[MetricOptions, _Mapping]] = ..., return_maps: _Optional[bool] = ...) -> None: ...

class MetricScore(_message.Message):
    __slots__ = ("image_index", "method", "class_id", "metric", "value", "curve", "class_score", "masked_score")
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CURVE_FIELD_NUMBER: _ClassVar[int]
    CLASS_SCORE_FIELD_NUMBER: _ClassVar[int]
    MASKED_SCORE_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    method: str
    class_id: int
    metric: _methods_pb2.Metric
    value: float
    curve: _containers.RepeatedScalarFieldContainer[float]
    class_score: float
    masked_score: float
    def __init__(self, image_index: _Optional[int] = ..., method: _Optional[str] = ..., class_id: _Optional[int] = ..., metric: _Optional[_Union[_methods_pb2.Metric, str]] = ..., value: _Optional[float] = ..., curve: _Optional[_Iterable[float]] = ..., class_score: _Optional[float] = ..., masked_score: _Optional[float] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("scores", "maps", "images", "done")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[MetricScore]
    maps: _containers.RepeatedCompositeFieldContainer[MapResult]
    images: _containers.RepeatedCompositeFieldContainer[ImageTargets]
    done: Done
    def __init__(self, scores: _Optional[_Iterable[_Union[MetricScore, _Mapping]]] = ..., maps: _Optional[_Iterable[_Union[MapResult, _Mapping]]] = ..., images: _Optional[_Iterable[_Union[ImageTargets, _Mapping]]] = ..., done: _Optional[_Union[Done, _Mapping]] = ...) -> None: ...
