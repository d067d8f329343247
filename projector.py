"""The audio projector: speech-encoder frames -> LLM token embeddings (AZeroS paper, Sec. 4.1).

The frozen Zipformer emits 768-d frames at 25 Hz. An LLM reads text at a few tokens per second, so
feeding it 25 "audio tokens" per second would make prompts long and attention expensive. The projector
therefore *stacks* k consecutive frames into one vector (k=4: 25 Hz -> 6.25 Hz) and maps it with a
two-layer MLP into the LLM's embedding space:

    (B, T, d) --drop T % k trailing frames--> (B, T//k * k, d)
              --stack k frames-->             (B, T//k, d*k)
              --linear1, ReLU, linear2-->     (B, T//k, D)

This is the *only* part of AZeroS that is trained (one projector per encoder). Parameter names
`linear1`/`linear2` match the official checkpoints so released weights load as they are.
"""
import torch
import torch.nn as nn


class Projector(nn.Module):
    """Frame-stacking MLP projector. d*k*D + D + D*D + D parameters (23,862,272 for 768, 4, 3584)."""

    def __init__(self, encoder_dim: int, llm_dim: int, k: int = 4):
        super().__init__()
        self.k = k
        self.linear1 = nn.Linear(encoder_dim * k, llm_dim)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor, x_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, d) encoder frames, x_lens: (B,) valid lengths -> ((B, T//k, D), x_lens // k)."""
        B, T, d = x.shape
        T = T - T % self.k  # a trailing group of fewer than k frames cannot be stacked: drop it
        x = x[:, :T].reshape(B, T // self.k, d * self.k)
        x = self.linear2(self.relu(self.linear1(x)))
        # Per utterance, only complete groups of k *valid* frames count; a group that mixes valid
        # frames with padding is excluded by the length, exactly as in the official code.
        return x, x_lens // self.k
