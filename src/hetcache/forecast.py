"""Forecasting a cached value at a new timestep from its last computed samples, per token row.

HetCache reuses values computed at earlier steps: the block-stack residual R on REUSE steps and for the rows a
PARTIAL step does not compute, and those rows' self-attention K/V. "hold" reuses the last sample as it is;
"linear" and "quadratic" extrapolate the last two or three samples as a polynomial in the timestep value (the
scheduler's timesteps are unevenly spaced, so the weights are Lagrange's for the actual sample times). Rows are
refreshed at different steps (a PARTIAL step computes only its rows), so every row has its own sample times.

A `RowHistory` holds the last `order + 1` samples of one tensor [B, N, ...] and is updated row-wise in place
(so CUDA graphs may read it by address); a `SampleTimes` holds the matching times per row, shared by all the
tensors of one cache (every computed row is refreshed in all of them at once).
"""

from __future__ import annotations

import torch

ORDERS = {"hold": 0, "linear": 1, "quadratic": 2}


class SampleTimes:
    """Times of the last `slots` samples of each of N rows: [slots, N] float64, oldest first; NaN = no sample."""

    def __init__(self, slots: int, num_rows: int, device: torch.device) -> None:
        self.times = torch.full((slots, num_rows), float("nan"), dtype=torch.float64, device=device)

    @property
    def slots(self) -> int:
        return self.times.shape[0]

    def push(self, rows: torch.Tensor | None, time: torch.Tensor) -> None:
        """Rows `rows` (None: all) were computed at `time` (a one-element tensor: it stays on the device, so a
        CUDA graph reads the step's own timestep)."""
        time = time.reshape(()).to(self.times.dtype)
        if rows is None:
            self.times[:-1] = self.times[1:].clone()
            self.times[-1] = time
            return
        shifted = self.times.index_select(1, rows)
        self.times[:-1].index_copy_(1, rows, shifted[1:].clone())
        self.times[-1].index_fill_(0, rows, time)

    def weights(self, time: torch.Tensor) -> torch.Tensor:
        """Lagrange weights [slots, N] (float64) that extrapolate each row's samples to `time`.

        Each row uses as many of its latest samples as it has, up to all slots (one sample: hold; two: linear;
        three: quadratic); weights of missing samples are 0. Polynomials of that degree are reproduced exactly.
        """
        times, time = self.times, time.reshape(()).to(self.times.dtype)
        present = ~torch.isnan(times)
        weights = torch.zeros_like(times)
        for k in range(self.slots):
            basis = torch.ones_like(times[k])
            for j in range(self.slots):
                if j != k:
                    factor = (time - times[j]) / (times[k] - times[j])
                    basis = basis * torch.where(present[j], factor, torch.ones_like(factor))
            weights[k] = torch.where(present[k], basis, torch.zeros_like(basis))
        return weights


class RowHistory:
    """The last `slots` samples of a tensor [B, N, ...]: stored [slots, B, N, ...] in `dtype`."""

    def __init__(self, slots: int, like: torch.Tensor, dtype: torch.dtype, values: torch.Tensor | None = None) -> None:
        self.values = torch.zeros((slots, *like.shape), dtype=dtype, device=like.device) if values is None else values

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()

    def latest(self) -> torch.Tensor:
        return self.values[-1]

    def push(self, rows: torch.Tensor | None, fresh: torch.Tensor) -> None:
        """Make `fresh` ([B, N, ...], or [B, |rows|, ...]) the newest sample of `rows` (None: all rows)."""
        values = self.values
        fresh = fresh.to(values.dtype)
        if rows is None:
            values[:-1] = values[1:].clone()
            values[-1].copy_(fresh)
            return
        if values.element_size() == 1:  # float8: index_copy_ has no float8 kernels, the bytes move the same
            values, fresh = values.view(torch.uint8), fresh.view(torch.uint8)
        older = values.index_select(2, rows)
        values[:-1].index_copy_(2, rows, older[1:].clone())
        values[-1].index_copy_(1, rows, fresh)

    def forecast(self, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """sum_k weights[k, row] * sample_k: [B, N, ...] in `dtype` (float32 arithmetic, float64 for float64
        samples)."""
        compute = torch.promote_types(self.values.dtype, torch.float32)
        shape = (weights.shape[0], 1, weights.shape[1]) + (1,) * (self.values.dim() - 3)
        return (weights.to(compute).view(shape) * self.values.to(compute)).sum(dim=0).to(dtype)
