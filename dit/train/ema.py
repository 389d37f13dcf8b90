"""The exponential moving average of the weights (what is evaluated and exported)."""

from __future__ import annotations

import torch

__all__ = ["EMA", "copy_ema"]


class EMA:
    """Exponential moving average of the weights, kept in fp32 on every rank.

    Every rank holds the full EMA so evaluation can sample on all ranks. Under ZeRO-3 the
    live parameters are partitioned, so each update gathers them first.
    """

    def __init__(self, engine, decay: float):
        self.engine, self.decay = engine, decay
        with self._gathered():
            self.names = [n for n, _ in self._params()]
            self.shadow = [p.detach().float().clone() for _, p in self._params()]

    def _params(self):
        return ((n, p) for n, p in self.engine.module.named_parameters() if p.requires_grad)

    def _gathered(self):
        import deepspeed

        params = [p for _, p in self._params()]
        return deepspeed.zero.GatheredParameters(params, enabled=self.engine.zero_optimization_stage() == 3)

    @torch.no_grad()
    def update(self) -> None:
        with self._gathered():
            live = [p.detach().float() for _, p in self._params()]
            torch._foreach_lerp_(self.shadow, live, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """EMA weights plus the model's buffers: the official DiT layout."""
        sd = {n: t.detach().cpu().clone() for n, t in zip(self.names, self.shadow)}
        for name, buf in self.engine.module.named_buffers():
            sd[name] = buf.detach().cpu().clone()
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(sd[name])


@torch.no_grad()
def copy_ema(model: torch.nn.Module, ema: EMA) -> torch.nn.Module:
    """Load the EMA weights into ``model`` (same architecture), device to device."""
    params = dict(model.named_parameters())
    for name, shadow in zip(ema.names, ema.shadow):
        params[name].copy_(shadow)
    return model
