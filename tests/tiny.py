"""Tiny, random, offline models for tests: an LLM folder, Zipformer folders, a whole release, a wav.

Everything is built from files in tests/fixtures (the 601-token ChatML tokenizer of
azeros_tiny_release, the tiny Zipformer config of zipformer_small), so no test touches the network.
Each builder takes well under a second.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from conftest import FIXTURES

TOKENIZER_DIR = FIXTURES / "azeros_tiny_release"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
ENCODER_CONFIG = FIXTURES / "zipformer_small" / "config.json"


def copy_tokenizer(path) -> Path:
    """The fixture's byte-level BPE tokenizer with the Qwen2.5 chat template; it already has
    <|AUDIO|> (600)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / name, path / name)
    return path


def tiny_qwen2(hidden: int = 32, layers: int = 2, vocab: int = 608):
    """A random Qwen2ForCausalLM whose special-token ids match the fixture's ChatML tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=597, eos_token_id=599,
                         pad_token_id=597, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config)


def make_tiny_llm_dir(path, hidden: int = 32, layers: int = 2, vocab: int = 608,
                      seed: int = 0) -> Path:
    """A local HF folder: random Qwen2ForCausalLM (fp32) + the ChatML tokenizer.

    Weights are drawn with large scales (like the official fixture) so greedy decoding has clear
    margins and batched/single comparisons are not decided by float noise.
    """
    torch.manual_seed(seed)
    model = tiny_qwen2(hidden, layers, vocab)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_((2.0 if "lm_head" in name else 0.25) * torch.randn_like(p))
        # keep the random model from printing lone bytes
        model.lm_head.weight[dead_ids(vocab)] *= 0.25
    path = Path(path)
    model.save_pretrained(str(path))
    return copy_tokenizer(path)


def dead_ids(vocab: int) -> list[int]:
    """Ids a readable random model should rarely emit: specials, unused rows, unprintable single
    bytes."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    dead = list(range(597, vocab))
    for i in range(597):
        text = tok.decode([i])
        if len(text) == 1 and (text == "\ufffd" or not (text.isprintable() or text == "\n")):
            dead.append(i)
    return dead


def make_tiny_encoder_dir(path, seed: int = 0) -> Path:
    """A random Zipformer folder (config.json + model.safetensors), zipformer_small config."""
    from zipformer import ZipformerConfig, ZipformerEncoder

    torch.manual_seed(seed)
    encoder = ZipformerEncoder(ZipformerConfig.from_json(ENCODER_CONFIG))
    encoder.save_pretrained(path)
    return Path(path)


def tiny_whisper_config(d_model: int = 32, layers: int = 2):
    """A random Whisper config: 80 mel bins, 1500 positions (30 s) as the real ones, tiny widths."""
    from transformers import WhisperConfig

    return WhisperConfig(vocab_size=64, num_mel_bins=80, d_model=d_model, encoder_layers=layers,
                         decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                         encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model,
                         max_source_positions=1500, max_target_positions=32, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)


def make_tiny_whisper_dir(path, kind: str = "WhisperForConditionalGeneration", seed: int = 0):
    """A transformers Whisper folder (save_pretrained: config.json + model.safetensors), random
    weights; kind: WhisperForConditionalGeneration (convert_whisper.py) or WhisperModel."""
    import transformers

    torch.manual_seed(seed)
    getattr(transformers, kind)(tiny_whisper_config()).save_pretrained(str(path))
    return Path(path)


def make_tiny_release(path, paraling: bool = True, seed: int = 0) -> Path:
    """A complete release folder (the official release layout) usable by AZeroS.from_pretrained
    and infer.py."""
    from model import AZeroS

    path = Path(path)
    make_tiny_llm_dir(path / "llm", seed=seed)
    make_tiny_encoder_dir(path / "speech_encoder", seed=seed + 1)
    if paraling:
        make_tiny_encoder_dir(path / "paraling_encoder", seed=seed + 2)
    torch.manual_seed(seed + 3)
    model = AZeroS.from_components(str(path / "llm"), str(path / "speech_encoder"),
                                   str(path / "paraling_encoder") if paraling else None)
    # projectors: official nn.Linear init plus a kick, so their outputs matter
    projectors = [p for n, p in model.named_parameters() if "projector" in n]
    with torch.no_grad():
        for p in model.trainable_parameters() or projectors:
            p.add_(0.5 * torch.randn_like(p))
    # llm/ and encoders exist already: only config, weights, tokenizer are written
    model.save_pretrained(path)
    return path


_CACHE: dict[tuple, Path] = {}


def cached_tiny_release(paraling: bool = True) -> Path:
    """make_tiny_release built once per test session (read-only use!); removed at exit."""
    key = (paraling,)
    if key not in _CACHE:
        root = Path(tempfile.mkdtemp(prefix="azeros_tiny_"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _CACHE[key] = make_tiny_release(root / "release", paraling=paraling)
    return _CACHE[key]


def write_wav(path, seconds: float, sr: int = 16000, seed: int = 0) -> Path:
    """A speech-like test signal (tones + noise), 16-bit PCM."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.3 * np.sin(2 * np.pi * (150 + 50 * seed) * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
    wave += 0.05 * rng.standard_normal(t.shape)
    sf.write(str(path), wave.astype(np.float32), sr, subtype="PCM_16")
    return Path(path)


class JsonHandler(BaseHTTPRequestHandler):
    """A fake OpenAI-compatible judge's plumbing: subclasses answer `do_POST` with `send_json`."""

    def send_json(self, value):
        raw = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(handler: type[BaseHTTPRequestHandler]):
    """Serve `handler` on a free loopback port for the duration of the block; yields its /v1 URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
