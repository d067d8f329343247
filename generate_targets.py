"""Self-generated targets, the data side of SIFT (AZeroS paper, Sec. 3.3-3.4, 5.3-5.7, appendix A).

SIFT never asks anyone to write instructions or answers. The frozen LLM reads a *text stand-in* for
an utterance (its transcript, plus paralinguistic metadata in stage 2); whatever it answers becomes
the target that the audio of the same utterance must reproduce. In training the projected audio
takes the place of that text, so a model that reproduces the targets behaves as if it had "heard"
the transcript and the metadata.

    manifest row -> normalised text + <meta> -> user turn of the mode -> frozen LLM -> response
    output row = input row + {mode, system, instruction, input_text, response, truncated, model}

Modes (Sec. 5.3 stage 1, Sec. 5.4 stage 2, Sec. 5.7 dialog LLM; strings as in appendix A):

    tsit_s    no LLM: target = transcript, instruction drawn from fixed ASR prompts (the baseline)
    sit_s     transcript + "Repeat the above content."                      (instruction tuning)
    sift_s    transcript                                                    (instruction-free)
    sit_sp    <audio><meta>k: v, ...</meta><text>transcript</text></audio> + "Describe all ..."
    sift_sp   <audio><meta>k: v, ...</meta><text>transcript</text></audio>
    sit_ssp / sift_ssp   as sit_sp / sift_sp under the dialog system message of Sec. 5.7

Support (not the method): support/targets_support.py loses no row (skips, shards, resume, input
order) and holds the plumbing: backend choice, output rows, CLI checks.

Usage (--model: a hub id, a local folder or a .gguf file; tsit_s needs none):
    python generate_targets.py --mode sift_sp --model Qwen/Qwen2.5-7B-Instruct \\
        --in a.jsonl b.jsonl.gz --out out.jsonl
    python generate_targets.py ... --shard 0 --nshards 4   (writes out.shard0-of-4.jsonl; run 0..3)
    python generate_targets.py --merge --nshards 4 --in a.jsonl b.jsonl.gz --out out.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import random
import re
import sys
from dataclasses import dataclass

os.environ.setdefault("MKL_DYNAMIC", "FALSE")  # before torch loads MKL (train.py says why)

from support import checks, targets_support
from support.files import append_jsonl
from support.labels import normalize_meta  # the official label vocabulary lives there
from support.manifest import Record
from support.targets_support import Generation, Row, Summary

MODES = ("tsit_s", "sit_s", "sift_s", "sit_sp", "sift_sp", "sit_ssp", "sift_ssp")

# The SIT instructions (appendix A, pages 19-21). Only English and Chinese exist in the paper and in
# the official script; every other language gets the English one.
INSTRUCTIONS = {
    "sit_s": {"en": "Repeat the above content.", "zh": "重复上述内容。"},
    "sit_sp": {"en": "Describe all information you can hear.", "zh": "描述你听到的所有信息。"},
    "sit_ssp": {"en": "Describe all information you can hear.", "zh": "描述你听到的所有信息。"},
}

# The dialog system message of Sec. 5.7 as printed in appendix A (page 21); the official script
# loses the space between "audios." and "NEVER", we follow the paper.
DIALOG_SYSTEM = (
    "You are a powerful virtual human who is capable of perceiving both text and speech inputs and "
    "generate precise natural responses. Speech inputs will be wrapped by <audio> and </audio> "
    "tags, containing both the text transcription and paralinguistic information. You must always "
    "pretend that you can indeed hear the input audios. NEVER mention that any metadata is "
    "provided through texts, and only use them in your response when necessary."
)

# TSIT_s (Sec. 5.3 (a)) samples "from a predefined set of ASR-specific prompts". The paper does not
# list them; these are the official ASR-LLM recipe's prompts (examples/asr_llm/configs/prompt.yaml).
ASR_PROMPTS = ("请重复以上内容", "Transcribe speech to text", "请转写音频为文字")

# The CJK ranges of the official text normaliser (auden.utils.text_normalization): CJK characters
# are joined without spaces, every other run of text is followed by one.
_CJK = re.compile(
    r"([\u1100-\u11ff\u2e80-\ua4cf\ua840-\uD7AF\uF900-\uFAFF\uFE30-\uFE4F\uFF65-\uFFDC"
    r"\U00020000-\U0002FFFF\u3000-\u303F\uff01-\uff60])"
)
_BRACKETED = re.compile(r"[<\[][^>\]]*[>\]]")  # <noise>, [laughter]: annotations, not words

# ------------------------------------------------------------------------------------------------
# 1. The text stand-in: what the LLM reads in place of the audio


def normalize_text(text: str) -> str:
    """The transcript as the LLM sees it (official `text_normalization(case='lower',
    simplified_chinese=True)`). Bracketed annotations go (the official call keeps them, but
    "[laughter]" is not something the speaker said), then lower case, CJK-aware spacing, whitespace
    collapsed. Punctuation stays: the LLM reads sentences, not ASR tokens."""
    text = _BRACKETED.sub("", text).lower()
    pieces = [p for p in _CJK.split(text) if p.strip()]
    text = "".join(p if _CJK.search(p) else f"{p} " for p in pieces).strip()
    text = re.sub(r"\s+", " ", text)
    # Traditional -> Simplified, as officially (zhconv is optional: without it, a warning)
    return targets_support.to_simplified(text) if _CJK.search(text) else text


def format_meta(meta: dict) -> str:
    """`age: young adult, gender: female` (the `<meta>` body of appendix A)."""
    return ", ".join(f"{k}: {v}" for k, v in normalize_meta(meta).items())


@dataclass(frozen=True)
class Prompt:
    """What one row asks. `input_text` is the whole user turn (the official `input_text` field);
    `target` is set only for tsit_s, where the transcript itself is the answer and no LLM runs."""
    system: str
    instruction: str
    input_text: str
    target: str | None = None

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.input_text}]


def build_prompt(record: Record, mode: str, seed: int = 0) -> Prompt:
    """The LLM input of `mode` for one record (appendix A, one example per mode and language)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    transcript = normalize_text(record.text)
    # 'zh' for Chinese manifests (zh, zh-CN, cmn, yue), otherwise 'en' (the official default)
    lang = "zh" if (record.language or "en").lower().startswith(("zh", "cmn", "yue")) else "en"
    if mode == "tsit_s":
        return Prompt("", tsit_instruction(record.id, seed), transcript, target=transcript)
    if mode == "sift_s":
        return Prompt("", "", transcript)
    if mode == "sit_s":
        # appendix A, page 19: "... us. Repeat the above content." but "...武夷山。重复上述内容。"
        # (no space between Chinese sentences)
        instruction = INSTRUCTIONS[mode][lang]
        return Prompt("", instruction, transcript + ("" if lang == "zh" else " ") + instruction)
    audio_text = f"<audio><meta>{format_meta(record.meta)}</meta><text>{transcript}</text></audio>"
    system = DIALOG_SYSTEM if mode.endswith("_ssp") else ""
    if mode.startswith("sift"):
        return Prompt(system, "", audio_text)
    instruction = INSTRUCTIONS[mode][lang]
    return Prompt(system, instruction, f"{audio_text} {instruction}")


def tsit_instruction(record_id: str, seed: int) -> str:
    """A seeded draw keyed on the id, not on the row position: the same row gets the same prompt
    whether it runs alone, in shard 3 of 8, or after a resume."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return random.Random(digest).choice(ASR_PROMPTS)


def chat_prompt(tokenizer, prompt: Prompt) -> str:
    """The full LLM input text: llm.py's training template (plain ChatML, no default system
    message) plus the generation prompt. Not the tokenizer's own template (for Qwen2.5 it adds "You
    are Qwen..."): the target must be produced under the same context it is learned in."""
    import llm

    text = llm.chat_text(tokenizer, prompt.messages(), training=True, system=prompt.system or None)
    return text + llm.ASSISTANT_HEADER


def plan(in_paths, mode: str, seed: int = 0, shard: int = 0,
         nshards: int = 1) -> tuple[list[Row], int]:
    """Every input line of this shard -> a Row with its prompt, or with the reason it is skipped
    (unreadable, malformed, repeated id, filtered) -> (rows, blank lines of all the inputs). Same
    inputs, same plan. Prompts are built for this shard's rows only."""
    # repeated ids are found across all of them here
    rows, blank = targets_support.read_rows(in_paths)
    rows = [r for r in rows if targets_support.in_shard(r, shard, nshards)]
    for row in rows:
        if row.skip is None:
            row.prompt = build_prompt(row.record, mode, seed)
            # the official filters, on the transcript the LLM and the training loss see
            row.skip = targets_support.filter_reason(row.record, normalize_text(row.record.text))
    return rows, blank


# ------------------------------------------------------------------------------------------------
# 2. Backends: prompts in, (response, truncated, generated tokens) out. Transformers (HFBackend),
#    vLLM (GPU only) and, for tsit_s, no LLM at all (TranscriptBackend) share one interface.


class HFBackend:
    """Transformers generation, made fast by batching and exact by greedy decoding.

    Rows are sorted by prompt length (longest first) and packed into batches while
    rows x (longest prompt + max_new_tokens) stays under `batch_tokens`: similar lengths waste
    little on padding, and the budget keeps the KV cache bounded whatever the prompt lengths. Left
    padding puts every row's last prompt token at the end, where generation continues; HF derives
    position ids from the attention mask, so a padded row sees the same positions as alone.
    """
    name = "hf"

    def __init__(self, model, tokenizer, *, model_label: str, max_new_tokens: int = 256,
                 batch_tokens: int = 16384, max_batch_rows: int | None = None):
        import llm

        self.model, self.tokenizer, self.model_label = model, tokenizer, model_label
        self.max_new_tokens, self.batch_tokens = max_new_tokens, batch_tokens
        self.max_batch_rows = max_batch_rows
        options = llm.GenerationOptions(max_new_tokens=max_new_tokens)
        self.gen_kwargs = llm.generation_kwargs(model, tokenizer, options)
        self.end_ids = set(self.gen_kwargs["eos_token_id"])  # <|im_end|> and the model's eos
        self._ids: dict[Prompt, list[int]] = {}

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        if prompt not in self._ids:
            text = chat_prompt(self.tokenizer, prompt)
            # no BOS: the text already has every special token, as llm.build_batch in training
            self._ids[prompt] = self.tokenizer.encode(text, add_special_tokens=False)
        return self._ids[prompt]

    def batches(self, prompts: list[Prompt]) -> list[list[int]]:
        lengths = [len(self.prompt_ids(p)) for p in prompts]
        return targets_support.budget_batches(lengths, self.max_new_tokens, self.batch_tokens,
                                              self.max_batch_rows)

    def generate(self, prompts: list[Prompt]) -> list[Generation]:
        import torch

        import llm

        rows = [self.prompt_ids(p) for p in prompts]
        for p in prompts:  # done with these: keep the cache as small as the window being planned
            self._ids.pop(p, None)
        input_ids, attention_mask = llm.pad_rows(rows, self.gen_kwargs["pad_token_id"], "left")
        checks.context(self.model.config, input_ids.shape[1], self.max_new_tokens)
        device = self.model.get_input_embeddings().weight.device
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids.to(device),
                                      attention_mask=attention_mask.to(device), **self.gen_kwargs)
        return [self._finish(r.tolist()) for r in out[:, input_ids.shape[1]:]]

    def _finish(self, tokens: list[int]) -> Generation:
        """Cut at the first end-of-turn token (what follows is batch padding). None: truncated."""
        end = next((k for k, t in enumerate(tokens) if t in self.end_ids), None)
        kept = tokens if end is None else tokens[:end]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Generation(text, end is None, len(tokens) if end is None else end + 1)


class TranscriptBackend:
    """tsit_s: the target is the transcript, nothing runs. 1024 rows are one resume unit."""
    name = "transcript"
    model_label = ""

    def batches(self, prompts: list[Prompt]) -> list[list[int]]:
        return targets_support.chunks(len(prompts), 1024)

    def generate(self, prompts: list[Prompt]) -> list[Generation]:
        return [Generation(p.target, False, 0) for p in prompts]


@dataclass
class VLLMOptions:
    """What the vLLM engine is given (flags --device, --tensor-parallel-size,
    --gpu-memory-utilization, --max-model-len)."""
    device: str | None = None  # cuda:N -> that GPU only; None/cuda: what CUDA_VISIBLE_DEVICES lists
    tensor_parallel_size: int = 1  # GPUs one model is split over (a 7B fits one 80 GB GPU)
    gpu_memory_utilization: float = 0.9  # share of each GPU's memory vLLM may take (KV cache)
    max_model_len: int | None = None  # prompt + answer tokens; None: the model's own (32k, Qwen2.5)


class VLLMBackend:
    """vLLM offline generation (GPU only): its chat API with the training ChatML template, greedy,
    and prefix caching (every row of a mode shares the chat header and, for *_ssp, the long system
    message). vLLM schedules its own batches, so we hand it large chunks in input order; a chunk is
    the resume unit."""
    name = "vllm"

    def __init__(self, model: str, *, model_label: str, gguf_file: str | None = None,
                 max_new_tokens: int = 256, chunk: int = 4096, options: VLLMOptions | None = None):
        options = options or VLLMOptions()
        if options.device is not None and options.device.startswith("cuda:"):
            # vLLM has no device argument: its workers (own processes) see the GPUs this lists
            os.environ["CUDA_VISIBLE_DEVICES"] = options.device.split(":")[1]
        from vllm import LLM, SamplingParams

        path = os.path.join(model, gguf_file) if gguf_file else model
        self.llm = LLM(model=path, tokenizer=model if gguf_file else None,
                       enable_prefix_caching=True, trust_remote_code=False,
                       tensor_parallel_size=options.tensor_parallel_size,
                       gpu_memory_utilization=options.gpu_memory_utilization,
                       max_model_len=options.max_model_len)
        self.params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        self.model_label, self.chunk = model_label, chunk

    def batches(self, prompts: list[Prompt]) -> list[list[int]]:
        return targets_support.chunks(len(prompts), self.chunk)

    def generate(self, prompts: list[Prompt]) -> list[Generation]:
        import llm

        conversations = [([{"role": "system", "content": p.system}] if p.system else [])
                         + p.messages() for p in prompts]
        outputs = self.llm.chat(conversations, self.params, chat_template=llm.CHATML_TEMPLATE,
                                add_generation_prompt=True, use_tqdm=False)
        return [Generation(o.text, o.finish_reason == "length", len(o.token_ids))
                for o in (out.outputs[0] for out in outputs)]


def make_backend(mode: str, model: str | None, *, gguf_file=None, backend="auto",
                 max_new_tokens=256, batch_tokens=16384, device=None, vllm=None):
    """tsit_s needs no model. `auto` picks vLLM when it is installed and CUDA works; transformers
    otherwise, on --device or on CUDA when it works, and never silently on the CPU for a large
    model. `vllm`: VLLMOptions (device, tensor parallelism, memory share, max length)."""
    if mode == "tsit_s":
        return TranscriptBackend()
    if not model:
        raise checks.CheckError(f"--model is required for mode {mode}")
    label = f"{model}:{gguf_file}" if gguf_file else str(model)  # the `model` field
    if targets_support.use_vllm(backend, device):
        options = dataclasses.replace(vllm or VLLMOptions(), device=device)
        return VLLMBackend(model, model_label=label, gguf_file=gguf_file,
                           max_new_tokens=max_new_tokens, options=options)
    import llm
    from support import model_support

    chosen = checks.pick_device(device)
    checks.cpu_fallback(model_support.llm_parameters(model, gguf_file), device, chosen,
                        f"--model {model}")
    lm, tokenizer = llm.load_llm(model, gguf_file=gguf_file, device=chosen)
    return HFBackend(lm, tokenizer, model_label=label, max_new_tokens=max_new_tokens,
                     batch_tokens=batch_tokens)


# ------------------------------------------------------------------------------------------------
# 3. The run: plan, skip what is done, generate batch by batch, append, finish in input order


def run(in_paths, out, mode: str, backend, *, seed: int = 0, shard: int = 0, nshards: int = 1,
        progress: bool = True, window: int = 100_000) -> Summary:
    """Generate targets for one shard of the inputs into shard_path(out), resuming what is there.

    Rows are appended in batch order while running (length-sorted, so not input order); when every
    row is done, the file is rewritten in input order. `id` is the key: resume skips ids already in
    the file, and only if the same backend wrote them. `backend` may also be a function that
    builds one: it is called once the output is locked, so a second run on the same output stops
    before it loads a 7B model."""
    with targets_support.locked_output(out, shard, nshards) as path:
        backend = backend() if callable(backend) else backend
        rows, blank = plan(in_paths, mode, seed, shard, nshards)
        done = targets_support.resume(path, rows, mode, backend.model_label, backend_name(backend))
        summary = Summary(blank_lines=blank, resumed=len(done))
        pending = [r for r in rows if r.skip is None and r.record.id not in done]
        generate(pending, mode, backend, path, done, summary, progress, window)
        return targets_support.finish(rows, done, path, summary)


def backend_name(backend) -> str | None:
    """"hf", "vllm", "transcript": recorded per row (a caller's own backend may have no name)."""
    return getattr(backend, "name", None)


def generate(pending: list[Row], mode, backend, path, done: dict, summary: Summary,
             progress: bool = True, window: int = 100_000) -> None:
    """Answer every pending row, appending each batch to `path` the moment it is done."""
    with targets_support.Meter(summary, len(pending), mode, progress) as meter:
        # Batches are planned per window of rows: millions of rows are never tokenized at once.
        for w in range(0, len(pending), window):
            rows = pending[w:w + window]
            prompts = [r.prompt for r in rows]
            for batch in backend.batches(prompts):
                gens = backend.generate([prompts[i] for i in batch])
                targets = [targets_support.target_row(rows[i], mode, g, backend.model_label,
                                                      path.parent, backend_name(backend))
                           for i, g in zip(batch, gens)]
                append_jsonl(path, targets)  # whole lines, fsynced: a kill costs at most this batch
                done.update((t["id"], t) for t in targets)
                meter.add(len(batch), sum(g.n_tokens for g in gens))


# ------------------------------------------------------------------------------------------------
# 4. The command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES,
                   help="which targets to generate (required unless --merge)")
    p.add_argument("--model",
                   help="LLM: hub id, local folder, or .gguf file (not needed for tsit_s)")
    p.add_argument("--gguf-file", help="GGUF file name inside --model")
    p.add_argument("--in", dest="inputs", nargs="+", required=True,
                   help="manifests (.jsonl/.jsonl.gz, ours or Lhotse)")
    p.add_argument("--out", required=True,
                   help="output .jsonl; skipped rows go to <out>.skipped.jsonl")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-tokens", type=int, default=16384,
                   help="transformers backend: rows x (longest prompt + max new tokens) per batch")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--nshards", type=int, default=1)
    p.add_argument("--merge", action="store_true", help="combine the finished shards of --out")
    p.add_argument("--backend", choices=("auto", "hf", "vllm"), default="auto")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when it works; a large "
                   "--model on a CPU needs --device cpu)")
    v = p.add_argument_group("vLLM backend").add_argument
    v("--tensor-parallel-size", type=int, default=1, help="GPUs one model is split over")
    v("--gpu-memory-utilization", type=float, default=0.9,
      help="share of each GPU's memory vLLM may take (weights + KV cache)")
    v("--max-model-len", type=int, help="prompt + answer tokens (default: the model's own)")
    p.add_argument("--seed", type=int, default=0, help="seeds the tsit_s instruction draw")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    targets_support.check_args(p, args)
    return args


def main(argv=None, backend=None) -> Summary:
    """The command line. `backend` lets a caller (tests, notebooks) reuse a loaded model."""
    args = parse_args(argv)
    checks.files_exist(args.inputs, "--in")
    checks.device(args.device)
    if args.merge:
        # the plan's skip decisions do not depend on the mode
        rows, blank = plan(args.inputs, args.mode or "sift_s", args.seed)
        summary = targets_support.merge(rows, blank, args.out, args.nshards, args.mode)
    else:
        vllm = VLLMOptions(None, args.tensor_parallel_size, args.gpu_memory_utilization,
                           args.max_model_len)
        backend = backend or (lambda: make_backend(  # built once the output is locked (run)
            args.mode, args.model, gguf_file=args.gguf_file, backend=args.backend,
            max_new_tokens=args.max_new_tokens, batch_tokens=args.batch_tokens, device=args.device,
            vllm=vllm))
        summary = run(args.inputs, args.out, args.mode, backend, seed=args.seed, shard=args.shard,
                      nshards=args.nshards, progress=not args.no_progress)
    print(summary.report(), file=sys.stderr)
    return summary


def cli(argv=None, backend=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(lambda argv: main(argv, backend), argv)


if __name__ == "__main__":
    sys.exit(cli())
