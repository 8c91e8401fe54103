"""Converted model.safetensors bytes vs the source's, per model, with what the extra bytes are.

Reads only the safetensors headers. Uses the checkpoints the other scripts left in
--workdir (converting any that are missing with checks=[]).

    .venv/bin/python bench/bytes.py            # GPT-2-small (12 layers), LLaMA-shaped
    .venv/bin/python bench/bytes.py --quick    # tiny smoke run
"""
import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

TARGET = 1.02
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}
HEAD_PARAMETERS = (".heads.a", ".heads.c", ".heads.g", "product.eps", "product.clear.a", "product.clear.c",
                   "product.clear.g")


def header(path: Path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def split_bytes(path: Path):
    """(header bytes, head-parameter bytes, all other tensor bytes) of a safetensors file."""
    header_bytes, entries = header(path)
    heads = other = 0
    for name, entry in entries.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        if name.endswith(HEAD_PARAMETERS):
            heads += end - start
        else:
            other += end - start
    return header_bytes, heads, other


def main(argv=None):
    args = common.parse_args("converted checkpoint bytes vs source bytes", argv)
    names = list(dict.fromkeys(common.FORWARD_MODELS[args.quick] + [common.CONVERSION_MODEL[args.quick]]))
    print(common.machine_line())
    rows, summary = [], []
    with common.workdir(args.workdir) as root:
        for name in names:
            src, out = common.prepare(name, root)
            s, c = common.file_bytes(src), common.file_bytes(out)
            s_header, _, s_tensors = split_bytes(src / "model.safetensors")
            c_header, c_heads, c_other = split_bytes(out / "model.safetensors")
            ratio = c / s
            rows.append([name, s, c, f"{ratio:.4f}x", c - s, c_heads, c_other - s_tensors, c_header - s_header])
            summary.append(common.summary_row(f"bytes {name}: converted / source", ratio, TARGET,
                                              f"{c} vs {s} bytes; head parameters {c_heads}"))
    common.print_table("bytes: model.safetensors, converted vs source (fp32)",
                       ["model", "source bytes", "converted bytes", "ratio", "extra", "of which head params a/c/g/eps",
                        "weights diff", "header diff"], rows)
    common.write_summary(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
