"""The AZeroS speech LLM: frozen encoders + trainable projectors + frozen LLM (paper Sec. 4.1).

  wave --fbank--> (B, T, 80) 100 Hz
    --> speech_encoder   (frozen Zipformer)   (B, T/4, 768) 25 Hz --> speech_encoder_projector --+
    --> paraling_encoder (frozen Zipformer)   (B, T/4, 768) 25 Hz --> paraling_encoder_projector |
                                each projector stacks ds_rate=4 frames: (B, T/16, D) 6.25 Hz     |
  "<audio><meta><|AUDIO|></meta><text><|AUDIO|></text></audio> {instruction}"  <-- splice --------+
    --> frozen LLM --> text

Training (Sec. 3.4 SIFT, Sec. 4.2) has two stages, and only one projector learns in each:
  stage 1: the speech (semantic) branch alone; the user turn is just `<|AUDIO|>`;
  stage 2: the paralinguistic projector learns; the speech projector stays as stage 1 left it.
The targets come from the frozen LLM itself (generate_targets.py): the loss asks the projected audio
to make the LLM say what it said for the transcript + metadata text. One builder per use:
  stage 1: AZeroS.from_components  (LLM + encoder folders, fresh projectors)
  stage 2: AZeroS.from_stage1      (a stage-1 model folder + a paralinguistic encoder)
  use:     AZeroS.from_pretrained  (a model folder in the release layout, or a hub id)

The speech encoder may also be Whisper (paper Table 6; whisper_encoder.py): each encoder reads its
own front end (Kaldi fbank for Zipformers, Whisper's log-mel for Whisper).

Folders use the layout of the released `AudenAI/azeros` (root config.json, projector weights in
model.safetensors, the tokenizer, sub-folders llm/, speech_encoder/, paraling_encoder/): the release
loads here as is, and a saved model loads in the official code with `AzerosModel.from_pretrained(
folder, strict=False)` (strict=True would miss the frozen parts' keys in model.safetensors).

Parity: the official code casts projector outputs to float16 before the splice. The released
projectors were trained behind that rounding, so we keep it (`round_audio_to_fp16=True`): at most
~5e-4 per value, and our outputs match the official ones token for token.

Support (not the method): support/model_support.py finds, checks, reads and writes model folders.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

import llm
from projector import Projector
from support import model_support
from support.files import atomic_path, staged_folder, write_atomic
from support.model_support import FROZEN, default_dtype
from whisper_encoder import WhisperSpeechEncoder, is_whisper_folder

# the user turn of a two-encoder model: paralinguistic frames in <meta>, speech frames in <text>
WRAPPED_AUDIO = f"<audio><meta>{llm.AUDIO_TOKEN}</meta><text>{llm.AUDIO_TOKEN}</text></audio>"


def load_encoder(path, device=None) -> nn.Module:
    """A frozen encoder from its folder: a transformers Whisper folder (config.json model_type
    "whisper", paper Table 6) or a Zipformer folder (the paper's TTA and Auden-Voice encoders)."""
    if is_whisper_folder(path):
        return WhisperSpeechEncoder.from_pretrained(path, device=device)
    from zipformer import ZipformerEncoder
    return ZipformerEncoder.from_pretrained(str(path), device=device)


def round_to_fp16(y: torch.Tensor) -> torch.Tensor:
    """The official forward_speech_encoder casts projector outputs to fp16 (module docstring): the
    forward value is exactly that rounding, kept in y's dtype (fp32 and bf16 hold those values, and
    CPU autocast has no fp16 rules). The gradient passes straight through: the official trainer
    used fp16 with a loss scaler, we train in bf16 without one, and a differentiable cast would
    round the gradient to fp16 too (1e-8 -> 0). y + (r - y) is exactly r: r - y is exact, as r and
    y are within a factor 2 of each other (Sterbenz), and so is the sum."""
    return y + (y.to(torch.float16).to(y.dtype) - y).detach()


class AZeroS(nn.Module):
    def __init__(self, lm, tokenizer, speech_encoder, paraling_encoder=None, *,
                 config: dict | None = None, speech_ds_rate: int = 4, paraling_ds_rate: int = 4,
                 round_audio_to_fp16: bool = True):
        super().__init__()
        self.llm = llm.freeze(lm)
        self.tokenizer = tokenizer
        rows = lm.get_input_embeddings().num_embeddings
        self.audio_token_id = llm.add_audio_token(tokenizer, lm)
        # a resized LLM differs from the folder it came from: save_pretrained writes it, not a link
        self.resized = lm.get_input_embeddings().num_embeddings != rows
        hidden = lm.config.hidden_size
        self.speech_encoder = llm.freeze(speech_encoder)
        self.speech_encoder_projector = Projector(speech_encoder.output_dim, hidden, speech_ds_rate)
        self.paraling_encoder = self.paraling_encoder_projector = None
        if paraling_encoder is not None:
            self.paraling_encoder = llm.freeze(paraling_encoder)
            self.paraling_encoder_projector = Projector(paraling_encoder.output_dim, hidden,
                                                        paraling_ds_rate)
        self.config = config if config is not None else model_support.release_config(self)
        self.round_audio_to_fp16 = round_audio_to_fp16
        self.sources: dict[str, str] = {}  # local folders of the frozen parts (linked on save)
        self.precision = "fp32"  # autocast of inference (train.py sets its own): see autocast()
        self.set_stage(None)

    # ----------------------------------------------------------------------------------------------
    # Building: one builder per use

    @classmethod
    def from_components(cls, llm_path, speech_encoder, paraling_encoder=None, *, gguf_file=None,
                        device=None, dtype=None, ds_rate: int = 4) -> AZeroS:
        """Stage 1 (or one-stage training): an LLM and encoder folders, fresh projectors."""
        lm, tokenizer = llm.load_llm(llm_path, gguf_file=gguf_file, device=device,
                                     dtype=dtype or default_dtype(device))
        speech = load_encoder(speech_encoder, device=device)
        para = load_encoder(paraling_encoder, device=device) if paraling_encoder else None
        model = cls(lm, tokenizer, speech, para, speech_ds_rate=ds_rate, paraling_ds_rate=ds_rate)
        model.sources = model_support.component_sources(llm_path, gguf_file, speech_encoder,
                                                        paraling_encoder)
        hub = model_support.llm_reference(llm_path, gguf_file)
        if hub and not model.resized:  # saved as a reference to the hub model, not a copy
            model.config["llm_hub"] = hub
        return model.to(device)

    @classmethod
    def from_stage1(cls, init, paraling_encoder, *, llm_path=None, gguf_file=None, device=None,
                    dtype=None, ds_rate: int = 4) -> AZeroS:
        """Stage 2: a stage-1 model folder (LLM, speech encoder, its trained projector) plus a
        paralinguistic encoder with a fresh projector. Nothing is read twice. `llm_path` loads the
        LLM from elsewhere (e.g. the same one at another path); the stage-1 projector must fit it.
        A paralinguistic branch the folder already has is replaced: stage 2 starts it afresh."""
        init = Path(init)
        if llm_path is None:
            model = cls.from_pretrained(init, device=device, dtype=dtype)
        else:
            model = cls.from_components(llm_path, init / "speech_encoder", gguf_file=gguf_file,
                                        device=device, dtype=dtype)
            projector = model.speech_encoder_projector
            projector.load_state_dict(model_support.stage1_projector(init, projector))
        device = model.speech_encoder_projector.linear1.weight.device
        encoder = load_encoder(paraling_encoder, device=device)
        model.paraling_encoder = llm.freeze(encoder)
        hidden = model.llm.config.hidden_size
        model.paraling_encoder_projector = Projector(encoder.output_dim, hidden, ds_rate).to(device)
        model_support.record_new_branch(model, paraling_encoder, ds_rate)  # config.json, sources
        model.set_stage(None)
        return model

    @classmethod
    def from_pretrained(cls, path_or_hub_id, device=None, dtype=None,
                        round_audio_to_fp16: bool = True, precision: str = "auto") -> AZeroS:
        """Inference and evaluation: a model in the release layout (a local folder, or a hub id
        such as "AudenAI/azeros"). dtype applies to the LLM; encoders and projectors keep float32
        weights (they are small, and the projectors' weights are the trained fp32 values) and run
        under `precision`'s autocast, as in training (auto: bf16 on CUDA, fp32 on CPU). Root
        weights may hold only the projectors (what training saves) or a full state dict."""
        root, config, weights = model_support.read_model_folder(path_or_hub_id)
        attn = "flash_attention_2" if config.get("use_flash_attn") else None  # else sdpa
        llm_path, revision = model_support.llm_location(root, config)  # llm/, or a hub model
        lm, tokenizer = llm.load_llm(llm_path, tokenizer_path=str(root), device=device,
                                     dtype=dtype or default_dtype(device), attn_implementation=attn,
                                     revision=revision)
        has_para = config.get("paraling_encoder_config") is not None
        model = cls(lm, tokenizer, load_encoder(root / "speech_encoder"),
                    load_encoder(root / "paraling_encoder") if has_para else None, config=config,
                    speech_ds_rate=config.get("speech_encoder_projector_ds_rate", 4),
                    paraling_ds_rate=config.get("paraling_encoder_projector_ds_rate", 4),
                    round_audio_to_fp16=round_audio_to_fp16)
        projectors = model_support.projector_weights(weights, model.state_dict())
        model.load_state_dict(projectors, strict=False)
        model.sources = {k: str(root / k) for k in FROZEN if (root / k).is_dir()}
        cuda = torch.device(device or "cpu").type == "cuda"
        model.precision = ("bf16" if cuda else "fp32") if precision == "auto" else precision
        return model.to(device) if device is not None else model

    def save_pretrained(self, out_dir, link_frozen: bool = True) -> None:
        """Write the release layout. Only the projectors are (re)written each time; the frozen parts
        are written once (or linked to the folders they came from): they never change. Every file
        is written whole or not at all, and config.json comes last: a full disk or a kill midway
        leaves a folder without config.json, never a config.json without its weights."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").unlink(missing_ok=True)  # not a model folder until it is complete
        for name in FROZEN:
            module = getattr(self, name)
            if name == "llm" and self.config.get("llm_hub"):
                continue  # config.json names the hub model (model_support.llm_reference)
            if module is not None and not (out / name).exists():
                # A resized LLM differs from its folder, and a transformers Whisper folder holds the
                # decoder too, which the official encoder loader refuses: write those, never link.
                whisper = isinstance(module, WhisperSpeechEncoder)
                link = link_frozen and not (self.resized or whisper)
                model_support.save_frozen_part(module, out / name, self.sources.get(name), link)
        projectors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                      if k.startswith(("speech_encoder_projector.", "paraling_encoder_projector."))}
        with atomic_path(out / "model.safetensors") as tmp:  # a killed save leaves no half file
            save_file(projectors, str(tmp), metadata={"format": "pt"})
        with staged_folder(out) as tmp:  # the tokenizer's files, all or none
            self.tokenizer.save_pretrained(str(tmp))
        write_atomic(out / "config.json", [json.dumps(self.config, indent=2)])

    # ----------------------------------------------------------------------------------------------
    # Stages and trainable parameters

    @property
    def use_paraling(self) -> bool:
        """Stage 1 trains the speech branch alone, even when a paralinguistic encoder is there."""
        return self.paraling_encoder is not None and self.stage != 1

    @property
    def audio_placeholder(self) -> str:
        return WRAPPED_AUDIO if self.use_paraling else llm.AUDIO_TOKEN

    def set_stage(self, stage: int | str | None) -> None:
        """1: only the speech projector trains; 2: only the paralinguistic one; "both": every
        projector at once (the one-stage training of paper Table 6); None: nothing trains."""
        if stage == 2 and self.paraling_encoder is None:
            raise ValueError("stage 2 needs a paralinguistic encoder")
        if stage not in (None, 1, 2, "both"):
            raise ValueError(f"stage must be 1, 2 or 'both', got {stage!r}")
        self.stage = stage
        for p in self.speech_encoder_projector.parameters():
            p.requires_grad_(stage in (1, "both"))
        if self.paraling_encoder_projector is not None:
            for p in self.paraling_encoder_projector.parameters():
                p.requires_grad_(stage in (2, "both"))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True):
        """model.train() must not wake the frozen parts (dropout in the LLM, Zipformer's batch
        counter)."""
        super().train(mode)
        for name in FROZEN:
            if getattr(self, name) is not None:
                getattr(self, name).eval()
        return self

    # ----------------------------------------------------------------------------------------------
    # Audio -> LLM-width frames

    def encoders(self) -> dict[str, nn.Module]:
        """The encoders in use, {"speech": ..., "paraling": ...} (paraling only when used)."""
        used = {"speech": self.speech_encoder}
        if self.use_paraling:
            used["paraling"] = self.paraling_encoder
        return used

    def front_end(self, waves, wave_lens=None, device=None, augment=None) -> dict:
        """16 kHz waveforms (list of 1-D tensors, or padded (B, N) with wave_lens) -> {branch:
        (feats, feat_lens)} for the encoders in use: Kaldi fbank for a Zipformer, Whisper's own
        log-mel for Whisper. Each kind is computed once: branches that read the same front end
        share its tensors. `augment(feats, feat_lens) -> feats` (training's SpecAugment) runs once
        per kind too, so such branches also share its masks."""
        import data
        computed, per_branch = {}, {}
        for branch, encoder in self.encoders().items():
            kind = getattr(encoder, "front_end", "fbank")
            if kind not in computed:
                feats, lens = (encoder.features(waves, wave_lens, device) if kind != "fbank"
                               else data.fbank(waves, wave_lens, device=device))
                computed[kind] = (augment(feats, lens) if augment else feats), lens
            per_branch[branch] = computed[kind]
        return per_branch

    def autocast(self):
        """Inference in the precision training used: the front end, encoders and projectors ran
        under bf16 autocast on CUDA there, so they do here (`precision`, from from_pretrained)."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        device = self.speech_encoder_projector.linear1.weight.device
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def features(self, waves) -> dict:
        """Waveforms (list of 16 kHz float arrays) -> the encoders' input features, {branch:
        (feats, feat_lens)} as front_end returns them, computed on our device (the GPU's fbank, as
        training)."""
        device = self.speech_encoder_projector.linear1.weight.device
        waves = [torch.as_tensor(w, dtype=torch.float32) for w in waves]
        return {branch: (feats.to(device), torch.as_tensor(lens).to(device))
                for branch, (feats, lens) in self.front_end(waves, device=device).items()}

    @torch.no_grad()
    def encode(self, feats: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The frozen encoders on the features of front_end -> {"speech": (out, lens), "paraling":
        (out, lens)} (paraling if used). The result does not depend on the projectors, so training
        can cache it."""
        out = {}
        for branch, encoder in self.encoders().items():
            x, lens = feats[branch]
            out[branch] = encoder(x, lens.clamp(max=x.shape[1]))
        return out

    def project(self, encoder_outputs: dict) -> list[list[torch.Tensor]]:
        """Encoder outputs -> per row, the audio segments in prompt order (paraling, speech)."""
        branches = [("paraling", self.paraling_encoder_projector)] if self.use_paraling else []
        branches.append(("speech", self.speech_encoder_projector))
        per_branch = []
        for name, projector in branches:
            x, lens = encoder_outputs[name]
            y, y_lens = projector(x.to(projector.linear1.weight.dtype), lens)
            if self.round_audio_to_fp16:
                y = round_to_fp16(y)
            per_branch.append([y[b, :n] for b, n in enumerate(y_lens.tolist())])
        return [list(row) for row in zip(*per_branch)]

    def audio_segments(self, feats=None, encoder_outputs=None):
        """Features (see front_end) or encoder outputs (see encode) -> project's segments."""
        if encoder_outputs is None:
            encoder_outputs = self.encode(feats)
        return self.project(encoder_outputs)

    # ----------------------------------------------------------------------------------------------
    # Prompts, the training forward and generation

    def user_message(self, prompt: str | None, with_audio: bool = True) -> dict:
        """The official user turn: "{audio placeholder} {prompt}", stripped."""
        text = f"{self.audio_placeholder if with_audio else ''} {prompt or ''}".strip()
        return {"role": "user", "content": text}

    def training_messages(self, record) -> list[dict]:
        """A data.Record with a SIFT response -> the chat the projectors learn from (Sec. 3.4).

        The user turn is the audio placeholder(s) and the record's instruction if any (SIFT has
        none); the assistant turn is the frozen LLM's own answer, flagged when it was cut off. There
        is never a system turn: a `_ssp` row's `system` only shaped the answer when it was
        generated (Sec. 5.7); the official trainer trains `_ssp` rows with the same two turns as
        `_sp` rows."""
        user = self.user_message(getattr(record, "instruction", None))
        return [user, {"role": "assistant", "content": record.response,
                       "truncated": bool(record.truncated)}]

    def forward(self, messages: list[list[dict]], feats=None, encoder_outputs=None,
                max_length: int | None = None, segments: list[list[torch.Tensor]] | None = None):
        """Teacher-forced pass -> {"loss", "logits", "acc", "num_tokens", "num_targets", "labels",
        "row_nll", "row_tokens"}. loss: mean next-token cross entropy over the supervised tokens
        (the assistant answers), num_tokens of them (num_targets: the same count as a host int,
        which training reads without waiting for the GPU); row_nll[b]: the summed negative
        log-likelihood of row b's answer (evaluation);
        logits: (num_tokens, vocab), only at the positions that predict a supervised token.

        The audio comes as features ({branch: (feats, feat_lens)}, as `features` returns them),
        cached encoder outputs, or ready-made `segments` (per row, LLM-width frames in placeholder
        order, as audio_segments returns; evaluation feeds the oracle text's embeddings this way).
        With none of them the prompts are text only."""
        if segments is None and (feats is not None or encoder_outputs is not None):
            segments = self.audio_segments(feats, encoder_outputs)
        batch = llm.build_batch(self.llm, self.tokenizer, messages, segments, training=True,
                                max_length=max_length)
        logits, targets, mask = llm.answer_logits(self.llm, batch)
        nll = llm.token_losses(logits, targets, mask)
        num_tokens = mask.sum()
        with torch.no_grad():
            acc = (logits.argmax(-1) == targets).sum() / num_tokens.clamp(min=1)
        return {"loss": nll.sum() / num_tokens.clamp(min=1), "logits": logits, "acc": acc,
                "num_tokens": num_tokens, "num_targets": batch.num_targets,
                "labels": batch.labels, "row_nll": nll.sum(1),
                "row_tokens": mask.sum(1)}

    @torch.no_grad()
    def generate(self, audio, messages: list[list[dict]],
                 options: llm.GenerationOptions | None = None, *, system: str | None = None,
                 feats: dict | None = None):
        """Answer each row. audio: list of waveforms, or None: text only, or the features given
        as `feats` (as `features` returns them). options: decoding (default: greedy, at most 200
        new tokens, as the official code)."""
        if audio is not None and feats is not None:
            raise ValueError("generate: give the audio or its feats, not both")
        with self.autocast():  # the training precision for the audio side
            if audio is not None:
                feats = self.features(audio)
            segments = None if feats is None else self.audio_segments(feats)
        batch = llm.build_batch(self.llm, self.tokenizer, messages, segments, training=False,
                                system=system)
        return llm.generate(self.llm, self.tokenizer, batch, options or llm.GenerationOptions())
