"""Audit throughput (images/s) with 1, 2, ... N server replicas (separate onnxplain-server processes on
loopback, the audit balancing round-robin over them), and a check that every run writes the same results.

    python benchmarks/bench_audit.py                    # shapes model, 24 generated images, 1-3 replicas
    python benchmarks/bench_audit.py --replicas 2
    python benchmarks/bench_audit.py --images 48 --methods occlusion,gradcam --steps 50
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from PIL import Image

from onnxplain.client.audit import Settings, run_audit
from onnxplain.default_model import shapes


def start_server(config: pathlib.Path | None) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "onnxplain.server.main", "--port", "0", "--log-level", "WARNING"]
    if config is not None:
        command += ["--config", str(config)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()   # "onnxplain-server: serving shapes on 127.0.0.1:PORT"
    if " on " not in line:
        process.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return process, line.strip().rsplit(" on ", 1)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--methods", default="occlusion,gradcam,integrated_gradients")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=3, help="measure 1..REPLICAS replicas (default 3)")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime intra-op threads per replica (default 0: onnxruntime's, one per core)")
    args = parser.parse_args()
    methods = [(m, {"window": "32", "stride": "32"} if m == "occlusion" else
                {"steps": "8"} if m == "integrated_gradients" else {}) for m in args.methods.split(",")]
    settings = Settings("shapes", methods, ["average_drop", "average_gain", "average_increase", "insertion",
                                            "deletion"], args.steps, 5.0, "")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        sample = shapes.generate(args.images, seed=1, size=96)
        with open(tmp / "data.csv", "w", newline="") as f:
            for i in range(len(sample)):
                Image.fromarray(sample.images[i]).save(tmp / f"{i:03d}.png")
                csv.writer(f).writerow([f"{i:03d}.png", int(sample.labels[i])])
        config = None
        if args.threads:
            config = tmp / "server.toml"
            config.write_text(f"[server]\nthreads = {args.threads}\n")
        servers = [start_server(config) for _ in range(args.replicas)]
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; onnxruntime threads per replica: "
              f"{args.threads or 'default'}", flush=True)
        try:
            results = {}
            for replicas in range(1, args.replicas + 1):
                addresses = [address for _, address in servers[:replicas]]
                run_audit(tmp / "data.csv", addresses, Settings("shapes", methods[:1], ["deletion"], 2, 5.0, ""),
                          tmp / f"warm{replicas}", quiet=True)   # sessions built and warm on every replica
                started = time.perf_counter()
                run_audit(tmp / "data.csv", addresses, settings, tmp / f"out{replicas}", quiet=True)
                seconds = time.perf_counter() - started
                results[replicas] = seconds
                print(f"{replicas} replica(s): {args.images} images in {seconds:.1f} s = "
                      f"{args.images / seconds:.2f} images/s (load average {os.getloadavg()[0]:.1f})", flush=True)
            reference = (tmp / "out1" / "metrics.csv").read_bytes()
            same = all((tmp / f"out{r}" / "metrics.csv").read_bytes() == reference for r in results)
            print(f"metrics.csv identical with 1..{args.replicas} replicas: {same}; speed-up over 1 replica: "
                  + ", ".join(f"{r}: {results[1] / s:.2f}x" for r, s in results.items()))
        finally:
            for process, _ in servers:
                process.terminate()
                process.wait(10)


if __name__ == "__main__":
    main()
