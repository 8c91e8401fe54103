"""Converted-model forward vs the source's transformers forward, side by side.

For each model (GPT-2-small widths, LLaMA-shaped; random weights, fp32, CPU, batch 1,
torch.no_grad) and each length n: the source forward, the converted forward on the fast
O(n) head path, and the dense reference path (one SDPA per head, O(n^2)), interleaved in
every repeat; medians reported. Dense is measured once per n (three times when a run
takes < 5 s) and skipped where its n^2 extrapolation exceeds --dense-limit seconds.

Sanity columns: fast vs dense (max |diff| / max |dense|) and fast vs source logits.
Breakdown columns (one extra, instrumented run per n): wall time inside the head groups
(fastpath.fast_head_group + fast_product_pairs) vs inside the source's activation module.

    .venv/bin/python bench/forward.py            # full (several minutes)
    .venv/bin/python bench/forward.py --quick    # tiny smoke run
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

TARGET_N = 1024
TARGET = 1.3


def extra_args(parser):
    parser.add_argument("--dense-limit", type=float, default=60.0,
                        help="skip dense where its estimated time exceeds this many seconds")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)


def source_activation_modules(model):
    """The activation inside each source MLP (GPT-2: mlp.act, LLaMA: mlp.act_fn)."""
    return [m for name, m in model.named_modules() if name.endswith(("mlp.act", "mlp.act_fn"))]


def timed_hooks(modules, totals, label):
    starts = {}

    def pre(module, args):
        starts[id(module)] = time.perf_counter()

    def post(module, args, output):
        totals[label] = totals.get(label, 0.0) + time.perf_counter() - starts.pop(id(module))

    return [h for m in modules for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]


def bench_model(name, root, sizes, repeats, dense_limit, fp64_check=True):
    import torch
    from shared.conversion import fastpath, load_converted

    src_dir, out_dir = common.prepare(name, root)
    source = common.load_source(src_dir)
    converted = load_converted(out_dir, device="cpu", head_impl="fast")
    vocab = source.config.vocab_size
    print(f"\n[{name}] {common.MODELS[name][3]}")
    print(f"  heads per unit (config.json layers[i].sublayers[1:]): {common.heads_per_unit(out_dir)}")
    print(f"  source attention implementation: {source.config._attn_implementation}")

    rows, summary = [], []
    dense_prev = None  # (n, seconds) of the last dense measurement
    fp64_line = fp64_diff = None
    for n in sizes:
        x = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            warm_src, _ = common.timed(lambda: source(x).logits)
            warm_fast, _ = common.timed(lambda: converted(x))  # compiles the fast path's kernels on first use
            t_src, t_fast = [], []
            for r in range(repeats):
                order = ("src", "fast") if r % 2 == 0 else ("fast", "src")
                for which in order:
                    if which == "src":
                        s, ref = common.timed(lambda: source(x).logits)
                        t_src.append(s)
                    else:
                        s, fast_out = common.timed(lambda: converted(x))
                        t_fast.append(s)
            # dense reference
            t_dense, dense_note, agree = [], "", None
            estimate = None if dense_prev is None else dense_prev[1] * (n / dense_prev[0]) ** 2
            if estimate is not None and estimate > dense_limit:
                dense_note = f"skipped (est. {estimate:.0f} s)"
            else:
                converted.set_head_impl("dense")
                try:
                    s, dense_out = common.timed(lambda: converted(x))
                    t_dense.append(s)
                    if s < 5.0:
                        for _ in range(2):
                            t_dense.append(common.timed(lambda: converted(x))[0])
                finally:
                    converted.set_head_impl("fast")
                dense_prev = (n, common.median(t_dense))
                agree = common.rel_diff(fast_out, dense_out)
            vs_source = common.rel_diff(fast_out, ref)
            dense_vs_source = common.rel_diff(dense_out, ref) if agree is not None else None
            if n == sizes[0] and fp64_check:
                # the accuracy target's reference: dense heads in float64 (fp32 dense loses ~1/eps on product pairs)
                converted.double()
                try:
                    fast64 = converted(x)
                    converted.set_head_impl("dense")
                    s64, dense64 = common.timed(lambda: converted(x))
                finally:
                    converted.float().set_head_impl("fast")
                fp64_diff = common.rel_diff(fast64, dense64)
                fp64_line = (f"  float64 model, n={n}: fast vs dense max rel diff {fp64_diff:.1e} (target <= 1e-6); "
                             f"vs that dense fp64 reference: fast fp32 {common.rel_diff(fast_out, dense64):.1e}, "
                             f"dense fp32 {common.rel_diff(dense_out, dense64):.1e} (dense fp64 run {common.fmt_s(s64)})")
            # breakdown: time inside head groups vs inside the source activation
            totals = {}
            hooks = timed_hooks(source_activation_modules(source), totals, "act")
            try:
                source(x)
            finally:
                for h in hooks:
                    h.remove()
            targets = [(fastpath, "fast_head_group", "heads"), (fastpath, "fast_product_pairs", "heads")]
            with common.accumulate_time(targets, totals):
                t_instr, _ = common.timed(lambda: converted(x))

        src_m, fast_m = common.median(t_src), common.median(t_fast)
        dense_m = common.median(t_dense) if t_dense else None
        ratio = fast_m / src_m
        rows.append([
            n, common.fmt_s(src_m), common.fmt_s(fast_m), common.fmt_ratio(ratio),
            common.fmt_ratio(min(t_fast) / min(t_src)),
            common.fmt_s(dense_m) if dense_m else dense_note,
            common.fmt_ratio(dense_m / src_m) if dense_m else "n/a",
            f"{agree:.1e}" if agree is not None else "n/a", f"{vs_source:.1e}",
            f"{dense_vs_source:.1e}" if dense_vs_source is not None else "n/a",
            f"{common.fmt_s(totals.get('heads', 0.0))} of {common.fmt_s(t_instr)}",
            common.fmt_s(totals.get("act", 0.0)),
            f"{common.fmt_s(warm_fast)}",
        ])
        target = TARGET if (n == TARGET_N and name.startswith("gpt2-small")) else None
        summary.append(common.summary_row(f"forward {name} n={n}: fast / source", ratio, target,
                                          f"{repeats} repeats, medians"))
        if dense_m:
            summary.append(common.summary_row(f"forward {name} n={n}: dense / source", dense_m / src_m, None,
                                              f"{len(t_dense)} run(s)"))
        summary.append(common.summary_row(f"forward {name} n={n}: fast vs dense (fp32) max rel diff",
                                          f"{agree:.1e}" if agree is not None else "n/a (dense skipped)"))
        if fp64_diff is not None and n == sizes[0]:
            summary.append(common.summary_row(f"forward {name} n={n}: fast vs dense, both float64, max rel diff",
                                              f"{fp64_diff:.1e}", met=fp64_diff <= 1e-6, target_text="<= 1e-6"))
    common.print_table(
        f"forward: {name}, fp32, CPU, batch 1, {repeats} interleaved repeats (medians)",
        ["n", "source", "fast", "fast/src", "(min/min)", "dense", "dense/src", "fast vs dense", "fast vs src",
         "dense vs src",
         "in head groups (1 run)", "in source act", "fast 1st call"],
        rows)
    if fp64_line:
        print(fp64_line)
    del source, converted
    return summary


def main(argv=None):
    args = common.parse_args("converted forward vs source forward", argv, extra_args)
    sizes = args.sizes or ([16, 32, 64] if args.quick else [128, 512, 1024])
    repeats = 2 if args.quick else 5
    print(common.machine_line())
    print(common.NO_GPU_NOTE)
    summary = []
    with common.workdir(args.workdir) as root:
        for name in common.FORWARD_MODELS[args.quick]:
            summary += bench_model(name, root, sizes, repeats, args.dense_limit)
    common.print_table("forward ratios (fast / source, dense / source; medians)",
                       ["metric", "value"],
                       [[r["metric"], common.fmt_ratio(r["value"]) if isinstance(r["value"], float) else r["value"]]
                        for r in summary])
    common.write_summary(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
