"""Per-token greedy generation cost, converted vs source, side by side.

Both sides run the same call, transformers' generate(do_sample=False, use_cache=True,
min_new_tokens = max_new_tokens = N, pad_token_id=0): on the source, and on the converted
model from load_converted (the source's class: its KV cache for the source attention, and
O(F) running sums per head group kept on that cache object). Same weights, same 8-token
prompt, fp32, CPU, batch 1; per token = total wall time / N (the prompt's prefill
included). Interleaved repeats, medians. Also checks that both produce the same token
sequence, and how much of the converted decode is spent inside the head-group caches
(HeadGroupCache.step + ProductPairsCache.step) and inside head groups run without a cache
(fast_head_group + fast_product_pairs: the prefill, or every step where the model's call did
not carry the cache), timed by wrapping them during the timed runs.

    .venv/bin/python bench/generate.py            # N = 256
    .venv/bin/python bench/generate.py --quick    # tiny smoke run
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

TARGET = 1.5
PROMPT_LEN = 8


def extra_args(parser):
    parser.add_argument("--tokens", type=int, default=None, help="tokens to generate (default 256, quick 16)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--models", nargs="*", default=None, help="names from bench/common.py MODELS")


def bench_model(name, root, new_tokens, repeats):
    import torch
    from shared.conversion import fastpath, fastpath_pairs

    source, converted, _ = common.load_pair(name, root)
    vocab = source.config.vocab_size
    prompt = torch.randint(0, vocab, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))

    def run(model, n):
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              use_cache=True, min_new_tokens=n, max_new_tokens=n, pad_token_id=0)

    targets = [(fastpath.HeadGroupCache, "step", "cached"), (fastpath_pairs.ProductPairsCache, "step", "cached"),
               (fastpath, "fast_head_group", "uncached"), (fastpath_pairs, "fast_product_pairs", "uncached")]
    run(source, 4), run(converted, 4)  # warm-up
    t_src, t_conv, cached, uncached = [], [], [], []
    for r in range(repeats):
        order = ("src", "conv") if r % 2 == 0 else ("conv", "src")
        for which in order:
            if which == "src":
                s, seq_src = common.timed(lambda: run(source, new_tokens))
                t_src.append(s)
            else:
                totals = {}
                with common.accumulate_time(targets, totals):  # negligible overhead: one wrapper per head-group call
                    s, seq_conv = common.timed(lambda: run(converted, new_tokens))
                t_conv.append(s)
                cached.append(totals.get("cached", 0.0))
                uncached.append(totals.get("uncached", 0.0))
        print(f"  repeat {r + 1}/{repeats}: source {common.fmt_s(t_src[-1] / new_tokens)}/token, "
              f"converted {common.fmt_s(t_conv[-1] / new_tokens)}/token", flush=True)
    assert seq_src.shape == seq_conv.shape == (1, PROMPT_LEN + new_tokens), (seq_src.shape, seq_conv.shape)
    same = torch.equal(seq_src, seq_conv)
    if same:
        identical = f"yes ({new_tokens}/{new_tokens})"
    else:
        first = int((seq_src[0] != seq_conv[0]).nonzero()[0]) - PROMPT_LEN
        identical = f"NO: first difference at generated token {first}"
    src_tok, conv_tok = common.median(t_src) / new_tokens, common.median(t_conv) / new_tokens
    ratio = conv_tok / src_tok
    cached_tok, uncached_tok = common.median(cached) / new_tokens, common.median(uncached) / new_tokens
    caches_used = "yes" if min(cached) > 0 else "NO: every step ran the head groups without a cache"
    row = [name, common.fmt_s(src_tok), common.fmt_s(conv_tok), common.fmt_ratio(ratio),
           common.fmt_ratio(min(t_conv) / min(t_src)), identical, common.fmt_s(cached_tok),
           common.fmt_s(uncached_tok), common.fmt_s(conv_tok - cached_tok - uncached_tok)]
    summary = [
        common.summary_row(f"generate {name}: per-token converted / source", ratio, TARGET,
                           f"{new_tokens} tokens, {repeats} repeats, medians"),
        common.summary_row(f"generate {name}: token sequences identical", identical),
        common.summary_row(f"generate {name}: head-group caches used", caches_used),
    ]
    return row, summary


def main(argv=None):
    args = common.parse_args("per-token generation cost, converted vs source", argv, extra_args)
    new_tokens = args.tokens or (16 if args.quick else 256)
    repeats = args.repeats or (2 if args.quick else 3)
    print(common.machine_line())
    print(common.code_line())
    print(common.NO_GPU_NOTE)
    rows, summary = [], []
    with common.workdir(args.workdir) as root:
        for name in args.models or common.FORWARD_MODELS[args.quick]:
            row, rows_summary = bench_model(name, root, new_tokens, repeats)
            rows.append(row)
            summary += rows_summary
    common.print_table(
        f"generate: greedy, {new_tokens} new tokens after an {PROMPT_LEN}-token prompt, fp32, CPU, batch 1, "
        f"{repeats} interleaved repeats (medians)",
        ["model", "source / token", "converted / token", "conv/src", "(min/min)", "same tokens",
         "converted: in head-group caches / token", "in head groups without a cache / token", "rest / token"],
        rows)
    common.write_summary(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
