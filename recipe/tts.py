"""A tiny offline text-to-speech front end for the CPU recipe: eSpeak NG through ctypes.

The demo needs speech whose transcript *and* paralinguistic attributes are known exactly, without
downloading anything. eSpeak NG is a formant synthesiser: robotic, but its voice variants give us
male/female voices, and its rate and pitch parameters give us speaking-speed and pitch labels that
are true by construction. The `espeakng-loader` wheel bundles the shared library and its voice
data, so `pip install` alone is enough (no system package).

    wave = Speaker().say("hello there", voice="en+f3", rate=170, pitch=50)   # float32, 16 kHz

Only four C calls are used: espeak_Initialize, espeak_SetVoiceByName, espeak_SetParameter,
espeak_Synth (synchronous mode, samples collected by a callback).
"""
import ctypes

import numpy as np
import torch

from data import resample

# Constants from espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_RATE, _PITCH = 1, 3  # espeak_PARAMETER values
_CHARS_UTF8 = 1
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)

# A voice is an accent + a variant ("en-us+f3"). The variants are those whose eSpeak NG voice file
# says its gender (voices/!v/*; eSpeak's default is male), less effects (whisper, croak, robots).
ACCENTS = ["en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc"]
MALE_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "Andy", "AnxiousAndy", "Denis",
                 "Diogo", "Henrique", "Hugo", "Lee", "Marco", "Storm", "antonio", "michel",
                 "miguel", "sandro", "travis", "victor"]
FEMALE_VARIANTS = ["f1", "f2", "f3", "f4", "f5", "Alicia", "Andrea", "Annie", "anika", "aunty",
                   "belinda", "grandma", "linda", "steph", "steph2", "steph3"]


class Speaker:
    """Loads libespeak-ng once per process (it keeps global state, so one instance is enough)."""

    _lib = None

    def __init__(self, sample_rate: int = 16000):
        import espeakng_loader  # imported here so that nothing else in the project needs it

        self.sample_rate = sample_rate
        if Speaker._lib is None:
            lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
            data = espeakng_loader.get_data_path().encode()
            native = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0)
            if native <= 0:
                raise RuntimeError("espeak-ng failed to initialise (bundled voice data not found?)")
            Speaker._lib, Speaker._native_rate = lib, native
        self._chunks: list[np.ndarray] = []
        # Keep a reference to the callback object: if Python garbage-collects it, C crashes.
        self._callback = _CALLBACK(self._collect)
        Speaker._lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, samples, n, events):
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(n,)).copy())
        return 0  # 0 = continue synthesis

    def say(self, text: str, voice: str = "en", rate: int = 170, pitch: int = 50) -> torch.Tensor:
        """Synthesise `text`; rate in words per minute (80-450), pitch 0-100. Returns float32 at
        sample_rate."""
        lib = Speaker._lib
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        lib.espeak_SetParameter(_RATE, int(rate), 0)
        lib.espeak_SetParameter(_PITCH, int(pitch), 0)
        self._chunks = []
        data = text.encode("utf-8")
        if lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, _CHARS_UTF8, None, None) != 0:
            raise RuntimeError(f"espeak-ng failed to synthesise {text!r}")
        pcm = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        wave = torch.from_numpy(pcm.astype(np.float32) / 32768.0)
        return resample(wave, Speaker._native_rate, self.sample_rate)
