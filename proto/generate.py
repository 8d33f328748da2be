"""Generate the Python stubs of the contract next to the .proto files.

    python proto/generate.py            # regenerate in place (commit the result)
    python proto/generate.py --out DIR  # generate elsewhere (the freshness test compares the two)

Needs grpcio-tools (the `test` extra pins the version the committed stubs come from).
"""

import argparse
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent


def generate(out: pathlib.Path) -> None:
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(str(p.relative_to(HERE)) for p in (HERE / "onnxplain" / "v1").glob("*.proto"))
    include = str(pathlib.Path(grpc_tools.__file__).parent / "_proto")
    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=HERE)
    generate(parser.parse_args().out)
