"""Occlusion: its time over the time of the same forwards alone, and the gRPC round trip over an in-process call.

    python benchmarks/bench_occlusion.py [--repeats 5] [--window 32 --stride 16]

For each model (the shipped default model; EfficientNet-Lite0 from ../shared when present):
  * forwards  : the plain model run over the same occluded inputs, prepared beforehand, in the same batches
  * in-process: kernels' occlusion (masks, composed Where graph, accumulation), no gRPC
  * gRPC      : the same through a real server on loopback and the Python client (decoding included)
Medians over repeats after one warm-up, the three runs interleaved. Target: in-process / forwards <= 1.1.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from timing import medians  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def bench_model(entry, image_bytes, window, stride, repeats, server_address):
    from onnxplain.client import Client
    from onnxplain.kernels import images
    from onnxplain.kernels.methods import METHODS, Job
    from onnxplain.kernels.methods.occlusion import window_corners, window_masks
    from onnxplain.kernels.runtime import Passes

    runner, pre = entry.runner, entry.preprocessing
    sample = images.preprocess(images.decode(image_bytes, 10 ** 8), pre).sample
    target = int(np.argmax(runner.scores(sample[None], Passes())[0]))
    method = METHODS["occlusion"]
    params = method.resolve({"window": window, "stride": stride}, (pre.height, pre.width))

    def in_process():
        for _ in method.run(Job(runner, sample, np.array([target]), params, pre.layout)):
            pass

    corners = window_corners(pre.height, pre.width, window, stride)
    masks = window_masks(pre.height, pre.width, corners, window)
    occluded = np.where(masks[:, None], np.float32(0), sample[None]).astype(np.float32)

    def forwards():
        runner.scores(sample[None], Passes())
        for i in range(0, len(occluded), runner.max_batch):
            runner.session.run([runner.score_name], {runner.input_name: occluded[i:i + runner.max_batch]})

    client = Client(server_address, timeout=600)

    def over_grpc():
        for _ in client.explain(entry.name, [image_bytes], [("occlusion", {"window": window, "stride": stride})],
                                targets=[target]):
            pass

    t_forward, t_kernel, t_grpc = medians([forwards, in_process, over_grpc], repeats)
    client.close()
    return dict(model=entry.name, inputs=len(corners) + 1, batch=runner.max_batch, forwards_s=t_forward,
                in_process_s=t_kernel, grpc_s=t_grpc, ratio=t_kernel / t_forward, grpc_over_in_process=t_grpc / t_kernel)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--stride", type=int, default=8)
    args = parser.parse_args(argv)

    from importlib.resources import files

    from onnxplain.server import config
    from onnxplain.server.config import Limits, ModelConfig, ServerConfig
    from onnxplain.server.main import Server

    models = [config.load(None).models[0]]
    photos = [(files("onnxplain.default_model") / "samples" / "star.png").read_bytes()]
    if (SHARED / "models" / "efficientnet_lite0_imagenet.onnx").exists():
        models.append(ModelConfig("efficientnet", SHARED / "models" / "efficientnet_lite0_imagenet.onnx",
                                  SHARED / "models" / "imagenet_labels.txt", "", {
                                      "fit": "center_crop", "scale": 1.0, "mean": [127.5] * 3, "std": [128.0] * 3}))
        photos.append((SHARED / "images" / "chelsea.jpg").read_bytes())
    server = Server(ServerConfig(port=0, limits=Limits(max_batch=32), models=tuple(models))).start()
    rows = []
    try:
        for model, photo in zip(models, photos):
            rows.append(bench_model(server.registry.get(model.name), photo, args.window, args.stride, args.repeats,
                                    server.address))
    finally:
        server.stop(0)
    print(f"occlusion, window {args.window}, stride {args.stride}, median of {args.repeats}")
    print(f"{'model':14s} {'inputs':>6s} {'batch':>5s} {'forwards s':>10s} {'occlusion s':>11s} {'ratio':>6s} "
          f"{'gRPC s':>8s} {'gRPC/in-proc':>12s}")
    for r in rows:
        print(f"{r['model']:14s} {r['inputs']:6d} {r['batch']:5d} {r['forwards_s']:10.3f} {r['in_process_s']:11.3f} "
              f"{r['ratio']:6.3f} {r['grpc_s']:8.3f} {r['grpc_over_in_process']:12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
