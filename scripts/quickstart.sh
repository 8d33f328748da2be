#!/usr/bin/env bash
# The main job, from a fresh clone: install the server into .venv, start it on the shipped default model,
# explain a bundled image, and write the maps to out/quickstart/. PORT=... picks another port.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${PORT:-50051}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[server]"
.venv/bin/onnxplain-server --port "$PORT" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
# wait until the server answers its health check
.venv/bin/python - "$PORT" <<'PY'
import sys, time, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
channel = grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}")
deadline = time.time() + 120
while True:
    try:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        if status == health_pb2.HealthCheckResponse.SERVING:
            break
    except grpc.RpcError:
        pass
    if time.time() > deadline:
        sys.exit("the server did not start")
    time.sleep(0.5)
PY
.venv/bin/onnxplain --server "127.0.0.1:$PORT" predict onnxplain/default_model/samples/*.png
.venv/bin/onnxplain --server "127.0.0.1:$PORT" explain onnxplain/default_model/samples/star.png \
    --method occlusion --top-k 2 --out out/quickstart
echo "maps (.npy, raw values) and overlays (.png) are in out/quickstart/"
