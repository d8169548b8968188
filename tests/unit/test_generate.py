import torch

from raylm.config import ModelSection
from raylm.data.tokenizer import train_bpe
from raylm.models import build_model
from raylm.serving.generate import GenerationRequest, generate_batch

TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n", "class A:\n    pass\n"] * 30


def _model_and_tokenizer():
    torch.manual_seed(0)
    tokenizer = train_bpe(TEXTS, vocab_size=300)
    model = build_model(ModelSection(), len(tokenizer), 64, tokenizer.eos_token_id, tokenizer.pad_token_id).eval()
    return model, tokenizer


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
