"""Zipformer2: the frozen speech encoder of AZeroS, inference-exact and batch-invariant.

AZeroS never trains its audio encoders (paper Sec. 4.1): a frozen Zipformer2 (the released TTA
encoder `AudenAI/auden-encoder-tta-m10` for content, Auden-Voice for paralinguistics) feeds the
small projectors that learn. The architecture is the Zipformer paper's (Yao et al., ICLR 2024,
Sec. 3); names follow the official code (AudenAI/Auden, from k2/icefall), so released checkpoints
load with strict=True.

    fbank (B, T, 80) at 100 Hz
      -> Conv2dSubsampling           conv stack + ConvNeXt         (B, (T-7)//2, 192)  ~50 Hz
      -> Zipformer2: 6 stacks        each at its own frame rate    (B, T1, 192..768)
           stack i: [downsample by 1,2,4,8,4,2] -> N x Zipformer2EncoderLayer -> upsample -> bypass
      -> full-dim output + SimpleDownsample(2)                     (B, (T1+1)//2, 768)  25 Hz

Left out: the training-only machinery (Balancer, Whiten, ScheduledFloat, dropout, ScaledAdam,
custom autograd, streaming). In eval mode it is the identity; the forward stays differentiable.

Batch invariance (unlike the official code, whose short utterances see their batch's padding
through the ConvNeXt and SimpleDownsample): every place padding could leak is masked per sequence,
so each row of a batch equals that utterance run alone, i.e. the official single-utterance output.

Support (not the method): support/model_support.py parses the config, checks inputs, reads/writes
weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from support import model_support
from support.model_support import JsonConfig

MIN_INPUT_FRAMES = 9  # the conv front end needs (T - 7) // 2 >= 1 embedded frames


def output_lengths(x_lens: Tensor) -> Tensor:
    """Number of 25 Hz encoder frames for `x_lens` 100 Hz fbank frames (official rounding)."""
    embed_lens = (x_lens - 7) // 2  # Conv2dSubsampling: no time padding, one stride-2 conv
    return (embed_lens + 1) // 2  # output SimpleDownsample(2) rounds up


def make_pad_mask(lens: Tensor, max_len: int) -> Tensor:
    """(B, max_len) bool mask, True at padding frames (frame index >= the sequence's length)."""
    return torch.arange(max_len, device=lens.device)[None, :] >= lens[:, None]


@dataclass
class ZipformerConfig(JsonConfig):
    """The official encoder config.json and its defaults: per-stack lists (one entry per stack, or
    one for all in the *_head_dim fields). dropout, warmup_batches, chunk_size and
    left_context_frames are training / streaming options, kept so the file round-trips."""

    model_type = "zipformer"
    feature_dim: int = 80
    output_downsampling_factor: int = 2
    num_encoder_layers: list[int] = field(default_factory=lambda: [2, 2, 3, 4, 3, 2])
    downsampling_factor: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 4, 2])
    encoder_dim: list[int] = field(default_factory=lambda: [192, 256, 384, 512, 384, 256])
    feedforward_dim: list[int] = field(default_factory=lambda: [576, 768, 1152, 1536, 1152, 768])
    warmup_batches: float = 4000.0
    dropout: float | None = None
    num_heads: list[int] = field(default_factory=lambda: [4, 4, 4, 8, 4, 4])
    query_head_dim: list[int] = field(default_factory=lambda: [32])
    value_head_dim: list[int] = field(default_factory=lambda: [12])
    pos_head_dim: list[int] = field(default_factory=lambda: [4])
    pos_dim: int = 48
    encoder_unmasked_dim: list[int] = field(default_factory=lambda: [192, 192, 256, 256, 256, 192])
    cnn_module_kernel: list[int] = field(default_factory=lambda: [31, 31, 15, 15, 15, 31])
    causal: bool = False
    chunk_size: list[int] = field(default_factory=lambda: [16, 32, 64, -1])
    left_context_frames: list[int] = field(default_factory=lambda: [64, 128, 256, -1])

    @classmethod
    def tta_m10(cls) -> ZipformerConfig:
        """The released TTA encoder (AudenAI/auden-encoder-tta-m10): ~152.7M parameters, 768-d."""
        return cls(num_encoder_layers=[2, 2, 4, 5, 4, 2],
                   encoder_dim=[192, 256, 512, 768, 512, 256],
                   feedforward_dim=[576, 768, 1536, 2304, 1536, 768])

    def per_stack(self, name: str) -> list[int]:
        """A per-stack field for every stack (a single value is broadcast, as officially)."""
        v = getattr(self, name)
        v = [v] if isinstance(v, int) else list(v)
        n = len(self.downsampling_factor)
        if len(v) == 1:
            v = v * n
        if len(v) != n:
            raise ValueError(f"{name} has {len(v)} entries, expected 1 or {n}")
        return v


# ----------------------------------------------------------------------------------------------
# Small building blocks


def swoosh_l(x: Tensor) -> Tensor:
    """SwooshL(x) = log(1 + e^(x-4)) - 0.08 x - 0.035 (Zipformer paper, eq. 6): feed-forwards."""
    return F.softplus(x - 4.0) - 0.08 * x - 0.035


def swoosh_r(x: Tensor) -> Tensor:
    """SwooshR(x) = log(1 + e^(x-1)) - 0.08 x - 0.313261687 (zero at x=0): used in convolutions."""
    return F.softplus(x - 1.0) - 0.08 * x - 0.313261687


class SwooshLinear(nn.Linear):
    """Activation, then a linear layer (the official `ActivationDropoutAndLinear`, no dropout).

    Subclassing nn.Linear keeps the parameter names `weight` / `bias` of the original.
    """

    def __init__(self, in_features: int, out_features: int, activation: str):
        super().__init__(in_features, out_features)
        self.activation = {"SwooshL": swoosh_l, "SwooshR": swoosh_r}[activation]

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.activation(x))


class BiasNorm(nn.Module):
    """LayerNorm replacement: x * exp(log_scale) / rms(x - bias) over channels, (..., C) shaped.

    Unlike LayerNorm the output is not centred: the learned `bias` only enters the scale, so one
    channel holding a large constant cannot defeat the normalisation.
    """

    def __init__(self, num_channels: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(1.0))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        inv_rms = torch.mean((x - self.bias) ** 2, dim=-1, keepdim=True) ** -0.5
        return x * (inv_rms * self.log_scale.exp())


class BypassModule(nn.Module):
    """Learned per-channel mix of a module's input x and output y: x + (y - x) * bypass_scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.bypass_scale = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, src_orig: Tensor, src: Tensor) -> Tensor:
        return src_orig + (src - src_orig) * self.bypass_scale


# ----------------------------------------------------------------------------------------------
# Front end: 100 Hz fbank -> ~50 Hz embeddings


class ConvNeXt(nn.Module):
    """ConvNeXt block on the front end's (B, 128, T, 19) map: 7x7 depthwise, two 1x1, residual."""

    def __init__(self, channels: int, hidden_ratio: int = 3, kernel_size: int = 7):
        super().__init__()
        pad = (kernel_size - 1) // 2
        self.depthwise_conv = nn.Conv2d(channels, channels, kernel_size, padding=pad,
                                        groups=channels)
        self.pointwise_conv1 = nn.Conv2d(channels, channels * hidden_ratio, 1)
        self.pointwise_conv2 = nn.Conv2d(channels * hidden_ratio, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.pointwise_conv2(swoosh_l(self.pointwise_conv1(self.depthwise_conv(x))))
        return x + y


class Conv2dSubsampling(nn.Module):
    """Front end: (B, T, 80) fbank -> (B, (T-7)//2, encoder_dim[0]) at ~50 Hz.

    Three 3x3 convs (time unpadded, one stride-2 in time, two stride-2 in frequency: 80 -> 39 -> 19
    bins), a ConvNeXt block, then a linear map of the flattened (channels x 19 bins) to the model
    width and a BiasNorm. `conv` is an nn.Sequential whose Identity slots stand where the original
    has training-only modules (ScaleGrad, Balancer) and activations, so the conv indices 0/4/7 of
    the checkpoint line up.
    """

    def __init__(self, in_channels: int, out_channels: int, ch1: int = 8, ch2: int = 32,
                 ch3: int = 128):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, ch1, 3, padding=(0, 1)),  # 0   (time, freq) padding: none in time
            nn.Identity(),  # 1   ScaleGrad (training only)
            nn.Identity(),  # 2   Balancer (training only)
            nn.Identity(),  # 3   SwooshR, applied in forward
            nn.Conv2d(ch1, ch2, 3, stride=2),  # 4
            nn.Identity(),  # 5   Balancer
            nn.Identity(),  # 6   SwooshR
            nn.Conv2d(ch2, ch3, 3, stride=(1, 2)),  # 7
        )
        self.convnext = ConvNeXt(ch3)
        out_width = (((in_channels - 1) // 2) - 1) // 2
        self.out = nn.Linear(out_width * ch3, out_channels)
        self.out_norm = BiasNorm(out_channels)

    def forward(self, x: Tensor, x_lens: Tensor) -> tuple[Tensor, Tensor]:
        x = x.unsqueeze(1)  # (B, 1, T, F)
        for i in (0, 4, 7):
            x = swoosh_r(self.conv[i](x))
        lens = (x_lens - 7) // 2
        # The three convs have no time padding, so embedded frame t reads fbank frames 2t..2t+6
        # only: every valid frame comes from the utterance itself. The ConvNeXt however pads time by
        # 3 on each side, and in a batch the "padding" it reads past an utterance's end is the conv
        # output of padding frames. Zeroing those frames makes the batch see exactly the zero
        # padding a lone utterance sees.
        x = x.masked_fill(make_pad_mask(lens, x.shape[2])[:, None, :, None], 0.0)
        x = self.convnext(x)
        b, c, t, f = x.shape
        x = self.out(x.transpose(1, 2).reshape(b, t, c * f))  # (B, T', C*F) -> (B, T', D)
        return self.out_norm(x), lens


# ----------------------------------------------------------------------------------------------
# Attention: one set of weights shared by three consumers


class CompactRelPositionalEncoding(nn.Module):
    """Embeddings of relative offsets -(T-1)..(T-1): (2T-1, pos_dim). No parameters.

    Offsets are squashed (log beyond ~sqrt(pos_dim), then atan onto (-pi/2, pi/2)) before a Fourier
    basis, so nearby offsets are told apart while 1000 vs 1001 barely differ. The last channel is a
    constant 1 so that the projection can learn a bias.
    """

    def __init__(self, pos_dim: int):
        super().__init__()
        self.pos_dim = pos_dim

    def forward(self, seq_len: int, device: torch.device) -> Tensor:
        x = torch.arange(-(seq_len - 1), seq_len, device=device).to(torch.float32).unsqueeze(1)
        freqs = 1 + torch.arange(self.pos_dim // 2, device=device)
        c = self.pos_dim**0.5
        x_compressed = c * x.sign() * ((x.abs() + c).log() - math.log(c))
        x_atan = (x_compressed / (self.pos_dim / (2.0 * math.pi))).atan()
        pe = torch.zeros(x.shape[0], self.pos_dim, device=device)
        pe[:, 0::2] = (x_atan * freqs).cos()
        pe[:, 1::2] = (x_atan * freqs).sin()
        pe[:, -1] = 1.0
        return pe


class RelPositionMultiheadAttentionWeights(nn.Module):
    """Attention weights with relative positions: (B, T, C) -> (H, B, T, T), rows sum to 1.

    score[i, j] = q_i . k_j + p_i . P(j - i), where P is a learned projection of the compact
    positional encoding. No 1/sqrt(d) factor: the official model folds it into `in_proj`. Padding
    keys are masked, which is what keeps attention from mixing padding into valid frames.
    """

    def __init__(self, embed_dim: int, pos_dim: int, num_heads: int, query_head_dim: int,
                 pos_head_dim: int):
        super().__init__()
        self.num_heads, self.query_head_dim = num_heads, query_head_dim
        self.pos_head_dim = pos_head_dim
        self.in_proj = nn.Linear(embed_dim, (2 * query_head_dim + pos_head_dim) * num_heads)
        self.linear_pos = nn.Linear(pos_dim, num_heads * pos_head_dim, bias=False)

    def forward(self, x: Tensor, pos_emb: Tensor, pad_mask: Tensor) -> Tensor:
        b, t, _ = x.shape
        h, dq, dp = self.num_heads, self.query_head_dim, self.pos_head_dim
        q, k, p = self.in_proj(x).split([h * dq, h * dq, h * dp], dim=-1)
        q = q.reshape(b, t, h, dq).permute(2, 0, 1, 3)  # (H, B, T, dq)
        k = k.reshape(b, t, h, dq).permute(2, 0, 3, 1)  # (H, B, dq, T)
        p = p.reshape(b, t, h, dp).permute(2, 0, 1, 3)  # (H, B, T, dp)
        scores = q @ k  # (H, B, T, T)

        pos = self.linear_pos(pos_emb).reshape(2 * t - 1, h, dp)
        pos = pos.permute(1, 2, 0).unsqueeze(1)  # (H, 1, dp, 2T-1)
        pos_scores = (p @ pos).contiguous()  # (H, B, T, 2T-1): column n is offset n - (T-1)
        # "Relative shift": we need out[i, j] = pos_scores[i, (T-1) + j - i]. A strided view does it
        # for free: stepping one row moves one row forward and one column back in memory.
        s0, s1, s2, s3 = pos_scores.stride()
        pos_scores = pos_scores.as_strided((h, b, t, t), (s0, s1, s2 - s3, s3),
                                           storage_offset=s3 * (t - 1))

        scores = (scores + pos_scores).masked_fill(pad_mask[None, :, None, :], -1000.0)
        return scores.softmax(dim=-1)


class SelfAttention(nn.Module):
    """Attention with given weights: values in_proj (B, T, H*dv), weighted sum, out_proj."""

    def __init__(self, embed_dim: int, num_heads: int, value_head_dim: int):
        super().__init__()
        self.in_proj = nn.Linear(embed_dim, num_heads * value_head_dim)
        self.out_proj = nn.Linear(num_heads * value_head_dim, embed_dim)

    def forward(self, x: Tensor, attn_weights: Tensor) -> Tensor:
        h, b, t, _ = attn_weights.shape
        v = self.in_proj(x).reshape(b, t, h, -1).permute(2, 0, 1, 3)  # (H, B, T, dv)
        out = (attn_weights @ v).permute(1, 2, 0, 3).reshape(b, t, -1)  # heads side by side
        return self.out_proj(out)


class NonlinAttention(nn.Module):
    """A convolution-module look-alike that mixes over time with the first head's attention weights.

    (B, T, C) -> in_proj -> s, x, y (B, T, 3C/4 each); x * tanh(s) is averaged over time with
    attn_weights[0], multiplied by y, and projected back to (B, T, C).
    """

    def __init__(self, channels: int, hidden_channels: int):
        super().__init__()
        self.in_proj = nn.Linear(channels, hidden_channels * 3)
        self.out_proj = nn.Linear(hidden_channels, channels)

    def forward(self, x: Tensor, attn_weights: Tensor) -> Tensor:
        s, x, y = self.in_proj(x).chunk(3, dim=-1)
        x = x * s.tanh()
        x = (attn_weights[0] @ x) * y  # (B, T, T) @ (B, T, hidden)
        return self.out_proj(x)


class FeedforwardModule(nn.Module):
    """(B, T, C) -> Linear -> SwooshL -> Linear -> (B, T, C)."""

    def __init__(self, embed_dim: int, feedforward_dim: int):
        super().__init__()
        self.in_proj = nn.Linear(embed_dim, feedforward_dim)
        self.out_proj = SwooshLinear(feedforward_dim, embed_dim, "SwooshL")

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(self.in_proj(x))


class ConvolutionModule(nn.Module):
    """(B, T, C) -> GLU -> depthwise conv over time -> SwooshR -> Linear -> (B, T, C)."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.in_proj = nn.Linear(channels, 2 * channels)
        self.depthwise_conv = nn.Conv1d(channels, channels, kernel_size,
                                        padding=kernel_size // 2, groups=channels)
        self.out_proj = SwooshLinear(channels, channels, "SwooshR")

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        x, s = self.in_proj(x).chunk(2, dim=-1)
        x = x * s.sigmoid()
        # The conv reaches kernel_size // 2 frames past an utterance's end. Alone it sees zero
        # padding there, so in a batch the padding frames must be zero too, not whatever the layer
        # computed for them.
        x = x.masked_fill(pad_mask[:, :, None], 0.0)
        x = self.depthwise_conv(x.transpose(1, 2)).transpose(1, 2)
        return self.out_proj(x)


# ----------------------------------------------------------------------------------------------
# Layers and stacks


class Zipformer2EncoderLayer(nn.Module):
    """One Zipformer block, (B, T, C) -> (B, T, C): a doubled Conformer sharing attention weights.

    ff1, nonlin-attention, self-attention 1, conv 1, ff2, mid bypass, self-attention 2, conv 2, ff3,
    BiasNorm, bypass. The attention weights are computed once and reused by the non-linear attention
    and both self-attention modules (the Zipformer paper's main efficiency trick).
    """

    def __init__(self, cfg: ZipformerConfig, i: int):
        super().__init__()
        dim, ff, heads = cfg.encoder_dim[i], cfg.feedforward_dim[i], cfg.per_stack("num_heads")[i]
        kernel = cfg.per_stack("cnn_module_kernel")[i]
        self.bypass = BypassModule(dim)
        self.bypass_mid = BypassModule(dim)
        self.self_attn_weights = RelPositionMultiheadAttentionWeights(
            dim, cfg.pos_dim, heads, cfg.per_stack("query_head_dim")[i],
            cfg.per_stack("pos_head_dim")[i])
        self.self_attn1 = SelfAttention(dim, heads, cfg.per_stack("value_head_dim")[i])
        self.self_attn2 = SelfAttention(dim, heads, cfg.per_stack("value_head_dim")[i])
        self.feed_forward1 = FeedforwardModule(dim, ff * 3 // 4)
        self.feed_forward2 = FeedforwardModule(dim, ff)
        self.feed_forward3 = FeedforwardModule(dim, ff * 5 // 4)
        self.nonlin_attention = NonlinAttention(dim, 3 * dim // 4)
        self.conv_module1 = ConvolutionModule(dim, kernel)
        self.conv_module2 = ConvolutionModule(dim, kernel)
        # unused by the official forward, but in the checkpoint
        self.bypass_scale = nn.Parameter(torch.full((dim,), 0.5))
        self.norm = BiasNorm(dim)

    def forward(self, src: Tensor, pos_emb: Tensor, pad_mask: Tensor) -> Tensor:
        src_orig = src
        attn_weights = self.self_attn_weights(src, pos_emb, pad_mask)
        src = src + self.feed_forward1(src)
        src = src + self.nonlin_attention(src, attn_weights)
        src = src + self.self_attn1(src, attn_weights)
        src = src + self.conv_module1(src, pad_mask)
        src = src + self.feed_forward2(src)
        src = self.bypass_mid(src_orig, src)
        src = src + self.self_attn2(src, attn_weights)
        src = src + self.conv_module2(src, pad_mask)
        src = src + self.feed_forward3(src)
        return self.bypass(src_orig, self.norm(src))


class Zipformer2Encoder(nn.Module):
    """Layers at one frame rate: (B, T, C) -> (B, T, C), sharing one positional encoding."""

    def __init__(self, cfg: ZipformerConfig, i: int):
        super().__init__()
        self.encoder_pos = CompactRelPositionalEncoding(cfg.pos_dim)
        self.layers = nn.ModuleList(Zipformer2EncoderLayer(cfg, i)
                                    for _ in range(cfg.num_encoder_layers[i]))

    def forward(self, x: Tensor, lens: Tensor) -> Tensor:
        pos_emb = self.encoder_pos(x.shape[1], x.device)
        pad_mask = make_pad_mask(lens, x.shape[1])
        for layer in self.layers:
            x = layer(x, pos_emb, pad_mask)
        return x


class SimpleDownsample(nn.Module):
    """Frame-rate reduction by a learned softmax-weighted average of each group of `ds` frames.

    (B, T, C) -> (B, ceil(T/ds), C); per-sequence lengths become ceil(len/ds).
    """

    def __init__(self, downsample: int):
        super().__init__()
        self.downsample = downsample
        self.bias = nn.Parameter(torch.zeros(downsample))

    def forward(self, x: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        b, t, c = x.shape
        ds = self.downsample
        t_out = (t + ds - 1) // ds
        # A lone utterance whose length is not a multiple of ds completes its last group by
        # repeating its last frame. The official code repeats the last frame of the padded *batch*
        # tensor, so in a batch a short utterance averages padding into its last frame. Index each
        # sequence's own frames instead, clamping to its own last valid frame: identical to the
        # single-utterance computation.
        last = (lens - 1).clamp(min=0)[:, None]
        idx = torch.minimum(torch.arange(t_out * ds, device=x.device)[None, :], last)
        x = x.gather(1, idx[:, :, None].expand(b, t_out * ds, c))
        weights = self.bias.softmax(dim=0)[:, None]  # (ds, 1)
        x = (x.reshape(b, t_out, ds, c) * weights).sum(dim=2)
        return x, (lens + ds - 1) // ds


class SimpleUpsample(nn.Module):
    """Frame repetition: (B, T, C) -> (B, T * upsample, C). No parameters."""

    def __init__(self, upsample: int):
        super().__init__()
        self.upsample = upsample

    def forward(self, x: Tensor) -> Tensor:
        return x.repeat_interleave(self.upsample, dim=1)


class DownsampledZipformer2Encoder(nn.Module):
    """A stack run at a lower frame rate: downsample, layers, upsample, then bypass with the input.

    (B, T, C) -> (B, ceil(T/ds), C) -> layers -> (B, T, C); `out_combiner` mixes input and output.
    """

    def __init__(self, cfg: ZipformerConfig, i: int):
        super().__init__()
        ds, dim = cfg.downsampling_factor[i], cfg.encoder_dim[i]
        self.downsample = SimpleDownsample(ds)
        self.encoder = Zipformer2Encoder(cfg, i)
        self.upsample = SimpleUpsample(ds)
        self.out_combiner = BypassModule(dim)

    def forward(self, x: Tensor, lens: Tensor) -> Tensor:
        y, y_lens = self.downsample(x, lens)
        y = self.encoder(y, y_lens)
        y = self.upsample(y)[:, : x.shape[1]]
        return self.out_combiner(x, y)


class Zipformer2(nn.Module):
    """The multi-rate stacks (U-Net-like rates 1,2,4,8,4,2 relative to ~50 Hz), 2x downsampled.

    (B, T, encoder_dim[0]) -> each stack in turn, channels cut or zero-padded to the stack's width
    -> full-width output (each channel from the latest stack with it) -> (B, ceil(T/2), max(dim)).
    """

    def __init__(self, cfg: ZipformerConfig):
        super().__init__()
        self.encoder_dim = list(cfg.encoder_dim)
        self.encoders = nn.ModuleList(
            Zipformer2Encoder(cfg, i) if ds == 1 else DownsampledZipformer2Encoder(cfg, i)
            for i, ds in enumerate(cfg.downsampling_factor)
        )
        self.downsample_output = SimpleDownsample(cfg.output_downsampling_factor)

    def forward(self, x: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        outputs = []
        for dim, module in zip(self.encoder_dim, self.encoders):
            x = x[..., :dim] if dim <= x.shape[-1] else F.pad(x, (0, dim - x.shape[-1]))
            x = module(x, lens)
            outputs.append(x)
        # Full-width output: start from the last stack, append the missing upper channels from the
        # most recent earlier stack that is wide enough (for TTA: 256 from stack 5, 256..512 from
        # stack 4, 512..768 from 3).
        pieces, cur = [outputs[-1]], self.encoder_dim[-1]
        for dim, out in zip(reversed(self.encoder_dim[:-1]), reversed(outputs[:-1])):
            if dim > cur:
                pieces.append(out[..., cur:dim])
                cur = dim
        return self.downsample_output(torch.cat(pieces, dim=-1), lens)


# ----------------------------------------------------------------------------------------------
# The public encoder


class ZipformerEncoder(nn.Module):
    """Frozen Zipformer2 encoder: (B, T, 80) fbank, 100 Hz -> (B, T', max(encoder_dim)), 25 Hz.

    State-dict compatible with the official `ZipformerEncoderModel` (keys `encoder_embed.*`,
    `encoder.*`, `model_batch_count`). Row i of a batched call equals utterance i run alone;
    frames past `encoder_out_lens` are zero.
    """

    def __init__(self, config: ZipformerConfig):
        super().__init__()
        model_support.check_zipformer_config(config)
        self.config = config
        self.output_dim = max(config.encoder_dim)
        self.encoder_embed = Conv2dSubsampling(config.feature_dim, config.encoder_dim[0])
        self.encoder = Zipformer2(config)
        # the official model's training-progress counter: unused here, but in the checkpoint
        self.register_buffer("model_batch_count", torch.tensor(100000.0))

    def forward(self, x: Tensor, x_lens: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, T, feature_dim) fbank (padding may hold anything), x_lens: (B,) valid frames.

        Returns encoder_out (B, T', D) and encoder_out_lens (B,) = output_lengths(x_lens).
        """
        x, x_lens = model_support.check_fbank(x, x_lens, self.config.feature_dim, MIN_INPUT_FRAMES)
        x, lens = self.encoder_embed(x, x_lens)
        x, lens = self.encoder(x, lens)
        x = x.masked_fill(make_pad_mask(lens, x.shape[1])[:, :, None], 0.0)
        return x, lens

    # ---- loading and saving in the official layout (support/model_support.py: the file work) ----

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> ZipformerEncoder:
        """An encoder folder or weight file, bare or composite; returned in eval mode."""
        config, state = model_support.read_zipformer(path)
        model = cls(ZipformerConfig.from_dict(config))
        model.load_state_dict(state, strict=True)
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, save_dir) -> None:
        """config.json + model.safetensors, as the official loader reads them."""
        model_support.save_zipformer(self, save_dir)
