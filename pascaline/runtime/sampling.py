"""Flow-matching sampling for every family: schedules, samplers, guidance, img2img.

Conventions, written once here:
- σ runs from 1 (noise) to 0 (data); ``x_σ = (1 - σ)·x0 + σ·noise``.
- ``F`` points toward the data: velocity ``v = dx/dσ = -F`` and the denoised estimate is
  ``D = x + σ·F``. A family's ``Prediction`` says what timestep its network gets for σ
  (Z-Image ``1 - σ``, the default here; SD3 ``σ·1000``) and the sign that turns its raw
  output into F (Z-Image +1: it returns ``x0 - noise``; SD3 -1: it returns the velocity).
- Latents stay fp32; only the model input is cast to the model dtype (``call_model``).

A model is any ``model_fn(x [B,C,h,w], t [B], conds) -> output [B,C,h,w]``, ``conds`` a
list of one conditioning per sample. Samplers see a ``predict(x, σ) -> F`` closure that
already applies guidance, so they are testable with scalar models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pascaline.errors import InvalidArgumentError
from pascaline.runtime.sizing import MAX_SCHEDULE_STEPS, MAX_STEPS, validate_denoise, validate_steps

ModelFn = Callable[[Tensor, Tensor, Any], Tensor]
Predict = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, int, float, Tensor], "bool | None"]

LATENT_CHANNELS = 16
SCHEDULERS = ("linear", "simple", "normal", "sgm_uniform")
_SIMPLE_TABLE = 1000  # ComfyUI's model-sampling table length (ModelSamplingAuraFlow / SD3)


def _one_minus(sigma: Tensor) -> Tensor:
    return 1.0 - sigma


@dataclass(frozen=True)
class Prediction:
    """What a network is fed for noise level σ, and the sign that makes its output F."""

    timestep: Callable[[Tensor], Tensor] = _one_minus
    output_sign: float = 1.0


ZIMAGE_PREDICTION = Prediction()


class Cancelled(Exception):  # noqa: N818 - a request, not a failure
    """Raised out of ``sample`` when the step callback returns False (or raises it itself)."""


def initial_noise(seed: int, height: int, width: int, *, batch: int = 1,
                  channels: int = LATENT_CHANNELS) -> Tensor:
    """The seed's starting noise, identical to ComfyUI's and diffusers' CPU-generator draw.

    ``torch.randn((batch, C, H//8, W//8), generator=Generator("cpu").manual_seed(seed))``, fp32.
    """
    if not 0 <= int(seed) < 2**64:
        raise InvalidArgumentError(f"seed {seed} is out of range; use a whole number from 0 to 2**64-1.")
    generator = torch.Generator("cpu").manual_seed(int(seed))
    shape = (batch, channels, height // 8, width // 8)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


# ---------------------------------------------------------------------------- schedules


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """Static time shift: σ' = sσ / (1 + (s−1)σ) (s = 3 for Z-Image Turbo)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def percent_to_sigma(percent: float, shift: float) -> float:
    """ComfyUI's ``percent_to_sigma`` for flow models: σ at a fraction of the timestep range
    (0 = the start, σ = 1; 1 = the end, σ = 0), ``shift(1 - percent)`` in between."""
    if percent <= 0:
        return 1.0
    if percent >= 1:
        return 0.0
    return float(shift_sigmas(torch.tensor(1.0 - percent, dtype=torch.float64), shift))


def _validate_schedule(steps: int, shift: float, scheduler: str, limit: int = MAX_STEPS) -> None:
    validate_steps(steps, limit)
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise InvalidArgumentError(f"shift must be a positive number, not {shift!r}.")
    if scheduler not in SCHEDULERS:
        raise InvalidArgumentError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}.")


def _linear(steps: int, shift: float) -> Tensor:
    # diffusers' ZImagePipeline, the official repo: shift(linspace(1, 0, N+1))
    base = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift_sigmas(base, shift)


def _table(shift: float) -> Tensor:
    """ComfyUI's model-sampling table ``shift(i/1000), i = 1..1000`` (float64)."""
    return shift_sigmas(torch.arange(1, _SIMPLE_TABLE + 1, dtype=torch.float64) / _SIMPLE_TABLE, shift)


def _simple(steps: int, shift: float) -> Tensor:
    table = _table(shift)
    picks = [table[-(1 + int(x * _SIMPLE_TABLE / steps))] for x in range(steps)]
    return torch.cat([torch.stack(picks), table.new_zeros(1)])


def _normal(steps: int, shift: float) -> Tensor:
    # diffusers' FlowMatchEulerDiscreteScheduler and ComfyUI's "normal": N points from σ_max to
    # σ_min = table[0] (already shifted), shifted again, then 0: the last σ is shifted twice
    lo, hi = _table(shift)[0], _table(shift)[-1]
    base = torch.linspace(float(hi), float(lo), steps, dtype=torch.float64)
    return torch.cat([shift_sigmas(base, shift), base.new_zeros(1)])


def _sgm_uniform(steps: int, shift: float) -> Tensor:
    # ComfyUI's sgm_uniform: N + 1 points from σ_max to σ_min, the last dropped, shifted, then 0
    lo, hi = _table(shift)[0], _table(shift)[-1]
    base = torch.linspace(float(hi), float(lo), steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([shift_sigmas(base, shift), base.new_zeros(1)])


SCHEDULES: dict[str, Callable[[int, float], Tensor]] = {
    "linear": _linear, "simple": _simple, "normal": _normal, "sgm_uniform": _sgm_uniform,
}  # fmt: skip


def sigma_schedule(steps: int, shift: float = 3.0, *, scheduler: str = "linear") -> Tensor:
    """The ``steps + 1`` sigmas of a run, ending at 0 (fp32).

    ``linear`` (diffusers' Z-Image pipeline, the official repo): ``shift(linspace(1, 0, N+1))``.
    ``simple`` (ComfyUI): ``table[-(1 + int(x·1000/N))]`` over ``table = shift(i/1000), i=1..1000``,
    then 0. Both are equal whenever N divides 1000 (8 steps included); elsewhere they differ by
    the truncation of ``x·1000/N`` (below 1e-3 in σ). ``normal`` (diffusers' SD3 scheduler,
    ComfyUI's ``normal``): ``shift(linspace(1, table[0], N))`` then 0, so the last σ before 0 is
    shifted twice (0.00893 at shift 3). ``sgm_uniform`` (ComfyUI): ``shift(linspace(1, table[0],
    N+1)[:-1])`` then 0. A family maps its user-facing names onto these (``Family.schedulers``).
    """
    _validate_schedule(steps, shift, scheduler, MAX_SCHEDULE_STEPS)  # img2img's long schedules too
    return SCHEDULES[scheduler](steps, shift).to(torch.float32)


def img2img_schedule(steps: int, denoise: float, shift: float = 3.0, *, scheduler: str = "linear") -> Tensor:
    """ComfyUI's partial schedule: the last ``steps + 1`` sigmas of an ``int(steps/denoise)``-step run."""
    validate_denoise(denoise)
    _validate_schedule(steps, shift, scheduler)
    if denoise > 0.9999:  # ComfyUI's own cut-off for "full denoise"
        return sigma_schedule(steps, shift, scheduler=scheduler)
    return sigma_schedule(int(steps / denoise), shift, scheduler=scheduler)[-(steps + 1) :]


# ---------------------------------------------------------------------------- model calls


def call_model(model_fn: ModelFn, x: Tensor, sigma: Tensor, cond: Any, dtype: torch.dtype | None,
               prediction: Prediction = ZIMAGE_PREDICTION) -> Tensor:
    """F in fp32 for latent ``x`` (fp32) at noise level ``sigma``.

    The model gets ``prediction.timestep(σ)`` per sample (fp32, like diffusers) and ``x`` cast
    to ``dtype``; its output times ``prediction.output_sign`` is F.
    """
    t = prediction.timestep(sigma).to(torch.float32).expand(x.shape[0])  # t: [B]
    x_in = x if dtype is None else x.to(dtype)
    out = model_fn(x_in, t, cond).float()
    return out if prediction.output_sign == 1.0 else out * prediction.output_sign


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


@dataclass(frozen=True)
class SkipLayerGuidance:
    """SD3.5's skip-layer guidance: ``F += scale·(F_cond − F_skip)`` while ``end ≤ σ ≤ start``.

    ``model_fn`` runs the conditional branch with the skipped blocks; ``sigma_start`` /
    ``sigma_end`` are σ bounds (ComfyUI's window, from percents of the timestep range).
    """

    model_fn: ModelFn
    scale: float
    sigma_start: float
    sigma_end: float

    def active(self, sigma: Tensor) -> bool:
        return self.scale != 0 and self.sigma_end <= float(sigma) <= self.sigma_start


def _branches(model_fn, x, sigma, conds: Sequence, dtype, prediction, batch: bool) -> list[Tensor]:
    """F of every conditioning in ``conds`` for the same ``x``: one batched call or one call each."""
    if batch and len(conds) > 1:
        stacked = torch.cat([x] * len(conds))
        return list(call_model(model_fn, stacked, sigma, [c for cs in conds for c in cs], dtype,
                               prediction).chunk(len(conds)))  # fmt: skip
    return [call_model(model_fn, x, sigma, c, dtype, prediction) for c in conds]


def guided_predict(
    model_fn: ModelFn, cond: Any, *, negative: Any = None, cfg: float = 1.0, dtype: torch.dtype | None = None,
    prediction: Prediction = ZIMAGE_PREDICTION, batch: bool = False, slg: SkipLayerGuidance | None = None,
) -> Predict:
    """``predict(x, σ) -> F`` with classifier-free guidance in ComfyUI's convention.

    ``F = F_neg + cfg·(F_pos − F_neg)`` (diffusers' guidance_scale g is ``cfg − 1``). At cfg 1 the
    negative branch is never run, so a Turbo step costs one forward. A missing negative is the
    zeroed positive, as in the official ComfyUI template. ``batch`` runs the positive and the
    negative as one batch of 2 (same result, one pass over the weights); ``slg`` adds SD3.5's
    skip-layer guidance inside its σ window.
    """
    neg = None if cfg == 1.0 else (zero_conditioning(cond) if negative is None else negative)

    def predict(x: Tensor, sigma: Tensor) -> Tensor:
        if neg is None:
            f = call_model(model_fn, x, sigma, cond, dtype, prediction)
            f_pos = f
        else:
            f_pos, f_neg = _branches(model_fn, x, sigma, [cond, neg], dtype, prediction, batch)
            f = f_neg + cfg * (f_pos - f_neg)
        if slg is not None and slg.active(sigma):
            f = f + slg.scale * (f_pos - call_model(slg.model_fn, x, sigma, cond, dtype, prediction))
        return f

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


def dpmpp_2m(predict: Predict, x: Tensor, sigmas: Tensor, on_step: OnStep) -> Tensor:
    """k-diffusion's DPM-Solver++(2M) as ComfyUI and the SD3.5 reference run it (σ as the noise
    level, τ = −ln σ); the first step and the step to σ = 0 are first order."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = to_denoised(x, sigma, predict(x, sigma))
        if sigma_next == 0:
            x = denoised  # σ_next/σ = 0 and 1 - e^{-h} = 1
        else:
            h = torch.log(sigma) - torch.log(sigma_next)  # τ_next - τ
            if old_denoised is not None:
                r = (torch.log(sigmas[i - 1]) - torch.log(sigma)) / h  # h_last / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            else:
                denoised_d = denoised
            x = (sigma_next / sigma) * x - torch.expm1(-h) * denoised_d
        old_denoised = denoised
        on_step(i, sigma_next, x)
    return x


Sampler = Callable[[Predict, Tensor, Tensor, OnStep], Tensor]
SAMPLERS: dict[str, Sampler] = {"euler": euler, "res_multistep": res_multistep, "dpmpp_2m": dpmpp_2m}


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
    prediction: Prediction = ZIMAGE_PREDICTION,
    batch_cfg: bool = False,
    slg: SkipLayerGuidance | None = None,
) -> Tensor:
    """Run ``steps`` sampler steps from ``noise`` (fp32) and return the final latent (fp32).

    ``blind_start = k`` runs the first k steps with zeroed positive conditioning, then the
    remaining steps from that latent with the real conditioning and no noise added: two
    sampler runs over ``σ[0..k]`` and ``σ[k..N]``, like two chained ComfyUI KSamplerAdvanced
    nodes (so a multistep sampler restarts its history at step k); k = 0 is the plain run.
    ``denoise < 1`` starts from ``init_latent`` at σ of ComfyUI's partial schedule
    (``img2img_schedule``): ``x = σ·noise + (1−σ)·init``. ``callback(step, total, σ, latent)``
    runs after every step; returning False raises ``Cancelled``. ``scheduler`` is a
    ``SCHEDULES`` name; ``prediction``, ``batch_cfg`` and ``slg``: see ``guided_predict``.
    """
    run = get_sampler(sampler)
    sigmas = img2img_schedule(steps, denoise, shift, scheduler=scheduler)
    _check_run(steps, cfg, blind_start)
    x = _start_latent(noise, sigmas[0], init_latent, denoise)
    segments = [(cond, blind_start, steps)]
    if blind_start:
        segments.insert(0, (zero_conditioning(cond), 0, blind_start))
    for seg_cond, first, last in segments:
        predict = guided_predict(model_fn, seg_cond, negative=negative, cfg=cfg, dtype=dtype,
                                 prediction=prediction, batch=batch_cfg, slg=slg)  # fmt: skip
        x = run(predict, x, sigmas[first : last + 1], _step_reporter(callback, first, steps))
    return x
