"""Converted-model forward vs the source's transformers forward, side by side.

For each model (GPT-2-small widths, LLaMA-shaped; random weights, fp32, CPU, batch 1,
torch.no_grad) and each length n: the source forward, and the converted forward
(load_converted: the source's transformers class with head modules in place of its FFNs) on
the fast O(n) head path, interleaved in every repeat, medians reported; and on the dense
reference path (head modules' impl = "dense": one SDPA per head, O(n^2)), measured once per n
(three times when a run takes < 5 s) and skipped where its n^2 extrapolation exceeds
--dense-limit seconds.

Sanity columns: fast vs dense (max |diff| / max |dense|) and fast vs source logits.
Breakdown columns (measured during the timed runs, medians): wall time inside the head groups
(fastpath.fast_head_group + fastpath_pairs.fast_product_pairs, timed by wrapping them) vs the
rest of the converted forward, and inside the source's activation module (forward hooks) vs the rest.
At the largest n of the GPT-2 model, one more fast forward runs under torch.profiler and
the top ops by self CPU time are printed. Every row also reports the first call's time.
At the smallest n, fast and dense also run on the float64 model (load_converted(dtype="float64")),
the reference of the 1e-6 accuracy target.

    .venv/bin/python bench/forward.py            # full (several minutes)
    .venv/bin/python bench/forward.py --quick    # tiny smoke run
"""
import os
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
    parser.add_argument("--models", nargs="*", default=None, help="names from bench/common.py MODELS")


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


def profile_split(converted, x, top=8):
    """Top ops by self CPU time in one fast forward (torch.profiler), as printable lines."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        converted(x)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    lines = [f"    {e.key[:60]:60s} {e.self_cpu_time_total / 1e3:9.1f} ms {100 * e.self_cpu_time_total / total:5.1f}%"
             f"  ({e.count} calls)" for e in events[:top]]
    return [f"  torch.profiler, one fast forward at n={x.shape[1]}: top ops by self CPU time "
            f"(total {total / 1e3:.0f} ms, profiler overhead included)"] + lines


def bench_model(name, root, sizes, repeats_for, dense_limit, profile_at):
    import torch
    from shared.conversion import fastpath, fastpath_pairs, load_converted

    source, converted, out_dir = common.load_pair(name, root)
    vocab = source.config.vocab_size
    print(f"  source attention implementation: {source.config._attn_implementation}", flush=True)

    timing_rows, check_rows, summary, notes = [], [], [], []
    dense_prev = None  # (n, seconds) of the last dense measurement
    heads_targets = [(fastpath, "fast_head_group", "heads"), (fastpath_pairs, "fast_product_pairs", "heads")]
    for n in sizes:
        repeats = repeats_for(n)
        x = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n))
        src_calls, fast_calls = [], []  # (wall, cpu, seconds in act / head groups)

        def run_source():
            totals = {}
            hooks = timed_hooks(source_activation_modules(source), totals, "act")
            hooks += timed_hooks([source.get_output_embeddings()], totals, "lm_head")
            try:
                wall, cpu, out = common.timed_cpu(lambda: source(x).logits)
            finally:
                for h in hooks:
                    h.remove()
            src_calls.append((wall, cpu, totals.get("act", 0.0), totals.get("lm_head", 0.0)))
            return out

        def run_fast():
            totals = {}
            with common.accumulate_time(heads_targets, totals):
                wall, cpu, out = common.timed_cpu(lambda: converted(x).logits)
            fast_calls.append((wall, cpu, totals.get("heads", 0.0)))
            return out

        with torch.no_grad():
            warm_fast, _ = common.timed(lambda: converted(x))
            common.timed(lambda: source(x))
            for r in range(repeats):
                if r % 2 == 0:
                    ref, fast_out = run_source(), run_fast()
                else:
                    fast_out, ref = run_fast(), run_source()
            # dense reference (fp32, as timed), measured once (three times when a run takes < 5 s)
            t_dense, dense_note, agree, dense_vs_source = [], "", None, None
            estimate = None if dense_prev is None else dense_prev[1] * (n / dense_prev[0]) ** 2
            if estimate is not None and estimate > dense_limit:
                dense_note = f"skipped (est. {estimate:.0f} s)"
            else:
                common.set_head_impl(converted, "dense")
                try:
                    s, dense_out = common.timed(lambda: converted(x).logits)
                    t_dense.append(s)
                    if s < 5.0:
                        t_dense += [common.timed(lambda: converted(x))[0] for _ in range(2)]
                finally:
                    common.set_head_impl(converted, "fast")
                dense_prev = (n, common.median(t_dense))
                agree, dense_vs_source = common.rel_diff(fast_out, dense_out), common.rel_diff(dense_out, ref)
            if n == sizes[0]:
                # the accuracy target's reference: dense heads in float64 (fp32 dense loses ~1/eps on product pairs)
                model64 = load_converted(out_dir, dtype="float64")
                fast64 = model64(x).logits
                common.set_head_impl(model64, "dense")
                s64, dense64 = common.timed(lambda: model64(x).logits)
                del model64
                fp64_diff = common.rel_diff(fast64, dense64)
                notes.append(f"  float64 model, n={n}: fast vs dense max rel diff {fp64_diff:.1e} (target <= 1e-6); "
                             f"against that dense fp64 reference: fast fp32 {common.rel_diff(fast_out, dense64):.1e}, "
                             f"dense fp32 {common.rel_diff(dense_out, dense64):.1e} (dense fp64 run {common.fmt_s(s64)})")
                summary.append(common.summary_row(f"forward {name} n={n}: fast vs dense, both float64, max rel diff",
                                                  f"{fp64_diff:.1e}", met=fp64_diff <= 1e-6, target_text="<= 1e-6"))
            if n == profile_at:
                notes += profile_split(converted, x)
        vs_source = common.rel_diff(fast_out, ref)

        src_wall, fast_wall = (common.median([c[0] for c in calls]) for calls in (src_calls, fast_calls))
        src_cpu, fast_cpu = (common.median([c[1] for c in calls]) for calls in (src_calls, fast_calls))
        act, heads = common.median([c[2] for c in src_calls]), common.median([c[2] for c in fast_calls])
        lm_head = common.median([c[3] for c in src_calls])
        ratio = fast_wall / src_wall
        blocks_ratio = (fast_wall - lm_head) / (src_wall - lm_head)  # both compute the same lm_head matmul
        dense_m = common.median(t_dense) if t_dense else None
        timing_rows.append([
            n, repeats, common.fmt_s(src_wall), common.fmt_s(fast_wall), common.fmt_ratio(ratio),
            common.fmt_ratio(min(c[0] for c in fast_calls) / min(c[0] for c in src_calls)),
            common.fmt_ratio(fast_cpu / src_cpu), common.fmt_s(lm_head), common.fmt_ratio(blocks_ratio),
            common.fmt_s(dense_m) if dense_m else dense_note,
            common.fmt_ratio(dense_m / src_wall) if dense_m else "n/a",
        ])
        check_rows.append([
            n, f"{agree:.1e}" if agree is not None else "n/a", f"{vs_source:.1e}",
            f"{dense_vs_source:.1e}" if dense_vs_source is not None else "n/a",
            common.fmt_s(heads), common.fmt_s(fast_wall - heads), common.fmt_s(act), common.fmt_s(src_wall - act),
            common.fmt_s(warm_fast),
        ])
        target = TARGET if (n == TARGET_N and name.startswith("gpt2-small")) else None
        summary.append(common.summary_row(f"forward {name} n={n}: fast / source", ratio, target,
                                          f"{repeats} repeats, medians"))
        summary.append(common.summary_row(f"forward {name} n={n}: fast / source, lm_head excluded", blocks_ratio))
        if dense_m:
            summary.append(common.summary_row(f"forward {name} n={n}: dense / source", dense_m / src_wall, None,
                                              f"{len(t_dense)} run(s)"))
        else:
            summary.append(common.summary_row(f"forward {name} n={n}: dense / source", dense_note))
        summary.append(common.summary_row(f"forward {name} n={n}: fast vs dense (fp32) max rel diff",
                                          f"{agree:.1e}" if agree is not None else "n/a (dense skipped)"))
        print(f"  n={n} done: source {common.fmt_s(src_wall)}, fast {common.fmt_s(fast_wall)} "
              f"(load avg {os.getloadavg()[0]:.2f})", flush=True)
    common.print_table(
        f"forward: {name}, fp32, CPU, batch 1, interleaved repeats (medians of wall time)",
        ["n", "repeats", "source", "fast", "fast/src", "(min/min)", "(cpu-time ratio)", "src lm_head",
         "fast/src excl. lm_head", "dense", "dense/src"],
        timing_rows)
    common.print_table(
        f"forward: {name}, agreement (max |diff| / max |ref| of logits) and where the time goes (medians)",
        ["n", "fast vs dense", "fast vs src", "dense vs src", "fast: in head groups", "fast: rest",
         "src: in activation", "src: rest", "fast 1st call"],
        check_rows)
    for line in notes:
        print(line)
    del source, converted
    return summary


def main(argv=None):
    args = common.parse_args("converted forward vs source forward", argv, extra_args)
    sizes = args.sizes or ([16, 32, 64] if args.quick else [128, 512, 1024])
    if args.quick:
        repeats_for = lambda n: 2  # noqa: E731
    else:
        repeats_for = lambda n: 5 if n <= 128 else 3  # noqa: E731
    print(common.machine_line())
    print(common.code_line())
    print(common.NO_GPU_NOTE)
    summary = []
    with common.workdir(args.workdir) as root:
        for name in args.models or common.FORWARD_MODELS[args.quick]:
            profile_at = sizes[-1] if name.startswith("gpt2") else None
            summary += bench_model(name, root, sizes, repeats_for, args.dense_limit, profile_at)
    common.print_table("forward ratios (fast / source, dense / source; medians)",
                       ["metric", "value"],
                       [[r["metric"], common.fmt_ratio(r["value"]) if isinstance(r["value"], float) else r["value"]]
                        for r in summary])
    print(common.machine_line())
    common.write_summary(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
