import math

import pytest
import torch

from pascaline.errors import InvalidArgumentError
from pascaline.runtime import sampling
from pascaline.runtime.sampling import (
    Cancelled,
    get_sampler,
    img2img_schedule,
    initial_noise,
    res_multistep_coefficients,
    sample,
    shift_sigmas,
    sigma_schedule,
)

# reference §5: the 8-step Turbo schedule and the res_multistep weights (h·b1, h·b2) of steps 1..6
SIGMAS_8 = [1.0, 0.954545, 0.9, 0.833333, 0.75, 0.642857, 0.5, 0.3, 0.0]
RES_HB = [
    (0.0936, -0.0365),
    (0.1231, -0.0491),
    (0.1697, -0.0697),
    (0.2500, -0.1072),
    (0.4110, -0.1887),
    (0.8410, -0.4410),
]


class Recorder:
    """A scalar model F = f(x, cond) that records every call."""

    def __init__(self, f):
        self.f, self.calls = f, []

    def __call__(self, x, t, cond):
        self.calls.append((x.dtype, t.clone(), cond))
        return self.f(x, cond)


def constant(c):
    return Recorder(lambda x, cond: torch.full_like(x, c))


def test_shift_formula():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.equal(shift_sigmas(s, 1.0), s)
    assert torch.allclose(shift_sigmas(s, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("scheduler", ["linear", "simple"])
def test_eight_step_schedule_equals_reference(scheduler):
    sigmas = sigma_schedule(8, 3.0, scheduler=scheduler)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (9,)
    assert torch.allclose(sigmas, torch.tensor(SIGMAS_8), atol=1e-6, rtol=0)
    t_model = (1 - sigmas[:-1]) * 1000
    assert torch.allclose(t_model, torch.tensor([0, 45.45, 100, 166.67, 250, 357.14, 500, 700]), atol=5e-3)


def test_comfy_simple_table_built_by_hand():
    # ComfyUI: table = shift(i/1000), i = 1..1000; simple: sigs[x] = table[-(1 + int(x*1000/N))], then 0
    table = [3 * (i / 1000) / (1 + 2 * (i / 1000)) for i in range(1, 1001)]
    for steps in (3, 7, 8, 13):
        expected = [table[-(1 + int(x * 1000 / steps))] for x in range(steps)] + [0.0]
        got = sigma_schedule(steps, scheduler="simple")
        assert torch.allclose(got, torch.tensor(expected), atol=1e-7, rtol=0)


def test_linear_and_simple_agree_when_steps_divide_1000():
    for steps in (1, 2, 4, 5, 8, 10, 20, 25):
        assert torch.allclose(sigma_schedule(steps), sigma_schedule(steps, scheduler="simple"), atol=1e-7)
    diff = (sigma_schedule(7) - sigma_schedule(7, scheduler="simple")).abs().max()
    assert 0 < diff < 1e-3


def test_schedule_matches_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    for steps in (4, 8, 9):
        sched.set_timesteps(sigmas=torch.linspace(1, 1 / steps, steps).tolist())
        assert torch.allclose(sched.sigmas, sigma_schedule(steps), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "at least 1"),
        ({"steps": 2.5}, "at least 1"),
        ({"steps": 8, "shift": 0.0}, "shift"),
        ({"steps": 8, "scheduler": "karras"}, "linear, simple"),
    ],
)
def test_schedule_errors(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        sigma_schedule(**kwargs)


def test_res_multistep_coefficients_equal_reference():
    s = sigma_schedule(8).double()
    for i, (hb1, hb2) in enumerate(RES_HB, start=1):
        h, b1, b2 = res_multistep_coefficients(s[i - 1], s[i], s[i + 1])
        assert float(h * b1) == pytest.approx(hb1, abs=6e-5)
        assert float(h * b2) == pytest.approx(hb2, abs=6e-5)


def test_euler_on_scalar_models():
    sigmas = sigma_schedule(8).tolist()
    x0 = torch.full((1, 16, 2, 2), 0.5)
    # F = c: x moves by (σ_i − σ_{i+1})·c each step, c in all
    out = sample(constant(2.0), x0, None, sampler="euler")
    assert torch.allclose(out, x0 + 2.0, atol=1e-6)
    # F = −x: x_{i+1} = x_i·(1 − (σ_i − σ_{i+1}))
    expected = 0.5
    for a, b in zip(sigmas[:-1], sigmas[1:], strict=True):
        expected *= 1 - (a - b)
    out = sample(Recorder(lambda x, c: -x), x0, None, sampler="euler")
    assert torch.allclose(out, torch.full_like(x0, expected), atol=1e-6)


def _res_multistep_by_hand(x, sigmas):
    """§5 written out in float64 for the model F = −x (so D = (1 − σ)·x)."""
    old = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (1 - s) * x
        if s_next == 0 or old is None:
            x = x + (x - d) / s * (s_next - s)
        else:
            h = math.log(s / s_next)
            c2 = -math.log(sigmas[i - 1] / s) / h
            phi1 = (1 - math.exp(-h)) / h
            phi2 = (phi1 - 1) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            x = (s_next / s) * x + h * (b1 * d + b2 * old)
        old = d
    return x


def test_res_multistep_on_scalar_models():
    x0 = torch.full((1, 16, 2, 2), 0.5)
    # F = c keeps D = x0 + c fixed, and the RES step then lands exactly on x0 + (1 − σ)·c
    seen = []
    out = sample(constant(-1.5), x0, None, sampler="res_multistep", callback=lambda *a: seen.append(a))
    for _step, _total, sigma, latent in seen:
        assert torch.allclose(latent, x0 - 1.5 * (1 - sigma), atol=1e-6)
    assert torch.allclose(out, x0 - 1.5, atol=1e-6)
    # F = −x exercises the second-order weights
    for steps in (3, 8):
        expected = _res_multistep_by_hand(0.5, sigma_schedule(steps).double().tolist())
        out = sample(Recorder(lambda x, c: -x), x0, None, steps=steps, sampler="res_multistep")
        assert torch.allclose(out, torch.full_like(x0, expected), atol=1e-6)
        euler_out = sample(Recorder(lambda x, c: -x), x0, None, steps=steps, sampler="euler")
        assert not torch.allclose(out, euler_out, atol=1e-4)  # the second-order terms matter


def _toy_model():
    w = torch.randn(16, 16) * 0.3

    def f(x, t, cond):  # x: [B, 16, h, w]
        return torch.tanh(torch.einsum("oc,bchw->bohw", w, x)) * (1 + t.view(-1, 1, 1, 1)) + cond

    return f


def test_euler_equals_diffusers_flow_match_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    f, cond, x0 = _toy_model(), torch.tensor(0.1), torch.randn(1, 16, 4, 4)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(sigmas=torch.linspace(1, 1 / 8, 8).tolist())
    x = x0.clone()
    for t in sched.timesteps:  # the diffusers ZImagePipeline loop
        timestep = ((1000 - t.expand(1)) / 1000).float()
        x = sched.step(-f(x, timestep, cond), t, x, return_dict=False)[0]
    ours = sample(f, x0, cond, sampler="euler")
    assert torch.allclose(ours, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sampler", ["euler", "res_multistep"])
def test_blind_start_zero_equals_plain_run(sampler):
    f, x0 = _toy_model(), torch.randn(1, 16, 4, 4)
    cond = [torch.randn(3, 4)]
    model = Recorder(lambda x, c: f(x, torch.zeros(1), c[0].sum()))
    plain = sample(model, x0, cond, sampler=sampler)
    assert torch.equal(sample(model, x0, cond, sampler=sampler, blind_start=0), plain)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_blind_start_zeroes_exactly_k_steps(k):
    cond = [torch.ones(3, 4)]
    model = Recorder(lambda x, c: torch.full_like(x, float(c[0].sum())))
    seen = []
    out = sample(
        model, torch.zeros(1, 16, 2, 2), cond, blind_start=k, callback=lambda s, n, *_: seen.append((s, n))
    )
    zeroed = [bool(c[0].eq(0).all()) for _, _, c in model.calls]
    assert zeroed == [True] * k + [False] * (8 - k)
    assert model.calls[k][2] is cond and seen == [(i, 8) for i in range(1, 9)]
    # F = 0 for the first k steps, then 12: the constant-F path ends at 12·σ_k
    assert torch.allclose(out, torch.full_like(out, 12 * sigma_schedule(8)[k].item()), atol=1e-5)


def test_blind_start_restarts_multistep_history():
    f, x0, cond = _toy_model(), torch.randn(1, 16, 4, 4), torch.tensor(0.2)
    sigmas, noop = sigma_schedule(8), lambda *a: None
    run = get_sampler("res_multistep")
    blind = run(sampling.guided_predict(f, torch.tensor(0.0)), x0, sigmas[:3], noop)
    expected = run(sampling.guided_predict(f, cond), blind, sigmas[2:], noop)
    assert torch.allclose(sample(f, x0, cond, blind_start=2), expected, atol=1e-6)


def test_cfg_one_runs_no_negative_branch():
    pos, neg = torch.tensor(1.0), torch.tensor(-1.0)
    model = Recorder(lambda x, c: torch.full_like(x, float(c)))
    out = sample(model, torch.zeros(1, 16, 2, 2), pos, negative=neg, cfg=1.0, sampler="euler")
    assert len(model.calls) == 8 and all(c is pos for _, _, c in model.calls)
    assert torch.allclose(out, torch.ones_like(out), atol=1e-6)


@pytest.mark.parametrize("sampler", ["euler", "res_multistep"])
def test_cfg_combines_positive_and_negative(sampler):
    pos, neg = torch.tensor(1.0), torch.tensor(-1.0)
    model = Recorder(lambda x, c: torch.full_like(x, float(c)))
    out = sample(model, torch.zeros(1, 16, 2, 2), pos, negative=neg, cfg=2.5, sampler=sampler)
    assert len(model.calls) == 16
    assert torch.allclose(out, torch.full_like(out, -1 + 2.5 * (1 - -1)), atol=1e-5)  # neg + cfg·(pos − neg)
    model.calls.clear()
    sample(model, torch.zeros(1, 16, 2, 2), pos, cfg=2.5)  # no negative: the zeroed positive
    assert [float(c) for _, _, c in model.calls[:2]] == [1.0, 0.0]


def test_img2img_starts_at_the_partial_schedule_sigma():
    assert torch.equal(img2img_schedule(8, 0.5), sigma_schedule(16)[-9:])
    assert torch.equal(img2img_schedule(8, 0.6), sigma_schedule(13)[-9:])  # int(8 / 0.6) = 13
    assert torch.equal(img2img_schedule(8, 1.0), sigma_schedule(8))
    noise, init = torch.randn(1, 16, 2, 2), torch.randn(1, 16, 2, 2)
    model = Recorder(lambda x, c: torch.zeros_like(x))  # F = 0 leaves the start latent as it is
    out = sample(model, noise, None, init_latent=init, denoise=0.5, sampler="euler")
    sigma0 = sigma_schedule(16)[8]
    assert len(model.calls) == 8 and torch.allclose(model.calls[0][1], 1 - sigma0.view(1))
    assert torch.allclose(out, sigma0 * noise + (1 - sigma0) * init, atol=1e-6)
    assert torch.allclose(sample(model, noise, None, init_latent=init, denoise=1.0), noise, atol=1e-6)


def test_img2img_errors():
    noise = torch.zeros(1, 16, 2, 2)
    with pytest.raises(InvalidArgumentError, match="needs an init image"):
        sample(constant(0.0), noise, None, denoise=0.5)
    with pytest.raises(InvalidArgumentError, match="does not match"):
        sample(constant(0.0), noise, None, init_latent=torch.zeros(1, 16, 4, 4), denoise=0.5)
    with pytest.raises(InvalidArgumentError, match=r"denoise must be a number from 0.01 to 1"):
        sample(constant(0.0), noise, None, init_latent=noise, denoise=0.0)


def test_callback_reports_and_cancels():
    seen, model = [], constant(1.0)

    def stop_after_three(step, total, sigma, latent):
        seen.append((step, total, sigma, latent.shape))
        return step < 3

    with pytest.raises(Cancelled, match="after step 3 of 8"):
        sample(model, torch.zeros(1, 16, 2, 2), None, callback=stop_after_three)
    assert len(model.calls) == 3
    assert [s[:2] for s in seen] == [(1, 8), (2, 8), (3, 8)]
    assert seen[0][2] == pytest.approx(SIGMAS_8[1], abs=1e-6) and seen[0][3] == (1, 16, 2, 2)

    def raises(*_):
        raise Cancelled("stop")

    with pytest.raises(Cancelled, match="stop"):
        sample(model, torch.zeros(1, 16, 2, 2), None, callback=raises)


def test_model_input_dtype_and_fp32_latents():
    model = Recorder(lambda x, c: torch.ones_like(x))  # returns bf16 like the real DiT
    out = sample(model, torch.zeros(1, 16, 2, 2), None, steps=2, dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    assert all(dt == torch.bfloat16 for dt, _, _ in model.calls)
    assert model.calls[0][1].dtype == torch.float32 and model.calls[0][1].shape == (1,)
    assert torch.allclose(torch.cat([c[1] for c in model.calls]), 1 - sigma_schedule(2)[:-1])


def test_initial_noise_is_the_documented_draw():
    expected = torch.randn(
        (1, 16, 96, 128), generator=torch.Generator("cpu").manual_seed(42), dtype=torch.float32
    )
    assert torch.equal(initial_noise(42, 768, 1024), expected)
    assert not torch.equal(initial_noise(43, 768, 1024), expected)
    with pytest.raises(InvalidArgumentError, match="seed"):
        initial_noise(-1, 64, 64)


def test_run_argument_errors():
    noise = torch.zeros(1, 16, 2, 2)
    with pytest.raises(
        InvalidArgumentError, match="unknown sampler 'heun'; choose one of dpmpp_2m, euler, res_multistep"
    ):
        sample(constant(0.0), noise, None, sampler="heun")
    with pytest.raises(InvalidArgumentError, match="blind start"):
        sample(constant(0.0), noise, None, blind_start=8)
    with pytest.raises(InvalidArgumentError, match="steps"):
        sample(constant(0.0), noise, None, steps=0)
    with pytest.raises(InvalidArgumentError, match="cfg"):
        sample(constant(0.0), noise, None, cfg=float("nan"))
