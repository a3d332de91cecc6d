"""Z-Image LoRAs in every trainer's format, through read_lora + apply_loras_ on the production DiT.

The reference is diffusers' ZImageTransformer2DModel with the same deltas injected by PEFT
(``add_adapter`` + the adapter's own forward, strength via ``set_adapters``); every format
encodes those deltas as its trainer does and must reproduce that output. Where diffusers
reads a format itself (``ZImageLoraLoaderMixin.lora_state_dict``), it is checked too, so
the writers here are the formats diffusers knows, not guesses.
"""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pascaline.errors import LoraError, TruncatedFileError
from pascaline.formats.zimage_dit import load_dit
from pascaline.formats.zimage_lora import zimage_lora_targets
from pascaline.lora import (
    LoraWarning,
    a1111_lora_text,
    apply_loras_,
    lora_records,
    lora_state,
    parse_lora_spec,
    read_lora,
    remove_loras_,
    set_lora_strengths_,
)
from tests.factories.dit import make_tiny_diffusers_dit, run_diffusers, save_comfy_dit
from tests.factories.lora import fuse_qkv_lora, kohya_keys, peft_inject_, peft_keys, random_lora, save_lora

RANK, ALPHA, STRENGTH = 4, 8.0, 0.8  # scale alpha / rank = 2
SCALE = ALPHA / RANK


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 12, 20, generator=g)
    return x, torch.tensor([0.0, 0.6]), [torch.randn(7, 32, generator=g), torch.randn(45, 32, generator=g)]


def _linears(model) -> dict[str, tuple[int, int]]:
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The base DiT (ComfyUI fp32 file), the deltas, the PEFT file and PEFT's output at STRENGTH."""
    tmp = tmp_path_factory.mktemp("zlora")
    ref = make_tiny_diffusers_dit()
    dit_path = save_comfy_dit(ref, tmp / "dit.safetensors", dtype=torch.float32)
    x, t, caps = _inputs()
    base = run_diffusers(ref, x, t, caps)
    lora = random_lora(_linears(ref), RANK)
    peft = peft_inject_(ref, lora, RANK, ALPHA, STRENGTH, tmp / "peft")
    expected = run_diffusers(ref, x, t, caps)
    return dict(
        tmp=tmp,
        dit=dit_path,
        lora=lora,
        base=base,
        expected=expected,
        peft=peft,
    )


def _ours(setup, path, strength=STRENGTH, mode="auto"):
    model = load_dit(setup["dit"], dtype=torch.float32)
    apply_loras_(model, [(read_lora(path), strength)], zimage_lora_targets, mode)
    x, t, caps = _inputs()
    with torch.no_grad():
        return model(x, t, caps), model


def _dotted(name: str) -> str:
    """Anime-Z's spelling: ``attention.to.q`` for ``attention.to_q``."""
    for p in "qkv":
        name = name.replace(f".to_{p}", f".to.{p}")
    return name


def _anime_z(lora):
    """Dot names with underscore alphas, plus the duplicate fused qkv / out copies (diffusers #13203)."""
    sd = {}
    for name, (down, up) in lora.items():
        sd[f"{_dotted(name)}.lora.down.weight"], sd[f"{_dotted(name)}.lora.up.weight"] = down, up
        sd[f"{name}.alpha"] = torch.tensor(ALPHA)
        if name.endswith("attention.to_q"):
            block = name.removesuffix(".to_q")
            fused = fuse_qkv_lora(*(lora[f"{block}.to_{p}"] for p in "qkv"))
            sd[f"{block}.qkv.lora.down.weight"], sd[f"{block}.qkv.lora.up.weight"] = fused
            sd[f"{block}.qkv.alpha"] = torch.tensor(3 * ALPHA)
            sd[f"{block}.out.lora.down.weight"], sd[f"{block}.out.lora.up.weight"] = lora[f"{block}.to_out.0"]
    return sd


_COMFY_NAMES = (
    ("all_x_embedder.2-1", "x_embedder"),
    ("all_final_layer.2-1", "final_layer"),
    (".attention.to_out.0", ".attention.out"),
)


def _comfy_fused(lora):
    """ComfyUI names with a FUSED qkv LoRA of rank 3r (alpha 3 x ALPHA keeps alpha / rank)."""
    sd = {}
    for name, (down, up) in lora.items():
        if ".attention.to_" in name and not name.endswith("to_out.0"):
            if name.endswith("to_q"):
                block = name.removesuffix(".to_q")
                pairs = {f"{block}.qkv": fuse_qkv_lora(*(lora[f"{block}.to_{p}"] for p in "qkv"))}
                sd.update(kohya_keys(pairs, "diffusion_model.", 3 * ALPHA, dotted=True))
            continue
        for old, new in _COMFY_NAMES:
            name = name.replace(old, new)
        sd.update(kohya_keys({name: (down, up)}, "diffusion_model.", ALPHA, dotted=True))
    return sd


def _scaled(lora, factor):
    return {n: (d, u * factor) for n, (d, u) in lora.items()}


FORMATS = {
    # producer: (state dict writer, metadata writer)
    "diffusers-pipeline": lambda lo, peft: (_prefixed(peft, "transformer."), _prefixed_meta(peft)),
    "base_model.model": lambda lo, peft: (_prefixed(peft, "base_model.model."), _meta(peft)),
    "ai-toolkit": lambda lo, peft: (kohya_keys(lo, "diffusion_model.", ALPHA, dotted=True), None),
    "musubi-tuner": lambda lo, peft: (kohya_keys(lo, "lora_unet_", ALPHA), None),
    "onetrainer": lambda lo, peft: (kohya_keys(lo, "lora_transformer_", ALPHA), None),
    "onetrainer-dotted": lambda lo, peft: (kohya_keys(lo, "transformer.", ALPHA, dotted=True), None),
    "lycoris": lambda lo, peft: (kohya_keys(lo, "lycoris_", ALPHA), None),
    "diffsynth": lambda lo, peft: (peft_keys(_scaled(lo, SCALE), prefix="", adapter="default"), None),
    "anime-z": lambda lo, peft: (_anime_z(lo), None),
    "comfy-fused-qkv": lambda lo, peft: (_comfy_fused(lo), None),
}
DIFFUSERS_READS = ("diffusers-pipeline", "ai-toolkit", "musubi-tuner", "diffsynth", "anime-z")


def _prefixed(peft_path, prefix):
    return {prefix + k: v for k, v in load_file(str(peft_path)).items()}


def _meta(peft_path):
    from safetensors import safe_open

    with safe_open(str(peft_path), "pt") as f:
        return f.metadata()


def _prefixed_meta(peft_path):
    meta = _meta(peft_path)
    config = json.loads(meta["lora_adapter_metadata"])
    return {**meta, "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}


def _write(setup, fmt):
    sd, meta = FORMATS[fmt](setup["lora"], setup["peft"])
    return save_lora(sd, setup["tmp"] / f"{fmt}.safetensors", meta)


def test_peft_file_matches_peft(setup):
    got, model = _ours(setup, setup["peft"])
    assert (setup["expected"] - setup["base"]).abs().max() > 0.05  # the LoRA changes the output
    torch.testing.assert_close(got, setup["expected"], rtol=1e-5, atol=1e-5)
    assert len(lora_state(model).merged) == len(setup["lora"]) - 2 * 6  # q/k/v of 6 blocks share a qkv


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_matches_peft(setup, fmt):
    path = _write(setup, fmt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, _ = _ours(setup, path)
    torch.testing.assert_close(got, setup["expected"], rtol=1e-5, atol=1e-5)
    duplicates = [w for w in caught if issubclass(w.category, LoraWarning)]
    assert len(duplicates) == (fmt == "anime-z")  # its fused copies are read once, and said so


@pytest.mark.parametrize("fmt", DIFFUSERS_READS)
def test_diffusers_reads_the_written_formats_the_same(setup, fmt):
    """diffusers' own converter + PEFT on the file we wrote gives the reference too."""
    from diffusers.loaders.lora_pipeline import ZImageLoraLoaderMixin

    path = _write(setup, fmt)
    state, metadata = ZImageLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    model = make_tiny_diffusers_dit()
    model.load_lora_adapter(state, prefix="transformer", adapter_name="x", metadata=metadata)
    model.set_adapters(["x"], weights=[STRENGTH])
    torch.testing.assert_close(run_diffusers(model, *_inputs()), setup["expected"], rtol=1e-5, atol=1e-5)


def test_split_and_fused_qkv_are_identical(setup):
    split, _ = _ours(setup, _write(setup, "musubi-tuner"))
    fused, _ = _ours(setup, _write(setup, "comfy-fused-qkv"))
    torch.testing.assert_close(split, fused, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["merge", "branch"])
def test_strength_zero_is_no_lora_and_branch_equals_merge(setup, mode):
    zero, _ = _ours(setup, setup["peft"], strength=0.0, mode=mode)
    torch.testing.assert_close(zero, setup["base"], rtol=1e-5, atol=1e-5)
    full, model = _ours(setup, setup["peft"], mode=mode)
    torch.testing.assert_close(full, setup["expected"], rtol=1e-5, atol=1e-5)
    x, t, caps = _inputs()
    with torch.no_grad():
        plain = load_dit(setup["dit"], dtype=torch.float32)(x, t, caps)
        set_lora_strengths_(model, [0.0])
        assert torch.equal(model(x, t, caps), plain)  # exactly the base: no delta, no rounding
        set_lora_strengths_(model, {read_lora(setup["peft"]).name: STRENGTH})
        torch.testing.assert_close(model(x, t, caps), full, rtol=1e-6, atol=1e-6)
        remove_loras_(model)
        assert torch.equal(model(x, t, caps), plain)
    assert lora_state(model) is None and "lora_branch" not in str(model)


def test_two_loras_each_with_its_strength(setup):
    """Two LoRAs at once equal their deltas summed; re-weighting one changes only its part."""
    other = random_lora(_linears(make_tiny_diffusers_dit()), RANK, seed=5)
    second = save_lora(kohya_keys(other, "lora_unet_", ALPHA), setup["tmp"] / "second.safetensors")
    model = load_dit(setup["dit"], dtype=torch.float32)
    first = read_lora(setup["peft"])
    apply_loras_(model, [(first, STRENGTH), (read_lora(second), 0.5)], zimage_lora_targets, "branch")
    x, t, caps = _inputs()
    with torch.no_grad():
        set_lora_strengths_(model, [STRENGTH, 0.0])
        torch.testing.assert_close(model(x, t, caps), setup["expected"], rtol=1e-5, atol=1e-5)
        set_lora_strengths_(model, [0.3, 0.5])
        both = model(x, t, caps)
    merged = load_dit(setup["dit"], dtype=torch.float32)
    apply_loras_(merged, [(first, 0.3)], zimage_lora_targets, "merge")
    apply_loras_(merged, [(read_lora(second), 0.5)], zimage_lora_targets, "merge")  # on top
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, caps), both, rtol=1e-5, atol=1e-5)
    assert [r["strength"] for r in lora_state(merged).records()] == [0.3, 0.5]


def test_records_for_png_metadata(setup):
    lora = read_lora(setup["peft"])
    records = lora_records([(lora, 0.8)])
    data = setup["peft"].read_bytes()
    import hashlib

    header = 8 + int.from_bytes(data[:8], "little")
    assert records == [
        {
            "name": "pytorch_lora_weights",
            "hash": hashlib.sha256(data[header:]).hexdigest()[:12],
            "strength": 0.8,
            "file": "pytorch_lora_weights.safetensors",
        }
    ]
    tags, hashes = a1111_lora_text(records)
    assert tags == "<lora:pytorch_lora_weights:0.8>" and hashes.startswith(
        'Lora hashes: "pytorch_lora_weights: '
    )
    assert parse_lora_spec("a/style.safetensors:0.5")[1] == 0.5
    assert parse_lora_spec("C:\\loras\\style.safetensors") == (
        parse_lora_spec("C:\\loras\\style.safetensors")[0],
        1.0,
    )
    assert str(parse_lora_spec("C:\\loras\\s.safetensors:1.5")[0]) == "C:\\loras\\s.safetensors"


# --- user errors: one sentence each ----------------------------------------------------------


def _apply_error(setup, sd, match, exc=LoraError, name="bad"):
    path = save_lora(sd, setup["tmp"] / f"{name}.safetensors")
    model = load_dit(setup["dit"], dtype=torch.float32)
    with pytest.raises(exc, match=match) as info:
        apply_loras_(model, [(read_lora(path), 1.0)], zimage_lora_targets)
    assert "\n" not in str(info.value) and lora_state(model) is None
    return str(info.value)


def test_unknown_keys_are_listed_never_dropped(setup):
    sd = kohya_keys(setup["lora"], "lora_unet_", ALPHA)
    sd.update(
        kohya_keys({"layers.0.attention.bogus": setup["lora"]["layers.0.attention.to_q"]}, "lora_unet_")
    )
    message = _apply_error(setup, sd, "1 of its .* match no module of this Z-Image model")
    assert "lora_unet_layers_0_attention_bogus" in message


def test_lora_of_another_family(setup):
    sd3 = {
        "transformer_blocks.0.attn.add_q_proj": (torch.zeros(4, 64), torch.zeros(64, 4)),
        "transformer_blocks.0.attn.to_q": (torch.zeros(4, 64), torch.zeros(64, 4)),
    }
    _apply_error(setup, peft_keys(sd3), "is a LoRA for SD3/SD3.5, not for this Z-Image model")


def test_lora_of_another_size(setup):
    wide = {"layers.0.attention.to_q": (torch.zeros(4, 128), torch.zeros(128, 4))}
    _apply_error(setup, peft_keys(wide), r"has \[192, 64\]; is the LoRA for another model size")


def test_checkpoint_given_as_lora(setup):
    with pytest.raises(
        LoraError, match="holds no LoRA tensors .* looks like a Z-Image DiT: pass it as a model"
    ):
        read_lora(setup["dit"])


def test_truncated_lora(setup):
    data = setup["peft"].read_bytes()
    cut = setup["tmp"] / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(TruncatedFileError, match="truncated"):
        read_lora(cut)


@pytest.mark.parametrize(
    ("suffix", "kind"), [(".dora_scale", "DoRA"), (".hada_w1_a", "LoHa"), (".lokr_w1", "LoKr")]
)
def test_other_adapter_kinds_are_refused_by_name(setup, suffix, kind):
    sd = kohya_keys(
        {"layers.0.attention.to_q": setup["lora"]["layers.0.attention.to_q"]}, "lora_unet_", ALPHA
    )
    sd["lora_unet_layers_0_attention_to_q" + suffix] = torch.ones(4)
    path = save_lora(sd, setup["tmp"] / f"{kind}.safetensors")
    with pytest.raises(LoraError, match=f"is a {kind} adapter"):
        read_lora(path)


def test_half_a_pair_and_stray_tensors(setup):
    down, up = setup["lora"]["layers.0.attention.to_q"]
    path = save_lora(
        {"lora_unet_layers_0_attention_to_q.lora_down.weight": down}, setup["tmp"] / "half.safetensors"
    )
    with pytest.raises(LoraError, match="is incomplete: .* has no up partner"):
        read_lora(path)
    save_lora({"a.lora_A.weight": down, "a.lora_B.weight": up, "emb": up}, setup["tmp"] / "stray.safetensors")
    with pytest.raises(LoraError, match="belong to no LoRA module"):
        read_lora(setup["tmp"] / "stray.safetensors")
