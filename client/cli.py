"""`onnxplain`: the command line for people and audits.

    onnxplain models
    onnxplain model NAME
    onnxplain methods
    onnxplain predict IMAGE... [--model M] [--top-k K]
    onnxplain explain IMAGE... [--model M] --method NAME [--target C | --top-k K] [--layer L]
                      [--param key=value ...] --out DIR
    onnxplain audit DATASET --model M --methods a,b [--metrics ad,ag,...] --out DIR [--resume]
                    [--server HOST:PORT ...]
    onnxplain health [--service NAME]          (grpc.health.v1: exit 0 when every --server is SERVING)
    onnxplain admin load PATH [--name N] [--replace] | unload NAME | reload NAME   (the `admin` role)

Credentials (see the README's Security section): --token (default $ONNXPLAIN_TOKEN) sends a bearer token;
--tls / --tls-ca CA.pem speak TLS; --tls-cert and --tls-key add this client's certificate (mutual TLS).

`--server` may be repeated (HOST:PORT of each replica) or be one `dns:///NAME:PORT` / `ipv4:a:p,b:p` target:
calls are balanced round-robin over the replicas (client.Client).

Exit status: 0 on success, 1 when the server answers with an error (its message is printed), 2 on a usage
error.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import grpc
import numpy as np
from PIL import Image
from tqdm import tqdm

from .client import Accepted, Client, Done, MapResult, Progress
from .overlay import overlay
from .audit import add_parser as add_audit_parser


DEFAULT_SERVER = "127.0.0.1:50051"


class UsageError(Exception):
    pass


class HealthError(Exception):
    pass


def credentials(args) -> dict:
    """The Client keyword arguments of the credential options."""
    return {"token": args.token, "tls": args.tls, "tls_ca": args.tls_ca, "tls_cert": args.tls_cert,
            "tls_key": args.tls_key}


def parse_params(items: list[str], methods: list[str]) -> dict[str, dict[str, str]]:
    """`key=value` applies to every requested method that has no explicit `method.key=value`;
    `method.key=value` to that method only."""
    per_method: dict[str, dict[str, str]] = {m: {} for m in methods}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param wants key=value, got {item!r}")
        method, dot, name = key.rpartition(".")
        targets = [method] if dot else methods
        if dot and method not in per_method:
            raise UsageError(f"--param {item!r} names method {method!r}, which is not requested")
        for m in targets:
            per_method[m][name] = value
    return per_method


def parse_target(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def pick_model(client: Client, model: str | None) -> str:
    if model:
        return model
    names = [m.name for m in client.models()]
    if len(names) == 1:
        return names[0]
    raise UsageError(f"the server serves {names}: choose one with --model")


def cmd_models(client: Client, args) -> None:
    for m in client.models():
        print(f"{m.name}\t{m.num_classes} classes\t{m.execution_provider}\t{m.description}")


def cmd_model(client: Client, args) -> None:
    info = client.model(args.name)
    pre = info.preprocessing
    print(f"model {info.name} on {info.execution_provider}: {info.num_classes} classes, scores {info.score_tensor} "
          f"({info.probabilities or 'softmax'})")
    for t in info.inputs:
        print(f"input {t.name} {t.dtype} {list(t.shape)} ({pre.layout})")
    print(f"preprocessing: fit={pre.fit} scale={pre.scale:g} mean={list(pre.mean)} std={list(pre.std)} "
          f"{pre.channel_order} -> {pre.input_height}x{pre.input_width}")
    print("layers:")
    for layer in info.layers:
        mark = " (default)" if layer.is_default else ""
        print(f"  {layer.name}\t{layer.kind}\t{list(layer.shape)}\tgrid {layer.grid_height}x{layer.grid_width}{mark}")


def cmd_methods(client: Client, args) -> None:
    for m in client.methods():
        print(f"{m.name} ({m.family}): {m.description}")
        for p in m.params:
            default = p.WhichOneof("default_value")
            value = getattr(p, default) if default else None
            bounds = f" [{p.minimum:g}, {p.maximum:g}]" if p.HasField("minimum") and p.HasField("maximum") else ""
            choices = f" one of {list(p.choices)}" if p.choices else ""
            print(f"    {p.name} = {value}{bounds}{choices}: {p.description}")


def cmd_predict(client: Client, args) -> None:
    model = pick_model(client, args.model)
    for path, prediction in zip(args.images, client.predict(model, args.images, top_k=args.top_k)):
        best = ", ".join(f"{s.class_id} {s.label} {s.probability:.3f}" for s in prediction.top)
        print(f"{path}: {best}")


def cmd_explain(client: Client, args) -> None:
    model = pick_model(client, args.model)
    method_names = [m for item in args.method for m in item.split(",") if m]
    params = parse_params(args.param, method_names)
    methods = [(m, params[m]) for m in method_names]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    targets = [parse_target(t) for t in args.target]
    stems = {i: pathlib.Path(p).stem for i, p in enumerate(args.images)}
    accepted = None
    done_tasks: dict[tuple[int, str], float] = {}
    bar = None
    written = []
    try:
        events = client.explain(model, args.images, methods, targets=targets, top_k=args.top_k, layer=args.layer,
                                normalization=args.normalize, timeout=args.timeout)
        for event in events:
            if isinstance(event, Accepted):
                accepted = event
                bar = tqdm(total=len(args.images) * len(methods), unit="task", disable=args.quiet,
                           bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}]")
            elif isinstance(event, Progress) and bar is not None:
                done_tasks[(event.image_index, event.method)] = event.done / max(event.total, 1)
                bar.n = sum(done_tasks.values())
                bar.set_postfix_str(f"{stems[event.image_index]} {event.method}", refresh=True)
            elif isinstance(event, MapResult) and event.final:
                written += save_map(out, args.images[event.image_index], stems[event.image_index], event,
                                    accepted.images[event.image_index].geometry.crop)
            elif isinstance(event, Done):
                if bar is not None:
                    bar.n = bar.total
                    bar.close()
                if not args.quiet:
                    print(f"{event.maps} maps in {event.total_ms / 1e3:.2f} s ({event.forward_samples} forward, "
                          f"{event.backward_samples} backward samples); written to {out}/", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
    for path in written:
        print(path)


def save_map(out: pathlib.Path, image_path: str, stem: str, result: MapResult, crop) -> list[pathlib.Path]:
    base = f"{stem}.{result.method}.{result.class_id}"
    npy, png = out / f"{base}.npy", out / f"{base}.png"
    np.save(npy, result.map.astype(np.float32))
    with Image.open(image_path) as original:
        overlay(original, result.map, crop).save(png)
    return [npy, png]


HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def health_status(channel: grpc.Channel, service: str = "", timeout: float = 5.0) -> str:
    """grpc.health.v1 Check of the server behind `channel`. The two messages are one string field and one enum
    field, encoded here by hand so that the thin client needs no grpcio-health-checking."""
    name = service.encode()
    request = (b"\x0a" + _varint(len(name)) + name) if name else b""
    response = channel.unary_unary(HEALTH_CHECK)(request, timeout=timeout)
    status = response[1] if len(response) >= 2 and response[0] == 0x08 else 0   # field 1, varint; absent = 0
    return HEALTH_STATUS.get(status, str(status))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def cmd_health(client: Client, args) -> None:
    """Every --server (each replica on its own) must answer SERVING; for containers' HEALTHCHECK."""
    failing = []
    for target in args.server or [DEFAULT_SERVER]:
        try:
            with Client(target, **credentials(args)) as one:    # TLS as for every other call
                status = health_status(one.channel, args.service, args.timeout or 5.0)
        except grpc.RpcError as exc:
            status = f"{exc.code().name}: {exc.details()}"
        print(f"{target}: {status}")
        if status != "SERVING":
            failing.append(target)
    if failing:
        raise HealthError(f"not serving: {', '.join(failing)}")


def cmd_admin(client: Client, args) -> None:
    if args.action == "load":
        model = client.load_model(args.path, args.name, args.replace)
    else:
        model = (client.unload_model if args.action == "unload" else client.reload_model)(args.name)
    print(f"{args.action}ed {model.name}\t{model.num_classes} classes\t{model.execution_provider}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxplain", description="Explain ONNX image classifiers with an "
                                     "onnxplain server.")
    parser.add_argument("--server", action="append", default=[],
                        help=f"HOST:PORT of the server (default {DEFAULT_SERVER}); repeat it for replicas (round-robin), "
                        "or give one dns:///NAME:PORT target")
    parser.add_argument("--timeout", type=float, default=None, help="deadline of each call, in seconds")
    parser.add_argument("--token", default=None, help="bearer token (default: $ONNXPLAIN_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    parser.add_argument("--tls-ca", help="TLS: the CA certificate (PEM) that signed the server's")
    parser.add_argument("--tls-cert", help="mutual TLS: this client's certificate (PEM)")
    parser.add_argument("--tls-key", help="mutual TLS: this client's private key (PEM)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the served models").set_defaults(run=cmd_models)
    p = sub.add_parser("model", help="describe a model: input, preprocessing, layers")
    p.add_argument("name")
    p.set_defaults(run=cmd_model)
    sub.add_parser("methods", help="list the methods and their parameters").set_defaults(run=cmd_methods)
    p = sub.add_parser("predict", help="top-k classes of images")
    p.add_argument("images", nargs="+")
    p.add_argument("--model")
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(run=cmd_predict)
    p = sub.add_parser("explain", help="saliency maps of images, written as .npy and .png overlays")
    p.add_argument("images", nargs="+")
    p.add_argument("--model")
    p.add_argument("--method", action="append", required=True, help="method name (repeatable, or a,b,c)")
    p.add_argument("--target", action="append", default=[], help="class id or label to explain (repeatable)")
    p.add_argument("--top-k", type=int, default=0, help="explain the top-k classes (default 1 when no --target)")
    p.add_argument("--layer", default="", help="layer for layer methods (default: the model's default layer)")
    p.add_argument("--param", action="append", default=[], help="key=value or method.key=value (repeatable)")
    p.add_argument("--normalize", choices=("none", "minmax", "maxabs"), default="none",
                   help="normalisation of the saved maps (default: the method's raw values)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_explain)
    add_audit_parser(sub)   # onnxplain audit DATASET ... (client/audit.py)
    p = sub.add_parser("admin", help="model management: load, unload, reload (needs the admin role)")
    admin = p.add_subparsers(dest="action", required=True)
    a = admin.add_parser("load", help="serve a .onnx or model .toml from the server's model directories")
    a.add_argument("path", help="relative to a model directory of the server, or absolute inside one")
    a.add_argument("--name", default="", help="name to serve it under (default: the TOML's name or the file stem)")
    a.add_argument("--replace", action="store_true", help="swap a model already served under that name")
    a.set_defaults(run=cmd_admin)
    for action, text in (("unload", "stop serving a model (running calls finish)"),
                         ("reload", "load a model again from its file, atomically (running calls finish)")):
        a = admin.add_parser(action, help=text)
        a.add_argument("name")
        a.set_defaults(run=cmd_admin)
    p = sub.add_parser("health", help="grpc.health.v1 check of every --server (exit 0 when all are SERVING)")
    p.add_argument("--service", default="", help="service name to check (default: the whole server)")
    p.set_defaults(run=cmd_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        timeout = args.timeout if args.command != "explain" else None
        with Client(args.server or [DEFAULT_SERVER], timeout=timeout, **credentials(args)) as client:
            args.run(client, args)
    except grpc.RpcError as exc:
        print(f"onnxplain: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except HealthError as exc:
        print(f"onnxplain: {exc}", file=sys.stderr)
        return 1
    except (UsageError, ValueError, OSError) as exc:
        print(f"onnxplain: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
