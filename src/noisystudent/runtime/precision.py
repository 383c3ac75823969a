"""Which precision runs fastest here: bf16 autocast is kept only where it is measured faster.

On a CPU, bf16 autocast is 1.4-1.8x faster than fp32 where the CPU has native bf16 (AVX-512
BF16, AMX) and up to 7x slower where it must emulate it; for some models it is neither. So
``precision: auto`` does not guess from the CPU's flags: :func:`choose_train_precision` times a
few training steps of the actual model on the actual first batch in both precisions and keeps
bf16 only if it is at least :data:`BF16_MIN_SPEEDUP` faster. The labeler applies the same bar to
inference (:func:`noisystudent.label.inference.calibrate_precision`, which also checks that bf16
agrees with fp32). On CUDA, ``auto`` is bf16 wherever the GPU supports it, without measuring.

The choice is cached per (model architecture, device, batch shape, threads) within a process, so
the stages of a pipeline run, and benchmark repeats, do not measure again.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
import torch.nn as nn

from .errors import ConfigError, error_reason

__all__ = ["BF16_MIN_SPEEDUP", "PRECISIONS", "resolve_precision", "choose_train_precision",
           "PrecisionCache"]

BF16_MIN_SPEEDUP = 1.05  # bf16 must be at least this much faster than fp32 to be chosen
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CALIBRATION_ROUNDS = (2, 3)  # timed fp32/bf16 step pairs (at least, at most), after a warm-up of each
CALIBRATION_BUDGET_S = 1.0  # past the minimum, stop adding rounds once this much time has gone into them
CLEARLY_SLOWER = 3.0  # bf16's best step this many times fp32's: no need for a third round

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32.

    ``auto`` is bf16 on a CUDA device that supports it; on a CPU it is decided by measuring
    (:func:`choose_train_precision`), and without a measurement it is fp32.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs CUDA (its gradient scaler is CUDA-only); "
                          "use bf16 or fp32")
    return _DTYPES[precision]


def _name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


class PrecisionCache:
    """Measured ``auto`` choices, by model class and size, batch shape and layout, device and
    thread count: a run holds one and passes it to every stage, so a stage whose model and batch
    an earlier stage measured reuses that measurement instead of timing again."""

    def __init__(self) -> None:
        self._choices: dict[tuple, dict] = {}

    def get(self, key: tuple) -> dict | None:
        return self._choices.get(key)

    def put(self, key: tuple, info: dict) -> None:
        self._choices[key] = info

    def __len__(self) -> int:
        return len(self._choices)

    def clear(self) -> None:
        """Forget the measured choices (after the machine's load has changed for good)."""
        self._choices.clear()


def _cache_key(net: nn.Module, x: torch.Tensor, device: torch.device) -> tuple:
    params = sum(p.numel() for p in net.parameters())
    memory = "channels_last" if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else "contiguous"
    return (type(net).__module__, type(net).__qualname__, params, tuple(x.shape), memory, str(device),
            torch.get_num_threads())


def _step_seconds(net: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                  loss_fn: Callable, dtype: torch.dtype | None) -> float:
    """Seconds of one forward and backward pass (the optimizer's update is the same in both
    precisions: the weights stay fp32)."""
    start = time.perf_counter()
    with torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
        logits = net(x)
    loss_fn(logits.float(), targets).backward()
    for p in net.parameters():
        p.grad = None
    return time.perf_counter() - start


def measure_bf16(net: nn.Module, x: torch.Tensor, targets: torch.Tensor, loss_fn: Callable) -> dict:
    """Time training steps of ``net`` on ``x`` in fp32 and bf16 autocast; returns the rates.

    The steps alternate (fp32, bf16, fp32, ...) after one warm-up step each (it pays for kernel
    selection), so a change in the machine's load hits both alike, and each precision is judged by
    its fastest step: on a busy machine a step that another process interrupted is slow for a
    reason that has nothing to do with the precision. ``net``'s parameters are not
    updated; its buffers (BatchNorm statistics), gradients and the CPU RNG (dropout) are restored,
    so a training run that calibrates ends bit-identical to one that does not.
    """
    buffers = {k: v.detach().clone() for k, v in net.named_buffers()}
    was_training = net.training
    rng = torch.get_rng_state()
    started = time.perf_counter()
    times = {"fp32": [], "bf16": []}
    try:
        net.train()
        for dtype in (None, torch.bfloat16):  # warm-up
            _step_seconds(net, x, targets, loss_fn, dtype)
        timed, (least, most) = 0.0, CALIBRATION_ROUNDS
        for round_ in range(1, most + 1):
            for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                times[name].append(_step_seconds(net, x, targets, loss_fn, dtype))
            timed += times["fp32"][-1] + times["bf16"][-1]
            if round_ >= least and (timed > CALIBRATION_BUDGET_S
                                    or min(times["bf16"]) > CLEARLY_SLOWER * min(times["fp32"])):
                break
    finally:
        with torch.no_grad():
            for k, v in net.named_buffers():
                v.copy_(buffers[k])
        for p in net.parameters():
            p.grad = None
        net.train(was_training)
        torch.set_rng_state(rng)
    images = len(x)
    fp32_s, bf16_s = min(times["fp32"]), min(times["bf16"])
    return {"fp32_img_s": round(images / fp32_s, 1), "bf16_img_s": round(images / bf16_s, 1),
            "bf16_speedup": round(fp32_s / bf16_s, 3), "calibration_steps": 2 + 2 * len(times["fp32"]),
            "calibration_s": round(time.perf_counter() - started, 3), "batch": images}


def choose_train_precision(precision: str, net: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                           loss_fn: Callable, *, cache: PrecisionCache | None = None,
                           measure: Callable[..., dict] | None = None) -> tuple[str, torch.dtype | None, dict]:
    """The training precision for ``train.precision`` = ``precision``: ``(name, autocast dtype, info)``.

    ``x`` and ``targets`` are a real training batch on the training device. An explicit
    ``fp32``/``bf16``/``fp16`` is used as given. ``auto``: on CUDA, bf16 where supported; on a
    CPU, bf16 only if :func:`measure_bf16` (or ``measure``, same signature) finds it at least
    :data:`BF16_MIN_SPEEDUP` faster for this model. ``info`` says what was requested and why the
    choice fell as it did, with the measured rates (``fp32_img_s``, ``bf16_img_s``,
    ``bf16_speedup``) and ``cached: True`` when an earlier measurement held in ``cache`` was reused
    (None: measure every time).
    """
    device = x.device
    dtype = resolve_precision(precision, device)
    if precision != "auto":
        return _name(dtype), dtype, {"requested": precision, "reason": "set in the config"}
    if device.type != "cpu":
        reason = "bf16 supported on this GPU" if dtype is not None else "no bf16 on this device"
        return _name(dtype), dtype, {"requested": "auto", "reason": reason}
    key = _cache_key(net, x, device)
    earlier = cache.get(key) if cache is not None else None
    if earlier is not None:
        info = dict(earlier, cached=True)
    else:
        try:
            info = (measure or measure_bf16)(net, x, targets, loss_fn)
        except RuntimeError as e:  # no bf16 kernel for some layer of this model on this CPU
            info = {"error": error_reason(e), "bf16_speedup": 0.0}
        faster = info["bf16_speedup"] >= BF16_MIN_SPEEDUP
        info = {"requested": "auto", **info, "chosen": "bf16" if faster else "fp32",
                "reason": (f"bf16 measured {info['bf16_speedup']:.2f}x fp32 on this CPU "
                           f"({'>=' if faster else '<'} {BF16_MIN_SPEEDUP})" if "error" not in info
                           else "bf16 failed on this CPU")}
        if cache is not None:
            cache.put(key, info)
        info = dict(info, cached=False)
    dtype = torch.bfloat16 if info["chosen"] == "bf16" else None
    return info["chosen"], dtype, info
