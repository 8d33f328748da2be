"""Replicas behind gRPC round_robin: three real servers on loopback (subprocesses, so that one can be SIGKILLed),
the Python client and the CLI balancing over them, and an audit that loses a replica midway and still ends with
every item, equal to a single-server run (maps and scores are deterministic)."""

from __future__ import annotations

import csv
import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from support import ROOT, default_model_config, start_server

from onnxplain.client import Client
from onnxplain.client import cli
from onnxplain.default_model import shapes

SAMPLES = ROOT / "onnxplain" / "default_model" / "samples"
AUDIT = ["--model", "shapes", "--methods", "gradcam,occlusion", "--param", "occlusion.window=32", "--param",
         "occlusion.stride=16", "--metrics", "ad,ag,ai,ins,del,pg", "--steps", "6", "--quiet"]


class Replica:
    """`python -m onnxplain.server.main --port 0` in a subprocess; its first line names its address."""

    def __init__(self, log: pathlib.Path):
        self.log = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "onnxplain.server.main", "--host", "127.0.0.1", "--port", "0",
             "--max-concurrent-jobs", "2", "--max-queued-jobs", "8", "--grace", "0"],
            stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT)
        self.address = None

    def wait_ready(self) -> "Replica":
        line = self.process.stdout.readline()
        match = re.search(r" on (\S+:\d+)$", line.strip())
        assert match, f"the server said {line!r}; its log: {pathlib.Path(self.log.name).read_text()[-2000:]}"
        self.address = match.group(1)
        return self

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    logs = tmp_path_factory.mktemp("replica_logs")
    started = [Replica(logs / f"replica{i}.log") for i in range(3)]   # all three load in parallel
    try:
        yield [r.wait_ready() for r in started]
    finally:
        for r in started:
            r.stop()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The shipped samples and generated shapes (boxes from the generator, so the pointing game counts)."""
    folder = tmp_path_factory.mktemp("replica_ds")
    rows = [[f"{p.name}", "", ""] for p in sorted(SAMPLES.glob("*.png"))]
    for p in sorted(SAMPLES.glob("*.png")):
        shutil.copy(p, folder / p.name)
    s = shapes.generate(10, seed=11, size=96)
    for i in range(len(s)):
        Image.fromarray(s.images[i]).save(folder / f"g{i:02d}.png")
        rows.append([f"g{i:02d}.png", shapes.CLASSES[s.labels[i]], " ".join(str(v) for v in s.boxes[i])])
    with open(folder / "data.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return folder / "data.csv"


def outputs(out: pathlib.Path) -> dict[str, bytes]:
    """Every result file of an audit, by relative path; items' timings (where, when, how often) left out."""
    result = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.parent.name == "items":
                record = json.loads(data)
                record.pop("timings")
                data = json.dumps(record, sort_keys=True).encode()
            result[str(p.relative_to(out))] = data
    return result


def items(out: pathlib.Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "items").glob("*.json"))]


def test_client_balances_calls_over_a_list_of_replicas():
    """In-process servers count the calls each one answered."""
    servers = [start_server([default_model_config()], max_concurrent_jobs=2, max_queued_jobs=8) for _ in range(3)]
    try:
        image = SAMPLES / "star.png"
        def calls():
            return [sum(j.rpc == "Evaluate" for j in s.explainer.jobs) for s in servers]

        with Client([s.address for s in servers], timeout=60) as client:
            # round_robin rotates over the replicas it is connected to; connections come up in the background, so
            # a round may start before all three are ready: then the next round is even.
            for _ in range(5):
                before = calls()
                for _ in range(6):
                    client.evaluate("shapes", [image], ["gradcam"], metrics=["average_drop"])
                per_server = [after - b for after, b in zip(calls(), before)]
                if per_server == [2, 2, 2]:
                    break
                time.sleep(0.2)
        assert per_server == [2, 2, 2]                                               # each in turn
        with Client(f"dns:///{servers[0].address}", timeout=60) as client:          # a dns:/// name works too
            assert [m.name for m in client.models()] == ["shapes"]
    finally:
        for s in servers:
            s.stop(0)


def test_cli_repeated_server_and_health(replicas, capsys):
    servers = [arg for r in replicas for arg in ("--server", r.address)]
    assert cli.main([*servers, "models"]) == 0
    assert capsys.readouterr().out.startswith("shapes\t8 classes")
    assert cli.main([*servers, "health"]) == 0
    assert capsys.readouterr().out.count(": SERVING") == 3
    assert cli.main(["--server", replicas[0].address, "health", "--service", "no.such.Service"]) == 1


def test_audit_survives_a_replica_killed_midway_and_equals_one_server(replicas, dataset, tmp_path):
    single = tmp_path / "single"
    assert cli.main(["audit", str(dataset), *AUDIT, "--out", str(single), "--server", replicas[0].address]) == 0
    n = len(items(single))
    assert n == 14

    out = tmp_path / "replicated"
    command = [sys.executable, "-m", "onnxplain.client.cli", "audit", str(dataset), *AUDIT, "--out", str(out),
               "--workers", "6"]
    for r in replicas:
        command += ["--server", r.address]
    audit = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = replicas[2]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and audit.poll() is None:
        if len(list((out / "items").glob("*.json"))) >= 3:
            break
        time.sleep(0.005)
    victim.process.send_signal(signal.SIGKILL)
    assert victim.process.wait(10) == -signal.SIGKILL
    done_at_kill = len(list((out / "items").glob("*.json")))
    stdout, stderr = audit.communicate(timeout=180)
    assert audit.returncode == 0, stderr
    assert 3 <= done_at_kill < n, "the audit ended before the replica could be killed"
    assert f"{n} images computed" in stderr

    records = items(out)
    assert len(records) == n                                                   # nothing lost
    assert any(r["timings"]["attempts"] > 1 for r in records), "no call was in flight on the killed replica"
    assert outputs(out) == outputs(single)                                     # the results of one server

    # A health check of the three now names the dead one.
    assert cli.main([arg for r in replicas for arg in ("--server", r.address)] + ["health"]) == 1
