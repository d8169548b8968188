"""Batched generation for requests of different lengths and settings.

Prompts are left-padded into one batch (position ids follow each row's real tokens, the attention mask hides the
padding) and decoded step by step with the KV cache. Each row keeps its own `max_new_tokens`, temperature, top-p,
seed and stop strings, and stops on its own; the batch ends when every row has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def _pick(logits: torch.Tensor, request: GenerationRequest, generator: torch.Generator | None) -> int:
    if request.temperature == 0 or generator is None:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / request.temperature, dim=-1)
    if request.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p (always at least the most likely one).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= request.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _generators(requests: list[GenerationRequest]) -> list[torch.Generator | None]:
    generators: list[torch.Generator | None] = []
    for request in requests:
        if request.temperature == 0:
            generators.append(None)
            continue
        generator = torch.Generator()
        generator.manual_seed(request.seed if request.seed is not None else int(torch.seed()))
        generators.append(generator)
    return generators


@torch.no_grad()
def generate_batch(model, tokenizer, requests: list[GenerationRequest]) -> list[GenerationResult]:
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    ids, mask = _left_pad([r.prompt_ids for r in requests], pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = _generators(requests)
    outputs: list[list[int]] = [[] for _ in requests]
    finish: list[str | None] = [None] * len(requests)
    past = None
    vocab = len(tokenizer)  # a model may have padded embedding rows (model.vocab_multiple): never sample them
    for _ in range(max(r.max_new_tokens for r in requests)):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True)
        past = out.past_key_values
        next_ids = torch.full((len(requests), 1), pad_id, dtype=torch.long)
        for row, request in enumerate(requests):
            if finish[row] is not None:
                continue
            token = _pick(out.logits[row, -1, :vocab], request, generators[row])
            next_ids[row, 0] = token
            finish[row] = _finished(tokenizer, request, outputs[row], token, eos_id)
        if all(reason is not None for reason in finish):
            break
        ids = next_ids
        mask = torch.cat([mask, torch.ones((len(requests), 1), dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
    return [_result(tokenizer, r, o, f or "length") for r, o, f in zip(requests, outputs, finish, strict=True)]


def _finished(tokenizer, request: GenerationRequest, output: list[int], token: int, eos_id: int) -> str | None:
    """Append `token` to `output` unless it ends the row; return the finish reason once the row is done."""
    if token == eos_id:
        return "stop"
    output.append(token)
    if request.stop and any(s in tokenizer.decode(output) for s in request.stop):
        return "stop"
    return "length" if len(output) >= request.max_new_tokens else None


def _result(tokenizer, request: GenerationRequest, output: list[int], reason: str) -> GenerationResult:
    text = tokenizer.decode(output, skip_special_tokens=True)
    for stop in request.stop:
        if stop in text:
            text = text[: text.index(stop)]
    return GenerationResult(token_ids=output, text=text, finish_reason=reason)
