"""The Admin servicer: load, unload and reload models (the `admin` role, see security.py).

A reload builds the new entry completely (read, check, warm up) before it replaces the old one in the registry;
calls already running keep the entry they took at their start, so none of them fails or changes model mid-way.
"""

from __future__ import annotations

import logging

import grpc

from onnxplain.v1 import admin_pb2, admin_pb2_grpc, service_pb2

from .config import ConfigError
from .logs import status_detail
from .registry import ModelEntry, ModelExists, Registry, RegistryBusy

log = logging.getLogger("onnxplain.server")


def loggable(text: str) -> str:
    """An error message that may quote an admin's path, with unprintable characters escaped: a newline in it must
    not start a forged log line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def summary(entry: ModelEntry) -> service_pb2.ModelSummary:
    return service_pb2.ModelSummary(name=entry.name, num_classes=entry.num_classes, description=entry.description,
                                    execution_provider=entry.runner.provider)


class Admin(admin_pb2_grpc.AdminServicer):
    def __init__(self, registry: Registry):
        self.registry = registry

    def _run(self, context, action, what: str):
        try:
            return action()
        except ModelExists as exc:
            code, message = grpc.StatusCode.ALREADY_EXISTS, str(exc)
        except RegistryBusy as exc:
            code, message = grpc.StatusCode.ABORTED, str(exc)
        except KeyError as exc:
            code = grpc.StatusCode.NOT_FOUND
            message = f"model {exc.args[0]!r} is not served; models: {self.registry.names}"
        except ConfigError as exc:
            log.warning("%s refused: %s", what, loggable(str(exc)))
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except Exception as exc:  # a fault while loading must fail this call only
            log.exception("%s failed", what)
            code, message = grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
        context.abort(code, status_detail(message))

    def LoadModel(self, request, context):
        def load():
            config = self.registry.model_config(request.path, request.name)
            return self.registry.load(config, replace=request.replace)

        return admin_pb2.LoadModelResponse(model=summary(self._run(context, load, "LoadModel")))

    def UnloadModel(self, request, context):
        entry = self._run(context, lambda: self.registry.unload(request.name), "UnloadModel")
        return admin_pb2.UnloadModelResponse(model=summary(entry))

    def ReloadModel(self, request, context):
        entry = self._run(context, lambda: self.registry.reload(request.name), "ReloadModel")
        return admin_pb2.ReloadModelResponse(model=summary(entry))
