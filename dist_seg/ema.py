"""Exponential moving average of a model's weights, updated without a host sync."""

from __future__ import annotations

import copy

import torch


class EMA(torch.nn.Module):
    """EMA of parameters and floating buffers (other buffers copied), kept in fp32.

    In place of torch's ``AveragedModel``, whose update reads its device counter on the host
    twice per call (``if self.n_averaged == 0`` and the ``float(n)`` an averaging function
    needs for a warmup): here the count is a Python int. The state dict keeps
    ``AveragedModel``'s keys (``module.*``, ``n_averaged``), so checkpoints load either way.

    The average stays in fp32 whatever the model's dtype: in bf16 (8 bits of mantissa) a
    lerp by 1 - 0.999 moves a weight by less than its rounding step, and it would never move.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool):
        super().__init__()
        self.module = copy.deepcopy(model).float().requires_grad_(False)
        self.decay, self.warmup, self.n = decay, warmup, 0

    def weight(self) -> float:
        """The lerp weight of the next update: 1 - decay, decay = min(decay, (1+n)/(10+n))."""
        n = self.n
        return 1 - (min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay)

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module, skip: torch.Tensor | None = None) -> None:
        """One update from ``model``; none where ``skip`` (a device flag) is 1, decided on the
        device (the optimizer step it follows was skipped there too). The host cannot see
        that flag, so a skipped step still counts in the warmup's n (one step of warmup
        early per non-finite batch)."""
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [t.detach() for t in (*model.parameters(), *model.buffers())]
        floats = [(m, t) for m, t in zip(mine, theirs, strict=True) if m.is_floating_point()]
        others = [(m, t) for m, t in zip(mine, theirs, strict=True) if not m.is_floating_point()]
        ema, src = [m for m, _ in floats], [t.float() for _, t in floats]
        if self.n == 0:  # the first update copies, as AveragedModel's does
            torch._foreach_copy_(ema, src)
        else:
            if skip is None:
                torch._foreach_lerp_(ema, src, self.weight())
            else:  # a device weight: ema += w * (src - ema), in three foreach kernels
                weight = (1 - skip.float().reshape(())) * self.weight()
                step = torch._foreach_sub(src, ema)
                torch._foreach_mul_(step, weight)
                torch._foreach_add_(ema, step)
        if others:  # BatchNorm's num_batches_tracked
            torch._foreach_copy_([m for m, _ in others], [t for _, t in others])
        self.n += 1

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "n_averaged"] = torch.tensor(self.n)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing,
                              unexpected, errors):  # fmt: skip
        count = state_dict.pop(prefix + "n_averaged", None)
        if count is None:
            missing.append(prefix + "n_averaged")
        else:
            self.n = int(count)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing, unexpected, errors
        )
