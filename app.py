"""Talk to an AZeroS model in the browser: microphone or upload, text, a multi-turn chat.

    pip install -r requirements-app.txt
    python app.py --model exp/demo/stage2              # then open http://127.0.0.1:7860
    python app.py --model path/to/azeros --host 0.0.0.0 --port 8000

The page: record or upload a clip, type an optional message (or only a message), and the answer
streams in token by token. Settings: a system prompt (a new one starts a new conversation), the
temperature (0: greedy, as the official evaluation), and spoken replies, read aloud by the bundled
eSpeak NG (recipe/tts.py), a robotic stand-in for the official release's CosyVoice2. Clear starts
over. Examples come from the demo's held-out clips when the model folder sits in a demo.py output
(DIR/../corpus).

Bad input (unreadable, silent or too long audio, an empty turn) is answered in the chat, not by a
broken page. Nothing is fetched from the internet at run time: Gradio's analytics are off and its
fonts and scripts are served from the installed package.

The chat (section 1) keeps the conversation. The official service answers turn k by feeding the
LLM every earlier turn again (their audio embeddings and text). Here the LLM's keys and values of
the conversation so far stay in a cache: turn k feeds only what is new (the end of the last
answer, the new user message, the assistant header), and its audio goes through the encoders
once. The LLM sees the same token sequence either way, so a greedy answer is the same
(tests/test_chat.py checks that, and the work saved).

    conv = Conversation(model, system="Answer in one sentence.")
    for text in conv.ask(wave, "What is said?"):       # the answer so far, once per new token
        print(text)
    for text in conv.ask(None, "Say it in French."):   # a text turn; turn 1's audio stays cached
        print(text)

The history is kept as token ids: the assistant's own ids (its decoded text re-tokenized may split
differently), and between answers the chat template's text for the new turn. The decoding loop is
written out (greedy, or temperature + top-p as llm.GenerationOptions says), because transformers'
generate() would re-feed its inputs_embeds: it has no way to be given only the new ones.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.generation import TemperatureLogitsWarper, TopPLogitsWarper

import data
import llm
from llm import GenerationOptions
from support import checks, model_support

QUESTIONS = ("", "Repeat what was said.", "Is the speaker a man or a woman?")  # as demo.py asks
EXAMPLES = 6
ANSWERING = "answering..."  # the status line while an answer streams (Stop acts on it)

# --------------------------------------------------------------------------------------------------
# 1. The chat: one conversation with a model, the LLM's KV cache kept between turns
# --------------------------------------------------------------------------------------------------


class Conversation:
    """One chat with one model: its turns so far, their token ids and the LLM's cache of them."""

    def __init__(self, model, system: str | None = None):
        self.model, self.system = model, system
        self.tokenizer = model.tokenizer
        self.audio_id = self.tokenizer.convert_tokens_to_ids(llm.AUDIO_TOKEN)
        self.stops = set(model_support.stop_token_ids(model.llm, self.tokenizer))
        # the conversation after its last complete turn
        self.messages: list[dict] = []  # as text (the chat template's input)
        self.text = ""  # what the template made of it, up to the end of the last answer
        self.ids: list[int] = []  # its token ids, each <|AUDIO|> expanded to one id per frame
        self.frames: list[torch.Tensor] = []  # the audio segments at those ids, in order
        # the LLM's state: keys and values for cache_ids (may run past `ids` by a turn cut short)
        self.cache: DynamicCache | None = None
        self.cache_ids: list[int] = []
        self.work = {"positions": 0, "clips": 0}  # fed to the LLM and to the encoders, in all
        self.answer: list[int] = []  # the last answer's token ids

    @torch.no_grad()
    def ask(self, wave: torch.Tensor | None, text: str | None,
            options: GenerationOptions | None = None) -> Iterator[str]:
        """One user turn (a 16 kHz waveform, a text, or both) -> the answer so far, after each new
        token. The turn joins the conversation when its answer is complete; a turn abandoned half
        way leaves nothing behind (its cached keys are cut off at the next turn)."""
        options = options or GenerationOptions()
        user = self.model.user_message(text, with_audio=wave is not None)
        if not user["content"]:
            raise checks.CheckError("an empty turn: record or upload audio, or type a message")
        segments = self.encode(wave) if wave is not None else []
        messages = [*self.messages, user]
        prompt_text, ids = self.history(messages, segments)
        max_new = self.room(len(ids), options.max_new_tokens)
        frames = [*self.frames, *segments]
        answer, shown, reply = [], "", ""
        for answer in self.stream(ids, frames, options, max_new):
            reply = self.tokenizer.decode(answer, skip_special_tokens=True)
            if reply != shown and not reply.endswith("\ufffd"):  # half a UTF-8 character: wait
                shown = reply
                yield reply
        if reply != shown:
            yield reply
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        self.text, self.ids, self.frames = prompt_text + reply, ids + answer, frames
        self.answer = answer

    def encode(self, wave: torch.Tensor) -> list[torch.Tensor]:
        """A waveform -> its LLM-width audio segments (paralinguistic, speech), computed once."""
        self.work["clips"] += 1
        with self.model.autocast():
            return self.model.audio_segments(self.model.features([wave]))[0]

    def history(self, messages: list[dict], segments: list[torch.Tensor]) -> tuple[str, list[int]]:
        """The whole conversation up to the new answer -> (text, ids). A ChatML template only
        appends to what it rendered before, so only the new text is tokenized; a template that
        rewrites earlier turns (some drop old reasoning) has it all re-tokenized."""
        text = llm.chat_text(self.tokenizer, messages, training=False, system=self.system)
        if text.startswith(self.text):
            new = self.tokenizer.encode(text[len(self.text):], add_special_tokens=False)
            return text, self.ids + self.expand(new, segments)
        all_ids = self.tokenizer.encode(text, add_special_tokens=False)
        return text, self.expand(all_ids, [*self.frames, *segments])

    def expand(self, ids: list[int], segments: list[torch.Tensor]) -> list[int]:
        try:
            return llm.expand_audio_tokens(ids, self.audio_id, [s.shape[0] for s in segments])
        except ValueError as e:  # e.g. "<|AUDIO|>" typed into the text
            raise checks.CheckError(f"this turn: {e}") from None

    def room(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """New tokens that still fit the LLM's context after the conversation so far."""
        limit = getattr(self.model.llm.config, "max_position_embeddings", None)
        if not isinstance(limit, int) or limit <= 0:
            return max_new_tokens
        if prompt_tokens >= limit:
            raise checks.CheckError(f"the conversation is {prompt_tokens} tokens long (text and "
                                    f"audio frames), over the LLM's context of {limit}: press "
                                    "Clear to start a new one")
        return min(max_new_tokens, limit - prompt_tokens)

    # ----------------------------------------------------------------------------------------------
    # The decoding loop

    def stream(self, ids: list[int], frames: list[torch.Tensor], options: GenerationOptions,
               max_new: int) -> Iterator[list[int]]:
        """Feed what the cache lacks of `ids`, then one token at a time -> the answer's ids so far.
        A stop token ends the answer and is not part of it (the template closes the turn)."""
        lm = self.model.llm
        start = self.rewind(ids)
        pending = ids[start:]
        x = self.embed(pending, frames, skip=ids[:start].count(self.audio_id))
        answer: list[int] = []
        for _ in range(max_new):
            out = lm(inputs_embeds=x, past_key_values=self.cache, use_cache=True,
                     logits_to_keep=1)
            self.cache_ids += pending
            self.work["positions"] += len(pending)
            token = self.pick(out.logits[0, -1].float(), options)
            if token in self.stops:
                break
            answer.append(token)
            yield answer
            pending = [token]
            x = lm.get_input_embeddings()(torch.tensor([pending], device=x.device))

    def rewind(self, ids: list[int]) -> int:
        """Keep the cache's longest prefix shared with `ids`, drop the rest -> where feeding
        starts. At least the last id is fed: its position gives the first answer token."""
        keep = 0
        limit = min(len(self.cache_ids), len(ids) - 1)
        while keep < limit and self.cache_ids[keep] == ids[keep]:
            keep += 1
        if self.cache is None:
            self.cache = DynamicCache(config=self.model.llm.config)
        if keep < len(self.cache_ids):
            try:
                self.cache.crop(keep - len(self.cache_ids))  # a negative count: remove that many
            except (RuntimeError, ValueError):  # a cache kind that cannot go back: start afresh
                self.cache, keep = DynamicCache(config=self.model.llm.config), 0
        self.cache_ids = self.cache_ids[:keep]
        return keep

    def embed(self, ids: list[int], frames: list[torch.Tensor], skip: int) -> torch.Tensor:
        """Token ids (1, n, D) embeddings, with the audio frames after the first `skip` spliced
        in at the <|AUDIO|> positions."""
        embedding = self.model.llm.get_input_embeddings()
        device = embedding.weight.device
        ids_t = torch.tensor([ids], device=device)
        x = embedding(ids_t)
        if self.audio_id in ids:
            rows = torch.cat(frames).to(device)[skip:]
            x = llm.splice_audio(x, ids_t, self.audio_id, rows[:ids.count(self.audio_id)])
        return x

    def pick(self, logits: torch.Tensor, options: GenerationOptions) -> int:
        """The next token: the most likely (greedy), or drawn at options.temperature from the
        smallest set holding options.top_p of the probability (transformers' own warpers, as
        generate() uses them). The audio placeholder is never said: as text it would ask the next
        turn for audio that is not there."""
        logits[self.audio_id] = float("-inf")
        if not options.temperature:
            return int(logits.argmax())
        scores = TemperatureLogitsWarper(options.temperature)(None, logits[None])
        if options.top_p is not None and options.top_p < 1.0:
            scores = TopPLogitsWarper(options.top_p)(None, scores)
        return int(torch.multinomial(scores.softmax(-1), 1))


# A recording whose loudest sample is below this is taken for a muted or missing microphone:
# speech peaks tens of dB higher, and a muted browser track delivers exact zeros.
SILENT_DBFS = -60.0
# What browsers record (MediaRecorder) and libsndfile does not read: a hint beats "unreadable".
BROWSER_FORMATS = (".webm", ".weba", ".m4a", ".mp4", ".aac")


def chat_clip(path, limit: float | None):
    """One recorded or uploaded clip -> 16 kHz waveform, or a CheckError saying what is
    wrong with it (unreadable or browser-only format, too long or short, silent)."""
    name = os.path.basename(str(path))
    try:
        checks.audio_file(path, limit)
        wave = data.load_audio(path)
    except Exception as e:
        if not checks.expected_failure(e):
            raise
        if str(path).lower().endswith(BROWSER_FORMATS):
            raise checks.CheckError(f"{name}: the {Path(path).suffix} format cannot be read here "
                                    "(only what libsndfile reads: wav, flac, ogg/opus, mp3); "
                                    "convert it, or record again") from None
        raise checks.CheckError(checks.first_line(e).replace(str(path), name)) from None
    peak = float(wave.abs().max())
    level = 20 * math.log10(peak) if peak > 0 else float("-inf")
    if level < SILENT_DBFS:
        raise checks.CheckError(f"{name}: the audio is silent (peak {level:.0f} dBFS, below "
                                f"{SILENT_DBFS:g} dBFS); check the microphone")
    return wave


# --------------------------------------------------------------------------------------------------
# 2. The page
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="A web page to talk to an AZeroS model.")
    p.add_argument("--model", required=True, help="model folder (release layout) or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (%(default)s; "
                   "0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (%(default)s)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when it works)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="LLM dtype; auto = the checkpoint's on GPU, float32 on CPU")
    p.add_argument("--max-new-tokens", type=int, default=200, help="answer length (%(default)s)")
    p.add_argument("--max-audio-seconds", type=float, default=checks.MAX_AUDIO_SECONDS,
                   help=checks.MAX_AUDIO_HELP)
    p.add_argument("--examples", nargs="*", help="manifests whose first clips are the page's "
                   "examples (default: DIR/../corpus/test_sentences.jsonl and real_test.jsonl, "
                   "the demo's held-out clips, where they exist)")
    return p.parse_args(argv)


class App:
    """The server side of the page: one model; each browser tab holds its own Conversation."""

    def __init__(self, model, max_new_tokens: int, max_audio_seconds: float):
        self.model = model
        self.max_new_tokens, self.max_audio_seconds = max_new_tokens, max_audio_seconds
        self.speaker = None  # eSpeak NG, loaded on the first spoken reply

    def respond(self, conv, history, audio: str | None, text: str | None, system: str | None,
                temperature: float | None):
        """One turn -> yields (conversation, chat history, answer or None, status line, cleared
        audio input, cleared text input), once per new token of the answer."""
        history, text = list(history or []), (text or "").strip()
        system = (system or "").strip() or None
        if conv is None or conv.system != system:
            if conv is not None and conv.messages:
                history.append(note("A new system prompt: a new conversation starts here."))
            conv = Conversation(self.model, system)
        if audio:
            history.append({"role": "user", "content": {"path": audio}})
        if text:
            history.append({"role": "user", "content": text})
        history.append({"role": "assistant", "content": ""})
        try:
            start, first, reply = time.perf_counter(), None, ""
            wave = chat_clip(audio, self.max_audio_seconds) if audio else None
            options = GenerationOptions(self.max_new_tokens, temperature or None)
            for reply in conv.ask(wave, text, options):
                first = first or time.perf_counter() - start
                history[-1] = {"role": "assistant", "content": reply}
                yield conv, history, None, ANSWERING, None, ""
            whole = time.perf_counter() - start
            status = (f"turn {len(conv.messages) // 2}: first token after {first or whole:.2f} "
                      f"s, whole answer {whole:.2f} s ({len(conv.answer)} tokens)")
            print(status, flush=True)  # the server's log keeps the latencies
            yield conv, history, reply, status, None, ""
        except Exception as e:  # the page stays alive: the problem becomes a chat message
            if not checks.expected_failure(e):
                traceback.print_exc()  # a bug: its traceback goes to the server's log
            history[-1] = note(f"Not answered: {checks.first_line(e)}")
            yield conv, history, None, "", None, text

    def speak(self, answer: str | None, enabled: bool):
        """The answer read aloud -> (sample rate, int16 samples) for the page, or None."""
        if not (enabled and answer and answer.strip()):
            return None
        from recipe.tts import Speaker

        self.speaker = self.speaker or Speaker()
        wave = self.speaker.say(answer)
        return self.speaker.sample_rate, (wave.clamp(-1, 1) * 32767).short().numpy()


def stopped(history: list, status: str) -> tuple[list, str]:
    """Stop pressed -> (chat history, status line): a note under an answer cut short; nothing
    when no answer was running."""
    if status != ANSWERING:
        return history, status
    return [*history, note("Stopped: this answer is not part of the conversation.")], "stopped"


def note(text: str) -> dict:
    """A line from the page itself, not from the model."""
    return {"role": "assistant", "content": text, "metadata": {"title": "note"}}


def example_rows(paths) -> list[list[str]]:
    """[audio, question] rows from the first clips of each manifest that exists."""
    from support.manifest import read_manifest

    rows, paths = [], [p for p in paths if Path(p).is_file()]
    for path in paths:
        records = read_manifest(path)[:EXAMPLES // len(paths)]
        rows += [[r.audio, QUESTIONS[i % len(QUESTIONS)]] for i, r in enumerate(records)]
    return rows


def build_page(app: App, examples: list[list[str]], title: str):
    import gradio as gr

    with gr.Blocks(title="AZeroS") as page:
        gr.Markdown(f"## Talk to AZeroS\nModel: `{title}`. Record or upload a clip, add a "
                    "message if you like, press Send. The conversation continues until Clear.")
        conv, answer = gr.State(None), gr.State(None)
        chatbot = gr.Chatbot(label="Conversation", height=420)
        with gr.Row():
            audio = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Audio",
                             scale=2, elem_id="audio-in")
            with gr.Column(scale=2):
                text = gr.Textbox(label="Message", placeholder="optional with audio", lines=2)
                with gr.Row():
                    send = gr.Button("Send", variant="primary")
                    stop = gr.Button("Stop answering", elem_id="stop")
                    clear = gr.Button("Clear", elem_id="clear")
        status = gr.Markdown("", elem_id="status")
        reply_audio = gr.Audio(label="Spoken reply", type="numpy", autoplay=True,
                               interactive=False, elem_id="spoken-reply")
        with gr.Accordion("Settings", open=False):
            system = gr.Textbox(label="System prompt", placeholder="the LLM's default")
            temperature = gr.Slider(0, 1.5, value=0, step=0.05,
                                    label="Temperature (0: greedy, as the official evaluation)")
            spoken = gr.Checkbox(False, label="Spoken replies (eSpeak NG)")
        if examples:
            gr.Examples(examples, inputs=[audio, text], label="Held-out clips from the demo")

        turn = dict(fn=app.respond, inputs=[conv, chatbot, audio, text, system, temperature],
                    outputs=[conv, chatbot, answer, status, audio, text])
        turns = [event(**turn) for event in (send.click, text.submit)]
        for t in turns:
            t.then(app.speak, [answer, spoken], reply_audio)
        # Stop cancels the running turn: gradio stops iterating respond(), so Conversation.ask
        # never completes and the half answer does not join the conversation (its cached keys are
        # cut off at the next turn); the page says so under it
        stop.click(stopped, inputs=[chatbot, status], outputs=[chatbot, status], cancels=turns)
        clear.click(lambda: (None, [], None, "", None, "", None),
                    outputs=[conv, chatbot, answer, status, audio, text, reply_audio])
    return page


def main(argv=None) -> None:
    """Load the model, then serve the chat page until the server stops."""
    args = parse_args(argv)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no calls home
    if importlib.util.find_spec("gradio") is None:  # before a minute of loading the model
        raise checks.CheckError("app.py needs gradio: pip install -r requirements-app.txt")
    checks.numbers(args, positive=("max_new_tokens",), non_negative=("max_audio_seconds",))
    checks.device(args.device)
    app = App(load_model(args), args.max_new_tokens, args.max_audio_seconds)
    corpus = Path(args.model).resolve().parent / "corpus"
    manifests = args.examples if args.examples is not None else [
        corpus / "test_sentences.jsonl", corpus / "real_test.jsonl"]
    examples = example_rows(manifests)
    page = build_page(app, examples, args.model)
    page.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, ssr_mode=False, footer_links=[],
        allowed_paths=sorted({str(Path(a).parent) for a, _ in examples}))


def load_model(args):
    model_support.quiet_libraries()
    from model import AZeroS

    device = checks.pick_device(args.device)
    checks.cpu_fallback(model_support.release_llm_parameters(args.model), args.device, device,
                        f"--model {args.model}")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    return AZeroS.from_pretrained(args.model, device=device, dtype=dtype)


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
