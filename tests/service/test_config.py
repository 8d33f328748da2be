"""Server configuration: TOML files, model directories, layout detection, limits, and clear start-up errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxplain.server import config
from onnxplain.server.config import ConfigError
from onnxplain.server.registry import load_entry


def nhwc_classifier(path, classes=4):
    """A tiny tf2onnx-style classifier: NHWC input, Transpose to NCHW, Conv, Relu, GAP, Flatten, Gemm."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 3, 3, 3], rng.normal(size=216).astype(np.float32))
    fc = helper.make_tensor("fc", TensorProto.FLOAT, [8, classes], rng.normal(size=8 * classes).astype(np.float32))
    nodes = [helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["nchw", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    graph = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 32, 32, 3])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", classes])], [w, fc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def test_no_configuration_serves_the_default_model():
    cfg = config.load(None)
    assert [m.name for m in cfg.models] == ["shapes"]
    assert cfg.limits.max_concurrent_jobs >= 1 and cfg.limits.max_image_pixels > 0


def test_model_directory_detects_nhwc_and_the_logits_before_softmax(tmp_path):
    nhwc_classifier(tmp_path / "tiny.onnx")
    (tmp_path / "tiny.txt").write_text("a\nb\nc\nd\n")
    cfg = config.load(None, [tmp_path])
    assert [m.name for m in cfg.models] == ["tiny"]
    entry = load_entry(cfg.models[0], cfg.limits)
    assert entry.preprocessing.layout == "NHWC" and entry.preprocessing.sample_shape == (32, 32, 3)
    assert entry.runner.score_name == "logits" and entry.labels == ["a", "b", "c", "d"]


def test_a_model_with_dynamic_height_and_width_is_served_at_the_configured_size(tmp_path):
    """Layer discovery needs the maps' sizes: the model is fixed to the configured input size (it found no layer
    at all, so no CAM method could run), and a layer method runs on it."""
    from onnxplain.kernels.methods import METHODS, Job

    model = onnx.load(nhwc_classifier(tmp_path / "dyn.onnx"))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[1].dim_param, dims[2].dim_param = "h", "w"
    onnx.save(model, tmp_path / "dyn.onnx")
    (tmp_path / "dyn.toml").write_text('name = "dyn"\npath = "dyn.onnx"\n'
                                       '[preprocessing]\ninput_height = 24\ninput_width = 40\n')
    cfg = config.load(None, [tmp_path])
    entry = load_entry(cfg.models[0], cfg.limits)
    assert [(layer.name, layer.grid) for layer in entry.layers] == [("relu", (24, 40))]
    assert entry.default_layer.name == "relu"
    sample = np.random.default_rng(0).standard_normal((24, 40, 3)).astype(np.float32)
    job = Job(entry.runner, sample, np.array([1]), METHODS["gradcam"].resolve({}, (24, 40)), "NHWC",
              entry.default_layer)
    assert list(METHODS["gradcam"].run(job))[-1].maps.shape == (1, 24, 40)


def test_a_model_onnxruntime_cannot_load_is_a_clear_start_up_error(tmp_path):
    """A float16 input feeding float32 weights passes the ONNX checker (graph.load_model gives it a float32 input
    and a Cast to float16) but not onnxruntime's type checks: a ConfigError naming the model, not a raw error."""
    model = onnx.load(nhwc_classifier(tmp_path / "half.onnx"))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.save(model, tmp_path / "half.onnx")
    with pytest.raises(ConfigError, match=r"model half: onnxruntime cannot load it: .*Type Error"):
        load_entry(config.load(None, [tmp_path]).models[0], config.Limits())


def test_toml_config_with_limits_and_preprocessing(tmp_path):
    nhwc_classifier(tmp_path / "m.onnx")
    (tmp_path / "server.toml").write_text('''
[server]
port = 0
[limits]
max_batch = 4
max_concurrent_jobs = 3
[[models]]
name = "bgr"
path = "m.onnx"
[models.preprocessing]
channel_order = "BGR"
fit = "shorter_side"
resize_shorter = 40
scale = 1.0
mean = [1, 2, 3]
std = [4, 5, 6]
''')
    cfg = config.load(tmp_path / "server.toml", max_queued_jobs=5)
    assert (cfg.limits.max_batch, cfg.limits.max_concurrent_jobs, cfg.limits.max_queued_jobs) == (4, 3, 5)
    entry = load_entry(cfg.models[0], cfg.limits)
    pre = entry.preprocessing
    assert (pre.channel_order, pre.fit, pre.resize_shorter, pre.mean, pre.std) == ("BGR", "shorter_side", 40,
                                                                                   (1, 2, 3), (4, 5, 6))
    assert entry.runner.max_batch == 4


@pytest.mark.parametrize("toml, message", [
    ('[limits]\nmax_batch = 0', "positive integer"),
    ('[limits]\nmax_bach = 2', "unknown limits"),
    ('[oops]\n', "unknown sections"),
    ('[[models]]\nname = "x"', "needs a path"),
    ('[[models]]\npath = "missing.onnx"', "missing.onnx"),
    ('[[models]]\npath = "m.onnx"\n[models.preprocessing]\nfit = "zoom"', "fit must be one of"),
    ('[[models]]\npath = "m.onnx"\nlabels = "three.txt"', "3 names for 4 classes"),
    ('[[models]]\npath = "m.onnx"\n[[models]]\npath = "m.onnx"', "unique"),
    ('[[models]]\nname = "a\\nb"\npath = "m.onnx"', "models[0]: name must be"),
    ('[[models]]\nname = "../m"\npath = "m.onnx"', "[A-Za-z0-9._-]"),
    ('[[models]]\npath = ["m.onnx"]', "path must be"),
    ('[limits]\nmax_call_seconds = 0', "limits.max_call_seconds must be a positive integer"),
    ('[connections]\nkeepalive_time = 5', "unknown connections keys ['keepalive_time']"),
    ('[connections]\nkeepalive_time_ms = -1', "connections.keepalive_time_ms must be an integer in [0, 2147483647]"),
    ('[connections]\nmax_connection_age_ms = 3000000000', "connections.max_connection_age_ms must be an integer"),
    ('[connections]\nmax_connection_idle_ms = "5m"', "connections.max_connection_idle_ms must be an integer"),
    ('[connections]\nkeepalive_permit_without_calls = 1', "keepalive_permit_without_calls must be true or false"),
])
def test_bad_configuration_is_reported_clearly(tmp_path, toml, message):
    nhwc_classifier(tmp_path / "m.onnx")
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    (tmp_path / "s.toml").write_text(toml)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        cfg = config.load(tmp_path / "s.toml")
        for m in cfg.models:
            load_entry(m, cfg.limits)


def test_call_cap_and_connection_management_have_defaults_and_are_configurable(tmp_path):
    from onnxplain.server.main import parse_args

    defaults = dict(config.load(None).connections.options(config.Limits()))
    assert config.Limits().max_call_seconds == 600
    assert defaults == {"grpc.keepalive_time_ms": 60_000, "grpc.keepalive_timeout_ms": 20_000,
                        "grpc.http2.ping_timeout_ms": 20_000, "grpc.http2.min_ping_interval_without_data_ms": 10_000,
                        "grpc.max_connection_idle_ms": 300_000, "grpc.max_connection_age_ms": 1_800_000,
                        "grpc.max_connection_age_grace_ms": 610_000, "grpc.keepalive_permit_without_calls": 1}
    (tmp_path / "server.toml").write_text("[limits]\nmax_call_seconds = 30\n[connections]\nkeepalive_time_ms = 5000\n"
                                          "max_connection_idle_ms = 0\nkeepalive_permit_without_calls = false\n")
    cfg = config.load(tmp_path / "server.toml")
    options = dict(cfg.connections.options(cfg.limits))
    assert options["grpc.keepalive_time_ms"] == 5000 and options["grpc.keepalive_permit_without_calls"] == 0
    assert "grpc.max_connection_idle_ms" not in options, "0 leaves gRPC's default"
    assert options["grpc.max_connection_age_grace_ms"] == 40_000, "a call running at GOAWAY is not cut before its cap"
    args = parse_args(["--config", str(tmp_path / "server.toml"), "--max-call-seconds", "90"])
    assert config.load(args.config, max_call_seconds=args.max_call_seconds).limits.max_call_seconds == 90


def test_corrupt_model_file_is_reported(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    cfg = config.load(None, [tmp_path])
    with pytest.raises(ConfigError, match="bad"):
        load_entry(cfg.models[0], cfg.limits)


def test_server_command_fails_fast_on_a_bad_model(tmp_path):
    import subprocess
    import sys

    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    result = subprocess.run([sys.executable, "-m", "onnxplain.server.main", "--model-dir", str(tmp_path), "--port", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "bad" in result.stderr


def test_model_roots_let_models_point_outside_the_toml_folder_without_serving_their_neighbours(tmp_path):
    models, configs = tmp_path / "models", tmp_path / "configs"
    models.mkdir(), configs.mkdir()
    nhwc_classifier(models / "m.onnx")
    nhwc_classifier(models / "other.onnx")
    body = '[[models]]\nname = "m"\npath = "../models/m.onnx"\n'
    (configs / "refused.toml").write_text(body)
    cfg = config.load(configs / "refused.toml")
    with pytest.raises(ConfigError, match="outside the model directories"):
        load_entry(cfg.models[0], cfg.limits, roots=cfg.model_dirs)
    (configs / "server.toml").write_text('model_roots = ["../models"]\n' + body)
    cfg = config.load(configs / "server.toml")
    assert [m.name for m in cfg.models] == ["m"]                 # other.onnx is not served
    assert load_entry(cfg.models[0], cfg.limits, roots=cfg.model_dirs).name == "m"
