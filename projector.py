"""The audio projector: speech-encoder frames -> LLM token embeddings (AZeroS paper, Sec. 4.1).

The frozen Zipformer emits 768-d frames at 25 Hz. An LLM reads text at a few tokens per second, so
25 "audio tokens" per second would make prompts long and attention expensive. The projector
therefore *stacks* ds_rate consecutive frames into one vector (ds_rate=4: 25 Hz -> 6.25 Hz) and maps
it with a two-layer MLP into the LLM's embedding space:

    (B, T, d) --drop T % ds_rate trailing frames--> (B, T//ds_rate * ds_rate, d)
              --stack ds_rate frames-->             (B, T//ds_rate, d*ds_rate)
              --linear1, ReLU, linear2-->           (B, T//ds_rate, D)

This is the *only* part of AZeroS that is trained (one projector per encoder). `ds_rate` is the
official config's *_projector_ds_rate, and `linear1`/`linear2` the official parameter names, so
released weights load as they are. (No support code: nothing here is hardening.)
"""
import torch
import torch.nn as nn


class Projector(nn.Module):
    """Frame-stacking MLP projector. d*r*D + D + D*D + D parameters (r = ds_rate; 23,862,272 for
    d=768, r=4, D=3584)."""

    def __init__(self, encoder_dim: int, llm_dim: int, ds_rate: int = 4):
        super().__init__()
        self.ds_rate = ds_rate
        self.linear1 = nn.Linear(encoder_dim * ds_rate, llm_dim)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor, x_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, d) encoder frames, x_lens: (B,) valid lengths -> ((B, T//r, D), x_lens//r)."""
        B, T, d = x.shape
        r = self.ds_rate
        T = T - T % r  # a trailing group of fewer than ds_rate frames cannot be stacked: drop it
        x = x[:, :T].reshape(B, T // r, d * r)
        x = self.linear2(self.relu(self.linear1(x)))
        # Per utterance, only complete groups of ds_rate *valid* frames count; a group that mixes
        # valid frames with padding is excluded by the length, exactly as in the official code.
        return x, x_lens // r
