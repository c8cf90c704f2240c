"""The torch inference executor: the built-in MiniLM embedder and TorchScript models."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from protocol.jobs import Precision
from worker.executors import inference
from worker.executors.inference import (
    BUILTIN_EMBEDDING_MODEL,
    EMBEDDING_DIM,
    InvalidInput,
    LoadedModel,
    ManifestError,
    ModelKind,
    ModelNotFound,
    ModelRegistry,
    UnsupportedPrecision,
    builtin_embedding_path,
    device_for,
    discover_models,
)

# torch 2.13 deprecates TorchScript and torch.ao.quantization, the APIs this executor is
# specified to use; these are the exact warnings they emit, nothing broader.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings(
        "ignore:torch.quantize_per_tensor, torch.quantize_per_channel and other quantized "
        "tensor creation functions:UserWarning"
    ),
]

# fp32 must agree with sentence-transformers up to float rounding.
FP32_MIN_COSINE = 0.99999
# Dynamic int8 (x86 engine: per-channel weights, 7-bit per-tensor activations), measured on
# this CPU. Against fp32: mean 0.96-0.98; worst sentence 0.90-0.95, by batch-mates, because the
# activation scale spans the whole padded batch ("" and "hi" next to a long text suffer most).
# The same text alone vs in a batch: down to 0.877 (""). 0.98 per sentence is out of reach for
# stock dynamic quantization; these bounds catch a broken int8 path, not rounding.
INT8_MIN_COSINE = 0.85
INT8_MEAN_COSINE = 0.95

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply on Tuesday.",
    "GPUs sit idle in many homes at night.",
    "hi",
    "",
    "Ünïcödé, emoji 🚀 and punctuation?!",
    # Longer than the model's 256-token window: both sides must truncate the same way.
    "The quick brown fox jumps over the lazy dog. " * 40,
]
CLOSE_PAIR = (0, 1)
UNRELATED = 2


def cosine(a: list[float], b: list[float]) -> float:
    left, right = torch.tensor(a), torch.tensor(b)
    return float(torch.nn.functional.cosine_similarity(left, right, dim=0))


# --- the built-in embedder (real model) ---------------------------------------------------


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry(device="cpu")


@pytest.fixture(scope="module")
def fp32_model(registry: ModelRegistry) -> LoadedModel:
    return registry.get(BUILTIN_EMBEDDING_MODEL, Precision.FP32)


@pytest.fixture(scope="module")
def fp32_embeddings(fp32_model: LoadedModel) -> list[list[float]]:
    return fp32_model.run_batch(SENTENCES)


@pytest.fixture(scope="module")
def reference_embeddings() -> list[list[float]]:
    """sentence-transformers' own pipeline on the same files: an independent reference."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(
        str(builtin_embedding_path()), device="cpu", local_files_only=True
    )
    return reference.encode(SENTENCES, convert_to_numpy=True).tolist()


@pytest.mark.slow
def test_embeddings_match_sentence_transformers(
    fp32_embeddings: list[list[float]], reference_embeddings: list[list[float]]
) -> None:
    for sentence, ours, reference in zip(
        SENTENCES, fp32_embeddings, reference_embeddings, strict=True
    ):
        assert cosine(ours, reference) >= FP32_MIN_COSINE, sentence[:40]


@pytest.mark.slow
def test_embeddings_are_unit_vectors_of_384(fp32_embeddings: list[list[float]]) -> None:
    assert len(fp32_embeddings) == len(SENTENCES)
    for embedding in fp32_embeddings:
        assert len(embedding) == EMBEDDING_DIM
        assert float(torch.tensor(embedding).norm()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_close_meanings_are_closer_than_unrelated(fp32_embeddings: list[list[float]]) -> None:
    first, second = (fp32_embeddings[i] for i in CLOSE_PAIR)
    assert cosine(first, second) > cosine(first, fp32_embeddings[UNRELATED]) + 0.2


@pytest.mark.slow
def test_batching_does_not_change_an_embedding(
    fp32_model: LoadedModel, fp32_embeddings: list[list[float]]
) -> None:
    # Padding to the longest sentence of a batch must not leak into shorter ones.
    for sentence, batched in zip(SENTENCES, fp32_embeddings, strict=True):
        (alone,) = fp32_model.run_batch([sentence])
        assert cosine(alone, batched) >= FP32_MIN_COSINE, sentence[:40]


@pytest.mark.slow
def test_registry_keeps_a_model_warm(registry: ModelRegistry, fp32_model: LoadedModel) -> None:
    assert registry.get(BUILTIN_EMBEDDING_MODEL, "fp32") is fp32_model
    assert (BUILTIN_EMBEDDING_MODEL, Precision.FP32) in registry.loaded()


@pytest.mark.slow
def test_embedder_rejects_non_text(fp32_model: LoadedModel) -> None:
    assert fp32_model.run_batch([]) == []
    with pytest.raises(InvalidInput, match="item 1 is int"):
        fp32_model.run_batch(["fine", 42])


@pytest.mark.slow
def test_int8_stays_close_to_fp32(
    registry: ModelRegistry, fp32_embeddings: list[list[float]]
) -> None:
    int8_model = registry.get(BUILTIN_EMBEDDING_MODEL, Precision.INT8)
    assert int8_model.device.type == "cpu"
    int8_embeddings = int8_model.run_batch(SENTENCES)
    cosines = [cosine(a, b) for a, b in zip(int8_embeddings, fp32_embeddings, strict=True)]
    assert min(cosines) >= INT8_MIN_COSINE, cosines
    assert sum(cosines) / len(cosines) >= INT8_MEAN_COSINE, cosines
    first, second = (int8_embeddings[i] for i in CLOSE_PAIR)
    assert cosine(first, second) > cosine(first, int8_embeddings[UNRELATED])


@pytest.mark.slow
def test_int8_depends_on_batch_mates_only_within_tolerance(registry: ModelRegistry) -> None:
    # What a verifier re-running an int8 job must allow for: another worker batches the
    # same text with different neighbours.
    int8_model = registry.get(BUILTIN_EMBEDDING_MODEL, Precision.INT8)
    batched = int8_model.run_batch(SENTENCES)
    for sentence, in_batch in zip(SENTENCES, batched, strict=True):
        (alone,) = int8_model.run_batch([sentence])
        assert cosine(alone, in_batch) >= INT8_MIN_COSINE, sentence[:40]


# --- precisions and devices (no model load) ---------------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precisions_need_cuda(precision: str) -> None:
    registry = ModelRegistry(device="cpu")
    with pytest.raises(UnsupportedPrecision, match="needs a CUDA GPU"):
        registry.get(BUILTIN_EMBEDDING_MODEL, precision)
    assert registry.loaded() == []


def test_precision_placement() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert device_for(Precision.FP32, cpu) == cpu
    assert device_for(Precision.INT8, cuda) == cpu  # quantized kernels are CPU-only
    assert device_for(Precision.FP16, cuda) == cuda
    with pytest.raises(UnsupportedPrecision):
        device_for(Precision.BF16, cpu)


def test_cpu_worker_offers_fp32_and_int8() -> None:
    registry = ModelRegistry(device="cpu")
    assert registry.offers() == [
        (BUILTIN_EMBEDDING_MODEL, Precision.FP32),
        (BUILTIN_EMBEDDING_MODEL, Precision.INT8),
    ]


def test_unknown_model_and_precision() -> None:
    registry = ModelRegistry(device="cpu")
    with pytest.raises(ModelNotFound, match="no model 'gpt-9'"):
        registry.get("gpt-9")
    with pytest.raises(UnsupportedPrecision, match="unknown precision 'fp8'"):
        registry.get(BUILTIN_EMBEDDING_MODEL, "fp8")


# --- TorchScript models ---------------------------------------------------------------------


class _AffineRows(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 + 1.0


def _manifest(name: str = "affine") -> dict[str, Any]:
    return {
        "name": name,
        "input": {"kind": "tensor", "dtype": "float32", "shape": [-1, 2, 3]},
        "output": {"kind": "tensor", "dtype": "float32", "shape": [-1, 2, 3]},
        "precisions": ["fp32", "fp16"],
    }


def _install(folder: Path, stem: str, manifest: Any) -> Path:
    torch.jit.script(_AffineRows()).save(str(folder / f"{stem}.pt"))
    manifest_path = folder / f"{stem}.json"
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    manifest_path.write_text(text)
    return manifest_path


def test_a_torchscript_offer_advertises_the_row_its_manifest_takes(tmp_path: Path) -> None:
    """So the orchestrator refuses a misshapen row at submit, before any worker is leased."""
    from protocol.workers import TensorShape
    from worker.executors.pipelines import InferencePipeline

    _install(tmp_path, "affine", _manifest())
    registry = ModelRegistry(tmp_path, device="cpu", include_builtin=False)
    pipeline = InferencePipeline(registry, max_batch=4, max_wait_s=0.01)

    shapes = {(c.model, c.precision): c.input for c in pipeline.capabilities()}

    assert shapes == {("affine", Precision.FP32): TensorShape(dtype="float32", shape=[2, 3])}


def test_torchscript_model_is_discovered_loaded_and_run(tmp_path: Path) -> None:
    manifest_path = _install(tmp_path, "affine", _manifest())

    (spec,) = discover_models(tmp_path)
    assert spec.name == "affine"
    assert spec.kind is ModelKind.TORCHSCRIPT
    assert spec.path == tmp_path / "affine.pt"
    assert spec.manifest_path == manifest_path
    assert spec.input is not None and spec.input.row_shape == (2, 3)
    assert spec.precisions == {Precision.FP32, Precision.FP16}

    registry = ModelRegistry(tmp_path, device="cpu", include_builtin=False)
    assert registry.offers() == [("affine", Precision.FP32)]
    model = registry.get("affine")
    rows = [[[1, 2, 3], [4, 5, 6]], [[0, 0, 0], [-1, -1, -1]]]
    assert model.run_batch(rows) == [
        [[3.0, 5.0, 7.0], [9.0, 11.0, 13.0]],
        [[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]],
    ]
    with pytest.raises(UnsupportedPrecision, match="needs a CUDA GPU"):
        registry.get("affine", "fp16")


def test_torchscript_rows_are_checked(tmp_path: Path) -> None:
    _install(tmp_path, "affine", _manifest())
    model = ModelRegistry(tmp_path, device="cpu", include_builtin=False).get("affine")
    with pytest.raises(InvalidInput, match=r"item 1 has shape \[3\], expected \[2, 3\]"):
        model.run_batch([[[1, 2, 3], [4, 5, 6]], [1, 2, 3]])
    with pytest.raises(InvalidInput, match="item 0 is not a float32 array"):
        model.run_batch([[[1, 2, 3], [4, 5]]])


def test_registry_loads_a_model_once_under_concurrency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install(tmp_path, "affine", _manifest())
    registry = ModelRegistry(tmp_path, device="cpu", include_builtin=False)
    real_load = inference.load_torchscript_model
    loads: list[str] = []

    def slow_load(*args: Any) -> Any:
        loads.append("affine")
        time.sleep(0.05)  # widen the window in which a racing thread would load again
        return real_load(*args)

    monkeypatch.setattr(inference, "load_torchscript_model", slow_load)
    got: list[LoadedModel] = []
    threads = [
        threading.Thread(target=lambda: got.append(registry.get("affine"))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == ["affine"]
    assert len(got) == 8 and all(model is got[0] for model in got)


_BAD_MANIFESTS = [
    pytest.param("{not json", None, "not valid JSON", id="not-json"),
    pytest.param([1, 2], None, "must be a JSON object", id="not-object"),
    pytest.param({**_manifest(), "name": ""}, "name", "must be a string", id="empty-name"),
    pytest.param(
        {k: v for k, v in _manifest().items() if k != "input"},
        "input",
        "must be an object",
        id="no-input",
    ),
    pytest.param(
        {**_manifest(), "input": {"kind": "tensor", "dtype": "float8", "shape": [-1, 3]}},
        "input.dtype",
        "must be one of",
        id="bad-dtype",
    ),
    pytest.param(
        {**_manifest(), "input": {"kind": "tensor", "dtype": "float32", "shape": [4, 3]}},
        "input.shape",
        "dimension 0 is the batch",
        id="no-batch-dim",
    ),
    pytest.param(
        {**_manifest(), "output": {"kind": "image", "dtype": "float32", "shape": [-1]}},
        "output.kind",
        'must be "tensor"',
        id="bad-kind",
    ),
    pytest.param({**_manifest(), "precisions": ["int8"]}, "precisions", "int8", id="int8"),
    pytest.param({**_manifest(), "max_batch": 0}, "max_batch", "positive", id="max-batch"),
    pytest.param({**_manifest(), "precision": ["fp32"]}, "precision", "unknown", id="typo"),
]


@pytest.mark.parametrize(("manifest", "field", "problem"), _BAD_MANIFESTS)
def test_a_bad_manifest_names_file_and_field(
    tmp_path: Path, manifest: Any, field: str | None, problem: str
) -> None:
    manifest_path = _install(tmp_path, "broken", manifest)
    with pytest.raises(ManifestError) as caught:
        discover_models(tmp_path)
    assert caught.value.path == manifest_path
    assert caught.value.field == field
    assert str(manifest_path) in str(caught.value)
    assert problem in str(caught.value)
    if field is not None:
        assert f"field '{field}'" in str(caught.value)


def test_weights_without_manifest_are_an_error(tmp_path: Path) -> None:
    torch.jit.script(_AffineRows()).save(str(tmp_path / "orphan.pt"))
    with pytest.raises(ManifestError, match=r"orphan\.json: missing; orphan\.pt needs it"):
        discover_models(tmp_path)


def test_duplicate_model_names_are_an_error(tmp_path: Path) -> None:
    _install(tmp_path, "first", _manifest("same"))
    _install(tmp_path, "second", _manifest("same"))
    with pytest.raises(ManifestError, match="model name 'same' is taken"):
        discover_models(tmp_path)
