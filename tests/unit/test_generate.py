import pytest
import torch

from raylm.config import ModelSection
from raylm.data.tokenizer import train_bpe
from raylm.models import build_model
from raylm.serving.generate import GenerationRequest, RowText, generate_batch, generate_steps

TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n", "class A:\n    pass\n"] * 30


def _model_and_tokenizer(preset: str = "tiny"):
    torch.manual_seed(0)
    tokenizer = train_bpe(TEXTS, vocab_size=300)
    section = ModelSection(preset=preset)
    model = build_model(section, len(tokenizer), 64, tokenizer.eos_token_id, tokenizer.pad_token_id).eval()
    return model, tokenizer


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_a_prompt_that_fills_the_context_and_a_long_reply_decode_together_as_alone(preset):
    """Context 64: A is 63 prompt tokens + 1 new, B is 2 prompt tokens + 62 new; each fits alone. A finished row must
    not go on advancing its positions (GPT-2's position table has 64 rows: IndexError, the whole batch failed)."""
    model, tokenizer = _model_and_tokenizer(preset)
    long = tokenizer("".join(TEXTS), add_special_tokens=False)["input_ids"][:63]
    short = tokenizer("def", add_special_tokens=False)["input_ids"][:2]
    assert len(long) == 63 and len(short) <= 2

    def requests():
        return [GenerationRequest(long, 1, temperature=0), GenerationRequest(short, 64 - len(short), temperature=0)]

    together = generate_batch(model, tokenizer, requests())
    alone = [generate_batch(model, tokenizer, [r])[0] for r in requests()]
    assert len(alone[1].token_ids) > 2, "B must outlive A by more than a step for the test to mean anything"
    assert [(r.token_ids, r.finish_reason, r.error) for r in together] == [
        (r.token_ids, r.finish_reason, None) for r in alone
    ]


def test_a_row_that_fails_fails_alone():
    """A seed torch cannot take fails its own request; the other request of the batch decodes as it would alone."""
    model, tokenizer = _model_and_tokenizer()
    ids = tokenizer("def add(", add_special_tokens=False)["input_ids"]
    good, bad = GenerationRequest(ids, 9, temperature=0), GenerationRequest(ids, 9, temperature=1.0, seed=2**70)
    failed_then_good = generate_batch(model, tokenizer, [bad, good])
    assert failed_then_good[0].finish_reason == "error" and isinstance(failed_then_good[0].error, ValueError)
    assert failed_then_good[0].token_ids == []
    expected = generate_batch(model, tokenizer, [GenerationRequest(ids, 9, temperature=0)])[0]
    assert failed_then_good[1].token_ids == expected.token_ids and failed_then_good[1].error is None
    (only,) = generate_batch(model, tokenizer, [GenerationRequest(ids, 9, temperature=1.0, seed=2**70)])
    assert only.finish_reason == "error"


def test_batched_greedy_equals_one_at_a_time():
    model, tokenizer = _model_and_tokenizer()
    prompts = ["def add(", "import os\nprint", "class"]
    requests = [
        GenerationRequest(tokenizer(p, add_special_tokens=False)["input_ids"], max_new_tokens=n, temperature=0)
        for p, n in zip(prompts, [7, 3, 12], strict=True)
    ]
    batched = generate_batch(model, tokenizer, requests)
    alone = [generate_batch(model, tokenizer, [r])[0] for r in requests]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    for request, result in zip(requests, batched, strict=True):
        assert len(result.token_ids) <= request.max_new_tokens
        assert result.finish_reason in {"stop", "length"}


def test_seeded_sampling_repeats_and_stop_strings_cut():
    model, tokenizer = _model_and_tokenizer()
    ids = tokenizer("def", add_special_tokens=False)["input_ids"]
    first = generate_batch(model, tokenizer, [GenerationRequest(ids, 10, temperature=1.0, top_p=0.9, seed=3)])[0]
    again = generate_batch(model, tokenizer, [GenerationRequest(ids, 10, temperature=1.0, top_p=0.9, seed=3)])[0]
    assert first.token_ids == again.token_ids
    free = generate_batch(model, tokenizer, [GenerationRequest(ids, 10, temperature=0)])[0]
    if len(free.text) > 1:
        stop = free.text[1]
        cut = generate_batch(model, tokenizer, [GenerationRequest(ids, 10, temperature=0, stop=[stop])])[0]
        assert stop not in cut.text and cut.finish_reason == "stop"


def test_a_vanishing_temperature_decodes_greedily_instead_of_overflowing():
    """logits / 1e-40 is inf, and sampling from it raises: under GREEDY_BELOW the request is greedy (vLLM's rule),
    and one such request in a batch leaves the others sampling as asked."""
    model, tokenizer = _model_and_tokenizer()
    ids = tokenizer("def", add_special_tokens=False)["input_ids"]
    greedy = generate_batch(model, tokenizer, [GenerationRequest(ids, 8, temperature=0)])[0]
    tiny, sampled = generate_batch(
        model, tokenizer, [GenerationRequest(ids, 8, temperature=1e-40), GenerationRequest(ids, 8, seed=3)]
    )
    assert tiny.token_ids == greedy.token_ids
    assert sampled.token_ids == generate_batch(model, tokenizer, [GenerationRequest(ids, 8, seed=3)])[0].token_ids


def test_padded_embedding_rows_are_never_sampled():
    """`model.vocab_multiple` pads the embedding past the tokenizer: make the padded ids the most likely and check
    that generation still only returns the tokenizer's ids."""
    torch.manual_seed(0)
    tokenizer = train_bpe(TEXTS, vocab_size=300)
    section = ModelSection(vocab_multiple=128)
    model = build_model(section, len(tokenizer), 64, tokenizer.eos_token_id, tokenizer.pad_token_id).eval()
    rows = model.get_input_embeddings().num_embeddings
    assert rows % 128 == 0 and rows > len(tokenizer)
    with torch.no_grad():
        model.get_output_embeddings().weight[len(tokenizer) :] = 5.0  # tied: the padded rows win every argmax
    ids = tokenizer("def", add_special_tokens=False)["input_ids"]
    for request in (GenerationRequest(ids, 8, temperature=0), GenerationRequest(ids, 8, temperature=1.0, seed=1)):
        (result,) = generate_batch(model, tokenizer, [request])
        assert result.token_ids and max(result.token_ids) < len(tokenizer)


def test_streamed_deltas_add_up_to_the_reply_and_never_show_a_stop_string():
    model, tokenizer = _model_and_tokenizer()
    ids = tokenizer("def", add_special_tokens=False)["input_ids"]
    free = generate_batch(model, tokenizer, [GenerationRequest(ids, 12, temperature=0)])[0]
    stop = free.text[3:5] if len(free.text) >= 5 else free.text[-1:]
    request = GenerationRequest(ids, 12, temperature=0, stop=[stop])
    (whole,) = generate_batch(model, tokenizer, [request])
    pieces = [step[0] for step in generate_steps(model, tokenizer, [request]) if step[0] is not None]
    streamed = "".join(d.text for d in pieces)
    assert streamed == whole.text and stop not in streamed
    # A piece never runs ahead into text the stop string later cuts.
    assert all(whole.text.startswith("".join(d.text for d in pieces[: i + 1])) for i in range(len(pieces)))
    assert pieces[-1].finish_reason == whole.finish_reason == "stop"
    assert all(d.finish_reason is None for d in pieces[:-1])


class _CountingTokenizer:
    """The real tokenizer, noting how many ids each decode is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def test_row_text_decodes_incrementally_holds_split_characters_and_cuts_at_a_stop_string():
    tokenizer = train_bpe(TEXTS, vocab_size=300)  # never saw these characters: each is split into byte tokens
    text = "print('naïve café — 日本語') " * 8 + "return STOP after"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2, "the test needs characters split over several tokens"
    counting = _CountingTokenizer(tokenizer)
    row = RowText(counting, stop=["STOP"])
    pieces, stopped_at = [], None
    for position, token in enumerate(ids):
        stopped = row.push(token)
        pieces.append(row.delta(finished=stopped))
        assert "\ufffd" not in pieces[-1], "half a character was released"
        if stopped:
            stopped_at = position
            break
    expected = text[: text.index("STOP")]
    assert "".join(pieces) == expected and tokenizer.decode(ids[: stopped_at + 1]).startswith(expected + "ST")
    # Each step decodes a few tokens, not the whole reply so far.
    assert max(counting.lengths) <= 8, max(counting.lengths)


def test_first_step_logits_of_a_padded_row_match_the_row_alone():
    """Left padding must not change what a row computes: fp32, deterministic algorithms, within 1e-4 (where a
    near-tie could flip a greedy token, the logits are the thing to compare)."""
    model, tokenizer = _model_and_tokenizer()
    torch.use_deterministic_algorithms(True)
    try:
        short = tokenizer("class", add_special_tokens=False)["input_ids"]
        long = tokenizer("import os\nprint(os.getcwd())", add_special_tokens=False)["input_ids"]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([[pad] * (len(long) - len(short)) + short, long])
        mask = torch.tensor([[0] * (len(long) - len(short)) + [1] * len(short), [1] * len(long)])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            batched = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            alone = model(input_ids=torch.tensor([short])).logits[0, -1]
        assert torch.allclose(batched[0], alone, atol=1e-4)
    finally:
        torch.use_deterministic_algorithms(False)


def test_int8_quantizes_gpt2_conv1d_layers_and_stays_close():
    from raylm.serving.quantize import int8_fraction, quantize_int8

    model, tokenizer = _model_and_tokenizer()
    ids = torch.tensor([tokenizer("def add(a, b):", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        full = model(ids).logits
    assert int8_fraction(model) == 0
    fraction = quantize_int8(model)
    # Every projection of every block (GPT-2's Conv1D) is int8; the tied embedding/head matrix is not.
    blocks = sum(
        p.numel() for n, p in model.named_parameters() if ".h." in n and n.endswith(".weight") and p.dim() == 2
    )
    everything = sum(p.numel() for p in model.parameters())
    assert abs(fraction - blocks / everything) < 1e-6 and fraction > 0.5
    with torch.no_grad():
        quantized = model(ids).logits
    assert (quantized - full).abs().max() < 0.05 * full.abs().max()
    assert (quantized.argmax(-1) == full.argmax(-1)).float().mean() >= 0.9


def test_a_cancelled_request_stops_at_the_next_step_and_a_batch_of_them_ends():
    model, tokenizer = _model_and_tokenizer()
    ids = tokenizer("def", add_special_tokens=False)["input_ids"]
    kept, dropped = GenerationRequest(ids, 20, temperature=0), GenerationRequest(ids, 50, temperature=0)
    steps = generate_steps(model, tokenizer, [kept, dropped])
    next(steps)
    dropped.cancelled.set()
    rest = list(steps)
    assert all(step[1] is None for step in rest)  # the cancelled row is done from the next step on
    assert len(rest) == 19  # the batch ends with the row still wanted, not with the cancelled one's 50
    alone = GenerationRequest(ids, 50, temperature=0)
    steps = generate_steps(model, tokenizer, [alone])
    next(steps)
    alone.cancelled.set()
    assert list(steps) == []
