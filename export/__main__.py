"""python -m export --model NAME|FOLDER|HUB_ID [--out graphs/NAME] [--dtype fp32] [--random-weights] [--force]
[--no-verify] [--no-migraphx] [--quant int4 [--quant-form matmulnbits|dequantizelinear] [--quant-block 32|64|128]]"""

import argparse
import sys

from .pipeline import DTYPES, QUANTS, ExportOptions, run
from .quantize import BLOCKS, FORMS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description="Export Qwen3-VL to ONNX for streaming.")
    parser.add_argument("--model", required=True,
                        help="tiny, Qwen3-VL-2B, Qwen3-VL-4B, Qwen3-VL-8B, a local Hugging Face folder, or a hub id")
    parser.add_argument("--out", help="output folder (default graphs/<name>)")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES)
    parser.add_argument("--random-weights", action="store_true",
                        help="the real architecture and sizes with random weights (offline)")
    parser.add_argument("--force", action="store_true", help="replace an existing export")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the proof against transformers")
    parser.add_argument("--no-migraphx", dest="migraphx", action="store_false",
                        help="skip the proof on MIGraphX's ref target (run when its Python module is importable)")
    parser.add_argument("--quant", choices=QUANTS,
                        help="4-bit weights in the decoder's matrix products, held to the quality budget against "
                             "the float graphs of --dtype (default out: graphs/<name>-int4)")
    parser.add_argument("--quant-form", choices=FORMS, default="matmulnbits",
                        help="com.microsoft MatMulNBits (default) or standard DequantizeLinear + MatMul (opset 21)")
    parser.add_argument("--quant-block", type=int, choices=BLOCKS,
                        help="weights per scale (default 128, where the widths allow: ONNX Runtime's CPU kernel runs "
                             "it faster than 32, llama.cpp Q4_0's block, at a coarser rounding)")
    args = parser.parse_args(argv)
    from runtime.manifest import ManifestError

    from .load import SourceError
    from .verify import VerificationError

    try:
        run(ExportOptions(args.model, args.out, args.dtype, args.random_weights, args.force, args.verify,
                          args.migraphx, args.quant, args.quant_form, args.quant_block))
    except (SourceError, ManifestError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except VerificationError as error:
        print(f"error: the export does not match its reference: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
