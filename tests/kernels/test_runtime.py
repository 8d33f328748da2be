"""kernels.runtime.Runner: the process settings it makes for onnxruntime's sake, and inputs placed once for
many runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort

from onnxplain.kernels import graph
from onnxplain.kernels.runtime import Passes, Runner

from support import ROOT

PROBE = """
import json, numpy
from threadpoolctl import threadpool_info
from onnxplain.kernels import graph
from onnxplain.kernels.runtime import Runner

def blas():
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

before = blas()
model = graph.load_model(%r)
Runner(model, graph.score_tensor(model), graph.input_spec(model)[0], providers=["CPUExecutionProvider"])
print(json.dumps({"before": before, "after": blas()}))
"""


def test_a_runner_keeps_numpys_blas_to_one_thread():
    """OpenBLAS's idle threads busy-wait after each call and would share the cores with onnxruntime's next run
    (Opti-CAM's finite-difference path ran its batches ~40% slower): a Runner limits numpy's BLAS to one thread.
    Checked in a fresh interpreter, as the limit is process-wide and other tests' Runners set it here already."""
    model = ROOT / "onnxplain" / "default_model" / "shapes_cnn.onnx"
    env = {"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "2"}   # two threads before, whatever the machine
    out = subprocess.run([sys.executable, "-c", PROBE % str(model)], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout
    threads = json.loads(out.strip().splitlines()[-1])
    assert threads["before"] and all(n == 2 for n in threads["before"]), threads
    assert threads["after"] and all(n == 1 for n in threads["after"]), threads


def test_resident_inputs_feed_runs_as_numpy_arrays_do():
    """Runner.resident places a method's constant inputs once where the sessions run (device memory on CUDA; on
    the CPU, the array's own memory): runs fed with them give the same scores as with the arrays, and count
    their samples from the OrtValue's shape."""
    model = graph.load_model(ROOT / "onnxplain" / "default_model" / "shapes_cnn.onnx")
    runner = Runner(model, graph.score_tensor(model), "input", providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 3, 96, 96)).astype(np.float32)
    placed = runner.resident(x[:, :, ::-1])          # a non-contiguous view is made contiguous first
    assert isinstance(placed, ort.OrtValue) and placed.device_name().lower() == "cpu"
    np.testing.assert_array_equal(placed.numpy(), x[:, :, ::-1])
    same = runner.resident(x)
    assert np.shares_memory(same.numpy(), x)          # no copy on the CPU
    passes = Passes()
    fed = runner.run(runner.session, [runner.score_name], {"input": placed}, passes)[0]
    plain = runner.run(runner.session, [runner.score_name], {"input": np.ascontiguousarray(x[:, :, ::-1])},
                       passes)[0]
    np.testing.assert_array_equal(fed, plain)
    assert passes.forward_samples == 6 and passes.runs == 2
