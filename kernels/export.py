"""`onnxplain-augment MODEL.onnx [--layer NAME ...] [--rule R] [--layer-rule R] -o OUT.onnx`: write the augmented graph
(original inputs + `seed`; outputs + layers + `<layer>__grad` + `<input>__grad`) for use outside the service."""
from __future__ import annotations

import argparse
import sys

import onnx

from .autodiff import RULE_VARIANTS, AutodiffError, augment

_TWO_GIB = 2**31 - 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="onnxplain-augment", description=__doc__)
    p.add_argument("model", help="input ONNX model")
    p.add_argument("-o", "--output", required=True, help="where to write the augmented model")
    p.add_argument("--layer", action="append", default=[], help="tensor to expose with its gradient (repeatable)")
    p.add_argument("--rule", choices=RULE_VARIANTS, default="standard")
    p.add_argument("--layer-rule", choices=RULE_VARIANTS, default=None,
                   help="rule for the layers' gradients when it differs from the input's (e.g. guided Grad-CAM: "
                        "--rule guided --layer-rule standard; a second backward pass, same forward and seed)")
    p.add_argument("--scores", default=None, help="tensor to differentiate (default: pre-softmax logits)")
    p.add_argument("--no-input-grad", action="store_true", help="do not output the input gradient")
    args = p.parse_args(argv)
    try:
        model = onnx.load(args.model)
        out = augment(model, layers=args.layer, wrt_input=not args.no_input_grad, rule=args.rule,
                      scores=args.scores, layer_rule=args.layer_rule)
    except (AutodiffError, OSError, onnx.checker.ValidationError) as e:
        print(f"onnxplain-augment: {e}", file=sys.stderr)
        return 2
    onnx.save(out, args.output, save_as_external_data=out.ByteSize() > _TWO_GIB)
    print(f"wrote {args.output}: inputs {[i.name for i in out.graph.input]}, "
          f"outputs {[o.name for o in out.graph.output]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
