"""Load against a server in its own process: p50/p99 latency of admitted calls, throughput, refusals.

    python benchmarks/bench_load.py [--clients 1 32] [--seconds 20] [--client-procs 4] [--threads 1]
                                    [--running 2] [--queued 4] [--retry-ms 20]

The same mix as tests/production/test_load.py (Predict, gradient, Grad-CAM, occlusion, SmoothGrad on two copies
of the shipped model, one random 96x96 input per call, one target), the same limits (2 running + 4 queued jobs,
batch 32, one onnxruntime thread per run), but the server runs as `python -m onnxplain.server.main` in a
subprocess and the client threads are spread over `--client-procs` processes: neither side shares a GIL with the
other, so what is measured is the server, not the interpreter lock of a test process. A refused client waits
`--retry-ms` and sends a new request. Latency is measured on the client, from the call to the last message.
"""

from __future__ import annotations

import argparse
import multiprocessing
import pathlib
import re
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = ("shapes", "shapes_b")
MIX = [("predict", {}), ("gradient", {}), ("gradcam", {}), ("occlusion", {"window": 32, "stride": 32}),
       ("smoothgrad", {"samples": 4})]


def server_config(directory: pathlib.Path, threads: int, running: int, queued: int, batch: int) -> pathlib.Path:
    """A server TOML serving the shipped model as `shapes` and again as `shapes_b`."""
    from onnxplain.server.config import DEFAULT_MODEL_TOML

    model_dir = DEFAULT_MODEL_TOML.parent
    text = DEFAULT_MODEL_TOML.read_text()
    copy = (text.replace('name = "shapes"', 'name = "shapes_b"')
            .replace('path = "shapes_cnn.onnx"', f'path = "{model_dir / "shapes_cnn.onnx"}"')
            .replace('labels = "labels.txt"', f'labels = "{model_dir / "labels.txt"}"')
            .replace("[preprocessing]", "[models.preprocessing]"))
    path = directory / "server.toml"
    path.write_text(f'model_dirs = ["{model_dir}"]\n\n[server]\nthreads = {threads}\n\n'
                    f"[limits]\nmax_batch = {batch}\nmax_concurrent_jobs = {running}\nmax_queued_jobs = {queued}\n\n"
                    f"[[models]]\n{copy}")
    return path


class ServerProcess:
    """`python -m onnxplain.server.main --config ... --port 0` on loopback; its address read from stdout."""

    def __init__(self, config: pathlib.Path, *extra: str, cpus: set[int] | None = None):
        import os

        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        self.proc = subprocess.Popen([sys.executable, "-m", "onnxplain.server.main", "--config", str(config),
                                      "--port", "0", "--log-level", "WARNING", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, preexec_fn=pin)
        line = self.proc.stdout.readline()
        found = re.search(r"on (\S+:\d+)", line)
        if found is None:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        self.address = found.group(1)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc)."""
        import os

        fields = pathlib.Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def client_process(address: str, threads: int, seconds: float, seed: int, retry: float, out) -> None:
    """`threads` clients calling in a loop for `seconds`; sends back (method, latency) per admitted call."""
    import grpc

    from onnxplain import tensors
    from onnxplain.v1 import methods_pb2, service_pb2, service_pb2_grpc, tensor_pb2

    params = {"occlusion": methods_pb2.OcclusionParams, "smoothgrad": methods_pb2.SmoothGradParams}
    lock = threading.Lock()
    admitted, refused, other = [], [0], []
    stop_at = time.perf_counter() + seconds

    def client(index: int) -> None:
        rng = np.random.default_rng([seed, index])
        stub = service_pb2_grpc.ExplainerStub(grpc.insecure_channel(address))
        while time.perf_counter() < stop_at:
            model = MODELS[rng.integers(len(MODELS))]
            method, values = MIX[rng.integers(len(MIX))]
            image = tensor_pb2.Image(tensor=tensors.to_proto(rng.normal(size=(3, 96, 96)).astype(np.float32)))
            spec = (methods_pb2.MethodSpec(**{method: params[method](**values)}) if method in params
                    else methods_pb2.MethodSpec(method=method))
            started = time.perf_counter()
            try:
                if method == "predict":
                    stub.Predict(service_pb2.PredictRequest(model=model, images=[image], top_k=8), timeout=60)
                else:
                    for _ in stub.Explain(service_pb2.ExplainRequest(
                            model=model, images=[image], methods=[spec],
                            targets=service_pb2.Targets(class_ids=[int(rng.integers(8))])), timeout=60):
                        pass
            except grpc.RpcError as exc:
                with lock:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        refused[0] += 1
                    else:
                        other.append(exc.code().name)
                time.sleep(retry)
                continue
            with lock:
                admitted.append((method, time.perf_counter() - started))

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put((admitted, refused[0], other))


def run(address: str, clients: int, procs: int, seconds: float, retry: float, seed: int) -> dict:
    procs = max(1, min(procs, clients))
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    shares = [clients // procs + (i < clients % procs) for i in range(procs)]
    workers = [context.Process(target=client_process, args=(address, n, seconds, seed * 1000 + i, retry, out))
               for i, n in enumerate(shares)]
    begun = time.perf_counter()
    for w in workers:
        w.start()
    parts = [out.get() for _ in workers]
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - begun
    admitted = [a for part in parts for a in part[0]]
    return {"admitted": admitted, "refused": sum(p[1] for p in parts), "other": [o for p in parts for o in p[2]],
            "elapsed": elapsed}


def report(clients: int, result: dict) -> str:
    latencies = np.array([lat for _, lat in result["admitted"]]) * 1e3
    calls = len(latencies) + result["refused"]
    cpu = (f"; server CPU {result['cpu']:.1f} s ({result['cpu'] / result['elapsed'] * 100:.0f}% of one core, "
           f"{result['cpu'] / max(1, calls) * 1e3:.2f} ms per call)") if "cpu" in result else ""
    lines = [f"{clients:3d} clients: {len(latencies)} admitted in {result['elapsed']:.1f} s "
             f"({len(latencies) / result['elapsed']:.1f}/s), {result['refused']} RESOURCE_EXHAUSTED "
             f"({result['refused'] / result['elapsed']:.1f}/s), {len(result['other'])} other; "
             f"latency p50 {np.percentile(latencies, 50):.0f} ms, p99 {np.percentile(latencies, 99):.0f} ms, "
             f"max {latencies.max():.0f} ms{cpu}"]
    for name, _ in MIX:
        mine = [lat * 1e3 for m, lat in result["admitted"] if m == name]
        if mine:
            lines.append(f"      {name:11s} n={len(mine):5d} p50 {np.percentile(mine, 50):6.0f} ms "
                         f"p99 {np.percentile(mine, 99):6.0f} ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--client-procs", type=int, default=4, help="processes the client threads are spread over")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per run")
    parser.add_argument("--running", type=int, default=2)
    parser.add_argument("--queued", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--server-cpus", help="pin the server to these CPUs (e.g. 0), the clients to the others, so "
                        "that clients do not take the server's cores")
    parser.add_argument("--retry-ms", type=float, default=20.0, help="a refused client's pause before its next call")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = server_config(pathlib.Path(tmp), args.threads, args.running, args.queued, args.batch)
        import os

        server_cpus = {int(c) for c in args.server_cpus.split(",")} if args.server_cpus else None
        server = ServerProcess(config, cpus=server_cpus)
        if server_cpus:   # the client processes (spawned from here) inherit the rest
            os.sched_setaffinity(0, (os.sched_getaffinity(0) - server_cpus) or server_cpus)
        try:
            print(f"server pid {server.proc.pid} on {server.address}: {args.running} running + {args.queued} queued, "
                  f"batch {args.batch}, {args.threads} onnxruntime thread(s); clients in {args.client_procs} "
                  f"process(es), retry {args.retry_ms:g} ms; server CPUs {sorted(os.sched_getaffinity(server.proc.pid))}, "
                  f"client CPUs {sorted(os.sched_getaffinity(0))}", flush=True)
            run(server.address, 1, 1, 2.0, args.retry_ms / 1e3, seed=0)   # warm-up: sessions, graphs
            for clients in args.clients:
                cpu = server.cpu_seconds()
                result = run(server.address, clients, args.client_procs, args.seconds, args.retry_ms / 1e3,
                             seed=clients)
                result["cpu"] = server.cpu_seconds() - cpu
                print(report(clients, result), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
