"""Vector quantizer of the VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning").

Each latent vector z_e (one per spatial position) is replaced by its nearest codebook entry
e_k, k = argmin_j ||z_e - e_j||^2. The decoder sees z_q = e_k in the forward pass but the gradient
is copied straight through to z_e (eq. 3's sg[] trick), and two terms train the codebook and
keep the encoder close to it (eq. 3):

    L_vq = ||sg[z_e] - e||^2  +  beta * ||z_e - sg[e]||^2
           (codebook loss:        (commitment loss: only the
            only the codebook      encoder gets this gradient)
            gets this gradient)

The tutorial's reference code (and diffusers' ``VectorQuantizer(legacy=True)``, kept there for
old checkpoints) multiplies the *codebook* term by beta instead; that changes how fast the
codebook follows the encoder relative to the commitment. Here beta is on the commitment term,
as in the paper.

Options beyond the paper:
- ``l2_normalize``: compare and emit l2-normalised vectors (cosine-similarity codebook lookup,
  Yu et al. 2022, "Vector-quantized Image Modeling with Improved VQGAN", sec. 3.2), which keeps
  codes from collapsing to the origin and improves codebook usage.
- usage statistics over a rolling window of training steps (fraction of codes used, perplexity
  exp(H(p)) of the code distribution: equal to the codebook size when all codes are used equally).
- dead-code restart (Dhariwal et al. 2020, "Jukebox", sec. 3.2; Zeghidour et al. 2021): codes that
  no latent vector picked for ``dead_code_restart_steps`` consecutive training steps are
  re-initialised from encoder outputs of the current batch, drawn with the torch RNG.

Distributed training: every rank sees a different batch, so usage counts and restart samples
differ between ranks unless they are synchronised. :meth:`VectorQuantizer.set_distributed_hooks`
takes two callables (for instance ``accelerator.reduce(t, "sum")`` and a broadcast from rank 0):
``all_reduce_sum`` makes the usage counts global (so every rank agrees which codes are dead and
reports the same perplexity) and ``broadcast_from_main`` replaces each rank's restart samples with
rank 0's, so the replicated codebooks stay identical. Without hooks (one process) nothing is
synchronised; this module never calls ``torch.distributed`` itself.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VectorQuantizer"]

TensorHook = Callable[[torch.Tensor], torch.Tensor]


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient and usage tracking.

    Args:
        codebook_size: number of codes K.
        embed_dim: code dimension D (the channel count of the latents it quantizes).
        beta: weight of the commitment term (paper: 0.25).
        l2_normalize: look up and emit l2-normalised vectors (cosine distance).
        usage_window: number of training steps the usage statistics cover.
        dead_code_restart_steps: restart codes unused for this many consecutive training steps;
            0 turns restarts off.
        dead_code_threshold: a code counts as used in a step when at least this many latent
            vectors (summed over processes when a reduce hook is set) picked it.

    Buffers (saved in checkpoints, so resumed runs continue the same statistics):
        usage_history (usage_window, K): assignment counts of the last steps, a ring buffer
            (rows not yet written are zeros, so sums over it need no fill count).
        history_index (): next row of the ring buffer.
        steps_since_used (K,): consecutive training steps without use, per code.
    """

    def __init__(
        self,
        codebook_size: int,
        embed_dim: int,
        beta: float = 0.25,
        l2_normalize: bool = False,
        usage_window: int = 100,
        dead_code_restart_steps: int = 0,
        dead_code_threshold: int = 1,
    ) -> None:
        super().__init__()
        if codebook_size < 1 or embed_dim < 1 or usage_window < 1:
            raise ValueError("codebook_size, embed_dim and usage_window must be positive")
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.beta = beta
        self.l2_normalize = l2_normalize
        self.usage_window = usage_window
        self.dead_code_restart_steps = dead_code_restart_steps
        self.dead_code_threshold = dead_code_threshold

        self.embedding = nn.Embedding(codebook_size, embed_dim)
        # Small uniform init as in the VQ-VAE reference code: codes start near the origin,
        # where a freshly initialised encoder's outputs also are.
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

        self.register_buffer("usage_history", torch.zeros(usage_window, codebook_size))
        self.register_buffer("history_index", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps_since_used", torch.zeros(codebook_size, dtype=torch.long))

        self._all_reduce_sum: TensorHook | None = None
        self._broadcast_from_main: TensorHook | None = None

    def set_distributed_hooks(
        self, all_reduce_sum: TensorHook | None = None, broadcast_from_main: TensorHook | None = None
    ) -> None:
        """Install the synchronisation used under data parallelism (see the module docstring).

        ``all_reduce_sum(t)`` must return the sum of ``t`` over processes; ``broadcast_from_main(t)``
        must return rank 0's ``t`` on every process. Both take and return tensors of equal shape.
        A broadcast needs the reduce as well: only global counts make every rank restart the same
        codes. The broadcast runs every training step (the (K, D) candidates, whether or not a code
        died), so that no rank has to read the dead count on the host.
        """
        if broadcast_from_main is not None and all_reduce_sum is None:
            raise ValueError("broadcast_from_main needs all_reduce_sum, or ranks may disagree on the dead codes")
        self._all_reduce_sum = all_reduce_sum
        self._broadcast_from_main = broadcast_from_main

    # ----------------------------------------------------------------------------------- lookup
    def codebook(self) -> torch.Tensor:
        """The codes as used for lookup: (K, D), l2-normalised when ``l2_normalize``."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_normalize else w

    def nearest_codes(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Indices (N,) of the nearest code to each row of ``z_flat`` (N, D), by squared L2 distance."""
        # fp32 even under autocast: a bf16 distance matrix would pick wrong codes among close ones
        codes = self.codebook().float()  # (K, D)
        z_flat = z_flat.float()
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, computed without an (N, K, D) intermediate
        dist = (
            z_flat.pow(2).sum(dim=1, keepdim=True)
            - 2.0 * z_flat @ codes.t()
            + codes.pow(2).sum(dim=1)[None, :]
        )  # (N, K)
        return dist.argmin(dim=1)

    @torch.no_grad()
    def code_indices(self, z_e: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each position of ``z_e`` (B, D, H, W): (B, H, W) long."""
        b, d, h, w = z_e.shape
        z = z_e.permute(0, 2, 3, 1).reshape(-1, d)  # (BHW, D)
        if self.l2_normalize:
            z = F.normalize(z.float(), dim=-1)
        return self.nearest_codes(z).view(b, h, w)

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for integer ``indices`` (B, H, W) as a latent map (B, D, H, W)."""
        z_q = F.embedding(indices, self.codebook())  # (B, H, W, D)
        return z_q.permute(0, 3, 1, 2).contiguous()  # (B, D, H, W)

    # ------------------------------------------------------------------------------ statistics
    @torch.no_grad()
    def _record_usage(self, indices: torch.Tensor) -> None:
        counts = torch.bincount(indices, minlength=self.codebook_size).to(self.usage_history.dtype)  # (K,)
        if self._all_reduce_sum is not None:
            counts = self._all_reduce_sum(counts)
        # index_copy_ with the index tensor: indexing by a 0-dim tensor would read it on the host
        self.usage_history.index_copy_(0, self.history_index.view(1), counts[None])
        self.history_index.copy_((self.history_index + 1) % self.usage_window)
        used = counts >= self.dead_code_threshold
        self.steps_since_used.add_(1).masked_fill_(used, 0)

    def usage_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fraction of codes used, perplexity) over the recorded window; both 0 before any step."""
        counts = self.usage_history.sum(dim=0)  # (K,)
        perplexity = torch.where(counts.sum() > 0, _perplexity(counts), torch.zeros_like(counts[0]))
        return (counts > 0).float().mean(), perplexity

    @torch.no_grad()
    def _restart_dead_codes(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Re-initialise codes unused for ``dead_code_restart_steps`` steps from rows of ``z_flat`` (N, D);
        returns how many (a 0-dim device tensor).

        Without a host sync: a candidate row is drawn for every code and only the dead codes take
        theirs (a ``where`` over the (K, D) codebook), so nothing waits to learn how many are dead.
        The dead set comes from the summed usage counts, so it is the same on every rank; the
        candidates are rank 0's.
        """
        dead = self.steps_since_used >= self.dead_code_restart_steps  # (K,) bool, same on every rank
        # Drawn with the torch RNG on z's device: reproducible under a fixed seed.
        pick = torch.randint(0, z_flat.shape[0], (self.codebook_size,), device=z_flat.device)  # (K,)
        candidates = z_flat[pick].to(self.embedding.weight.dtype)  # (K, D)
        if self._broadcast_from_main is not None:
            candidates = self._broadcast_from_main(candidates.contiguous())
        weight = self.embedding.weight
        weight.copy_(torch.where(dead[:, None], candidates, weight))
        self.steps_since_used.masked_fill_(dead, 0)
        return dead.sum()

    # ----------------------------------------------------------------------------------- forward
    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Quantize encoder outputs.

        Args:
            z_e: (B, D, H, W) encoder outputs.
        Returns:
            z_q: (B, D, H, W) quantized latents carrying the straight-through gradient to ``z_e``
                (to the l2-normalised ``z_e`` when ``l2_normalize``).
            loss: scalar codebook loss + beta * commitment loss (eq. 3, means over elements), fp32.
            logs: detached 0-dim tensors ``vq_codebook_loss``, ``vq_commitment_loss``, ``vq_perplexity``
                (this batch), ``vq_window_perplexity``, ``vq_window_usage`` (fraction of codes used
                in the window), ``vq_restarted_codes``.
        In training mode it first restarts dead codes (from this batch) and afterwards records usage.
        The lookup and losses run in fp32; ``z_q`` comes back in ``z_e``'s dtype.
        """
        b, d, h, w = z_e.shape
        if d != self.embed_dim:
            raise ValueError(f"expected {self.embed_dim} latent channels, got {d}")
        z = z_e.float().permute(0, 2, 3, 1).reshape(-1, d)  # (BHW, D)
        if self.l2_normalize:
            z = F.normalize(z, dim=-1)

        restarted = torch.zeros((), dtype=torch.long, device=z_e.device)
        if self.training and self.dead_code_restart_steps > 0:
            # Before the lookup, so the codebook is not modified after autograd has used it.
            restarted = self._restart_dead_codes(z.detach())

        indices = self.nearest_codes(z.detach())  # (BHW,)
        e = F.embedding(indices, self.codebook()).float()  # (BHW, D), differentiable w.r.t. the codebook

        codebook_loss = F.mse_loss(e, z.detach())  # moves codes toward sg[z_e]
        commitment_loss = F.mse_loss(z, e.detach())  # moves z_e toward sg[e]
        loss = codebook_loss + self.beta * commitment_loss

        z_q = z + (e - z).detach()  # forward: e; backward: identity to z (straight-through)
        z_q = z_q.view(b, h, w, d).permute(0, 3, 1, 2).contiguous().to(z_e.dtype)  # (B, D, H, W)

        if self.training:
            self._record_usage(indices)
        window_usage, window_perplexity = self.usage_stats()
        batch_counts = torch.bincount(indices, minlength=self.codebook_size).float()  # (K,)
        logs = {
            "vq_codebook_loss": codebook_loss.detach(),
            "vq_commitment_loss": commitment_loss.detach(),
            "vq_perplexity": _perplexity(batch_counts),
            "vq_window_perplexity": window_perplexity,
            "vq_window_usage": window_usage,
            "vq_restarted_codes": restarted.float(),
        }
        return z_q, loss, logs


def _perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the distribution proportional to ``counts`` (K,): K for uniform use, 1 for one code."""
    p = counts / counts.sum().clamp_min(1.0)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()  # 0 * log(eps) = 0 for unused codes
    return torch.exp(entropy)
