"""Flow-matching sampling for Z-Image Turbo: schedules, samplers, guidance, img2img.

Conventions (reference §5), written once here:
- σ runs from 1 (noise) to 0 (data); the network gets ``t = 1 - σ`` (t = 0 is pure noise).
- The raw network output F points toward the data: velocity ``v = dx/dσ = -F`` and the
  denoised estimate is ``D = x + σ·F``.
- Latents stay fp32; only the model input is cast to the model dtype (``call_model``).

A model is any ``model_fn(x [B,16,h,w], t [B], cond) -> F [B,16,h,w]``; for the DiT
``cond`` is its list of caption features. Samplers see a ``predict(x, σ) -> F`` closure
that already applies guidance, so they are testable with scalar models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from pascaline.errors import InvalidArgumentError
from pascaline.runtime.sizing import MAX_SCHEDULE_STEPS, MAX_STEPS, validate_denoise, validate_steps

ModelFn = Callable[[Tensor, Tensor, Any], Tensor]
Predict = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, int, float, Tensor], "bool | None"]

LATENT_CHANNELS = 16
SCHEDULERS = ("linear", "simple")
_SIMPLE_TABLE = 1000  # ComfyUI's ModelSamplingAuraFlow table length


class Cancelled(Exception):  # noqa: N818 - a request, not a failure
    """Raised out of ``sample`` when the step callback returns False (or raises it itself)."""


def initial_noise(seed: int, height: int, width: int, *, batch: int = 1) -> Tensor:
    """The seed's starting noise, identical to ComfyUI's and diffusers' CPU-generator draw.

    ``torch.randn((batch, 16, H//8, W//8), generator=Generator("cpu").manual_seed(seed))``, fp32.
    """
    if not 0 <= int(seed) < 2**64:
        raise InvalidArgumentError(f"seed {seed} is out of range; use a whole number from 0 to 2**64-1.")
    generator = torch.Generator("cpu").manual_seed(int(seed))
    shape = (batch, LATENT_CHANNELS, height // 8, width // 8)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


# ---------------------------------------------------------------------------- schedules


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """Static time shift: σ' = sσ / (1 + (s−1)σ) (s = 3 for Z-Image Turbo)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _validate_schedule(steps: int, shift: float, scheduler: str, limit: int = MAX_STEPS) -> None:
    validate_steps(steps, limit)
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise InvalidArgumentError(f"shift must be a positive number, not {shift!r}.")
    if scheduler not in SCHEDULERS:
        raise InvalidArgumentError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}.")


def sigma_schedule(steps: int, shift: float = 3.0, *, scheduler: str = "linear") -> Tensor:
    """The ``steps + 1`` sigmas of a run, ending at 0 (fp32).

    ``linear`` (diffusers, the official repo): ``shift(linspace(1, 0, N+1))``.
    ``simple`` (ComfyUI): ``table[-(1 + int(x·1000/N))]`` over ``table = shift(i/1000), i=1..1000``,
    then 0. Both are equal whenever N divides 1000 (8 steps included); elsewhere they differ by
    the truncation of ``x·1000/N`` (below 1e-3 in σ).
    """
    _validate_schedule(steps, shift, scheduler, MAX_SCHEDULE_STEPS)  # img2img's long schedules too
    if scheduler == "linear":
        base = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        return shift_sigmas(base, shift).to(torch.float32)
    table = shift_sigmas(torch.arange(1, _SIMPLE_TABLE + 1, dtype=torch.float64) / _SIMPLE_TABLE, shift)
    picks = [table[-(1 + int(x * _SIMPLE_TABLE / steps))] for x in range(steps)]
    return torch.cat([torch.stack(picks), table.new_zeros(1)]).to(torch.float32)


def img2img_schedule(steps: int, denoise: float, shift: float = 3.0, *, scheduler: str = "linear") -> Tensor:
    """ComfyUI's partial schedule: the last ``steps + 1`` sigmas of an ``int(steps/denoise)``-step run."""
    validate_denoise(denoise)
    _validate_schedule(steps, shift, scheduler)
    if denoise > 0.9999:  # ComfyUI's own cut-off for "full denoise"
        return sigma_schedule(steps, shift, scheduler=scheduler)
    return sigma_schedule(int(steps / denoise), shift, scheduler=scheduler)[-(steps + 1) :]


# ---------------------------------------------------------------------------- model calls


def call_model(model_fn: ModelFn, x: Tensor, sigma: Tensor, cond: Any, dtype: torch.dtype | None) -> Tensor:
    """Raw network output F in fp32 for latent ``x`` (fp32) at noise level ``sigma``.

    The model gets ``t = 1 - σ`` per sample (fp32, like diffusers) and ``x`` cast to ``dtype``.
    """
    t = (1.0 - sigma).to(torch.float32).expand(x.shape[0])  # t: [B]
    x_in = x if dtype is None else x.to(dtype)
    return model_fn(x_in, t, cond).float()


def to_denoised(x: Tensor, sigma: Tensor, f: Tensor) -> Tensor:
    """D = x + σ·F (the data estimate; ComfyUI's ``denoised``)."""
    return x + sigma * f


def zero_conditioning(cond: Any) -> Any:
    """ComfyUI's ``ConditioningZeroOut``: same shapes, all zeros (a tensor or a list of tensors)."""
    if isinstance(cond, Tensor):
        return torch.zeros_like(cond)
    if isinstance(cond, (list, tuple)):
        return type(cond)(zero_conditioning(c) for c in cond)
    raise TypeError(f"cannot zero conditioning of type {type(cond).__name__}")


def guided_predict(
    model_fn: ModelFn, cond: Any, *, negative: Any = None, cfg: float = 1.0, dtype: torch.dtype | None = None
) -> Predict:
    """``predict(x, σ) -> F`` with classifier-free guidance in ComfyUI's convention.

    ``F = F_neg + cfg·(F_pos − F_neg)`` (diffusers' guidance_scale g is ``cfg − 1``). At cfg 1 the
    negative branch is never run, so a Turbo step costs one forward. A missing negative is the
    zeroed positive, as in the official ComfyUI template.
    """
    if cfg == 1.0:
        return lambda x, sigma: call_model(model_fn, x, sigma, cond, dtype)
    neg = zero_conditioning(cond) if negative is None else negative

    def predict(x: Tensor, sigma: Tensor) -> Tensor:
        f_pos = call_model(model_fn, x, sigma, cond, dtype)
        f_neg = call_model(model_fn, x, sigma, neg, dtype)
        return f_neg + cfg * (f_pos - f_neg)

    return predict


# ---------------------------------------------------------------------------- samplers

OnStep = Callable[[int, Tensor, Tensor], None]  # (index within the segment, σ reached, latent)


def euler(predict: Predict, x: Tensor, sigmas: Tensor, on_step: OnStep) -> Tensor:
    """First-order step in σ, written like diffusers' FlowMatchEulerDiscreteScheduler.step."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = -predict(x, sigma)  # v = dx/dσ
        x = x + (sigma_next - sigma) * v
        on_step(i, sigma_next, x)
    return x


def res_multistep_coefficients(sigma_prev: Tensor, sigma: Tensor, sigma_next: Tensor) -> tuple[Tensor, ...]:
    """``(h, b1, b2)`` of ComfyUI's second-order RES step (eta 0, τ = −ln σ, h = τ_next − τ)."""
    t_prev, t, t_next = (-torch.log(s) for s in (sigma_prev, sigma, sigma_next))
    h = t_next - t
    c2 = (t_prev - t) / h  # τ_old = τ_i because, with eta 0, the previous σ_down is σ_i
    phi1 = torch.expm1(-h) / -h
    phi2 = (phi1 - 1.0) / -h
    b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
    b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
    return h, b1, b2


def res_multistep(predict: Predict, x: Tensor, sigmas: Tensor, on_step: OnStep) -> Tensor:
    """ComfyUI ``sample_res_multistep`` (eta 0, no CFG++): deterministic, one forward per step.

    The first step of a run and the step to σ = 0 are Euler steps on D; the others mix the
    current and previous denoised estimates with the exponential-integrator weights.
    """
    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = to_denoised(x, sigma, predict(x, sigma))
        if sigma_next == 0 or old_denoised is None:
            d = (x - denoised) / sigma
            x = x + d * (sigma_next - sigma)
        else:
            h, b1, b2 = res_multistep_coefficients(sigmas[i - 1], sigma, sigma_next)
            x = torch.exp(-h) * x + h * (b1 * denoised + b2 * old_denoised)  # e^{-h} = σ_next/σ
        old_denoised = denoised
        on_step(i, sigma_next, x)
    return x


Sampler = Callable[[Predict, Tensor, Tensor, OnStep], Tensor]
SAMPLERS: dict[str, Sampler] = {"euler": euler, "res_multistep": res_multistep}


def get_sampler(name: str) -> Sampler:
    """The sampler registered under ``name``; an unknown name lists the known ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        known = ", ".join(sorted(SAMPLERS))
        raise InvalidArgumentError(f"unknown sampler {name!r}; choose one of {known}.") from None


# ---------------------------------------------------------------------------- a whole run


def _step_reporter(callback: StepCallback | None, offset: int, total: int) -> OnStep:
    def on_step(i: int, sigma: Tensor, x: Tensor) -> None:
        if callback is not None and callback(offset + i + 1, total, float(sigma), x) is False:
            raise Cancelled(f"sampling was cancelled after step {offset + i + 1} of {total}.")

    return on_step


def _start_latent(noise: Tensor, sigma0: Tensor, init_latent: Tensor | None, denoise: float) -> Tensor:
    if init_latent is None:
        if denoise < 1:
            raise InvalidArgumentError(f"denoise {denoise} needs an init image; give one, or set denoise 1.")
        return noise.float()
    if init_latent.shape != noise.shape:
        raise InvalidArgumentError(
            f"the init image's latent {tuple(init_latent.shape)} does not match the noise "
            f"{tuple(noise.shape)}; give the init image at the requested size."
        )
    return sigma0 * noise.float() + (1 - sigma0) * init_latent.float()  # ComfyUI's noise_scaling (CONST)


def _check_run(steps: int, cfg: float, blind_start: int) -> None:
    if not (isinstance(cfg, (int, float)) and math.isfinite(cfg)):
        raise InvalidArgumentError(f"cfg must be a finite number, not {cfg!r}.")
    if isinstance(blind_start, bool) or not isinstance(blind_start, int) or not 0 <= blind_start < steps:
        raise InvalidArgumentError(
            f"blind start must be a whole number from 0 to steps - 1 ({steps - 1}), not {blind_start!r}."
        )


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    noise: Tensor,
    cond: Any,
    *,
    steps: int = 8,
    shift: float = 3.0,
    sampler: str = "res_multistep",
    scheduler: str = "linear",
    negative: Any = None,
    cfg: float = 1.0,
    blind_start: int = 0,
    init_latent: Tensor | None = None,
    denoise: float = 1.0,
    callback: StepCallback | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Run ``steps`` sampler steps from ``noise`` (fp32) and return the final latent (fp32).

    ``blind_start = k`` runs the first k steps with zeroed positive conditioning, then the
    remaining steps from that latent with the real conditioning and no noise added: two
    sampler runs over ``σ[0..k]`` and ``σ[k..N]``, like two chained ComfyUI KSamplerAdvanced
    nodes (so a multistep sampler restarts its history at step k); k = 0 is the plain run.
    ``denoise < 1`` starts from ``init_latent`` at σ of ComfyUI's partial schedule
    (``img2img_schedule``): ``x = σ·noise + (1−σ)·init``. ``callback(step, total, σ, latent)``
    runs after every step; returning False raises ``Cancelled``.
    """
    run = get_sampler(sampler)
    sigmas = img2img_schedule(steps, denoise, shift, scheduler=scheduler)
    _check_run(steps, cfg, blind_start)
    x = _start_latent(noise, sigmas[0], init_latent, denoise)
    segments = [(cond, blind_start, steps)]
    if blind_start:
        segments.insert(0, (zero_conditioning(cond), 0, blind_start))
    for seg_cond, first, last in segments:
        predict = guided_predict(model_fn, seg_cond, negative=negative, cfg=cfg, dtype=dtype)
        x = run(predict, x, sigmas[first : last + 1], _step_reporter(callback, first, steps))
    return x
