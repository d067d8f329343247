"""Support code for model.py, llm.py and zipformer.py: models on disk (not the method).

model.py builds the model; what it needs from the file system lives here, off its reading path:
  1. where a folder comes from: a local path, or a hub id downloaded once;
  2. which weight file a folder holds (the official loader's order), read as safetensors or as a
     .pt with weights_only=True (never unpickle arbitrary objects); a Zipformer encoder's config
     and weights in the official layout, from a bare or a composite checkpoint;
  3. checks that name the missing or mismatched piece (a file, a key, a width) in one line;
  4. the root config.json of the release layout, and the frozen parts written once or linked;
  5. loading details of the LLM: GGUF files, the attention fallback, an embedding resize, stop
     tokens, quiet transformers logs.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from support import checks, files

WEIGHT_FILES = ("pretrained.safetensors", "model.safetensors", "pretrained.pt", "model.pt")
FROZEN = ("llm", "speech_encoder", "paraling_encoder")  # sub-folders, never trained

# --------------------------------------------------------------------------------------------------
# 1-2. Finding and reading


def resolve_model_dir(path_or_hub_id) -> Path:
    """A local folder as is; anything else is treated as a hub id and downloaded (cached) once."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    if path.exists() or checks.looks_local(str(path_or_hub_id)):  # a mistyped path is no hub id
        raise FileNotFoundError(f"model folder {path_or_hub_id}: no such folder")
    from huggingface_hub import snapshot_download
    logging.info("downloading %s from the Hugging Face hub", path_or_hub_id)
    try:
        return Path(snapshot_download(str(path_or_hub_id)))
    except Exception as e:  # offline, unknown repo, no access: one clear line for the CLI
        raise FileNotFoundError(f"model folder not found and hub download of {path_or_hub_id} "
                                f"failed: {type(e).__name__}") from e


def find_weights(folder) -> Path:
    """The weight file of a model or encoder folder, in the official loader's order."""
    for name in WEIGHT_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise FileNotFoundError(f"model folder incomplete: none of {list(WEIGHT_FILES)} in {folder}")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a .pt loaded with weights_only=True; a training checkpoint's
    {"state_dict": ...} or {"model": ...} wrapper is taken off."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    return state


# --------------------------------------------------------------------------------------------------
# 2b. The Zipformer encoder's files (zipformer.py keeps only the architecture)


class JsonConfig:
    """config.json <-> a dataclass: unknown keys (model_type, ...) are ignored when reading."""

    model_type = ""

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path):
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, **asdict(self)}


def check_zipformer_config(config) -> None:
    """Options of the official config that this inference-only encoder does not implement."""
    if config.causal:
        raise NotImplementedError("causal (streaming) Zipformer2 is not implemented; released "
                                  "encoders are not")
    if config.output_downsampling_factor != 2:
        raise ValueError("output_downsampling_factor must be 2, as in the official code")


def check_fbank(x: torch.Tensor, x_lens: torch.Tensor, feature_dim: int,
                min_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's input, checked with one clear line per mistake -> (x cut to the longest row,
    x_lens as long on x's device). Extra padding changes the tensor size, never the result."""
    if x.dim() != 3 or x.shape[-1] != feature_dim:
        raise ValueError(f"expected fbank of shape (B, T, {feature_dim}), got {tuple(x.shape)}")
    x_lens = x_lens.to(device=x.device, dtype=torch.long)
    if x_lens.shape != (x.shape[0],):
        raise ValueError(f"x_lens must have shape ({x.shape[0]},), got {tuple(x_lens.shape)}")
    if int(x_lens.min()) < min_frames:
        raise ValueError(f"input too short: the Zipformer front end needs at least "
                         f"{min_frames} fbank frames (90 ms at 100 Hz), got lengths "
                         f"{x_lens.tolist()}")
    max_len = int(x_lens.max())
    if max_len > x.shape[1]:
        raise ValueError(f"x_lens.max() = {max_len} exceeds the {x.shape[1]} frames of x")
    return x[:, :max_len], x_lens


def read_zipformer(path) -> tuple[dict, dict]:
    """An encoder folder (config.json + pretrained|model .safetensors|.pt), or a weight file beside
    its config.json -> (encoder config dict, state dict with the official names). Composite
    checkpoints are accepted: a config holding `speech_encoder_config` / `audio_encoder_config` /
    `encoder_config` and weights under a `module.` and/or `speech_encoder.` / `audio_encoder.` /
    `encoder.` prefix."""
    path = Path(path)
    weight_path, path = (find_weights(path), path) if path.is_dir() else (path, path.parent)
    config = checks.json_file(path / "config.json")
    sub = next((k for k in checks.ENCODER_CONFIG_KEYS if f"{k}_config" in config), None)
    # the config's own key first; "encoder." last: a bare encoder's keys start with it too
    # (encoder.encoders...)
    prefixes = [f"{k}." for k in ((sub,) if sub else ()) + checks.ENCODER_CONFIG_KEYS]
    state = zipformer_state(load_state_dict(weight_path), prefixes)
    return (config[f"{sub}_config"] if sub else config), state


def zipformer_state(state: dict, prefixes: list[str]) -> dict:
    """Strip DDP's `module.` and a composite model's encoder prefix; add `model_batch_count` if
    absent."""
    probe = "encoder_embed.conv.0.weight"
    if probe not in state and any(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.")}
    if probe not in state:
        for pfx in prefixes:
            if pfx + probe in state:
                state = {k[len(pfx) :]: v for k, v in state.items() if k.startswith(pfx)}
                break
        else:
            raise KeyError(f"no Zipformer encoder weights found (looked for '{probe}' under "
                           f"{prefixes})")
    state = dict(state)
    # old checkpoints lack it (the official loader adds it too)
    state.setdefault("model_batch_count", torch.tensor(100000.0))
    return state


def save_zipformer(encoder, save_dir) -> None:
    """config.json + model.safetensors with the official names (what the official loader reads)."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "config.json").write_text(json.dumps(encoder.config.to_dict(), indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(save_dir / "model.safetensors"))


# --------------------------------------------------------------------------------------------------
# 3. Checks


def require(path: Path) -> Path:
    """Fail early, naming the missing piece of a model folder."""
    if not path.exists():
        raise FileNotFoundError(f"model folder incomplete: {path} is missing")
    return path


def check_model_folder(root: Path, config: dict) -> Path:
    """Every part of a release folder is there and reads, before anything slow is loaded -> the
    root weight file."""
    require(root / "speech_encoder")
    if not config.get("llm_hub"):  # else the LLM is the hub model it names (llm_location)
        require(root / "llm")
    if config.get("paraling_encoder_config") is not None:
        require(root / "paraling_encoder")
    checks.model_files(root)  # a corrupt weight or config file is named, no library traceback
    weights = find_weights(root)
    require(root / "tokenizer_config.json")
    return weights


def read_model_folder(path_or_hub_id) -> tuple[Path, dict, dict]:
    """A release folder, checked part by part before anything slow is loaded -> (root, config,
    root weights)."""
    root = resolve_model_dir(path_or_hub_id)
    config = checks.json_file(require(root / "config.json"))
    return root, config, load_state_dict(check_model_folder(root, config))


def projector_weights(state: dict, own: dict) -> dict:
    """The projector entries of root weights, checked against the model's own state dict. Keys of
    the frozen parts are ignored (the sub-folders hold those); a missing, unknown or mis-shaped key
    is an error that names it."""
    frozen = tuple(f"{m}." for m in FROZEN)
    own = {k: v for k, v in own.items() if not k.startswith(frozen)}
    state = {k: v for k, v in state.items() if not k.startswith(frozen)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
           if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"root weights do not match the model: missing {missing}, unexpected "
                         f"{unexpected}, shape mismatch {bad}")
    return state


def stage1_projector(init: Path, projector) -> dict:
    """The trained speech projector of a stage-1 folder, for `projector` of a stage-2 model built on
    another copy of the LLM; a width that cannot match is named with its usual cause."""
    state = load_file(str(init / "model.safetensors"))
    prefix = "speech_encoder_projector."
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not state:
        raise checks.CheckError(f"--init {init}: model.safetensors holds no "
                                "speech_encoder_projector.* weights")
    llm_width, init_width = projector.linear2.out_features, state["linear2.weight"].shape[0]
    if init_width != llm_width:
        raise checks.CheckError(
            f"the stage-1 projector in {init} maps to width {init_width}, but the LLM has hidden "
            f"size {llm_width}: stage 2 must use the LLM stage 1 was trained with (leave out --llm "
            f"to use {init / 'llm'})")
    enc_in = state["linear1.weight"].shape[1]
    if enc_in != projector.linear1.in_features:
        raise checks.CheckError(
            f"the stage-1 projector in {init} takes {enc_in} inputs (encoder dim x ds_rate), but "
            f"the speech encoder gives {projector.linear1.in_features}: use the speech encoder of "
            "stage 1")
    return state


# --------------------------------------------------------------------------------------------------
# 4. Writing the release layout


def encoder_config(encoder) -> dict | None:
    """An encoder's entry in the root config.json (None when the model has no such encoder). Its
    model_type says which encoder it is: "zipformer", or transformers' "whisper" (the whole
    WhisperConfig, as the official code stores it)."""
    if encoder is None:
        return None
    from transformers import WhisperConfig  # whisper_encoder.py keeps the transformers config

    if isinstance(encoder.config, WhisperConfig):
        return encoder.config.to_dict()
    return {"model_type": "zipformer", **encoder.config.to_dict()}


def release_config(model) -> dict:
    """The root config.json of the release layout, for a model built from components."""
    para = model.paraling_encoder_projector
    return {
        "model_type": "azeros", "use_flash_attn": False, "exclude_from_checkpoint": list(FROZEN),
        "speech_encoder_projector_ds_rate": model.speech_encoder_projector.ds_rate,
        "paraling_encoder_projector_ds_rate": para.ds_rate if para is not None else 4,
        "speech_encoder_config": encoder_config(model.speech_encoder),
        "paraling_encoder_config": encoder_config(model.paraling_encoder),
        "llm_config": model.llm.config.to_dict(),
    }


def component_sources(llm_path, gguf_file, speech_encoder, paraling_encoder) -> dict[str, str]:
    """The local folders a model built from components came from, to link on save. A GGUF LLM is
    converted on load, so its folder is never linked."""
    gguf = gguf_file or str(llm_path).endswith(".gguf")
    parts = {"llm": None if gguf else llm_path, "speech_encoder": speech_encoder,
             "paraling_encoder": paraling_encoder}
    return {k: str(v) for k, v in parts.items() if v and os.path.isdir(v)}


def llm_reference(llm_path, gguf_file) -> dict | None:
    """{"id", "revision"} of an LLM that came from the hub (not a local folder, not a GGUF file),
    else None. A release records this in config.json ("llm_hub") instead of writing llm/: rank 0
    would otherwise re-save 15 GB of unchanged weights at the end of every run, while the other
    ranks wait at a barrier. The revision is the commit transformers loaded, so the reference
    stays exact when the hub repository changes."""
    if gguf_file or str(llm_path).endswith(".gguf") or os.path.isdir(llm_path):
        return None
    from huggingface_hub import try_to_load_from_cache

    # the load just cached config.json under snapshots/<commit>/ of the revision it resolved
    cached = try_to_load_from_cache(str(llm_path), "config.json")
    commit = Path(cached).parent.name if isinstance(cached, str) else None
    return {"id": str(llm_path), "revision": commit}


def llm_location(root: Path, config: dict) -> tuple[str, str | None]:
    """(where to load a release's LLM from, revision): its llm/ folder (a copy or a link), else
    the hub model its config.json records."""
    hub = config.get("llm_hub")
    if (root / "llm").exists() or not hub:
        return str(root / "llm"), None
    return hub["id"], hub.get("revision")


def record_new_branch(model, paraling_encoder, ds_rate: int) -> None:
    """After stage 2 attaches a fresh paralinguistic branch: the saved config.json must describe
    it, or the folder would load without it; a replaced branch's old folder is not linked."""
    model.config = {**model.config, "paraling_encoder_projector_ds_rate": ds_rate,
                    "paraling_encoder_config": encoder_config(model.paraling_encoder)}
    model.sources.pop("paraling_encoder", None)
    if os.path.isdir(paraling_encoder):
        model.sources["paraling_encoder"] = str(paraling_encoder)


def save_frozen_part(module, target: Path, source: str | None, link: bool) -> None:
    """Write a frozen part, or (`link`) symlink the local folder it was loaded from."""
    if link and source and os.path.isdir(source):
        # a relative link keeps working when the whole experiment folder is moved or copied
        rel = os.path.relpath(os.path.abspath(source), target.parent.resolve())
        target.symlink_to(rel, target_is_directory=True)
    else:
        with files.atomic_folder(target) as tmp:  # a full disk leaves no half-written folder
            module.save_pretrained(str(tmp))


# --------------------------------------------------------------------------------------------------
# 5. Loading the LLM


def default_dtype(device) -> torch.dtype | str:
    """LLM dtype when none is asked for: the checkpoint's own on GPU, float32 on CPU (half is slow
    there)."""
    return "auto" if torch.device(device or "cpu").type == "cuda" else torch.float32


def gguf_source(name_or_path, gguf_file: str | None) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None): a path to a `.gguf` file is split into its
    folder and name, which is how transformers reads GGUF."""
    path = str(name_or_path)
    if gguf_file is None and path.endswith(".gguf") and os.path.isfile(path):
        path, gguf_file = os.path.split(os.path.abspath(path))
    return path, gguf_file


def load_tokenizer(path, extra: dict, tokenizer_path=None):
    """The LLM's tokenizer (`extra`: the GGUF file), or the one at `tokenizer_path`, with
    transformers' logs quiet: a release's root config.json (where its tokenizer lives) says
    "azeros", a model type transformers warns about."""
    from transformers import AutoTokenizer

    with quiet_transformers(), no_remote_code(tokenizer_path or path):
        if tokenizer_path:
            return AutoTokenizer.from_pretrained(str(tokenizer_path), trust_remote_code=False)
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, **extra)


@contextlib.contextmanager
def no_remote_code(path):
    """Around a transformers load with trust_remote_code=False (never None: with None, a config
    whose `auto_map` names code in the folder made transformers ask "[y/N]" on stdout). A model
    that exists only as such code is refused in one line."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise checks.CheckError(f"{path}: its config asks to run code from the model folder "
                                "(auto_map), which AZeroS never does; use an LLM that transformers "
                                "implements") from None


def attention(name: str | None) -> str:
    """SDPA unless asked otherwise. "flash_attention_2" needs the flash_attn package, and without
    it transformers fails at the first forward: fall back to SDPA with a warning instead."""
    attn = name or "sdpa"
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        warnings.warn("flash_attention_2 requested but flash_attn is not installed; using sdpa",
                      stacklevel=3)
        attn = "sdpa"
    return attn


def forget_gguf_quantizer(model) -> None:
    """transformers de-quantizes GGUF weights into plain tensors but keeps a quantizer marker that
    makes save_pretrained refuse; drop it, so a model trained on a GGUF LLM exports as any other."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def fit_embeddings(model, tokenizer, token: str) -> bool:
    """Resize the LLM's embeddings when `token`'s id falls outside them -> whether it did. We say
    so: a resized model no longer matches the checkpoint on disk."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    rows = model.get_input_embeddings().num_embeddings
    if token_id < rows:
        return False
    warnings.warn(f"{token} id {token_id} is outside the LLM's {rows} embedding rows: resizing "
                  f"the embeddings to {len(tokenizer)}", stacklevel=3)
    model.resize_token_embeddings(len(tokenizer))
    return True


def stop_token_ids(llm, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS, `<|im_end|>`, and the generation config's
    EOS (an id or a list); unknown or negative ids left out."""
    eos = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    cfg_eos = llm.generation_config.eos_token_id
    eos |= set(cfg_eos) if isinstance(cfg_eos, list) else {cfg_eos}
    return sorted(i for i in eos if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id)


def per_token_parameters(llm) -> int:
    """The parameters one token's matrix products use: all of them but the input embedding (a
    table lookup), which counts only when it is tied to the output head (then it is that head)."""
    embedding, head = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    tied = head.data_ptr() == embedding.data_ptr()
    return sum(p.numel() for p in llm.parameters()) - (0 if tied else embedding.numel())


def estimate_parameters(config: dict) -> int:
    """A decoder-only LLM's parameter count from its config alone (before loading 15 GB of weights
    to find out): attention with grouped K/V, a gated MLP, embeddings (and an untied head).
    Qwen2.5-7B: 7.6B; small biases and norms are left out (under 0.1%)."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    attention = h * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * h * config.get("intermediate_size", 4 * h)
    embeddings = config["vocab_size"] * h * (1 if config.get("tie_word_embeddings") else 2)
    return layers * (attention + mlp) + embeddings


def llm_parameters(name_or_path, gguf_file: str | None = None) -> int | None:
    """estimate_parameters of an LLM folder, hub id or GGUF file (None if its config cannot be
    read: the loader then says why, with its own error)."""
    from transformers import AutoConfig

    path, gguf = gguf_source(name_or_path, gguf_file)
    try:
        extra = {"gguf_file": gguf} if gguf else {}
        config = AutoConfig.from_pretrained(path, trust_remote_code=False, **extra)
        return estimate_parameters(config.get_text_config().to_dict())
    except Exception:  # offline hub id, odd config: not this check's business
        return None


def release_llm_parameters(path_or_hub_id) -> int | None:
    """estimate_parameters of the LLM of a model in the release layout (its llm_config)."""
    try:
        config = checks.json_file(resolve_model_dir(path_or_hub_id) / "config.json")
        return estimate_parameters(config["llm_config"])
    except Exception:  # a missing folder or config is reported by the loader, in its own words
        return None


def quiet_libraries() -> None:
    """Keep stdout for the answer (infer.py): no progress bars or informational warnings."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


@contextlib.contextmanager
def quiet_transformers():
    """transformers logs errors only inside the block (e.g. while reading a release's tokenizer,
    whose root config.json says "azeros", a model type it warns about)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
