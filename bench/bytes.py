"""Converted model.safetensors bytes vs the source's, per model, with what the extra bytes are.

Reads only the safetensors headers (every shard, where a checkpoint is sharded). A converted
checkpoint holds the source's tensors under their own names and dtype plus each FFN site's
head parameters (a, c, g per head, eps per product pair); tensors whose names the source does
not store are split into those head parameters and any others (listed by name). Uses the
checkpoints the other scripts left in --workdir (converting any that are missing with checks=[]).

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
HEAD_PARAMETERS = ("a", "c", "g", "eps")  # the last part of a head parameter's name


def tensors(directory: Path):
    """(header bytes of all weight files, {tensor name: bytes})."""
    header_bytes, sizes = 0, {}
    for path in common.weight_files(directory):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            entries = json.loads(f.read(n))
        header_bytes += 8 + n
        for name, entry in entries.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                sizes[name] = end - start
    return header_bytes, sizes


def main(argv=None):
    args = common.parse_args("converted checkpoint bytes vs source bytes", argv)
    names = list(dict.fromkeys(common.FORWARD_MODELS[args.quick] + [common.CONVERSION_MODEL[args.quick]]))
    print(common.machine_line())
    rows, summary, notes = [], [], []
    with common.workdir(args.workdir) as root:
        for name in names:
            src, out = common.prepare(name, root)
            s, c = common.file_bytes(src), common.file_bytes(out)
            s_header, s_tensors = tensors(src)
            c_header, c_tensors = tensors(out)
            new = {n: b for n, b in c_tensors.items() if n not in s_tensors}
            heads = sum(b for n, b in new.items() if n.rpartition(".")[2] in HEAD_PARAMETERS)
            others = {n: b for n, b in new.items() if n.rpartition(".")[2] not in HEAD_PARAMETERS}
            shared_diff = sum(c_tensors[n] - b for n, b in s_tensors.items() if n in c_tensors)
            dropped = sum(b for n, b in s_tensors.items() if n not in c_tensors)
            ratio = c / s
            rows.append([name, s, c, f"{ratio:.4f}x", c - s, heads, sum(others.values()),
                         shared_diff - dropped, c_header - s_header])
            if others:
                notes.append(f"  {name}: tensors the source does not store, other than head parameters: "
                             + ", ".join(f"{n} ({b} bytes)" for n, b in others.items()))
            summary.append(common.summary_row(f"bytes {name}: converted / source", ratio, TARGET,
                                              f"{c} vs {s} bytes; head parameters {heads}"))
    common.print_table("bytes: model.safetensors (all shards), converted vs source (fp32)",
                       ["model", "source bytes", "converted bytes", "ratio", "extra", "of which head params a/c/g/eps",
                        "other new tensors", "source tensors diff", "header diff"], rows)
    for line in notes:
        print(line)
    common.write_summary(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
