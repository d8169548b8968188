"""Batched generation for requests of different lengths and settings, one decoding step at a time.

Prompts are left-padded into one batch (position ids follow each row's real tokens, the attention mask hides the
padding) and decoded step by step with the KV cache. Each row keeps its own `max_new_tokens`, temperature, top-p,
seed and stop strings, and stops on its own; the batch ends when every row has. `generate_steps` yields after every
step the text each row gained (what streaming sends); `generate_batch` runs it to the end.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

GREEDY_BELOW = 1e-5
"""vLLM's threshold (_SAMPLING_EPS): a lower temperature is greedy decoding."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set when nobody waits for the reply any more (timed out, disconnected): the row stops at the next step."""


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    error: Exception | None = None


@dataclass
class Delta:
    """What one row gained in one step: the token (None for the end-of-text token, which is not part of the reply),
    new text (possibly empty: held back, or half a character), the reply's token count so far, and the finish
    reason on the row's last delta ("stop", "length", or "error" with the `error`)."""

    token_id: int | None
    text: str
    tokens: int
    finish_reason: str | None = None
    error: Exception | None = None
    """Why the row failed (finish_reason "error"): the request fails, the rest of its batch goes on."""


class RowText:
    """One row's decoded text as it grows. Text is released only once it cannot turn into a stop string or is not
    half of a multi-byte character, so a streamed reply never shows what the whole reply would have cut.

    Each step decodes only the newest tokens (with a few before them for context, as vLLM's incremental
    detokenizer does) and looks for stop strings only where a new one could end: per token the cost stays flat
    however long the reply grows.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self.decoded = ""  # the text of token_ids[:self._read]
        self._prefix = self._read = 0  # token_ids[_prefix:_read] is the context the next decode starts from
        self.stop_at: int | None = None
        self.sent = 0

    def push(self, token: int) -> bool:
        """Add a token; True once the text holds a stop string."""
        self.token_ids.append(token)
        searched_to = max(0, len(self.decoded) - self.holdback)
        self._decode_new(flush=False)
        found = [i for s in self.stop if (i := self.decoded.find(s, searched_to)) >= 0]
        if found:
            self.stop_at = min(found)
        return bool(found)

    def _decode_new(self, flush: bool) -> None:
        decode = self.tokenizer.decode
        context = decode(self.token_ids[self._prefix : self._read], skip_special_tokens=True)
        text = decode(self.token_ids[self._prefix :], skip_special_tokens=True)
        # A token that ends inside a UTF-8 character decodes to U+FFFD: wait for the rest (unless the reply is over).
        if len(text) > len(context) and (flush or not text.endswith("\ufffd")):
            self.decoded += text[len(context) :]
            self._prefix, self._read = self._read, len(self.token_ids)

    def text(self) -> str:
        return self.decoded if self.stop_at is None else self.decoded[: self.stop_at]

    def delta(self, finished: bool) -> str:
        if finished and self.stop_at is None:
            self._decode_new(flush=True)
        text = self.text()
        ready = text if finished else text[: max(self.sent, len(text) - self.holdback)]
        new, self.sent = ready[self.sent :], max(self.sent, len(ready))
        return new


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def _greedy(request: GenerationRequest) -> bool:
    """Temperatures under GREEDY_BELOW decode greedily, as vLLM does: dividing logits by 1e-40 overflows to inf."""
    return request.temperature < GREEDY_BELOW


def _pick(logits: torch.Tensor, request: GenerationRequest, generator: torch.Generator | None) -> int:
    if _greedy(request) or generator is None:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / request.temperature, dim=-1)
    if request.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p (always at least the most likely one).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= request.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _generator(request: GenerationRequest) -> torch.Generator | None:
    if _greedy(request):
        return None
    generator = torch.Generator()
    generator.manual_seed(request.seed if request.seed is not None else int(torch.seed()))
    return generator


@torch.no_grad()
def generate_steps(model, tokenizer, requests: list[GenerationRequest]) -> Iterator[list[Delta | None]]:
    """After each decoding step, one entry per request: its `Delta`, or None once it finished (or was cancelled) in an
    earlier step. A row that finishes, is cancelled or fails leaves the batch (its rows of the KV cache go too): it
    costs nothing more and its position never advances past its own last token, so no request's length can push
    another's past the model's context. A failure in one row (its seed, sampling, decoding its text) ends that row
    only, with a `Delta` whose `error` says why."""
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    vocab = len(tokenizer)  # a model may have padded embedding rows (model.vocab_multiple): never sample them
    rows: list[RowText | None] = [None] * len(requests)
    generators: list[torch.Generator | None] = [None] * len(requests)
    finish: list[str | None] = [None] * len(requests)
    failed: dict[int, Exception] = {}  # rows that failed since the last step, told in the next one
    for index, request in enumerate(requests):
        try:
            rows[index], generators[index] = RowText(tokenizer, request.stop), _generator(request)
        except Exception as err:
            finish[index], failed[index] = "error", err
    ids, mask = _left_pad([r.prompt_ids for r in requests], pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    live = list(range(len(requests)))  # the request each row of the batch tensors (and of the KV cache) is
    past = None
    while True:
        for index in live:
            if finish[index] is None and requests[index].cancelled.is_set():
                finish[index] = "cancelled"
        keep = [row for row, index in enumerate(live) if finish[index] is None]
        if not keep:
            if failed:
                yield _failures(len(requests), rows, failed)
            return
        if len(keep) < len(live):
            ids, mask, positions = ids[keep], mask[keep], positions[keep]
            if past is not None:
                past.batch_select_indices(torch.tensor(keep))
            live = [live[row] for row in keep]
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True)
        past = out.past_key_values
        next_ids = torch.full((len(live), 1), pad_id, dtype=torch.long)
        step = _failures(len(requests), rows, failed)
        for row, index in enumerate(live):
            request, text = requests[index], rows[index]
            try:
                token = _pick(out.logits[row, -1, :vocab], request, generators[index])
                next_ids[row, 0] = token
                finish[index] = _finished(text, request, token, eos_id)
                kept = None if token == eos_id else token
                step[index] = Delta(kept, text.delta(finish[index] is not None), len(text.token_ids), finish[index])
            except Exception as err:  # this row's failure is this row's alone
                finish[index] = "error"
                step[index] = Delta(None, "", len(text.token_ids), "error", error=err)
        yield step
        ids = next_ids
        mask = torch.cat([mask, torch.ones((len(live), 1), dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1


def _failures(size: int, rows: list[RowText | None], failed: dict[int, Exception]) -> list[Delta | None]:
    """A step's entries for the rows that failed before it (and forgets them: each failure is told once)."""
    step: list[Delta | None] = [None] * size
    for index, err in failed.items():
        step[index] = Delta(None, "", len(rows[index].token_ids) if rows[index] else 0, "error", error=err)
    failed.clear()
    return step


def _finished(row: RowText, request: GenerationRequest, token: int, eos_id: int) -> str | None:
    """Add `token` to the row unless it ends it; the finish reason once the row is done."""
    if token == eos_id:
        return "stop"
    if row.push(token):
        return "stop"
    return "length" if len(row.token_ids) >= request.max_new_tokens else None


def generate_batch(model, tokenizer, requests: list[GenerationRequest]) -> list[GenerationResult]:
    results = [GenerationResult([], "", "length") for _ in requests]
    for step in generate_steps(model, tokenizer, requests):
        for result, delta in zip(results, step, strict=True):
            if delta is not None:
                result.token_ids += [] if delta.token_id is None else [delta.token_id]
                result.text += delta.text
                result.finish_reason = delta.finish_reason or result.finish_reason
                result.error = delta.error
    return results
