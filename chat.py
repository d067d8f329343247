"""A multi-turn chat with an AZeroS model, streamed token by token, reusing the KV cache (app.py).

The official service answers turn k by feeding the LLM every earlier turn again (their audio
embeddings and text). Here the LLM's keys and values of the conversation so far stay in a cache:
turn k feeds only what is new (the end of the last answer, the new user message, the assistant
header), and its audio goes through the encoders once. The LLM sees the same token sequence either
way, so a greedy answer is the same (tests/test_chat.py checks that, and the work saved).

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

from collections.abc import Iterator

import torch
from transformers import DynamicCache
from transformers.generation import TemperatureLogitsWarper, TopPLogitsWarper

import checks
import llm
import model_support
from llm import GenerationOptions


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
            return self.model.audio_segments(*self.model.features([wave]))[0]

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
