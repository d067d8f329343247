"""Talk to an AZeroS model in the browser: microphone or upload, text, a multi-turn chat.

    pip install -r requirements-app.txt
    python app.py --model exp/demo/stage2              # then open http://127.0.0.1:7860
    python app.py --model path/to/azeros --host 0.0.0.0 --port 8000

The page: record or upload a clip, type an optional message (or only a message), and the answer
streams in token by token. The chat keeps the conversation; every turn reuses the LLM's KV cache of
the turns before it (chat.py), so earlier audio is never encoded again. Settings: a system prompt
(a new one starts a new conversation), the temperature (0: greedy, as the official evaluation),
and spoken replies, read aloud by the bundled eSpeak NG (recipe/tts.py), a robotic stand-in for the
official release's CosyVoice2. Clear starts over. Examples come from the demo's held-out clips
when the model folder sits in a demo.py output (DIR/../corpus).

Bad input (unreadable, silent or too long audio, an empty turn) is answered in the chat, not by a
broken page. Nothing is fetched from the internet at run time: Gradio's analytics are off and its
fonts and scripts are served from the installed package.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import traceback
from pathlib import Path

import checks
from llm import GenerationOptions

QUESTIONS = ("", "Repeat what was said.", "Is the speaker a man or a woman?")  # as demo.py asks
EXAMPLES = 6


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
        from chat import Conversation

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
            wave = checks.chat_clip(audio, self.max_audio_seconds) if audio else None
            options = GenerationOptions(self.max_new_tokens, temperature or None)
            for reply in conv.ask(wave, text, options):
                first = first or time.perf_counter() - start
                history[-1] = {"role": "assistant", "content": reply}
                yield conv, history, None, "answering...", None, ""
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
        recipe = str(Path(__file__).resolve().parent / "recipe")
        if recipe not in sys.path:
            sys.path.append(recipe)
        from tts import Speaker

        self.speaker = self.speaker or Speaker()
        wave = self.speaker.say(answer)
        return self.speaker.sample_rate, (wave.clamp(-1, 1) * 32767).short().numpy()


def note(text: str) -> dict:
    """A line from the page itself, not from the model."""
    return {"role": "assistant", "content": text, "metadata": {"title": "note"}}


def example_rows(paths) -> list[list[str]]:
    """[audio, question] rows from the first clips of each manifest that exists."""
    from manifest import read_manifest

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
        for event in (send.click, text.submit):
            event(**turn).then(app.speak, [answer, spoken], reply_audio)
        clear.click(lambda: (None, [], None, "", None, "", None),
                    outputs=[conv, chatbot, answer, status, audio, text, reply_audio])
    return page


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no calls home
    try:
        if importlib.util.find_spec("gradio") is None:  # before a minute of loading the model
            raise checks.CheckError("app.py needs gradio: pip install -r requirements-app.txt")
        checks.numbers(args, positive=("max_new_tokens",), non_negative=("max_audio_seconds",))
        checks.device(args.device)
        app = App(load_model(args), args.max_new_tokens, args.max_audio_seconds)
    except Exception as e:
        if not checks.expected_failure(e):
            raise
        print(f"error: {checks.first_line(e)}", file=sys.stderr)
        return 1
    corpus = Path(args.model).resolve().parent / "corpus"
    manifests = args.examples if args.examples is not None else [
        corpus / "test_sentences.jsonl", corpus / "real_test.jsonl"]
    examples = example_rows(manifests)
    page = build_page(app, examples, args.model)
    page.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, ssr_mode=False, footer_links=[],
        allowed_paths=sorted({str(Path(a).parent) for a, _ in examples}))
    return 0


def load_model(args):
    import model_support

    model_support.quiet_libraries()
    import torch

    from model import AZeroS

    device = checks.pick_device(args.device)
    checks.cpu_fallback(model_support.release_llm_parameters(args.model), args.device, device,
                        f"--model {args.model}")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    return AZeroS.from_pretrained(args.model, device=device, dtype=dtype)


if __name__ == "__main__":
    sys.exit(main())
