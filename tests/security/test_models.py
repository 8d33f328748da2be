"""Model confinement and start-up faults on real servers: paths that escape the model directories (`..`,
symlinks, ONNX external data), oversized models, custom operator domains, labels outside; a corrupt or missing
model at start-up leaves the others serving, or stops the server with fail_fast."""

from __future__ import annotations

import os
import pathlib
import shutil

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxplain.v1 import admin_pb2, admin_pb2_grpc, service_pb2, service_pb2_grpc

from support import default_model_config

SHAPES = default_model_config()


def start(models=(), **fields):
    from onnxplain.server.config import Limits, ServerConfig
    from onnxplain.server.main import Server

    limits = fields.pop("limits", Limits())
    return Server(ServerConfig(host="127.0.0.1", port=0, limits=limits, models=tuple(models), **fields)).start()


def admin_load(server, path: str, name: str = "") -> admin_pb2.LoadModelResponse:
    with grpc.insecure_channel(server.address) as channel:
        return admin_pb2_grpc.AdminStub(channel).LoadModel(admin_pb2.LoadModelRequest(path=path, name=name), timeout=30)


def served(server) -> list[str]:
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.ExplainerStub(channel)
        return [m.name for m in stub.ListModels(service_pb2.ListModelsRequest(), timeout=10).models]


@pytest.fixture
def layout(tmp_path):
    """models/ (the model directory, holding shapes.onnx) and outside/ (a sibling holding a valid model)."""
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    shutil.copy(SHAPES.path, models / "shapes.onnx")
    shutil.copy(SHAPES.path, outside / "secret.onnx")
    return models, outside


@pytest.fixture
def server(layout):
    from onnxplain.server.config import ModelConfig

    models, _ = layout
    srv = start([ModelConfig("shapes", models / "shapes.onnx")], model_dirs=(models,))
    yield srv
    srv.stop(0)


def refused(server, path: str, match: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        admin_load(server, path)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert match in info.value.details(), info.value.details()
    return info.value.details()


def test_a_model_inside_the_model_directory_loads(server, layout):
    models, _ = layout
    shutil.copy(SHAPES.path, models / "copy.onnx")
    assert admin_load(server, "copy.onnx").model.name == "copy"
    assert admin_load(server, str(models / "copy.onnx"), name="copy2").model.num_classes == 8
    (models / "sub").mkdir()
    assert admin_load(server, "sub/../copy.onnx", name="copy3").model.name == "copy3"   # `..` that stays inside
    assert served(server) == ["copy", "copy2", "copy3", "shapes"]


def test_path_traversal_is_refused(server, layout):
    _, outside = layout
    refused(server, "../outside/secret.onnx", "outside the model directories")
    refused(server, str(outside / "secret.onnx"), "outside the model directories")
    refused(server, "../../../../../../etc/passwd", "outside the model directories")
    assert served(server) == ["shapes"]


def test_symlink_escape_is_refused(server, layout):
    models, outside = layout
    (models / "link.onnx").symlink_to(outside / "secret.onnx")
    (models / "linkdir").symlink_to(outside, target_is_directory=True)
    refused(server, "link.onnx", str(outside / "secret.onnx"))
    refused(server, "linkdir/secret.onnx", "outside the model directories")
    assert served(server) == ["shapes"]


def test_a_path_the_file_system_cannot_take_is_invalid(server, caplog):
    refused(server, "shapes\0.onnx", "NUL")
    refused(server, "x" * 5000 + ".onnx", "path")     # ENAMETOOLONG
    refused(server, "m.onnx\n2026-01-01 00:00:00,000 INFO onnxplain.server []: forged", "not a file")
    assert served(server) == ["shapes"]
    assert "\n2026-01-01" not in caplog.text and "m.onnx\\n2026" in caplog.text   # logged escaped


@pytest.mark.parametrize("name", ["evil\n2026-01-01 00:00:00,000 INFO onnxplain.server []: forged", "a/b", "a b",
                                  "-flag", ".hidden", "x" * 129, "caf\u00e9"])
def test_a_model_name_outside_the_rule_is_refused(server, name):
    """Model names are written into log lines, metric labels and file names: a newline forged log lines."""
    with pytest.raises(grpc.RpcError) as info:
        admin_load(server, "shapes.onnx", name=name)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "[A-Za-z0-9._-]" in info.value.details() and "\n" not in info.value.details()
    assert served(server) == ["shapes"]
    assert admin_load(server, "shapes.onnx", name="Shapes-2_v1.0").model.name == "Shapes-2_v1.0"


def test_a_file_whose_stem_breaks_the_name_rule_needs_a_name(server, layout):
    models, _ = layout
    shutil.copy(SHAPES.path, models / "my model.onnx")
    refused(server, "my model.onnx", "[A-Za-z0-9._-]")
    assert admin_load(server, "my model.onnx", name="mine").model.name == "mine"
    (models / "bad.toml").write_text('name = "a:b"\npath = "shapes.onnx"\n')
    refused(server, "bad.toml", "a:b")


def test_a_symlink_inside_the_directory_is_followed(server, layout):
    models, _ = layout
    (models / "alias.onnx").symlink_to(models / "shapes.onnx")
    assert admin_load(server, "alias.onnx").model.name == "alias"


def test_labels_outside_the_model_directory_are_refused(server, layout):
    models, outside = layout
    (outside / "labels.txt").write_text("\n".join("abcdefgh"))
    (models / "m.toml").write_text('name = "m"\npath = "shapes.onnx"\nlabels = "../outside/labels.txt"\n')
    refused(server, "m.toml", "labels file")


def external_data_model(directory: pathlib.Path, location: str) -> pathlib.Path:
    """The shapes model with one initializer's data in the external file `location` (relative to directory)."""
    model = onnx.load(str(SHAPES.path))
    tensor = model.graph.initializer[0]
    data = onnx.numpy_helper.to_array(tensor)
    target = (directory / location)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data.tobytes())
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": str(data.nbytes)}.items():
        tensor.external_data.add(key=key, value=value)
    path = directory / f"ext_{abs(hash(location)) % 10_000}.onnx"
    onnx.save(model, str(path))
    return path


def test_external_data_next_to_the_model_loads(server, layout):
    models, _ = layout
    path = external_data_model(models, "weights/w.bin")
    assert admin_load(server, path.name, name="external").model.num_classes == 8


@pytest.mark.parametrize("location", ["../outside/w.bin", "ABSOLUTE", "weights/../../outside/w.bin", "LINK"])
def test_external_data_escape_is_refused(server, layout, location):
    models, outside = layout
    if location == "ABSOLUTE":
        location = str(outside / "w.bin")
    if location == "LINK":
        (models / "wl").symlink_to(outside, target_is_directory=True)
        location = "wl/w.bin"
    path = external_data_model(models, location)
    assert (models / location).resolve().is_relative_to(outside.resolve())
    refused(server, path.name, "outside the model's directory")


def test_oversized_model_is_refused(layout):
    from onnxplain.server.config import Limits, ModelConfig

    models, _ = layout
    size = (models / "shapes.onnx").stat().st_size
    tiny = custom_domain_model(models / "tiny.onnx", domain="")   # a standard 4-class model of a few hundred bytes
    srv = start([ModelConfig("tiny", tiny)], model_dirs=(models,), limits=Limits(max_model_bytes=size - 1))
    try:
        details = refused(srv, "shapes.onnx", "limits.max_model_bytes")
        assert str(size) in details
        # external data counts too: a small .onnx whose weights live beside it
        path = external_data_model(models, "big.bin")
        assert path.stat().st_size < size - 1
        (models / "big.bin").write_bytes(b"\0" * size)   # bigger than the limit on its own
        refused(srv, path.name, "with its external data")
    finally:
        srv.stop(0)


def custom_domain_model(path: pathlib.Path, domain: str = "com.example.ops") -> pathlib.Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    first = helper.make_node("Secret", ["x"], ["h"], domain=domain) if domain else helper.make_node("Relu", ["x"], ["h"])
    nodes = [first,
             helper.make_node("GlobalAveragePool", ["h"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w"], ["y"])]
    w = onnx.numpy_helper.from_array(np.ones((3, 4), np.float32), "w")
    model = helper.make_model(helper.make_graph(nodes, "custom", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else []))
    onnx.save(model, str(path))
    return path


def test_custom_operator_domain_is_refused_unless_allowed(layout):
    from onnxplain.server.config import ConfigError, ModelConfig, Security

    models, _ = layout
    custom_domain_model(models / "custom.onnx")
    srv = start([ModelConfig("shapes", models / "shapes.onnx")], model_dirs=(models,))
    try:
        refused(srv, "custom.onnx", "custom operator domains ['com.example.ops']")
    finally:
        srv.stop(0)
    # allowed in config: the domain check passes, and the model then fails (no kernel for it) with another reason
    srv = start([ModelConfig("shapes", models / "shapes.onnx")], model_dirs=(models,),
                security=Security(allowed_domains=("com.example.ops",)))
    try:
        with pytest.raises(grpc.RpcError) as info:
            admin_load(srv, "custom.onnx")
        assert "custom operator domains" not in info.value.details()
    finally:
        srv.stop(0)


def test_corrupt_and_missing_models_at_start_up_leave_the_others_serving(layout, caplog):
    from onnxplain.server import config

    models, _ = layout
    (models / "corrupt.onnx").write_bytes(b"\x08\x07this is not an onnx model" * 10)
    (models / "truncated.onnx").write_bytes((models / "shapes.onnx").read_bytes()[:5000])
    (models / "missing.toml").write_text('name = "missing"\npath = "nowhere.onnx"\n')
    cfg = config.load(None, [models])
    srv = start(cfg.models, model_dirs=cfg.model_dirs)
    try:
        assert served(srv) == ["shapes"]
        assert sorted(srv.registry.failed) == ["corrupt", "missing", "truncated"]
        assert "not a valid ONNX model" in srv.registry.failed["corrupt"]
        assert "nowhere.onnx" in srv.registry.failed["missing"] and "does not exist" in srv.registry.failed["missing"]
    finally:
        srv.stop(0)
    logs = caplog.text
    assert "not serving model corrupt" in logs and "not serving model missing" in logs


def test_bad_toml_files_in_a_model_directory_are_reported_and_the_others_served(layout, caplog):
    """A model TOML that cannot be read (syntax, no path, a bad name) is a model that cannot be loaded, named
    after its file; an ONNX of the same stem is not served with default preprocessing in its place."""
    from onnxplain.server import config

    models, _ = layout
    shutil.copy(SHAPES.path, models / "other.onnx")
    (models / "syntax.toml").write_text('name = "x"\npath = \n')
    (models / "nopath.toml").write_text('name = "nopath"\n')
    (models / "badname.toml").write_text('name = "evil\\nname"\npath = "shapes.onnx"\n')
    (models / "other.toml").write_text('path = 5\n')
    cfg = config.load(None, [models])
    srv = start(cfg.models, model_dirs=cfg.model_dirs)
    try:
        assert served(srv) == ["shapes"]
        assert sorted(srv.registry.failed) == ["badname", "nopath", "other", "syntax"]
        assert "syntax.toml" in srv.registry.failed["syntax"] and "line 2" in srv.registry.failed["syntax"]
        assert "needs a path" in srv.registry.failed["nopath"]
        assert "[A-Za-z0-9._-]" in srv.registry.failed["badname"]
        assert "path must be" in srv.registry.failed["other"]
    finally:
        srv.stop(0)
    assert "not serving model syntax" in caplog.text and "not serving model nopath" in caplog.text
    assert "evil\nname" not in caplog.text


def test_server_command_fail_fast_stops_at_a_bad_toml(layout, capsys):
    from onnxplain.server.main import main

    models, _ = layout
    (models / "syntax.toml").write_text('name = "x"\npath = \n')
    assert main(["--model-dir", str(models), "--port", "0", "--fail-fast"]) == 2
    assert "syntax.toml" in capsys.readouterr().err


def test_fail_fast_stops_at_a_bad_model(layout):
    from onnxplain.server import config
    from onnxplain.server.config import ConfigError

    models, _ = layout
    (models / "corrupt.onnx").write_bytes(b"\x08\x07garbage")
    cfg = config.load(None, [models])
    with pytest.raises(ConfigError, match="model corrupt"):
        start(cfg.models, model_dirs=cfg.model_dirs, fail_fast=True)


def test_server_command_fail_fast_flag_and_toml(layout, capsys):
    from onnxplain.server.main import main

    models, _ = layout
    (models / "corrupt.onnx").write_bytes(b"\x08\x07garbage")
    assert main(["--model-dir", str(models), "--port", "0", "--fail-fast"]) == 2
    assert "model corrupt" in capsys.readouterr().err
    toml = models.parent / "server.toml"
    toml.write_text('model_dirs = ["models"]\n[server]\nport = 0\nfail_fast = true\n')
    assert main(["--config", str(toml)]) == 2
    assert "model corrupt" in capsys.readouterr().err


def test_toml_models_outside_the_config_directory_are_refused(tmp_path, layout):
    """A [[models]] path in the server TOML must stay in the TOML's directory or a model directory."""
    from onnxplain.server import config
    from onnxplain.server.config import ConfigError

    models, outside = layout
    toml = models / "server.toml"
    toml.write_text('[[models]]\npath = "../outside/secret.onnx"\n')
    cfg = config.load(toml)
    with pytest.raises(ConfigError, match="outside the model directories"):
        start(cfg.models, model_dirs=cfg.model_dirs)
