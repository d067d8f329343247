"""The demo's stand-in for the pretrained encoders: two small Zipformers trained briefly, frozen.

AZeroS never trains its speech encoders. It takes them ready-made: the semantic one is the TTA
Zipformer (AudenAI/auden-encoder-tta-m10, trained on large real ASR/translation corpora), the
paralinguistic one is Auden-Voice (trained on real speaker, emotion, age and gender data). Both are
frozen, and the projectors learn to translate their frames for the LLM. Offline there are no
pretrained weights, and a *random* Zipformer would give the projectors nothing to translate. So the
demo makes the smallest honest substitute:

    semantic encoder        small Zipformer + CTC character head          (ASR: what was said)
    paralinguistic encoder  small Zipformer + mean-pool + 3 linear heads  (gender/speed/pitch: how)

Both are trained for a few minutes on the demo's TRAIN split only (held-out voices and sentences are
never seen), then saved with `ZipformerEncoder.save_pretrained` and used frozen, exactly like the
released encoders. The heads are thrown away: only the encoder body is kept, as in the paper.

How this differs from the paper: the encoders are tiny (about 1M parameters instead of ~150M),
trained on minutes of robotic eSpeak speech instead of thousands of hours of real speech, for a few
hundred steps, by this project (not by a separate pretraining run on other data). Their features are
therefore weak and specialised to the synthetic voices; the demo shows the *method*, not the paper's
numbers.

    python -m recipe.pretrain_encoders --train data/tts/train.jsonl --valid data/tts/valid.jsonl \
        --out exp/encoders [--steps 300]          # writes exp/encoders/{speech,paraling}/
"""
import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data import fbank, load_audio, read_manifest
from support import checks
from support.files import write_atomic
from zipformer import ZipformerConfig, ZipformerEncoder

# Characters the CTC head spells; index 0 is the CTC blank. Others (punctuation) are dropped.
CHARS = " abcdefghijklmnopqrstuvwxyz'"
ATTRIBUTES = {"gender": ["male", "female"], "speed": ["slow", "normal", "fast"],
              "pitch": ["low", "normal", "high"]}


def small_config() -> ZipformerConfig:
    """A ~1M-parameter Zipformer2 with the released encoders' structure (6 stacks, same frame
    rates)."""
    return ZipformerConfig(
        num_encoder_layers=[1, 1, 1, 1, 1, 1],
        encoder_dim=[64, 96, 128, 160, 128, 96],
        feedforward_dim=[128, 192, 256, 320, 256, 192],
        num_heads=[2, 2, 4, 4, 4, 2],
        query_head_dim=[16], value_head_dim=[8], pos_head_dim=[4], pos_dim=24,
        encoder_unmasked_dim=[64, 64, 96, 96, 96, 64],
    )


class CTCHead(nn.Module):
    """Frames -> character logits. The encoder runs at 25 Hz, but fast speech has more than 25
    characters a second and CTC needs at least one frame per character: each frame predicts two
    (50 Hz)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * (len(CHARS) + 1))

    def forward(self, x, lens):
        b, t, _ = x.shape
        return self.proj(x).view(b, 2 * t, len(CHARS) + 1).log_softmax(-1), 2 * lens


class AttributeHeads(nn.Module):
    """Mean over valid frames -> one linear classifier per attribute (utterance-level labels)."""

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({a: nn.Linear(dim, len(v)) for a, v in ATTRIBUTES.items()})

    def forward(self, x, lens):
        mask = (torch.arange(x.shape[1])[None, :] < lens[:, None]).float()[..., None]
        pooled = (x * mask).sum(1) / lens[:, None].clamp(min=1)
        return {a: h(pooled) for a, h in self.heads.items()}


def load_features(records):
    """All fbank features in memory (minutes of audio: small) as a list of (T, 80) tensors."""
    feats = []
    for r in tqdm(records, desc="fbank", unit="utt", leave=False):
        f, n = fbank([load_audio(r.audio, r.offset, r.duration)])
        feats.append(f[0, : int(n[0])])
    return feats


def char_ids(text: str) -> list[int]:
    return [CHARS.index(c) + 1 for c in " ".join(text.lower().split()) if c in CHARS]


def batches(n: int, size: int, rng: random.Random):
    """Endless shuffled index batches."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from (order[i: i + size] for i in range(0, n - size + 1, size))


def pad_batch(feats, idx):
    lens = torch.tensor([feats[i].shape[0] for i in idx])
    x = torch.nn.utils.rnn.pad_sequence([feats[i] for i in idx], batch_first=True,
                                        padding_value=math.log(1e-10))
    return x, lens


def speech_loss(head, out, lens, records, idx):
    logp, lp_lens = head(out, lens)
    targets = [torch.tensor(char_ids(records[i].text)) for i in idx]
    t_lens = torch.tensor([len(t) for t in targets])
    # zero_infinity: an utterance too fast for its frames contributes nothing instead of inf.
    return F.ctc_loss(logp.transpose(0, 1), torch.cat(targets), lp_lens, t_lens, zero_infinity=True)


def attribute_loss(head, out, lens, records, idx):
    logits = head(out, lens)
    return sum(F.cross_entropy(logits[a], torch.tensor([v.index(records[i].meta[a]) for i in idx]))
               for a, v in ATTRIBUTES.items())


@torch.no_grad()
def greedy_cer(encoder, head, feats, records) -> float:
    """Character error rate of greedy CTC decoding: does the semantic encoder hear words at all?"""
    errors = total = 0
    for f, r in zip(feats, records):
        out, lens = encoder(f[None], torch.tensor([f.shape[0]]))
        best = head(out, lens)[0][0].argmax(-1).tolist()
        hyp = [c for j, c in enumerate(best) if c != 0 and (j == 0 or c != best[j - 1])]
        ref = char_ids(r.text)
        errors += edit_distance(hyp, ref)
        total += len(ref)
    return errors / max(total, 1)


def edit_distance(a, b) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


@torch.no_grad()
def attribute_accuracy(encoder, head, feats, records) -> dict:
    correct = {a: 0 for a in ATTRIBUTES}
    for f, r in zip(feats, records):
        logits = head(*encoder(f[None], torch.tensor([f.shape[0]])))
        for a, v in ATTRIBUTES.items():
            correct[a] += int(v[int(logits[a].argmax())] == r.meta[a])
    return {a: round(c / max(len(records), 1), 3) for a, c in correct.items()}


def train_encoder(kind: str, feats, records, steps: int, batch_size: int, lr: float, seed: int,
                  bf16: bool = False):
    """Train a fresh small Zipformer with its head; returns (encoder, head, final mean loss).
    bf16: forward and backward under bf16 autocast (weights and AdamW stay fp32), ~2x faster on
    CPUs with AVX512-BF16/AMX."""
    torch.manual_seed(seed)
    encoder = ZipformerEncoder(small_config())
    head = CTCHead(encoder.output_dim) if kind == "speech" else AttributeHeads(encoder.output_dim)
    loss_fn = speech_loss if kind == "speech" else attribute_loss
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    encoder.train()
    recent = []
    bar = tqdm(range(steps), desc=f"pretrain {kind} encoder", unit="step")
    for _, idx in zip(bar, batches(len(feats), batch_size, random.Random(seed))):
        x, lens = pad_batch(feats, idx)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out, out_lens = encoder(x, lens)
            loss = loss_fn(head, out.float(), out_lens, records, idx)  # CTC and softmax in fp32
        opt.zero_grad()
        loss.backward()
        # no ScaledAdam/Balancer here: clipping keeps it stable
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-20:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
    return encoder.eval(), head.eval(), sum(recent) / max(len(recent), 1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True,
                   help="training manifest (labels: text, meta gender/speed/pitch)")
    p.add_argument("--valid", help="manifest to report CER / attribute accuracy on")
    p.add_argument("--out", required=True,
                   help="writes OUT/speech and OUT/paraling (encoder folders)")
    p.add_argument("--steps", type=int, default=300,
                   help="optimizer steps of the speech (semantic) encoder")
    p.add_argument("--paraling-steps", type=int,
                   help="optimizer steps of the paralinguistic encoder (default: --steps;"
                   " gender/speed/pitch are learnt much faster than characters)")
    p.add_argument("--kinds", nargs="+", choices=["speech", "paraling"],
                   default=["speech", "paraling"],
                   help="which encoders to train (the demo's speech encoder is Whisper tiny.en)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU); see train_encoder")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    out = Path(args.out)
    train = read_manifest(args.train)
    feats = load_features(train)
    valid = read_manifest(args.valid) if args.valid else []
    valid_feats = load_features(valid) if valid else []
    # a resumed run keeps the report of an encoder it skips
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    for kind in ("speech", "paraling"):
        if kind not in args.kinds:
            continue
        if (out / kind / "model.safetensors").exists():
            print(f"skipping {kind} encoder: {out / kind} exists")
            continue
        t0 = time.time()
        steps = args.steps if kind == "speech" else (args.paraling_steps or args.steps)
        encoder, head, loss = train_encoder(kind, feats, train, steps, args.batch_size, args.lr,
                                            args.seed, args.bf16)
        entry = {"train_loss": round(loss, 4), "steps": steps, "bf16": args.bf16,
                 "seconds": round(time.time() - t0, 1),
                 "parameters": sum(p.numel() for p in encoder.parameters())}
        if valid:
            if kind == "speech":
                entry["valid"] = {"cer": round(greedy_cer(encoder, head, valid_feats, valid), 3)}
            else:
                entry["valid"] = attribute_accuracy(encoder, head, valid_feats, valid)
        print(f"{kind} encoder: {json.dumps(entry)}")
        report[kind] = entry
        # the frozen encoder; the head is only a training device
        encoder.save_pretrained(out / kind)
        write_atomic(out / "report.json", [json.dumps(report, indent=2) + "\n"])
    return report


def cli(argv=None) -> int:
    """main() with a bad input as one line on stderr and exit status 1 (support/checks.py)."""
    return checks.run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
