"""Whisper as the frozen speech encoder (AZeroS paper, Table 6: "1 Stage, Whisper").

The paper's main model reads speech through Zipformers; Table 6 swaps in OpenAI's Whisper encoder
(official recipe: scripts/train_whisper.sh; DeSTA2.5 and LLaSO use the same encoder). This file
loads the encoder half of any transformers Whisper folder and runs it the way AZeroS needs:

    16 kHz wave --log_mel--> (B, T, n_mels) at 100 Hz      Whisper's own front end, not Kaldi fbank
      --conv1 (k=3), GELU, conv2 (k=3, stride 2), GELU-->  (B, ceil(T/2), d_model) at 50 Hz
      --+ positional embeddings [:ceil(T/2)]-->            cut to the input, not all 1500 (30 s)
      --N transformer layers, LayerNorm-->                 (B, ceil(T/2), d_model)

No padding to 30 s. Whisper was trained on 30-s windows, and transformers' WhisperEncoder.forward
refuses any other length (it checks for exactly 3000 input frames). Padding a 3-s clip to 30 s would
make the encoder ten times slower and hand the projector 1350 frames of silence, so the official
code patches that forward to cut the positional embeddings to the input length
(src/auden/models/whisper_encoder/utils.py). We do the same with a forward of our own over
transformers' modules (their weights and layers, not their forward), so nothing is monkey-patched.
On a 30-s input it computes exactly what transformers' forward computes.

Batches. Each utterance gets the output it gets alone: frames past its end are zeroed before each
convolution (a kernel of 3 reads one frame past it) and masked out of attention. The official
encoder has no mask, so there a short clip's frames change with the padding of its batch.

The projector stacks 4 Whisper frames as for the Zipformer (official configs/train.yaml ds_rate 4,
which scripts/train_whisper.sh keeps): 50 Hz / 4 = 12.5 LLM positions per second of speech.

Support (not the method): check_front_end and read_encoder_weights, at the end of this file.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms: 100 frames per second
DYNAMIC_RANGE = 8.0  # log10 units kept below each utterance's loudest bin (80 dB)
MAX_FRAMES = 3000  # 30 s: Whisper has 1500 positions after its stride-2 convolution
# key prefixes of WhisperEncoder, WhisperModel and WhisperForConditionalGeneration checkpoints
WEIGHT_PREFIXES = ("", "encoder.", "model.encoder.")


def is_whisper_folder(path) -> bool:
    """A transformers Whisper folder: config.json with a model_type containing "whisper" (the test
    the official code uses)."""
    config = Path(path) / "config.json"
    return config.is_file() and "whisper" in str(json.loads(config.read_text()).get("model_type"))


# -------------------------------------------------------------------------------------------------
# Front end: Whisper's log-mel spectrogram


@lru_cache(maxsize=4)
def mel_filters(n_mels: int) -> torch.Tensor:
    """(n_mels, 201) Slaney-style mel filters over 0-8 kHz: WhisperFeatureExtractor's filters (and
    openai-whisper's mel_filters.npz, made by librosa with the same settings)."""
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(num_frequency_bins=1 + N_FFT // 2, num_mel_filters=n_mels,
                           min_frequency=0.0, max_frequency=SAMPLE_RATE / 2,
                           sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    return torch.from_numpy(bank).float().T.contiguous()


def log_mel_one(wave: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """One 16 kHz waveform of N samples -> (N // 160, n_mels) log-mel, as WhisperFeatureExtractor
    computes it for an unpadded input: power STFT (Hann window, centred, reflect-padded), mel
    filters, log10, floored at the utterance's maximum - 8, then (x + 4) / 4 (about unit scale)."""
    window = torch.hann_window(N_FFT, device=wave.device)
    stft = torch.stft(wave, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2  # the last frame is dropped: N // 160 frames
    log_spec = (mel_filters(n_mels).to(wave.device) @ power).clamp(min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - DYNAMIC_RANGE)
    return ((log_spec + 4.0) / 4.0).T


def log_mel(waves, lengths=None, n_mels: int = 80, device=None):
    """A batch of 16 kHz waveforms (list of 1-D tensors, or padded (B, N) with `lengths`) -> feats
    (B, T, n_mels) float32 and feat_lens (B,) = samples // 160. Each utterance is computed alone, so
    its numbers do not depend on the batch; frames past its end are 0 (the encoder ignores them)."""
    if lengths is not None:
        waves = [w[: int(n)] for w, n in zip(waves, lengths)]
    waves = [torch.as_tensor(w, dtype=torch.float32, device=device) for w in waves]
    if any(len(w) < HOP_LENGTH for w in waves):
        raise ValueError(f"audio too short for Whisper's front end: need {HOP_LENGTH} samples "
                         f"(10 ms), got lengths {[len(w) for w in waves]}")
    per_utt = [log_mel_one(w, n_mels) for w in waves]
    lens = torch.tensor([len(f) for f in per_utt], dtype=torch.long, device=per_utt[0].device)
    return nn.utils.rnn.pad_sequence(per_utt, batch_first=True), lens


# -------------------------------------------------------------------------------------------------
# The encoder


class WhisperSpeechEncoder(nn.Module):
    """Frozen Whisper encoder: (B, T, n_mels) log-mel at 100 Hz -> (B, ceil(T/2), d_model) at 50 Hz.

    `self.encoder` is transformers' WhisperEncoder, so the state-dict keys, and the folder
    save_pretrained writes, are transformers' own (the official code loads that folder with
    WhisperEncoder.from_pretrained); only its forward is replaced by ours. Output frames past
    encoder_out_lens are zero.
    """

    def __init__(self, config):
        super().__init__()
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        self.config = config if isinstance(config, WhisperConfig) else WhisperConfig(**config)
        self.encoder = WhisperEncoder(self.config)
        self.n_mels = self.config.num_mel_bins
        self.output_dim = self.config.d_model
        self.weights_dtype = torch.float32  # what save_pretrained writes: the loaded file's dtype
        # the features this encoder reads; model.front_end computes each kind once per batch
        self.front_end = f"whisper log-mel {self.n_mels}"

    def features(self, waves, lengths=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return log_mel(waves, lengths, self.n_mels, device)

    def forward(self, x: torch.Tensor, x_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, n_mels) log-mel (frames past x_lens may hold anything), x_lens: (B,) valid
        frames. Inputs over 30 s are cut to 30 s, as in the official code (its data is 1-30 s)."""
        if x.dim() != 3 or x.shape[-1] != self.n_mels:
            raise ValueError(f"expected log-mel of shape (B, T, {self.n_mels}), "
                             f"got {tuple(x.shape)}")
        enc = self.encoder
        x_lens = x_lens.to(device=x.device, dtype=torch.long).clamp(max=MAX_FRAMES)
        T = int(x_lens.max())
        x = x[:, :T]
        valid = torch.arange(T, device=x.device)[None, :] < x_lens[:, None]  # (B, T)
        # Zero the padding before each convolution: a kernel of 3 reads one frame past an
        # utterance's end, which, run alone, is the convolution's own zero padding.
        h = x.masked_fill(~valid[..., None], 0.0).transpose(1, 2)  # (B, n_mels, T)
        h = F.gelu(enc.conv1(h)).masked_fill(~valid[:, None, :], 0.0)
        h = F.gelu(enc.conv2(h)).transpose(1, 2)  # (B, ceil(T/2), D)
        out_lens = (x_lens - 1) // 2 + 1
        # The official patch: positions 0..T'-1 of the 1500, instead of all 1500.
        h = h + enc.embed_positions.weight[: h.shape[1]]
        mask = None  # a batch without padding needs none (and then runs as transformers' forward)
        if bool((out_lens < h.shape[1]).any()):
            keep = torch.arange(h.shape[1], device=h.device)[None, :] < out_lens[:, None]
            mask = torch.zeros(keep.shape, dtype=h.dtype, device=h.device)
            mask = mask.masked_fill(~keep, torch.finfo(h.dtype).min)[:, None, None, :]
        for layer in enc.layers:
            h = layer(h, mask)
        h = enc.layer_norm(h)
        pad = torch.arange(h.shape[1], device=h.device)[None, :] >= out_lens[:, None]
        return h.masked_fill(pad[..., None], 0.0), out_lens

    # ---- loading and saving ----

    @classmethod
    def from_pretrained(cls, path, device=None) -> WhisperSpeechEncoder:
        """A transformers Whisper folder (WhisperModel, WhisperForConditionalGeneration or
        WhisperEncoder; safetensors, one file or shards): config.json and the encoder's weights, the
        decoder is never read. Returned in eval mode, float32."""
        path = Path(path)
        with torch.device("meta"):  # no random init of weights that are loaded next (large: ~10 s)
            model = cls(json.loads((path / "config.json").read_text()))
        check_front_end(path, model.n_mels)
        state = read_encoder_weights(path)
        model.weights_dtype = next(iter(state.values())).dtype
        missing, unexpected = model.encoder.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"{path}: Whisper encoder weights do not match its config.json: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.to(device=device, dtype=torch.float32).eval()

    def save_pretrained(self, out_dir) -> None:
        """transformers' WhisperEncoder folder: config.json + model.safetensors with its key names,
        in the dtype the weights came in (fp16 -> fp32 -> fp16 is exact, so a float16 checkpoint is
        written back bit for bit and no larger)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.config.to_json_file(str(out / "config.json"))
        state = {k: v.detach().to("cpu", self.weights_dtype).contiguous()
                 for k, v in self.encoder.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def check_front_end(path: Path, n_mels: int) -> None:
    """A folder's preprocessor_config.json (WhisperFeatureExtractor's settings), if there is one,
    must describe the front end log_mel computes: other settings mean other features."""
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return
    saved = json.loads(file.read_text())
    ours = {"feature_size": n_mels, "sampling_rate": SAMPLE_RATE, "n_fft": N_FFT,
            "hop_length": HOP_LENGTH, "dither": 0.0}
    wrong = {k: saved[k] for k in ours if k in saved and saved[k] != ours[k]}
    if wrong:
        raise ValueError(f"{file}: {wrong} differ from the front end whisper_encoder.log_mel "
                         f"computes ({ours})")


def read_encoder_weights(path: Path) -> dict[str, torch.Tensor]:
    """The encoder's tensors from model.safetensors (or the shards model.safetensors.index.json
    lists), without the prefix of the class that saved them. Only these tensors are read."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (path / "model.safetensors").is_file():
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors (or model.safetensors.index.json) "
                                "in this Whisper folder")
    prefix = next((p for p in WEIGHT_PREFIXES if f"{p}conv1.weight" in weight_map), None)
    if prefix is None:
        raise ValueError(f"{path}: no Whisper encoder weights (no conv1.weight under the prefixes "
                         f"{[p or '(none)' for p in WEIGHT_PREFIXES]})")
    wanted = [k for k in weight_map if k.startswith(prefix)]  # no prefix: a bare WhisperEncoder
    state = {}
    for shard in sorted({weight_map[k] for k in wanted}):
        with safe_open(str(path / shard), "pt") as f:
            for k in (k for k in wanted if weight_map[k] == shard):
                state[k[len(prefix):]] = f.get_tensor(k)
    return state
