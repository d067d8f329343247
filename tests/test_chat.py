"""app.Conversation (the multi-turn engine of app.py) and app.py's turn handler, without a browser.

The claim to check: keeping the KV cache between turns gives the answer that re-feeding the whole
conversation gives (transformers' generate() on all of it, every clip encoded again), while feeding
the LLM only the new positions and encoding each clip once."""
import numpy as np
import pytest
import soundfile as sf
import torch

import app
import data
import llm
from app import Conversation
from llm import GenerationOptions
from support import checks
from tiny import cached_tiny_release, write_wav

GREEDY = GenerationOptions(max_new_tokens=10)
SYSTEM = "Answer briefly."


@pytest.fixture(scope="module")
def model():
    from model import AZeroS

    return AZeroS.from_pretrained(cached_tiny_release(), device="cpu")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return [data.load_audio(write_wav(folder / f"{i}.wav", 1.0 + 0.5 * i, seed=i))
            for i in range(2)]


def answer(conv, wave, text, options=GREEDY) -> str:
    *_, reply = conv.ask(wave, text, options)
    return reply


def refeed(model, prompt_ids: list[int], waves: list, options=GREEDY) -> list[int]:
    """The official way: every clip encoded again, the whole conversation fed to generate()."""
    with model.autocast():
        segments = [s for w in waves for s in model.audio_segments(model.features([w]))[0]]
    ids = torch.tensor([prompt_ids])
    embeds = model.llm.get_input_embeddings()(ids)
    if segments:
        embeds = llm.splice_audio(embeds, ids, model.tokenizer.convert_tokens_to_ids(
            llm.AUDIO_TOKEN), torch.cat(segments))
    batch = llm.Batch(ids, embeds, torch.ones_like(ids), None)
    out = llm.generate_ids(model.llm, model.tokenizer, batch, options)[0].tolist()
    stops = set(llm.model_support.stop_token_ids(model.llm, model.tokenizer))
    return out[:next((i for i, t in enumerate(out) if t in stops), len(out))]


def collapse_audio(ids: list[int], audio_id: int) -> list[int]:
    """One <|AUDIO|> per run of them: the ids the template's text tokenizes to."""
    return [t for i, t in enumerate(ids) if t != audio_id or i == 0 or ids[i - 1] != audio_id]


def test_first_turn_is_model_generate(model, clips):
    conv = Conversation(model, system=SYSTEM)
    reply = answer(conv, clips[0], "Describe the audio.")
    expected = model.generate([clips[0]], [[model.user_message("Describe the audio.")]],
                              GREEDY, system=SYSTEM)[0]
    assert reply == expected and conv.answer
    assert conv.work == {"positions": len(conv.ids) - 1, "clips": 1}  # the last token: unfed


def test_cached_turns_answer_as_refeeding_and_do_less_work(model, clips):
    conv = Conversation(model, system=SYSTEM)
    turns = [(clips[0], "Describe the audio."), (clips[1], "And this one?"), (None, "Thanks.")]
    audio_id = conv.audio_id
    refed = 0  # positions the official way feeds: every turn's whole prompt, then its answer
    for k, (wave, text) in enumerate(turns):
        cached, before, known = len(conv.cache_ids), dict(conv.work), len(conv.ids)
        answer(conv, wave, text)
        prompt = conv.ids[:len(conv.ids) - len(conv.answer)]
        waves = [w for w, _ in turns[:k + 1] if w is not None]
        assert conv.answer == refeed(model, prompt, waves), f"turn {k + 1}"
        # the history is the chat template's rendering of the conversation, earlier answers included
        rendered = llm.chat_text(model.tokenizer, conv.messages[:-1], training=False,
                                 system=SYSTEM)
        assert model.tokenizer.decode(collapse_audio(prompt, audio_id)) == rendered
        # less work: the cache held the conversation so far (but an answer's last, unfed token),
        # only the positions it lacked were fed, and only the new clip was encoded
        assert cached >= known - 1
        fed_answer = len(conv.cache_ids) - len(prompt)  # answer tokens fed (all but a last one)
        assert conv.work["positions"] - before["positions"] == len(prompt) - cached + fed_answer
        assert conv.work["clips"] - before["clips"] == (wave is not None)
        assert conv.cache.get_seq_length() == len(conv.cache_ids)
        refed += len(prompt) + fed_answer
    # each position of the conversation was fed to the LLM once; re-feeding feeds early ones again
    assert conv.work == {"positions": len(conv.cache_ids), "clips": 2}
    assert conv.work["positions"] < refed


def test_turn_cut_short_leaves_nothing_behind(model, clips):
    conv = Conversation(model, system=SYSTEM)
    answer(conv, clips[0], "Describe the audio.")
    stream = conv.ask(clips[1], "Something else.", GREEDY)
    next(stream), next(stream)
    stream.close()  # the page was closed half way through the answer
    assert len(conv.messages) == 2
    reply = answer(conv, None, "Thanks.")

    fresh = Conversation(model, system=SYSTEM)
    answer(fresh, clips[0], "Describe the audio.")
    assert reply == answer(fresh, None, "Thanks.")
    assert conv.ids == fresh.ids


def test_a_new_system_prompt_reuses_nothing_it_should_not(model, clips):
    """A template that rewrites earlier text (here: another system prompt) re-tokenizes it all;
    the cache keeps only the common prefix, and the answer is that of a fresh conversation."""
    conv = Conversation(model, system=SYSTEM)
    answer(conv, clips[0], "Describe the audio.")
    conv.system = "Answer at length."
    reply = answer(conv, None, "Thanks.")
    fresh_ids = llm.expand_audio_tokens(
        model.tokenizer.encode(llm.chat_text(model.tokenizer, conv.messages[:-1], training=False,
                                             system=conv.system), add_special_tokens=False),
        conv.audio_id, [f.shape[0] for f in conv.frames])
    assert conv.ids[:len(conv.ids) - len(conv.answer)] == fresh_ids
    assert conv.answer == refeed(model, fresh_ids, [clips[0]])
    assert reply == model.tokenizer.decode(conv.answer, skip_special_tokens=True)


def test_sampling(model):
    """top_p below any one token's probability keeps only the most likely: greedy at any
    temperature; a high temperature draws other answers, the same ones for the same seed."""
    def ask(options):
        return answer(Conversation(model), None, "Describe a cat.", options)

    greedy = ask(GREEDY)
    assert ask(GenerationOptions(max_new_tokens=10, temperature=1.3, top_p=1e-6)) == greedy
    hot = GenerationOptions(max_new_tokens=10, temperature=1.5)
    torch.manual_seed(0)
    first = ask(hot)
    torch.manual_seed(0)
    assert ask(hot) == first != greedy


def test_bad_turns_are_one_line_errors(model, clips, monkeypatch):
    conv = Conversation(model)
    with pytest.raises(checks.CheckError, match="an empty turn"):
        answer(conv, None, "   ")
    with pytest.raises(checks.CheckError, match=r"1 <\|AUDIO\|> placeholder\(s\) but the audio "
                                                r"gives 0"):
        answer(conv, None, "What is <|AUDIO|>?")
    assert conv.messages == [] and conv.work["positions"] == 0
    n_prompt = len(model.tokenizer.encode(llm.chat_text(
        model.tokenizer, [{"role": "user", "content": "Hi."}], training=False)))
    monkeypatch.setattr(model.llm.config, "max_position_embeddings", n_prompt + 3)
    answer(conv, None, "Hi.")  # the context caps the answer at 3 tokens
    assert len(conv.answer) <= 3
    with pytest.raises(checks.CheckError, match="over the LLM's context of .* press Clear"):
        answer(conv, None, "And again?")


def test_chat_clip_refuses_bad_audio(tmp_path):
    rate = 16000
    sf.write(tmp_path / "silent.wav", np.zeros(rate, np.int16), rate, subtype="PCM_16")
    with pytest.raises(checks.CheckError, match=r"silent.wav: the audio is silent \(peak -inf"):
        app.chat_clip(tmp_path / "silent.wav", 50)
    quiet = np.full(rate, 10, np.int16)  # 10 / 32768: -70 dBFS
    sf.write(tmp_path / "quiet.wav", quiet, rate, subtype="PCM_16")
    with pytest.raises(checks.CheckError, match=r"peak -70 dBFS, below -60 dBFS"):
        app.chat_clip(tmp_path / "quiet.wav", 50)
    write_wav(tmp_path / "long.wav", 51.0)
    with pytest.raises(checks.CheckError, match=r"long.wav: 51.0 s of audio is over the limit "
                                                r"of 50 s"):
        app.chat_clip(tmp_path / "long.wav", 50)
    (tmp_path / "rec.webm").write_bytes(b"\x1aE\xdf\xa3" + bytes(200))  # an EBML (WebM) header
    with pytest.raises(checks.CheckError, match=r"rec.webm: the .webm format cannot be read"):
        app.chat_clip(tmp_path / "rec.webm", 50)
    (tmp_path / "junk.wav").write_bytes(b"not audio")
    with pytest.raises(checks.CheckError, match=r"^junk.wav: unreadable audio"):
        app.chat_clip(tmp_path / "junk.wav", 50)
    wave = app.chat_clip(write_wav(tmp_path / "ok.wav", 1.0), 50)
    assert wave.shape == (rate,)


def test_app_turns_stream_and_bad_input_becomes_a_chat_message(model, tmp_path):
    import app

    page = app.App(model, max_new_tokens=6, max_audio_seconds=50)
    shown = []
    for step in page.respond(None, [], str(write_wav(tmp_path / "a.wav", 1.0)), "Hi", "", 0):
        shown.append(step[1][-1]["content"])  # what the page shows at that moment
    conv, history, reply, status, audio, text = step
    # streamed: a longer answer at each new token, then the finished one with the summary
    assert 3 <= len(shown) <= len(conv.answer) + 1 and shown[-2] == shown[-1]
    assert all(b.startswith(a) and a != b for a, b in zip(shown[:-2], shown[1:-1]))
    assert [m["role"] for m in history] == ["user", "user", "assistant"]
    assert history[0]["content"] == {"path": str(tmp_path / "a.wav")}
    assert history[-1]["content"] == reply == model.tokenizer.decode(conv.answer,
                                                                     skip_special_tokens=True)
    assert status.startswith("turn 1: first token after ")
    assert status.endswith(f"({len(conv.answer)} tokens)")
    assert (audio, text) == (None, "")  # the inputs are cleared for the next turn

    (tmp_path / "junk.wav").write_bytes(b"not audio")
    for clip, typed, message in ((None, " ", "an empty turn: record or upload audio"),
                                 (str(tmp_path / "junk.wav"), "", "junk.wav: unreadable audio")):
        *_, (conv2, history2, reply2, status2, _, _) = page.respond(conv, history, clip, typed,
                                                                    "", 0)
        assert conv2 is conv and reply2 is None and status2 == ""
        assert history2[-1]["content"].startswith(f"Not answered: {message}")
        assert len(conv.messages) == 2  # the failed turn is not part of the conversation

    *_, (new, history3, *_) = page.respond(conv, history, None, "Hello", "Be brief.", 0)
    assert new is not conv and new.system == "Be brief." and len(new.messages) == 2
    assert "a new conversation starts" in history3[len(history)]["content"]


def test_spoken_reply():
    import app

    page = app.App(None, max_new_tokens=6, max_audio_seconds=50)
    assert page.speak("hello there", False) is None and page.speak("  ", True) is None
    rate, samples = page.speak("hello there", True)
    assert rate == 16000 and samples.dtype == np.int16 and 0.2 * rate < len(samples) < 5 * rate
    assert np.abs(samples).max() > 1000  # speech, not silence


def test_stop_cancels_the_running_turn_and_says_so(model):
    """The page's Stop button cancels both ways a turn starts (Send, Enter) and notes the cut
    answer; pressed with no answer running it changes nothing."""
    pytest.importorskip("gradio")
    import app

    page = app.build_page(app.App(model, max_new_tokens=6, max_audio_seconds=50), [], "tiny")
    fns = list(page.fns.values())
    ids = {b.elem_id: i for i, b in page.blocks.items() if getattr(b, "elem_id", None)}
    turns = {f._id for f in fns if getattr(f.fn, "__name__", "") == "respond"}
    on_stop = [f for f in fns if (ids["stop"], "click") in f.targets]
    # the click runs `stopped` and gradio's own cancel function, which holds the cancelled ids
    assert len(turns) == 2 and "stopped" in [getattr(f.fn, "__name__", "") for f in on_stop]
    assert {i for f in on_stop for i in f.cancels} == turns

    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    cut, status = app.stopped(history, app.ANSWERING)
    assert cut[:2] == history and status == "stopped"
    assert cut[2]["content"] == "Stopped: this answer is not part of the conversation."
    assert app.stopped(history, "turn 1: first token after 0.10 s") == (
        history, "turn 1: first token after 0.10 s")
