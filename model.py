"""The AZeroS speech LLM: frozen encoders + trainable projectors + frozen LLM (AZeroS paper, Sec. 4.1).

    fbank --> speech_encoder (frozen Zipformer, semantic) --> speech_encoder_projector ----------+
          \\-> paraling_encoder (frozen, paralinguistic) --> paraling_encoder_projector --+       |
                                                                                         v       v
    "<audio><meta><|AUDIO|></meta><text><|AUDIO|></text></audio> {instruction}" --> frozen LLM --> text

Training (Sec. 3.4 SIFT, Sec. 4.2 two stages) happens in two stages, and only one projector learns in each:
  stage 1: the semantic branch alone; the user turn is just `<|AUDIO|>` standing for the transcript.
  stage 2: the paralinguistic projector learns; the semantic projector stays as stage 1 left it.
The targets come from the frozen LLM itself (generate_targets.py), so the loss asks the projected audio to
make the LLM say what it said for the transcript + metadata text.

The semantic encoder may also be Whisper (paper Table 6; whisper_encoder.py): give a transformers
Whisper folder instead of a Zipformer one. Each encoder reads its own front end (Kaldi fbank for
Zipformers, Whisper's log-mel for Whisper), and config.json records each encoder's model_type.

Checkpoints use the layout of the released `AudenAI/azeros`: a root config.json, the projector
weights in model.safetensors, the tokenizer at the root, and the frozen parts as sub-folders llm/,
speech_encoder/, paraling_encoder/. The official release loads here as is; a model saved here loads in the
official code with `AzerosModel.from_pretrained(folder, strict=False)` (model.safetensors holds only the
projectors, so the default strict=True reports the frozen parts' keys as missing).

One numerical detail matters for parity: the official code casts projector outputs to float16 before they
are spliced into the LLM input. The released projectors were trained behind that rounding, so we keep it
by default (`round_audio_to_fp16=True`): it costs at most ~5e-4 of absolute precision per value and makes
our outputs match the official implementation token for token. Turn it off only for your own models.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import checks
import llm as L
from projector import Projector
from whisper_encoder import WhisperSpeechEncoder, is_whisper_folder

SPEECH, PARALING = "speech", "paraling"
# the user-turn layout of a two-encoder model: paralinguistic frames in <meta>, semantic frames in <text>
WRAPPED_AUDIO = f"<audio><meta>{L.AUDIO_TOKEN}</meta><text>{L.AUDIO_TOKEN}</text></audio>"
WEIGHT_FILES = ("pretrained.safetensors", "model.safetensors", "pretrained.pt", "model.pt")  # official order
FROZEN = ("llm", "speech_encoder", "paraling_encoder")


def default_dtype(device) -> torch.dtype | str:
    """LLM dtype when none is asked for: the checkpoint's own on GPU, float32 on CPU (half is slow there)."""
    return "auto" if torch.device(device or "cpu").type == "cuda" else torch.float32


class AZeroS(nn.Module):
    def __init__(self, llm, tokenizer, speech_encoder, paraling_encoder=None, *, config: dict | None = None,
                 speech_k: int = 4, paraling_k: int = 4, round_audio_to_fp16: bool = True):
        super().__init__()
        self.llm = L.freeze(llm)
        self.tokenizer = tokenizer
        rows = llm.get_input_embeddings().num_embeddings
        self.audio_token_id = L.add_audio_token(tokenizer, llm)
        # a resized LLM differs from the folder it came from, so save_pretrained must write it, not link it
        self.resized = llm.get_input_embeddings().num_embeddings != rows
        self.speech_encoder = L.freeze(speech_encoder)
        hidden = llm.config.hidden_size
        self.speech_encoder_projector = Projector(speech_encoder.output_dim, hidden, speech_k)
        self.paraling_encoder = L.freeze(paraling_encoder) if paraling_encoder is not None else None
        self.paraling_encoder_projector = (Projector(paraling_encoder.output_dim, hidden, paraling_k)
                                           if paraling_encoder is not None else None)
        self.config = config if config is not None else self._make_config()
        self.round_audio_to_fp16 = round_audio_to_fp16
        self.stage = None  # None: inference, both branches used if present
        self.sources: dict[str, str] = {}  # local folders the frozen parts came from (for linking on save)
        self.set_stage(None)

    def _make_config(self) -> dict:
        """The root config.json of the release layout."""
        llm_config = self.llm.config.to_dict()
        return {
            "model_type": "azeros", "use_flash_attn": False, "exclude_from_checkpoint": list(FROZEN),
            "speech_encoder_projector_ds_rate": self.speech_encoder_projector.k,
            "paraling_encoder_projector_ds_rate": (self.paraling_encoder_projector.k
                                                   if self.paraling_encoder_projector is not None else 4),
            "speech_encoder_config": encoder_config(self.speech_encoder),
            "paraling_encoder_config": encoder_config(self.paraling_encoder),
            "llm_config": llm_config,
        }

    # ------------------------------------------------------------------------------------------------------
    # Building and loading

    @classmethod
    def from_components(cls, llm: str, speech_encoder: str, paraling_encoder: str | None = None, *, gguf_file=None,
                        device=None, dtype=None, projector_k: int = 4) -> AZeroS:
        """A fresh model (randomly initialised projectors) from an LLM and encoder folders, for training."""
        model, tokenizer = L.load_llm(llm, gguf_file=gguf_file, dtype=dtype or default_dtype(device), device=device)
        speech = load_encoder(speech_encoder, device=device)
        para = load_encoder(paraling_encoder, device=device) if paraling_encoder else None
        self = cls(model, tokenizer, speech, para, speech_k=projector_k, paraling_k=projector_k).to(device)
        gguf = gguf_file or str(llm).endswith(".gguf")
        self.sources = {k: str(v) for k, v in (("llm", None if gguf else llm), ("speech_encoder", speech_encoder),
                                               ("paraling_encoder", paraling_encoder)) if v and os.path.isdir(v)}
        return self

    @classmethod
    def from_pretrained(cls, path_or_hub_id, device=None, dtype=None, round_audio_to_fp16: bool = True) -> AZeroS:
        """Load a model in the release layout (a local folder, or a hub id such as "AudenAI/azeros").

        dtype applies to the LLM; encoders and projectors stay float32 (they are small, and the projectors'
        weights are the trained fp32 values). Root weights may hold only the projectors (what training
        saves; the official loader needs strict=False for these) or a full state dict.
        """
        root = resolve_model_dir(path_or_hub_id)
        config = checks.json_file(require(root / "config.json"))
        has_para = config.get("paraling_encoder_config") is not None
        require(root / "speech_encoder"), require(root / "llm")
        if has_para:
            require(root / "paraling_encoder")
        checks.model_files(root)  # a corrupt weight or config file is named, no library traceback
        weights = load_state_dict(find_weights(root))
        require(root / "tokenizer_config.json")
        attn = "flash_attention_2" if config.get("use_flash_attn") else None  # falls back to sdpa if missing
        llm, tokenizer = L.load_llm(str(root / "llm"), tokenizer_path=str(root), dtype=dtype or default_dtype(device),
                                    attn_implementation=attn)
        speech = load_encoder(root / "speech_encoder")
        para = load_encoder(root / "paraling_encoder") if has_para else None
        self = cls(llm, tokenizer, speech, para, config=config,
                   speech_k=config.get("speech_encoder_projector_ds_rate", 4),
                   paraling_k=config.get("paraling_encoder_projector_ds_rate", 4),
                   round_audio_to_fp16=round_audio_to_fp16)
        self.load_weights(weights)
        self.sources = {k: str(root / k) for k in FROZEN if (root / k).is_dir()}
        return self.to(device) if device is not None else self

    def attach_paraling_encoder(self, path: str, k: int = 4) -> AZeroS:
        """Add a paralinguistic encoder (from its folder) with a fresh projector: a stage-1 model becomes
        the starting point of stage 2. Everything already loaded (LLM, semantic encoder, its trained
        projector) is kept as is, so nothing is read twice. A paralinguistic branch the model already has
        is replaced, projector included: stage 2 always starts its projector from scratch.
        Returns self, for chaining after from_pretrained.
        """
        device = self.speech_encoder_projector.linear1.weight.device
        encoder = load_encoder(path, device=device)
        self.paraling_encoder = L.freeze(encoder)
        self.paraling_encoder_projector = Projector(encoder.output_dim, self.llm.config.hidden_size, k).to(device)
        # the saved config.json must describe the new branch, or the folder would load without it
        self.config = {**self.config, "paraling_encoder_projector_ds_rate": k,
                       "paraling_encoder_config": encoder_config(encoder)}
        # a local folder is linked on save; anything else (or a replaced branch's old folder) must not be
        self.sources.pop("paraling_encoder", None)
        if os.path.isdir(path):
            self.sources["paraling_encoder"] = str(path)
        self.set_stage(self.stage)  # the new projector follows the current stage (frozen unless stage 2)
        return self

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load root weights: projectors must all be there; keys of the frozen parts are ignored (the
        sub-folders hold those). Anything unknown or mis-shaped is an error that names the keys."""
        own = {k: v for k, v in self.state_dict().items() if not k.startswith(tuple(f"{m}." for m in FROZEN))}
        state = {k: v for k, v in state.items() if not k.startswith(tuple(f"{m}." for m in FROZEN))}
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        bad = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
               if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or bad:
            raise ValueError(f"root weights do not match the model: missing {missing}, unexpected {unexpected}, "
                             f"shape mismatch {bad}")
        self.load_state_dict(state, strict=False)

    def save_pretrained(self, out_dir, link_frozen: bool = True) -> None:
        """Write the release layout. Only the projectors are (re)written each time; the frozen parts are
        written once (or symlinked to the folders they were loaded from), since they never change."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(self.config, indent=2))
        projectors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                      if k.startswith(("speech_encoder_projector.", "paraling_encoder_projector."))}
        # temp file + rename: a run killed mid-save never leaves a half-written model.safetensors behind
        tmp = out / ".model.safetensors.tmp"
        save_file(projectors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / "model.safetensors")
        self.tokenizer.save_pretrained(str(out))
        for name in FROZEN:
            module, target = getattr(self, name), out / name
            if module is None or target.exists():
                continue
            source = self.sources.get(name)
            # A transformers Whisper folder holds the decoder too, and the official loader
            # (WhisperEncoder.from_pretrained) wants the encoder alone: write it, never link it.
            linkable = not (self.resized or isinstance(module, WhisperSpeechEncoder))
            if link_frozen and linkable and source and os.path.isdir(source):
                # a relative link keeps working when the whole experiment folder is moved or copied
                target.symlink_to(os.path.relpath(os.path.abspath(source), out.resolve()), target_is_directory=True)
            else:
                module.save_pretrained(str(target))

    # ------------------------------------------------------------------------------------------------------
    # Stages and trainable parameters

    @property
    def use_paraling(self) -> bool:
        """Stage 1 trains the semantic branch alone, even when a paralinguistic encoder is attached."""
        return self.paraling_encoder is not None and self.stage != 1

    @property
    def audio_placeholder(self) -> str:
        return WRAPPED_AUDIO if self.use_paraling else L.AUDIO_TOKEN

    def set_stage(self, stage: int | str | None) -> None:
        """1: only the semantic projector trains; 2: only the paralinguistic one; "both": every
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
        """model.train() must not wake the frozen parts (dropout in the LLM, batch-count tricks in Zipformer)."""
        super().train(mode)
        for name in FROZEN:
            if getattr(self, name) is not None:
                getattr(self, name).eval()
        return self

    # ------------------------------------------------------------------------------------------------------
    # Audio -> LLM-width frames

    def encoders(self) -> dict[str, nn.Module]:
        """The encoders in use, {"speech": ..., "paraling": ...} (paraling only when used)."""
        used = {SPEECH: self.speech_encoder}
        if self.use_paraling:
            used[PARALING] = self.paraling_encoder
        return used

    @torch.no_grad()
    def encode(self, feats, feat_lens) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Run the frozen encoders -> {"speech": (out, lens), "paraling": (out, lens)} (paraling if used).

        feats/feat_lens as front_end returns them (tensors, or {branch: tensor} dicts when the
        encoders read different front ends). The result does not depend on the projectors, so
        training can cache it across epochs."""
        out = {}
        for branch, encoder in self.encoders().items():
            x, lens = feats, feat_lens
            if isinstance(feats, dict):
                x, lens = feats[branch], feat_lens[branch]
            out[branch] = encoder(x, lens.clamp(max=x.shape[1]))
        return out

    def front_end(self, waves, wave_lens=None, device=None) -> tuple:
        """16 kHz waveforms (list of 1-D tensors, or padded (B, N) with wave_lens) -> (feats,
        feat_lens), the input of the encoders in use: Kaldi fbank for a Zipformer, Whisper's own
        log-mel for Whisper (paper Table 6). When the two read different front ends (a Whisper
        semantic encoder beside a Zipformer paralinguistic one), feats and feat_lens are
        {branch: tensor} dicts; otherwise plain tensors."""
        import data
        computed, per_branch = {}, {}
        for branch, encoder in self.encoders().items():
            kind = getattr(encoder, "front_end", "fbank")
            if kind not in computed:
                computed[kind] = (encoder.features(waves, wave_lens, device) if kind != "fbank"
                                  else data.fbank(waves, wave_lens, device=device))
            per_branch[branch] = computed[kind]
        if len(computed) == 1:
            return next(iter(computed.values()))
        return ({b: f for b, (f, _) in per_branch.items()},
                {b: n for b, (_, n) in per_branch.items()})

    def project(self, encoder_outputs: dict) -> list[list[torch.Tensor]]:
        """Encoder outputs -> per row, the audio segments in prompt order (paralinguistic, then semantic)."""
        branches = [(PARALING, self.paraling_encoder_projector)] if self.use_paraling else []
        branches.append((SPEECH, self.speech_encoder_projector))
        rows = None
        for name, projector in branches:
            x, lens = encoder_outputs[name]
            y, y_lens = projector(x.to(projector.linear1.weight.dtype), lens)
            if self.round_audio_to_fp16:
                # The official forward_speech_encoder casts to fp16 (see module docstring). Going back to the
                # projector dtype keeps exactly those values (fp32 holds every fp16) and keeps fp16 tensors
                # away from CPU autocast, which has no fp16 rules.
                y = y.to(torch.float16).to(y.dtype)
            segments = [y[b, :n] for b, n in enumerate(y_lens.tolist())]
            rows = [[s] for s in segments] if rows is None else [r + [s] for r, s in zip(rows, segments)]
        return rows

    def audio_segments(self, feats=None, feat_lens=None, encoder_outputs=None) -> list[list[torch.Tensor]]:
        if encoder_outputs is None:
            encoder_outputs = self.encode(feats, feat_lens)
        return self.project(encoder_outputs)

    # ------------------------------------------------------------------------------------------------------
    # Training forward and generation

    def forward(self, messages: list[list[dict]], feats=None, feat_lens=None, encoder_outputs=None,
                max_length: int | None = None, segments: list[list[torch.Tensor]] | None = None) -> dict:
        """Teacher-forced pass -> {"loss", "logits", "acc", "num_tokens", "labels", "row_nll", "row_tokens"}.

        loss is the mean next-token cross entropy over supervised tokens (the assistant answers);
        row_nll[b] is the summed negative log-likelihood of row b's answer (for evaluation).

        The audio comes as fbank features, as cached encoder outputs, or as ready-made `segments` (per row,
        LLM-width frames in placeholder order, like audio_segments returns; evaluation feeds the oracle
        text's embeddings this way). With none of them the prompts are text only.
        """
        if segments is None and (feats is not None or encoder_outputs is not None):
            segments = self.audio_segments(feats, feat_lens, encoder_outputs)
        batch = L.build_batch(self.llm, self.tokenizer, messages, segments, training=True, max_length=max_length)
        logits = self.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits
        nll, mask = L.token_losses(logits, batch.labels)
        num_tokens = mask.sum()
        with torch.no_grad():
            hits = (logits[:, :-1].argmax(-1) == batch.labels[:, 1:]) & mask
            acc = hits.sum() / num_tokens.clamp(min=1)
        return {"loss": nll.sum() / num_tokens.clamp(min=1), "logits": logits, "acc": acc,
                "num_tokens": num_tokens, "labels": batch.labels, "row_nll": nll.sum(1), "row_tokens": mask.sum(1)}

    def features(self, audio) -> tuple:
        """Waveforms (list of 16 kHz float arrays) or an (feats, feat_lens) tuple -> the encoders'
        input features (see front_end) on our device."""
        device = self.speech_encoder_projector.linear1.weight.device
        if isinstance(audio, tuple) and len(audio) == 2:
            feats, lens = audio
        else:
            feats, lens = self.front_end([torch.as_tensor(w, dtype=torch.float32) for w in audio])
        if isinstance(feats, dict):
            return ({b: f.to(device) for b, f in feats.items()},
                    {b: torch.as_tensor(n).to(device) for b, n in lens.items()})
        return feats.to(device), torch.as_tensor(lens).to(device)

    def user_message(self, prompt: str | None, with_audio: bool = True) -> dict:
        """The official user turn: "{audio placeholder} {prompt}", stripped."""
        text = f"{self.audio_placeholder if with_audio else ''} {prompt or ''}".strip()
        return {"role": "user", "content": text}

    @torch.no_grad()
    def generate(self, audio, messages: list[list[dict]], options: L.GenerationOptions | None = None,
                 *, system: str | None = None) -> list[str]:
        """Answer each row. audio: list of waveforms, an (feats, feat_lens) tuple, or None (text only).
        options: decoding settings (default: greedy, at most 200 new tokens, as the official code)."""
        segments = None if audio is None else self.audio_segments(*self.features(audio))
        batch = L.build_batch(self.llm, self.tokenizer, messages, segments, training=False, system=system)
        return L.generate(self.llm, self.tokenizer, batch, options or L.GenerationOptions())

    def training_messages(self, record) -> list[dict]:
        """A data.Record with a SIFT response -> the chat the projectors learn from (Sec. 3.4).

        The user turn is the audio placeholder(s) and the instruction if the record has one (SIFT has
        none); the assistant turn is the frozen LLM's own answer, flagged when it was cut off.
        There is never a system turn: a `_ssp` row's `system` (the dialog system message) only shaped
        the answer when it was generated (Sec. 5.7); the official trainer trains `_ssp` rows with the
        same two turns as `_sp` rows, so the model learns to answer that way without being told."""
        user = self.user_message(getattr(record, "instruction", None))
        return [user, {"role": "assistant", "content": record.response, "truncated": bool(record.truncated)}]


# ----------------------------------------------------------------------------------------------------------
# Files


def load_encoder(path, device=None) -> nn.Module:
    """A frozen encoder from its folder: a transformers Whisper folder (config.json model_type
    "whisper", paper Table 6) or a Zipformer folder (the paper's TTA and Auden-Voice encoders)."""
    if is_whisper_folder(path):
        return WhisperSpeechEncoder.from_pretrained(path, device=device)
    from zipformer import ZipformerEncoder
    return ZipformerEncoder.from_pretrained(str(path), device=device)


def encoder_config(encoder) -> dict | None:
    """An encoder's entry in the root config.json (None when the model has no such encoder). Its
    model_type says which encoder it is: "zipformer", or transformers' "whisper" (the whole
    WhisperConfig, as the official code stores it)."""
    if encoder is None:
        return None
    if isinstance(encoder, WhisperSpeechEncoder):
        return encoder.config.to_dict()
    return {"model_type": "zipformer", **encoder.config.to_dict()}


def require(path: Path) -> Path:
    """Fail early, naming the missing piece of a model folder."""
    if not path.exists():
        raise FileNotFoundError(f"model folder incomplete: {path} is missing")
    return path


def resolve_model_dir(path_or_hub_id) -> Path:
    """A local folder as is; anything else is treated as a hub id and downloaded (cached) once."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    if path.exists() or checks.looks_local(str(path_or_hub_id)):  # a mistyped path is not a hub id
        raise FileNotFoundError(f"model folder {path_or_hub_id}: no such folder")
    from huggingface_hub import snapshot_download
    logging.info("downloading %s from the Hugging Face hub", path_or_hub_id)
    try:
        return Path(snapshot_download(str(path_or_hub_id)))
    except Exception as e:  # offline, unknown repo, no access: one clear line for the CLI
        raise FileNotFoundError(f"model folder not found and hub download of {path_or_hub_id} failed: "
                                f"{type(e).__name__}") from e


def find_weights(root: Path) -> Path:
    for name in WEIGHT_FILES:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"model folder incomplete: none of {list(WEIGHT_FILES)} in {root}")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a .pt loaded with weights_only=True (never unpickle arbitrary objects)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state

