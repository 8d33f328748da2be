from onnxplain.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Metric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_UNSPECIFIED: _ClassVar[Metric]
    AVERAGE_DROP: _ClassVar[Metric]
    AVERAGE_GAIN: _ClassVar[Metric]
    AVERAGE_INCREASE: _ClassVar[Metric]
    INSERTION: _ClassVar[Metric]
    DELETION: _ClassVar[Metric]
    POINTING_GAME: _ClassVar[Metric]
    ENERGY_POINTING_GAME: _ClassVar[Metric]
METRIC_UNSPECIFIED: Metric
AVERAGE_DROP: Metric
AVERAGE_GAIN: Metric
AVERAGE_INCREASE: Metric
INSERTION: Metric
DELETION: Metric
POINTING_GAME: Metric
ENERGY_POINTING_GAME: Metric

class OcclusionParams(_message.Message):
    __slots__ = ("window", "stride", "baseline")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    window: int
    stride: int
    baseline: float
    def __init__(self, window: _Optional[int] = ..., stride: _Optional[int] = ..., baseline: _Optional[float] = ...) -> None: ...

class GradientParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InputXGradientParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SmoothGradParams(_message.Message):
    __slots__ = ("samples", "noise_level", "variant", "seed")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NOISE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    samples: int
    noise_level: float
    variant: str
    seed: int
    def __init__(self, samples: _Optional[int] = ..., noise_level: _Optional[float] = ..., variant: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class IntegratedGradientsParams(_message.Message):
    __slots__ = ("steps", "baseline", "blur_sigma", "method", "baseline_tensor")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    BLUR_SIGMA_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BASELINE_TENSOR_FIELD_NUMBER: _ClassVar[int]
    steps: int
    baseline: str
    blur_sigma: float
    method: str
    baseline_tensor: _tensor_pb2.Tensor
    def __init__(self, steps: _Optional[int] = ..., baseline: _Optional[str] = ..., blur_sigma: _Optional[float] = ..., method: _Optional[str] = ..., baseline_tensor: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class GuidedBackpropParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeconvnetParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GuidedGradCamParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CamParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GradCamParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GradCamPlusPlusParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class XGradCamParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HiResCamParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerCamParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EigenCamParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ScoreCamParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AblationCamParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RiseParams(_message.Message):
    __slots__ = ("masks", "grid", "keep_probability", "seed")
    MASKS_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    KEEP_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    masks: int
    grid: int
    keep_probability: float
    seed: int
    def __init__(self, masks: _Optional[int] = ..., grid: _Optional[int] = ..., keep_probability: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class OptiCamParams(_message.Message):
    __slots__ = ("iterations", "learning_rate", "loss", "gradient", "directions", "step", "seed")
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    iterations: int
    learning_rate: float
    loss: str
    gradient: str
    directions: int
    step: float
    seed: int
    def __init__(self, iterations: _Optional[int] = ..., learning_rate: _Optional[float] = ..., loss: _Optional[str] = ..., gradient: _Optional[str] = ..., directions: _Optional[int] = ..., step: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class MethodSpec(_message.Message):
    __slots__ = ("method", "layer", "occlusion", "gradient", "input_x_gradient", "smoothgrad", "integrated_gradients", "guided_backprop", "deconvnet", "guided_gradcam", "cam", "gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "eigencam", "scorecam", "ablationcam", "rise", "opticam")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    OCCLUSION_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    INPUT_X_GRADIENT_FIELD_NUMBER: _ClassVar[int]
    SMOOTHGRAD_FIELD_NUMBER: _ClassVar[int]
    INTEGRATED_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    GUIDED_BACKPROP_FIELD_NUMBER: _ClassVar[int]
    DECONVNET_FIELD_NUMBER: _ClassVar[int]
    GUIDED_GRADCAM_FIELD_NUMBER: _ClassVar[int]
    CAM_FIELD_NUMBER: _ClassVar[int]
    GRADCAM_FIELD_NUMBER: _ClassVar[int]
    GRADCAMPP_FIELD_NUMBER: _ClassVar[int]
    XGRADCAM_FIELD_NUMBER: _ClassVar[int]
    HIRESCAM_FIELD_NUMBER: _ClassVar[int]
    LAYERCAM_FIELD_NUMBER: _ClassVar[int]
    EIGENCAM_FIELD_NUMBER: _ClassVar[int]
    SCORECAM_FIELD_NUMBER: _ClassVar[int]
    ABLATIONCAM_FIELD_NUMBER: _ClassVar[int]
    RISE_FIELD_NUMBER: _ClassVar[int]
    OPTICAM_FIELD_NUMBER: _ClassVar[int]
    method: str
    layer: str
    occlusion: OcclusionParams
    gradient: GradientParams
    input_x_gradient: InputXGradientParams
    smoothgrad: SmoothGradParams
    integrated_gradients: IntegratedGradientsParams
    guided_backprop: GuidedBackpropParams
    deconvnet: DeconvnetParams
    guided_gradcam: GuidedGradCamParams
    cam: CamParams
    gradcam: GradCamParams
    gradcampp: GradCamPlusPlusParams
    xgradcam: XGradCamParams
    hirescam: HiResCamParams
    layercam: LayerCamParams
    eigencam: EigenCamParams
    scorecam: ScoreCamParams
    ablationcam: AblationCamParams
    rise: RiseParams
    opticam: OptiCamParams
    def __init__(self, method: _Optional[str] = ..., layer: _Optional[str] = ..., occlusion: _Optional[_Union[OcclusionParams, _Mapping]] = ..., gradient: _Optional[_Union[GradientParams, _Mapping]] = ..., input_x_gradient: _Optional[_Union[InputXGradientParams, _Mapping]] = ..., smoothgrad: _Optional[_Union[SmoothGradParams, _Mapping]] = ..., integrated_gradients: _Optional[_Union[IntegratedGradientsParams, _Mapping]] = ..., guided_backprop: _Optional[_Union[GuidedBackpropParams, _Mapping]] = ..., deconvnet: _Optional[_Union[DeconvnetParams, _Mapping]] = ..., guided_gradcam: _Optional[_Union[GuidedGradCamParams, _Mapping]] = ..., cam: _Optional[_Union[CamParams, _Mapping]] = ..., gradcam: _Optional[_Union[GradCamParams, _Mapping]] = ..., gradcampp: _Optional[_Union[GradCamPlusPlusParams, _Mapping]] = ..., xgradcam: _Optional[_Union[XGradCamParams, _Mapping]] = ..., hirescam: _Optional[_Union[HiResCamParams, _Mapping]] = ..., layercam: _Optional[_Union[LayerCamParams, _Mapping]] = ..., eigencam: _Optional[_Union[EigenCamParams, _Mapping]] = ..., scorecam: _Optional[_Union[ScoreCamParams, _Mapping]] = ..., ablationcam: _Optional[_Union[AblationCamParams, _Mapping]] = ..., rise: _Optional[_Union[RiseParams, _Mapping]] = ..., opticam: _Optional[_Union[OptiCamParams, _Mapping]] = ...) -> None: ...

class MethodInfo(_message.Message):
    __slots__ = ("name", "family", "description", "reference", "uses_layer", "uses_gradients", "params")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    USES_LAYER_FIELD_NUMBER: _ClassVar[int]
    USES_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    description: str
    reference: str
    uses_layer: bool
    uses_gradients: bool
    params: _containers.RepeatedCompositeFieldContainer[ParamInfo]
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., description: _Optional[str] = ..., reference: _Optional[str] = ..., uses_layer: _Optional[bool] = ..., uses_gradients: _Optional[bool] = ..., params: _Optional[_Iterable[_Union[ParamInfo, _Mapping]]] = ...) -> None: ...

class ParamInfo(_message.Message):
    __slots__ = ("name", "type", "description", "default_number", "default_bool", "default_string", "minimum", "maximum", "choices")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[ParamInfo.Type]
        TYPE_INT: _ClassVar[ParamInfo.Type]
        TYPE_FLOAT: _ClassVar[ParamInfo.Type]
        TYPE_BOOL: _ClassVar[ParamInfo.Type]
        TYPE_ENUM: _ClassVar[ParamInfo.Type]
        TYPE_TENSOR: _ClassVar[ParamInfo.Type]
    TYPE_UNSPECIFIED: ParamInfo.Type
    TYPE_INT: ParamInfo.Type
    TYPE_FLOAT: ParamInfo.Type
    TYPE_BOOL: ParamInfo.Type
    TYPE_ENUM: ParamInfo.Type
    TYPE_TENSOR: ParamInfo.Type
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_NUMBER_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_BOOL_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STRING_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_FIELD_NUMBER: _ClassVar[int]
    MAXIMUM_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: ParamInfo.Type
    description: str
    default_number: float
    default_bool: bool
    default_string: str
    minimum: float
    maximum: float
    choices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[ParamInfo.Type, str]] = ..., description: _Optional[str] = ..., default_number: _Optional[float] = ..., default_bool: _Optional[bool] = ..., default_string: _Optional[str] = ..., minimum: _Optional[float] = ..., maximum: _Optional[float] = ..., choices: _Optional[_Iterable[str]] = ...) -> None: ...

class OutputOptions(_message.Message):
    __slots__ = ("normalization", "resolution", "partial_maps", "return_attribution")
    class Normalization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        NORMALIZATION_UNSPECIFIED: _ClassVar[OutputOptions.Normalization]
        NONE: _ClassVar[OutputOptions.Normalization]
        MINMAX: _ClassVar[OutputOptions.Normalization]
        MAX_ABS: _ClassVar[OutputOptions.Normalization]
    NORMALIZATION_UNSPECIFIED: OutputOptions.Normalization
    NONE: OutputOptions.Normalization
    MINMAX: OutputOptions.Normalization
    MAX_ABS: OutputOptions.Normalization
    class Resolution(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        RESOLUTION_UNSPECIFIED: _ClassVar[OutputOptions.Resolution]
        INPUT: _ClassVar[OutputOptions.Resolution]
        LAYER: _ClassVar[OutputOptions.Resolution]
    RESOLUTION_UNSPECIFIED: OutputOptions.Resolution
    INPUT: OutputOptions.Resolution
    LAYER: OutputOptions.Resolution
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_MAPS_FIELD_NUMBER: _ClassVar[int]
    RETURN_ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    normalization: OutputOptions.Normalization
    resolution: OutputOptions.Resolution
    partial_maps: bool
    return_attribution: bool
    def __init__(self, normalization: _Optional[_Union[OutputOptions.Normalization, str]] = ..., resolution: _Optional[_Union[OutputOptions.Resolution, str]] = ..., partial_maps: _Optional[bool] = ..., return_attribution: _Optional[bool] = ...) -> None: ...

class Map(_message.Message):
    __slots__ = ("image_index", "class_id", "method", "map")
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    image_index: int
    class_id: int
    method: str
    map: _tensor_pb2.Tensor
    def __init__(self, image_index: _Optional[int] = ..., class_id: _Optional[int] = ..., method: _Optional[str] = ..., map: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
