"""Architecture sweep: every causal-LM model type transformers maps, built tiny and random,
saved, converted, and classified.

    .venv/bin/python bench/architectures.py --out bench/out/architectures.json
    .venv/bin/python bench/architectures.py --types gpt2,llama,mamba --timeout 60

For each model type of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` (one child process each, with a
timeout, so a hang or a crash cannot stop the sweep):

  1. build: `tests/conversion/tiny.py`'s default config shrunk field by field (tiny_config),
     its sub-configs (text_config, vision_config, ...) shrunk the same way here, plus the
     per-type OVERRIDES below; the model is first built on the meta device and refused as
     "not shrunk" when it has more than --max-params parameters (a full-size default config
     would take minutes and gigabytes); then built for real (random weights, norms perturbed,
     tiny.perturb_norms) and saved with save_pretrained.
  2. convert: `convert(src, out, ConversionOptions(calibration_tokens=128, seq_len=32, greedy_tokens=16))`.

Outcome per type:
  passed    converted, verdict passed
  failed    converted, verdict failed (report.failures)
  refused   a ConversionError (its .code and message)
  error     any other exception inside convert() (a converter bug, not a refusal)
  timeout   the child ran past --timeout (the stage it was in is recorded)
  crashed   the child died without a result (signal, out of memory)
  no_build  the tiny model could not be built or saved (config/model errors, missing optional
            dependencies, not shrinkable): not counted in the headline's denominator

Headline: of the types that build, how many convert and pass.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONVERT_OPTIONS = dict(calibration_tokens=128, seq_len=32, greedy_tokens=16)
MAX_PARAMS = 5_000_000  # a tiny config is ~0.1M parameters; above this the shrink did not take

# multi-head latent attention (deepseek_v2/v3 and relatives): the latent and per-head widths
# tiny.SHRINK does not name, consistent with head_dim 8; keys and values have as many heads as queries
MLA = {"num_key_value_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
       "qk_nope_head_dim": 8, "qk_head_dim": 16, "v_head_dim": 8, "head_dim": 8}
MLA_INDEXER = {**MLA, "index_head_dim": 8, "index_n_heads": 2, "index_topk": 8}

# BART-style decoders: layer counts and widths under their own names (tiny.SHRINK's
# num_hidden_layers is an alias of encoder_layers there, so the decoder kept its default depth)
SEQ2SEQ_DECODER = {"encoder_layers": 2, "decoder_layers": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
                   "encoder_attention_heads": 4, "decoder_attention_heads": 4}
# hybrids whose first two default layers are both linear attention / SSM: transformers cannot
# build a causal mask without one attention layer, so keep one of each
HYBRID = {"layer_types": ["linear_attention", "full_attention"]}
QWEN4_EXP = {"layer_types": ["linear_attention", "indexed_attention"], "indexer_n_heads": 2, "indexer_kv_heads": 1,
             "indexer_head_dim": 8, "indexer_budget": 16, "indexer_compress_ratio": 4}

# model_type -> config fields set on top of tiny.SHRINK (top level). Data only: what a type's
# config needs so that its tiny version is consistent. A dict value under a sub-config's name
# ("text_config", ...) is applied to that sub-config.
OVERRIDES = {
    # per-layer lists derived from a count (only the constructor re-derives them)
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "attention_layers": ["global", "local"],
                "num_layers": 2},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "gemma3n_text": {"num_kv_shared_layers": 0, "layer_types": ["sliding_attention", "full_attention"],
                     "vocab_size_per_layer_input": 97, "hidden_size_per_layer_input": 8, "laurel_rank": 8},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # defaults that are None where the model needs a number
    "hunyuan_v1_dense": {"head_dim": 8},
    "hunyuan_v1_moe": {"head_dim": 8},
    "ministral": {"head_dim": 8},
    "nemotron": {"num_key_value_heads": 2},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},  # clip_qkv None fails in torch.clamp
    "zaya": {"num_experts_per_tok": 1},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    "reformer": {"is_decoder": True, "attn_layers": ["local", "lsh"], "axial_pos_shape": (8, 16),
                 "axial_pos_embds_dim": (16, 16), "local_attn_chunk_length": 16, "lsh_attn_chunk_length": 16,
                 "num_buckets": 4},
    # widths tiny.SHRINK does not name
    "cpmant": {"dim_ff": 64, "dim_head": 8},
    "granitemoehybrid": {**HYBRID, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16,
                         "mamba_chunk_size": 16},
    "mamba2": {"head_dim": 16, "n_groups": 1, "state_size": 16, "chunk_size": 16},
    **{t: SEQ2SEQ_DECODER for t in ("bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart",
                                     "mvp", "pegasus", "plbart", "whisper")},
    **{t: HYBRID for t in ("qwen3_next", "olmo_hybrid", "qwen3_5_text", "qwen3_5_moe_text")},
    **{t: {"text_config": HYBRID} for t in ("qwen3_5", "qwen3_5_moe")},
    "qwen4_exp_text": QWEN4_EXP,
    "qwen4_exp": {"text_config": QWEN4_EXP},
    "lfm3": {"layer_types": ["conv", "full_attention"]},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"], "lru_width": 32, "attention_window_size": 16},
    "glm4_moe_lite": MLA,
    "minicpm3": MLA,
    "youtu": MLA,
    "rwkv": {"attention_hidden_size": 32},
    # the cache rounds qk/v widths up to multiples of 64 and the layers do not: widths where both agree
    "xlstm": {"embedding_dim": 128, "hidden_size": 128, "num_blocks": 2, "num_heads": 4},
    "hrm_text": {"num_layers_per_stack": 1},
    "xmod": {"default_language": "en_XX"},
    "bailing_hybrid": {**HYBRID, **MLA},
    "kimi_linear": {**HYBRID, **MLA, "linear_head_dim": 8, "linear_num_heads": 4,
                    "num_experts_per_token": 2},
    # zamba: with one hybrid layer transformers' tie_weights_keys for the shared block fails; use two
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"],
              "attention_hidden_size": 64, "attention_head_dim": 16, "mamba_dt_rank": 4, "use_mamba_kernels": False},
    "zamba2": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"],
               "hybrid_layer_ids": [1, 2], "attention_hidden_size": 64, "attention_head_dim": 16, "mamba_headdim": 16,
               "n_mamba_heads": 4, "mamba_d_state": 16, "adapter_rank": 8, "use_mamba_kernels": False},
    "bamba": {"attn_layer_indices": [1], "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16,
              "mamba_chunk_size": 16},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "roc_bert": {"shape_vocab_size": 97, "shape_embed_dim": 16, "pronunciation_vocab_size": 97,
                 "pronunciation_embed_dim": 16},
    "deepseek_v2": {**MLA, "num_experts_per_tok": 2},
    "deepseek_v3": MLA,
    "sarvam_mla": MLA,
    "axk1": {**MLA, "n_group": 1, "topk_group": 1},
    "axk2": MLA_INDEXER,
    "deepseek_v32": MLA_INDEXER,
    "glm_moe_dsa": MLA_INDEXER,
    "hy_v4": MLA_INDEXER,
    "longcat_flash": {**MLA, "expert_ffn_hidden_size": 32, "n_routed_experts": 4, "zero_expert_num": 2},
    "inkling2_text": {"unpadded_vocab_size": 97, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
                      "swa_head_dim": 8},
    "inkling2_loop_text": {"unpadded_vocab_size": 97, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
                           "swa_head_dim": 8},
    "gemma4_text": {"vocab_size_per_layer_input": 97, "hidden_size_per_layer_input": 8, "per_layer_config": {}},
    "gemma4": {"text_config": {"vocab_size_per_layer_input": 97, "hidden_size_per_layer_input": 8,
                               "per_layer_config": {}}},
    # the composite config derives the global transformer's input width (encoder width x cross_attn_k)
    # in its constructor only: the shrunk value, so that the saved config rebuilds the same model
    "blt": {"encoder_hash_byte_group_vocab": 101, "encoder_config": {"hidden_size_global": 32},
            "decoder_config": {"hidden_size_global": 32}, "global_config": {"encoder_cross_output_size": 64}},
}

# sub-config fields that tiny.SHRINK does not name but that must shrink with it
NESTED_SHRINK = {"vocab_size": 97, "intermediate_size": 64, "hidden_size": 32}


# ----------------------------------------------------------------------------------------------
# child: one model type
# ----------------------------------------------------------------------------------------------

def _get(obj, key):
    """getattr that also treats a config's refusal to answer (a per-layer attribute) as None."""
    try:
        return getattr(obj, key, None)
    except Exception:  # noqa: BLE001 - e.g. AmbiguousGlobalPerLayerAttributeError
        return None


def _shrink_sub_configs(config, shrink: dict, overrides: dict) -> None:
    """tiny_config shrinks the top level only: shrink each sub-config (text_config, vision_config,
    ...) with the same table, where the sub-config has the field."""
    names = list(getattr(config, "sub_configs", {}) or {})
    for name in names:
        sub = getattr(config, name, None)
        if sub is None or not hasattr(sub, "to_dict"):
            continue
        for key, value in {**shrink, **(overrides.get(name) or {})}.items():
            if key in (overrides.get(name) or {}) or _get(sub, key) is not None:
                try:
                    setattr(sub, key, value)
                except AttributeError:
                    pass
        layers = _get(sub, "num_hidden_layers")
        if isinstance(_get(sub, "layer_types"), list) and layers:
            try:
                sub.layer_types = (sub.layer_types * layers)[:layers]
            except AttributeError:
                pass
        kv, heads = _get(sub, "num_key_value_heads"), _get(sub, "num_attention_heads")
        if isinstance(kv, int) and isinstance(heads, int) and kv and heads % kv:
            sub.num_key_value_heads = heads
        _shrink_sub_configs(sub, shrink, overrides.get(name) or {})


def _init_config(model_type: str, shrink: dict, **overrides):
    """The tiny config through the config class' constructor (tiny.SHRINK's fields that the
    default config sets, plus overrides), so fields the constructor derives from others
    (layer lists, block types) follow them: the fallback when tiny.tiny_config's field-by-field
    setattr leaves a config inconsistent."""
    import transformers

    try:
        fields = transformers.AutoConfig.for_model(model_type).to_dict()
    except Exception:  # noqa: BLE001 - a default config that does not validate without the overrides
        fields = transformers.AutoConfig.for_model(model_type, **overrides).to_dict()
    kwargs = {k: v for k, v in shrink.items() if fields.get(k) is not None}
    config = transformers.AutoConfig.for_model(model_type, **{**kwargs, **overrides})
    kv, heads = _get(config, "num_key_value_heads"), _get(config, "num_attention_heads")
    if isinstance(kv, int) and isinstance(heads, int) and kv and heads % kv:
        config.num_key_value_heads = heads
    return config


def tiny_configs(model_type: str):
    """(strategy, config) candidates in order: tiny.tiny_config, then the constructor."""
    from tests.conversion import tiny

    import transformers

    overrides = dict(OVERRIDES.get(model_type, {}))
    sub_configs = getattr(transformers.CONFIG_MAPPING[model_type], "sub_configs", {}) or {}
    nested = {k: v for k, v in overrides.items() if k in sub_configs and isinstance(v, dict)}
    flat = {k: v for k, v in overrides.items() if k not in nested}
    for strategy, make in (("tiny", lambda: tiny.tiny_config(model_type, **flat)),
                           ("init", lambda: _init_config(model_type, tiny.SHRINK, **flat))):
        def candidate(make=make):
            config = make()
            _shrink_sub_configs(config, {**tiny.SHRINK, **NESTED_SHRINK}, nested)
            return config
        yield strategy, candidate


def build_tiny(model_type: str, max_params: int, meta_only: bool = False):
    """A tiny random model of model_type: the first config strategy whose model builds (on the
    meta device), validates and stays under max_params; then built for real, norms perturbed
    (tiny.perturb_norms). Raises the last strategy's error, with every strategy's in .errors."""
    import torch
    import transformers

    from tests.conversion import tiny

    errors = {}
    for strategy, candidate in tiny_configs(model_type):
        try:
            config = candidate()
            with torch.device("meta"):
                shape = transformers.AutoModelForCausalLM.from_config(config)
            params = sum(p.numel() for p in shape.parameters())
            if params > max_params:
                biggest = sorted(((p.numel(), n) for n, p in shape.named_parameters()), reverse=True)[:3]
                raise BuildTooBig(f"not shrunk: {params / 1e6:.1f}M parameters (largest: " + ", ".join(
                    f"{n} {tuple(shape.get_parameter(n).shape)}" for _, n in biggest) + ")")
            if hasattr(config, "validate"):
                config.validate()
            del shape
            break
        except Exception as exc:  # noqa: BLE001 - try the next strategy
            errors[strategy] = exc
    else:
        exc = list(errors.values())[-1]
        exc.errors = {k: f"{type(e).__name__}: {_first_line(e)}" for k, e in errors.items()}
        raise exc
    if meta_only:
        return None, params, strategy
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    tiny.perturb_norms(model, torch.Generator().manual_seed(1))
    return model, params, strategy


class BuildTooBig(Exception):
    pass


def _first_line(exc: BaseException, limit: int = 400) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def _where(exc: BaseException) -> dict:
    """The innermost frame in shared/ (where the converter was) and the innermost frame of all."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/shared/" in f.filename]
    fmt = lambda f: f"{Path(f.filename).name}:{f.lineno} {f.name}"  # noqa: E731
    return {"converter": fmt(ours[-1]) if ours else None, "innermost": fmt(frames[-1]) if frames else None}


def source_check(directory: Path) -> str:
    """Whether transformers itself runs the saved source: a forward pass and a 4-token greedy
    generate() (tells a converter bug from a tiny model that transformers cannot run)."""
    import torch
    import transformers

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()
        vocab = model.config.get_text_config().vocab_size
        ids = torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model(input_ids=ids)
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        return "ok"
    except Exception as exc:  # noqa: BLE001
        return f"fails: {type(exc).__name__}: {_first_line(exc, 200)}"


def child(model_type: str, result_path: Path, max_params: int) -> None:
    result = {"type": model_type, "stage": "import", "converter_digest": converter_digest()}

    def dump():
        result_path.write_text(json.dumps(result, default=str))

    dump()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from shared.conversion import ConversionError, ConversionOptions, convert

    result["class"] = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    with tempfile.TemporaryDirectory(prefix=f"arch-{model_type}-") as tmp:
        t = time.perf_counter()
        result["stage"] = "build"
        dump()
        try:
            model, params, strategy = build_tiny(model_type, max_params)
            result["params"], result["build_strategy"] = params, strategy
            result["built_class"] = type(model).__name__
            result["stage"] = "save"
            dump()
            model.save_pretrained(Path(tmp) / "src")
            del model
        except BaseException as exc:  # noqa: BLE001 - every build failure is a result
            result.update(status="no_build", exception=type(exc).__name__, message=_first_line(exc),
                          strategy_errors=getattr(exc, "errors", None), traceback=traceback.format_exc()[-3000:])
            result["build_s"] = time.perf_counter() - t
            dump()
            return
        result["build_s"] = time.perf_counter() - t
        t = time.perf_counter()
        result["stage"] = "convert"
        dump()
        try:
            report = convert(Path(tmp) / "src", Path(tmp) / "out", ConversionOptions(**CONVERT_OPTIONS))
        except ConversionError as exc:
            result.update(status="refused", code=exc.code, message=exc.message[:1000])
        except BaseException as exc:  # noqa: BLE001
            result.update(status="error", exception=type(exc).__name__, message=_first_line(exc),
                          where=_where(exc), traceback=traceback.format_exc()[-3000:])
            result["source_check"] = source_check(Path(tmp) / "src")
        else:
            summary = report.summary
            result.update(status="passed" if report.passed else "failed", failures=list(report.failures),
                          summary={k: summary.get(k) for k in (
                              "source_architecture", "ffn_sites", "attention_heads_added", "max_local_rel",
                              "logits_max_rel", "kl_max", "top1_agreement", "greedy_identical", "hidden_min_cosine")})
        result["convert_s"] = time.perf_counter() - t
        result["stage"] = "done"
        dump()


# ----------------------------------------------------------------------------------------------
# parent: the sweep
# ----------------------------------------------------------------------------------------------

def run_one(model_type: str, timeout: float, max_params: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="arch-result-") as tmp:
        path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model_type, "--result", str(path),
               "--max-params", str(max_params)]
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the child and anything it started
            output, _ = proc.communicate()
            timed_out = True
        wall = time.perf_counter() - started
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            result = {"type": model_type, "stage": "start"}
    result["wall_s"] = round(wall, 1)
    if timed_out:
        result.update(status="timeout", message=f"no result after {timeout:.0f} s (stage: {result.get('stage')})")
    elif "status" not in result:
        tail = [line for line in (output or "").strip().splitlines() if line.strip()][-3:]
        result.update(status="crashed", returncode=proc.returncode,
                      message=f"exit {proc.returncode} in stage {result.get('stage')}: " + " | ".join(tail)[-400:])
    return result


def built(r: dict) -> bool:
    """Whether the type counts as 'builds': it reached conversion."""
    if r["status"] in ("passed", "failed", "refused", "error"):
        return True
    return r["status"] in ("timeout", "crashed") and r.get("stage") in ("convert", "done")


FAILURE_KINDS = [(" local error ", "local error > tolerance"), ("logits max relative", "logits error"),
                 ("top-1 differs", "top-1 differs"), ("KL ", "KL too large"), ("hidden states", "hidden-state error"),
                 ("greedy", "greedy differs")]


def reason(r: dict) -> str:
    """A short group key for a non-passing result."""
    status, msg = r["status"], r.get("message") or ""
    if status == "failed":
        kinds = sorted({next((label for prefix, label in FAILURE_KINDS if prefix in f), f[:60])
                        for f in r.get("failures", [])})
        return "verdict failed: " + "; ".join(kinds)
    if status == "refused":
        if "looks like an FFN but matches no known pattern" in msg:
            m = re.search(r"\((\w+)\) looks like an FFN.*?\(its children: ([^)]*)\)", msg)
            return f"refused [{r['code']}]: unmatched FFN {m.group(1)} (children: {m.group(2)})" if m else msg
        if "activation" in msg and "is none of" in msg:
            m = re.search(r"activation (\w+) is none of", msg)
            return f"refused [{r['code']}]: activation {m.group(1) if m else '?'} not buildable"
        if NO_FFN in msg:
            return f"refused [{r['code']}]: no FFN matched"
        return f"refused [{r['code']}]: " + re.sub(r"\d+", "N", msg)[:160]
    if status == "no_build":
        exc = r.get("exception", "")
        if re.search(r"requires? the|pip install|No module named|is not installed", msg) or exc in (
                "ImportError", "ModuleNotFoundError"):
            return "no_build: missing optional dependency"
        if "trust_remote_code" in msg:
            return "no_build: remote code only"
        if exc == "BuildTooBig":
            return "no_build: not shrunk (> max params)"
        return f"no_build: {exc}"
    if status == "error":
        src = r.get("source_check") or ""
        where = (r.get("where") or {}).get("converter") or "?"
        if src.startswith("fails"):
            return f"error in convert, transformers fails too: {src[len('fails: '):][:90]}"
        return f"error in convert: {r.get('exception')} at {where}" + ("" if src == "ok" else " (source not checked)")
    return f"{status} (stage {r.get('stage')})"


def table(results: list[dict]) -> str:
    rows = ["| type | class | status | sites | max local rel | logits rel | KL | top-1 | s | note |",
            "|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(x):
        return "" if x is None else (f"{x:.2g}" if isinstance(x, float) else str(x))

    for r in results:
        s = r.get("summary") or {}
        note = "" if r["status"] == "passed" else (
            "; ".join(r.get("failures", [])[:2]) if r["status"] == "failed" else (r.get("message") or ""))[:120]
        rows.append(f"| {r['type']} | {r.get('class') or ''} | {r['status']} | {fmt(s.get('ffn_sites'))} | "
                    f"{fmt(s.get('max_local_rel'))} | {fmt(s.get('logits_max_rel'))} | {fmt(s.get('kl_max'))} | "
                    f"{fmt(s.get('top1_agreement'))} | {fmt(r.get('wall_s'))} | {note.replace('|', '/')} |")
    return "\n".join(rows)


NO_FFN = "has no FFN that any known pattern matches"  # convert()'s refusal of a model with nothing to replace


def headline(results: list[dict]) -> dict:
    """The headline rate counts every type that builds. Types refused for having no FFN at all
    (pure SSMs: nothing to replace, and no attention to host heads either) stay in it as not
    converted; they are also counted apart, with the rate the other types reach."""
    n_built = sum(built(r) for r in results)
    n_passed = sum(r["status"] == "passed" for r in results)
    no_ffn = [r["type"] for r in results if r["status"] == "refused" and NO_FFN in (r.get("message") or "")]
    counts = defaultdict(int)
    for r in results:
        counts[r["status"]] += 1
    with_ffn = n_built - len(no_ffn)
    return {"types": len(results), "built": n_built, "passed": n_passed,
            "pass_rate_of_built": round(n_passed / n_built, 4) if n_built else None,
            "no_ffn": no_ffn, "pass_rate_of_built_with_ffn": round(n_passed / with_ffn, 4) if with_ffn else None,
            "by_status": dict(counts)}


def grouped(results: list[dict]) -> dict:
    groups = defaultdict(list)
    for r in results:
        if r["status"] != "passed":
            groups[reason(r)].append(r["type"])
    return dict(sorted(groups.items(), key=lambda kv: (kv[0].startswith("no_build"), -len(kv[1]), kv[0])))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", help="comma-separated model types (default: every causal-LM type)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per model type (default 120)")
    parser.add_argument("--max-params", type=int, default=MAX_PARAMS,
                        help=f"refuse to build a model larger than this (default {MAX_PARAMS:,})")
    parser.add_argument("--resume", action="store_true",
                        help="keep the results already in --out and run only the types it lacks (a sweep cut "
                             "short); with --types, run those again and keep every other result")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        child(args.child, args.result, args.max_params)
        return 0

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.types.split(",") if args.types else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    unknown = [t for t in types if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    if unknown:
        parser.error(f"not causal-LM model types: {unknown}")
    started = datetime.datetime.now().astimezone()
    results = []
    if args.resume:
        if not args.out:
            parser.error("--resume needs --out")
        if args.out.exists():
            previous = json.loads(args.out.read_text())
            rerun = set(types) if args.types else set()  # named types run again
            results = [r for r in previous["results"] if r["type"] not in rerun]
            started = datetime.datetime.fromisoformat(previous["started"])
            print(f"resuming: {len(results)} results kept from {args.out}", flush=True)
            types = sorted(set(types) | {r["type"] for r in results})
    done = {r["type"] for r in results}
    for i, model_type in enumerate(types, 1):
        if model_type in done:
            continue
        r = run_one(model_type, args.timeout, args.max_params)
        results.append(r)
        extra = "" if r["status"] == "passed" else " " + reason(r)[:140]
        print(f"[{i}/{len(types)}] {model_type:28s} {r['status']:8s} {r['wall_s']:6.1f}s{extra}", flush=True)
        if args.out:  # partial results as the sweep goes
            _write(args.out, started, args, types, results)

    order = {t: i for i, t in enumerate(types)}
    results.sort(key=lambda r: order[r["type"]])
    print()
    print(table(results))
    head = headline(results)
    print()
    print(f"{head['types']} causal-LM model types; {head['built']} build; {head['passed']} of those convert and pass "
          f"({100 * (head['pass_rate_of_built'] or 0):.1f} %, target >= 80 %); by status: {head['by_status']}")
    print(f"{len(head['no_ffn'])} of the types that build are refused for having no FFN any row matches "
          f"({', '.join(head['no_ffn']) or '-'}): counted above as not converted; without them "
          f"{100 * (head['pass_rate_of_built_with_ffn'] or 0):.1f} %")
    print()
    for key, members in grouped(results).items():
        print(f"{key} ({len(members)}): {', '.join(members)}")
    if args.out:
        _write(args.out, started, args, types, results, done=True)
        print(f"\nresults: {args.out}")
    return 0


def converter_digest() -> str:
    """sha256 (first 12 hex) of shared/conversion's sources: tells whether the converter changed
    while the sweep ran (each result records the digest its child saw)."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted((ROOT / "shared" / "conversion").rglob("*.py")):
        digest.update(str(file.relative_to(ROOT)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]


def _write(path: Path, started, args, types, results, done=False):
    import torch
    import transformers

    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"started": started.isoformat(timespec="seconds"), "complete": done and len(results) == len(types),
               "transformers": transformers.__version__, "torch": torch.__version__, "timeout_s": args.timeout,
               "max_params": args.max_params, "options": CONVERT_OPTIONS, "converter_digest_at_end": converter_digest(),
               "converter_digests": sorted({r.get("converter_digest") for r in results if r.get("converter_digest")}),
               "headline": headline(results),
               "groups": grouped(results), "results": results}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
