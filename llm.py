"""The frozen LLM and the prompt around the audio (AZeroS paper, Sec. 4.1 model, Sec. 3.4 SIFT).

AZeroS never trains the LLM. Everything it needs from the language model is here:

1. load a causal LM + tokenizer (local folder, hub id or GGUF file) and freeze it;
2. add one special token, `<|AUDIO|>`, that marks where audio goes in a prompt;
3. render chat messages to text (a fixed ChatML template for training, the tokenizer's own for
   inference);
4. expand each `<|AUDIO|>` to as many copies as the projector emitted frames, embed the ids and
   overwrite those rows with the audio features ("splice"): ids (B, L) -> embeddings (B, L, D);
5. build labels (B, L) that supervise only the assistant's answer, and the loss;
6. generate from embeddings (left padding for batches, greedy by default, optional streaming).

A batch row is a list of messages `{"role": ..., "content": ...}`.
Support (not the method): support/model_support.py holds the loading details (GGUF, attention
fallback, embedding resize, stop tokens).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, TextStreamer

from support import checks, model_support

AUDIO_TOKEN = "<|AUDIO|>"
IGNORE_INDEX = -100  # what torch's cross_entropy skips
ASSISTANT_HEADER = "<|im_start|>assistant\n"
# The official fixed ChatML template (the CHAT_TEMPLATE of run_data_generation.py), the one template
# of training and target generation (chat_text below; vLLM's chat API takes it as it is). A
# truncated turn (it hit the generation limit) has no <|im_end|>: it is always the last one.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{% if not message.get('truncated') %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TURN_START = "<|im_start|>"
# Causal-LM families whose head is the output projection alone (checked in transformers' code):
# answer_logits applies it to the answer positions only. Other families run their own forward.
PLAIN_HEAD_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

# --------------------------------------------------------------------------------------------------
# Loading


def load_llm(name_or_path, gguf_file: str | None = None, dtype=None, device=None,
             attn_implementation: str | None = None, tokenizer_path=None,
             revision: str | None = None):
    """A local folder, hub id or `.gguf` file -> (frozen model, tokenizer). dtype None: the
    checkpoint's own; attention: SDPA unless asked otherwise; `tokenizer_path`: the tokenizer from
    elsewhere (a release keeps it at its root, not in llm/); `revision`: a hub commit."""
    path, gguf = model_support.gguf_source(name_or_path, gguf_file)
    extra = {"gguf_file": gguf} if gguf else {}
    if revision:
        extra["revision"] = revision
    attn = model_support.attention(attn_implementation)
    tokenizer = model_support.load_tokenizer(path, extra, tokenizer_path)
    if device is not None:  # each weight goes straight to the device: no 15 GB copy in host RAM
        extra["device_map"] = {"": torch.device(device)}
    with model_support.no_remote_code(path):  # a config's auto_map never runs the folder's code
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype if dtype is not None else "auto", attn_implementation=attn,
            trust_remote_code=False, **extra)
    if gguf:
        model_support.forget_gguf_quantizer(model)
    return freeze(model), tokenizer


def freeze(module: nn.Module) -> nn.Module:
    """Frozen = no gradients and eval mode (no dropout). AZeroS only ever trains the projectors."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def checkpoint_layers(model: nn.Module) -> int:
    """Gradient checkpointing of a FROZEN, eval-mode LLM: each decoder layer keeps only its input
    for the backward pass and recomputes the rest there (the activations of a 7B LLM are ~6.6 MB
    per token otherwise, docs/gpu.md). transformers' own switch checkpoints only in train mode,
    and the frozen LLM stays in eval mode (no dropout), so it would do nothing: each layer's
    forward is wrapped here instead. Eval mode stays, so the recompute is the same computation
    (no dropout to redraw). Returns the number of layers wrapped."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        plain = type(layer).forward.__get__(layer)  # the class's forward, bound to this layer
        layer.forward = partial(checkpoint, plain, use_reentrant=False)
    return len(layers)


def add_audio_token(tokenizer, model=None) -> int:
    """Make `<|AUDIO|>` a special token and return its id.

    Qwen2.5 pads its embedding matrix to a multiple of 128 rows, so a new id fits without touching
    the model (the row is never read: those positions are overwritten by audio features)."""
    if AUDIO_TOKEN not in tokenizer.get_vocab():
        # add_tokens(special=True) appends without replacing the other extra special tokens
        tokenizer.add_tokens([AUDIO_TOKEN], special_tokens=True)
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    if model is not None and model_support.fit_embeddings(model, tokenizer, AUDIO_TOKEN):
        freeze(model)  # the resized matrix is a new parameter
    return audio_id


# --------------------------------------------------------------------------------------------------
# Prompt text and labels


def chat_text(tokenizer, messages: list[dict], *, training: bool, system: str | None = None) -> str:
    """Render messages to the prompt string; `system` is prepended unless there already is one.

    training=True: the official fixed ChatML template, `<|im_start|>{role}\\n{content}<|im_end|>\\n`
    per turn and no default system message, so the projectors learn the target under the conditions
    the frozen LLM produced it for the text prompt (Sec. 3.4). An assistant message with
    `"truncated": True` hit the generation limit then: it loses its `<|im_end|>\\n` (the LLM never
    said "I am done") and ends the text, as the official `<|truncated|>` marker does.
    training=False: the tokenizer's own template plus `<|im_start|>assistant\\n` (for Qwen2.5 that
    injects its default system message)."""
    if system is not None and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    if not training:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.apply_chat_template(messages, chat_template=CHATML_TEMPLATE, tokenize=False)


def expand_audio_tokens(ids: list[int], audio_id: int, lengths: list[int]) -> list[int]:
    """Replace the i-th `<|AUDIO|>` id by lengths[i] copies of it (one per projected frame). Same
    as expanding the text (special tokens are split off before BPE), and cheaper."""
    n_placeholders = sum(1 for i in ids if i == audio_id)
    if n_placeholders != len(lengths):
        raise ValueError(f"the prompt has {n_placeholders} {AUDIO_TOKEN} placeholder(s) but the "
                         f"audio gives {len(lengths)} segment(s)")
    out, segment = [], iter(lengths)
    for i in ids:
        out.extend([i] * next(segment) if i == audio_id else [i])
    return out


def make_labels(ids: list[int], tokenizer) -> list[int]:
    """Labels for one training row: supervise only what the assistant says, else IGNORE_INDEX.

    An assistant turn runs from after the token *sequence* of `<|im_start|>assistant\\n` (any ChatML
    tokenizer, however it splits "assistant") to the next `<|im_start|>` or the row's end: its text,
    `<|im_end|>` and the newline, which teaches the model to stop (a truncated turn has none). On
    AZeroS's single-turn data this equals the official rule (keyed on the `assistant` token id)."""
    header = tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False)
    turn_start = tokenizer.convert_tokens_to_ids(TURN_START)
    labels = [IGNORE_INDEX] * len(ids)
    starts = [s for s in range(len(ids) - len(header) + 1) if ids[s:s + len(header)] == header]
    for s in starts:
        t = s + len(header)
        while t < len(ids) and ids[t] != turn_start:
            labels[t] = ids[t]
            t += 1
    return labels


# --------------------------------------------------------------------------------------------------
# Batching and splicing


@dataclass
class Batch:
    """LLM inputs for a batch. labels is None for inference prompts."""
    input_ids: torch.Tensor       # (B, L) long, pad id where attention_mask is 0
    inputs_embeds: torch.Tensor   # (B, L, D) with audio frames spliced in
    attention_mask: torch.Tensor  # (B, L) long
    labels: torch.Tensor | None   # (B, L) long, IGNORE_INDEX where not supervised
    num_targets: int = 0          # supervised tokens, counted on the host (no GPU sync to read)


def pad_rows(rows: list[list[int]], pad: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to one length -> (ids, mask). Generation needs left padding, so every row's
    next token is at the end."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[b, span] = torch.tensor(r, dtype=torch.long)
        mask[b, span] = 1
    return ids, mask


def splice_audio(embeds: torch.Tensor, input_ids: torch.Tensor, audio_id: int,
                 frames: torch.Tensor) -> torch.Tensor:
    """Overwrite the embeddings at `<|AUDIO|>` positions with audio frames, in reading order.

    frames: (N, D), every segment of every row concatenated in prompt order. masked_scatter fills
    masked positions row-major, i.e. exactly that order, and is differentiable w.r.t. `frames`."""
    mask = input_ids == audio_id
    n_tokens, n_frames = int(mask.sum()), frames.shape[0]
    if n_tokens != n_frames:
        raise ValueError(f"{n_tokens} {AUDIO_TOKEN} positions in the prompt but {n_frames} audio "
                         "frames")
    return embeds.masked_scatter(mask.unsqueeze(-1), frames.to(embeds.dtype))


def build_batch(llm, tokenizer, messages: list[list[dict]], audio=None, *, training: bool,
                system: str | None = None, max_length: int | None = None) -> Batch:
    """Messages (+ audio segments per row, in placeholder order) -> padded LLM inputs.

    audio[b] is a list of (n_i, D) tensors, one per `<|AUDIO|>` in row b's messages; None (or an
    empty list) means a text-only prompt. Training pads on the right, inference on the left."""
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    audio = audio if audio is not None else [[] for _ in messages]
    rows, label_rows = [], []
    for b, (msgs, segments) in enumerate(zip(messages, audio, strict=True)):
        text = chat_text(tokenizer, msgs, training=training, system=system)
        ids = tokenizer.encode(text, add_special_tokens=False)
        try:
            ids = expand_audio_tokens(ids, audio_id, [s.shape[0] for s in segments])
        except ValueError as e:
            raise ValueError(f"row {b}: {e}") from None
        if max_length is not None:
            ids = ids[:max_length]  # cuts the response's end; a cut into the audio is caught below
        rows.append(ids)
        if training:
            label_rows.append(make_labels(ids, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = pad_rows(rows, pad, "right" if training else "left")
    embed = llm.get_input_embeddings()
    device = embed.weight.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    embeds = embed(input_ids)
    segments = [s for row in audio for s in row]
    if segments:
        embeds = splice_audio(embeds, input_ids, audio_id, torch.cat(segments).to(device))
    labels, num_targets = None, 0
    if training:
        labels = pad_rows(label_rows, IGNORE_INDEX, "right")[0].to(device)
        # what answer_logits' mask will count (labels[:, 1:] supervised), known before the GPU runs
        num_targets = sum(t != IGNORE_INDEX for row in label_rows for t in row[1:])
    return Batch(input_ids, embeds, attention_mask, labels, num_targets)


# --------------------------------------------------------------------------------------------------
# Loss and generation


def answer_logits(llm, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced pass -> (logits (N, V), targets (N,), mask (B, L-1)): logits only at the N
    positions that predict a supervised token (logits at t predict t+1), in row-major order.

    Why not the model's own forward: it applies the output head at every position, and the head
    is a large share of a small LLM's work (SmolLM2-135M: 28M of the 134M parameters a token
    uses), while only the answer is scored (about a third of a training row, a few tokens of a
    choice row). Heading just those positions made a CPU training step ~25% faster; on a GPU it
    never builds the (B, L, vocab) logits (152k columns for Qwen2.5). Families whose head does
    more than the output projection (soft-capping, scaling) run their own forward instead."""
    targets = batch.labels[:, 1:]
    mask = targets != IGNORE_INDEX
    inputs = dict(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                  use_cache=False)  # no KV cache to keep (and none to write twice on recompute)
    if llm.config.model_type in PLAIN_HEAD_FAMILIES:
        hidden = llm.base_model(**inputs).last_hidden_state
        logits = llm.get_output_embeddings()(hidden[:, :-1][mask])
    else:
        logits = llm(**inputs).logits[:, :-1][mask]
    return logits, targets[mask], mask


def token_losses(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """answer_logits' output -> per-token NLL of the next token (B, L-1), 0 where not supervised.
    Row sums are the utterance log-likelihoods evaluation needs; the mean over the masked tokens
    is the training loss (as in HF causal LMs)."""
    nll = nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    return torch.zeros(mask.shape, device=nll.device).masked_scatter(mask, nll)


@dataclass
class GenerationOptions:
    """How to decode: greedy (as the official evaluation) unless a temperature > 0 is given."""
    max_new_tokens: int = 200  # the official generate_config
    temperature: float | None = None  # None or 0: greedy; > 0: top-p sampling
    top_p: float | None = None  # nucleus threshold when sampling (None: 1.0, no cut)
    stream: bool = False  # print the answer to stdout as it is produced (a batch of one)
    extra: dict = field(default_factory=dict)  # any other transformers generate() argument


def generation_kwargs(llm, tokenizer, options: GenerationOptions) -> dict:
    """Arguments for `llm.generate` from `options`.

    Released chat LLMs ship a generation_config with sampling on and a repetition penalty (Qwen2.5:
    temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05). Transformers fills every
    argument we leave unset from it, so we set them all: the official evaluation decodes greedily.
    """
    eos = model_support.stop_token_ids(llm, tokenizer)  # <|im_end|> and every EOS the LLM knows
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    kw = dict(max_new_tokens=options.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
              num_beams=1, repetition_penalty=1.0)
    if options.temperature:
        top_p = options.top_p if options.top_p is not None else 1.0
        kw.update(do_sample=True, temperature=options.temperature, top_p=top_p, top_k=0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    kw.update(options.extra)
    return kw


@torch.no_grad()
def generate_ids(llm, tokenizer, batch: Batch, options: GenerationOptions) -> torch.Tensor:
    """Generate from a left-padded inference Batch -> new token ids (B, n), padded after EOS.
    With only inputs_embeds, HF returns just the new tokens and derives position ids from the
    attention mask (cumsum - 1): a left-padded row sees the positions it would see alone."""
    kw = generation_kwargs(llm, tokenizer, options)
    checks.context(llm.config, batch.inputs_embeds.shape[1], kw["max_new_tokens"])  # the cap
    if options.stream:
        if batch.inputs_embeds.shape[0] != 1:
            raise ValueError("streaming needs a batch of one")
        kw["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    return llm.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                        **kw)


def generate(llm, tokenizer, batch: Batch, options: GenerationOptions) -> list[str]:
    """generate_ids, decoded. skip_special_tokens drops <|im_end|> and the padding after it, as
    the official batch_decode does."""
    ids = generate_ids(llm, tokenizer, batch, options)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)
