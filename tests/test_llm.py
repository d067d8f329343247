"""llm.py: prompt text, <|AUDIO|> expansion, labels, splicing, padding, loading and generation
arguments.

Uses the fixture's 601-token ChatML tokenizer (Qwen2.5 chat template) and tiny random LLMs from
tests/tiny.py.
"""

import json

import pytest
import torch
from transformers import AutoTokenizer

import llm
from conftest import FIXTURES
from tiny import TOKENIZER_DIR, make_tiny_llm_dir

META = json.loads((FIXTURES / "azeros_tiny_expected" / "meta.json").read_text())
FWD = META["runs"]["b_forward"]
IM_START, IM_END, AUDIO, NL = 598, 599, 600, 198


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return llm.load_llm(make_tiny_llm_dir(tmp_path_factory.mktemp("llm")), dtype=torch.float32)


def test_training_text_is_plain_chatml_without_system(tok):
    assert llm.chat_text(tok, FWD["messages"][0], training=True) == FWD["text_after_CHAT_TEMPLATE"]
    with_sys = llm.chat_text(
        tok, [{"role": "user", "content": "hi"}], training=True, system="Be brief."
    )
    assert with_sys == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_truncated_response_loses_its_end(tok):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "a long answ", "truncated": True},
    ]
    expected = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\na long answ"
    assert llm.chat_text(tok, msgs, training=True) == expected


def test_inference_text_uses_tokenizer_template(tok):
    msgs = [{"role": "user", "content": "Describe the audio."}]
    text = llm.chat_text(tok, msgs, training=False)
    assert text.startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud."
    )  # Qwen2.5 default system
    assert text.endswith("<|im_start|>user\nDescribe the audio.<|im_end|>\n<|im_start|>assistant\n")
    text = llm.chat_text(tok, msgs, training=False, system="S.")
    assert text.startswith("<|im_start|>system\nS.<|im_end|>\n") and "Qwen" not in text


def test_labels_match_official_on_exact_sequence(tok):
    ids = FWD["input_ids"]
    assert llm.make_labels(ids, tok) == FWD["labels"]
    # the supervised part is the answer, <|im_end|> and the newline after it
    assert [i for i in llm.make_labels(ids, tok) if i != llm.IGNORE_INDEX][-2:] == [IM_END, NL]


def test_labels_found_by_token_sequence_not_single_id(tok):
    # A tokenizer-agnostic check: "assistant" inside the user turn and a multi-turn chat.
    msgs = [
        {"role": "user", "content": "assistant\nsay hi"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "ok"},
    ]
    ids = tok.encode(llm.chat_text(tok, msgs, training=True), add_special_tokens=False)
    labels = llm.make_labels(ids, tok)
    supervised = [i for i in labels if i != llm.IGNORE_INDEX]
    assert tok.decode(supervised) == "hi<|im_end|>\nok<|im_end|>\n"
    # truncated: the answer is supervised but no <|im_end|>
    msgs = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "partial", "truncated": True},
    ]
    ids = tok.encode(llm.chat_text(tok, msgs, training=True), add_special_tokens=False)
    assert tok.decode([i for i in llm.make_labels(ids, tok) if i != llm.IGNORE_INDEX]) == "partial"


def char_chatml_tokenizer():
    """A character-level ChatML tokenizer: "assistant" is 9 tokens, the header 11 (built in ~ms,
    offline)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?\n<>|/"))
    backend = Tokenizer(
        models.WordLevel({c: i for i, c in enumerate(chars)} | {"[UNK]": len(chars)}, "[UNK]")
    )
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"], special_tokens=True)
    return tok


def test_labels_with_multi_token_assistant_header():
    # the official rule keys on a single "assistant" id, which this tokenizer does not have
    tok = char_chatml_tokenizer()
    assert len(tok.encode(llm.ASSISTANT_HEADER, add_special_tokens=False)) == 11
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi there!"}]
    ids = tok.encode(llm.chat_text(tok, msgs, training=True), add_special_tokens=False)
    supervised = [i for i in llm.make_labels(ids, tok) if i != llm.IGNORE_INDEX]
    assert tok.decode(supervised).replace(" ", "") == "Hithere!<|im_end|>\n"
    assert (
        llm.add_audio_token(tok) == len(tok) - 1
    )  # a tokenizer without <|AUDIO|> gets it appended


def test_expand_audio_tokens_counts_and_mismatch():
    ids = [1, AUDIO, 2, AUDIO, 3]
    out = llm.expand_audio_tokens(ids, AUDIO, [3, 2])
    assert out == [1, AUDIO, AUDIO, AUDIO, 2, AUDIO, AUDIO, 3]
    with pytest.raises(ValueError, match=r"2 <\|AUDIO\|> placeholder\(s\) .* 1 segment"):
        llm.expand_audio_tokens(ids, AUDIO, [3])


def test_splice_replaces_audio_rows_in_order():
    ids = torch.tensor([[5, AUDIO, AUDIO, 6], [AUDIO, 7, 8, 9]])
    embeds = torch.zeros(2, 4, 3)
    frames = torch.arange(9, dtype=torch.float32).view(3, 3) + 1
    out = llm.splice_audio(embeds, ids, AUDIO, frames)
    assert (
        torch.equal(out[0, 1], frames[0])
        and torch.equal(out[0, 2], frames[1])
        and torch.equal(out[1, 0], frames[2])
    )
    assert out[ids != AUDIO].abs().sum() == 0
    with pytest.raises(ValueError, match="3 <.*positions in the prompt but 2 audio frames"):
        llm.splice_audio(embeds, ids, AUDIO, frames[:2])


def test_build_batch_padding_sides_and_labels(tok, tiny_llm):
    model, _ = tiny_llm
    msgs = [
        [{"role": "user", "content": "<|AUDIO|> hi"}, {"role": "assistant", "content": "yes"}],
        [
            {"role": "user", "content": "<|AUDIO|>"},
            {"role": "assistant", "content": "a longer answer"},
        ],
    ]
    audio = [[torch.randn(3, 32)], [torch.randn(5, 32)]]
    train = llm.build_batch(model, tok, msgs, audio, training=True)
    assert (train.input_ids == AUDIO).sum(1).tolist() == [3, 5]
    assert train.attention_mask[:, 0].all()  # right padding for training
    assert (train.labels[train.attention_mask == 0] == llm.IGNORE_INDEX).all()
    assert torch.equal(train.inputs_embeds[0][train.input_ids[0] == AUDIO], audio[0][0])
    infer = llm.build_batch(model, tok, [m[:1] for m in msgs], audio, training=False)
    assert infer.attention_mask[:, -1].all() and infer.labels is None  # left padding for generation
    assert (infer.input_ids[:, -3:] == torch.tensor(tok.encode(llm.ASSISTANT_HEADER))).all()
    cut = llm.build_batch(model, tok, msgs, audio, training=True, max_length=20)
    assert cut.input_ids.shape[1] == 20
    with pytest.raises(
        ValueError, match="positions in the prompt but"
    ):  # a cut through the audio is an error
        llm.build_batch(
            model,
            tok,
            msgs,
            [[torch.randn(30, 32)], [torch.randn(5, 32)]],
            training=True,
            max_length=20,
        )


def test_load_llm_frozen_eval_sdpa(tiny_llm):
    model, tok = tiny_llm
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert model.config._attn_implementation == "sdpa"
    assert len(tok) == 601


def test_add_audio_token_resizes_only_when_needed(tmp_path, tiny_llm):
    model, tok = tiny_llm
    assert (
        llm.add_audio_token(tok, model) == AUDIO
        and model.get_input_embeddings().num_embeddings == 608
    )
    small, tok2 = llm.load_llm(make_tiny_llm_dir(tmp_path, vocab=600), dtype=torch.float32)
    with pytest.warns(UserWarning, match="resizing"):
        assert llm.add_audio_token(tok2, small) == AUDIO
    assert small.get_input_embeddings().num_embeddings == 601
    assert not any(p.requires_grad for p in small.parameters())


def test_generation_is_greedy_unless_temperature(tiny_llm):
    model, tok = tiny_llm
    kw = llm.generation_kwargs(model, tok, llm.GenerationOptions(max_new_tokens=5))
    assert (
        kw["do_sample"] is False
        and kw["repetition_penalty"] == 1.0
        and IM_END in kw["eos_token_id"]
    )
    kw = llm.generation_kwargs(model, tok, llm.GenerationOptions(temperature=0.7, top_p=0.9))
    assert (
        kw["do_sample"] is True
        and kw["temperature"] == 0.7
        and kw["top_p"] == 0.9
        and kw["top_k"] == 0
    )


def two_answers(tok, model):
    """A right-padded training batch of two rows with answers of different lengths."""
    msgs = [
        [{"role": "user", "content": "<|AUDIO|> hi"}, {"role": "assistant", "content": "yes"}],
        [
            {"role": "user", "content": "<|AUDIO|>"},
            {"role": "assistant", "content": "a longer answer"},
        ],
    ]
    width = model.get_input_embeddings().weight.shape[1]
    return llm.build_batch(model, tok, msgs, [[torch.randn(3, width)], [torch.randn(5, width)]],
                           training=True)


@torch.no_grad()
def three_ways(model, batch):
    """answer_logits, the model's own logits at every position, and the decoder's hidden states."""
    inputs = dict(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask)
    return (llm.answer_logits(model, batch), model(**inputs).logits,
            model.base_model(**inputs).last_hidden_state)


def test_answer_logits_are_the_full_forward_at_answer_positions(tok, tiny_llm):
    model, _ = tiny_llm
    batch = two_answers(tok, model)
    (logits, targets, mask), full, hidden = three_ways(model, batch)
    assert torch.equal(mask, batch.labels[:, 1:] != llm.IGNORE_INDEX)
    assert torch.equal(targets, batch.labels[:, 1:][mask]) and mask.sum(1).min() > 0
    # the same products, only fewer rows: equal up to fp32 rounding of a length-H dot product
    # (|error| <= H * u * |h|.|w|, Higham Sec. 3.1)
    head = model.get_output_embeddings().weight
    h = hidden[:, :-1][mask]
    bound = head.shape[1] * 2.0**-24 * (h.abs() @ head.abs().T)
    assert ((logits - full[:, :-1][mask]).abs() <= bound).all()
    nll = llm.token_losses(logits, targets, mask)
    assert (nll[~mask] == 0).all()
    ref = torch.nn.functional.cross_entropy(
        full[:, :-1].reshape(-1, head.shape[0]), batch.labels[:, 1:].reshape(-1)
    )
    assert torch.allclose(nll.sum() / mask.sum(), ref, rtol=1e-5)


def test_a_head_with_soft_capping_runs_its_own_forward(tok):
    """Gemma-2 caps its logits after the output projection: projecting the hidden states alone
    would score with uncapped logits, so such families take the model's own forward."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=608, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16, final_logit_softcapping=2.0)
    model = llm.freeze(Gemma2ForCausalLM(config))
    with torch.no_grad():
        model.model.norm.weight.fill_(50.0)  # logits well past the cap
    assert model.config.model_type not in llm.PLAIN_HEAD_FAMILIES
    batch = two_answers(tok, model)
    (logits, _, mask), full, hidden = three_ways(model, batch)
    with torch.no_grad():
        uncapped = model.get_output_embeddings()(hidden[:, :-1][mask])
    assert torch.equal(logits, full[:, :-1][mask])
    assert logits.abs().max() <= 2.0 < uncapped.abs().max()
