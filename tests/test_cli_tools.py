"""`pascaline quantize` and `pascaline info`, run in-process through ``main``."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pascaline.cli import _dit_placement, main
from pascaline.formats.safetensors_io import WeightSource
from pascaline.formats.zimage_dit import load_dit
from pascaline.quant import scheme_from_metadata
from pascaline.quant.qlinear import QLinear
from pascaline.runtime.device import GIB, format_bytes
from pascaline.runtime.quantize import quantize_file
from tests.factories.dit import save_diffusers_dit
from tests.factories.qwen3 import make_qwen3, save_comfy


@pytest.fixture
def dit_copy(dit_bf16, tmp_path):
    """The tiny DiT alone in a fresh folder, so default outputs land where the test looks."""
    return shutil.copy(dit_bf16, tmp_path / "dit_bf16.safetensors")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("pascaline: error: "), err
    return err


def _summary(capsys) -> str:
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return out[0]


# --- quantize --------------------------------------------------------------------------------


def test_quantize_dit_default_scheme_and_name(dit_copy, tmp_path, capsys):
    assert main(["quantize", str(dit_copy)]) == 0
    out = tmp_path / "dit_bf16_int8.safetensors"
    assert sorted(os.listdir(tmp_path)) == ["dit_bf16.safetensors", "dit_bf16_int8.safetensors"]
    line = _summary(capsys)
    tensors = len(load_file(str(out)))
    sizes = f"{format_bytes(WeightSource(dit_copy).nbytes)} -> {format_bytes(out.stat().st_size)}"
    assert re.fullmatch(
        rf"{re.escape(f'{out}  zimage-dit, int8, {tensors} tensors, {sizes}, ')}\d+\.\d s", line
    ), line
    model = load_dit(out, dtype=torch.float32)
    qkv = model.layers[0].attention.qkv
    assert isinstance(qkv, QLinear) and qkv.scheme.name == "int8" and qkv.qweight.dtype == torch.int8
    reference = load_dit(dit_copy, dtype=torch.float32, quant="int8").state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_quantize_encoder_with_scheme_and_out(tmp_path, capsys):
    src = save_comfy(make_qwen3(), tmp_path / "qwen_3_4b.safetensors", dtype=torch.bfloat16)
    out = tmp_path / "te.safetensors"
    assert main(["quantize", str(src), "--scheme", "fp8-e4m3", "--out", str(out)]) == 0
    metadata = WeightSource(out).metadata
    assert json.loads(metadata["pascaline"])["model"] == "qwen3-encoder"
    assert scheme_from_metadata(metadata).name == "fp8-e4m3"
    assert load_file(str(out))["layers.0.self_attn.q_proj.qweight"].dtype == torch.float8_e4m3fn
    assert _summary(capsys).startswith(f"{out}  qwen3-encoder, fp8-e4m3, ")


def test_default_name_of_a_folder_source(dit_model, tmp_path, capsys):
    save_diffusers_dit(dit_model, tmp_path / "snap" / "transformer", shards=2)
    assert main(["quantize", str(tmp_path / "snap" / "transformer"), "--scheme", "w8a8"]) == 0
    assert main(["quantize", str(tmp_path / "snap") + "/"]) == 0  # a snapshot root stands for its DiT
    for path, scheme in (
        (tmp_path / "snap" / "transformer_w8a8.safetensors", "w8a8"),
        (tmp_path / "snap_int8.safetensors", "int8"),
    ):
        assert scheme_from_metadata(WeightSource(path).metadata).name == scheme


def test_existing_output_is_refused_then_replaced_with_overwrite(dit_copy, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"an older file")
    assert main(["quantize", str(dit_copy), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in _error_line(capsys)
    assert out.read_bytes() == b"an older file"
    assert sorted(os.listdir(tmp_path)) == ["dit_bf16.safetensors", "q.safetensors"]
    assert main(["quantize", str(dit_copy), "--out", str(out), "--overwrite"]) == 0
    assert scheme_from_metadata(WeightSource(out).metadata).name == "int8"
    assert sorted(os.listdir(tmp_path)) == ["dit_bf16.safetensors", "q.safetensors"]


def _text(path):
    path.write_text("hello, not weights")


def _vae(path):
    save_file({"decoder.conv_in.weight": torch.zeros(8, 16, 3, 3)}, str(path))


@pytest.mark.parametrize(
    ("make", "message"), [(None, "does not exist"), (_text, "not a safetensors file"), (_vae, "FLUX.1 VAE")]
)
def test_bad_sources_fail_in_one_line_and_write_nothing(make, message, tmp_path, capsys):
    src = tmp_path / "model.safetensors"
    if make is not None:
        make(src)
    before = sorted(os.listdir(tmp_path))
    assert main(["quantize", str(src)]) == 2
    assert message in _error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == before  # no output, no .partial


def test_unknown_scheme_is_a_usage_error(dit_copy, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(dit_copy), "--scheme", "int4"])
    assert exc.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err


def test_progress_is_monotonic_and_ends_at_the_tensor_count(dit_bf16, tmp_path):
    calls: list[tuple[int, int]] = []
    result = quantize_file(
        dit_bf16, tmp_path / "q.safetensors", "w8a8", progress=lambda done, total: calls.append((done, total))
    )
    total = len(load_file(str(result.path)))
    assert result.tensors == total
    assert calls == [(i, total) for i in range(1, total + 1)]


def test_source_is_closed_when_quantizing_the_model_fails(dit_bf16, tmp_path, monkeypatch):
    import pascaline.quant.files as files

    closed = []
    monkeypatch.setattr(WeightSource, "close", lambda self: closed.append(self.path))

    def broken(model, scheme):
        raise RuntimeError("boom")

    monkeypatch.setattr(files, "quantize_", broken)
    with pytest.raises(RuntimeError, match="boom"):
        quantize_file(dit_bf16, tmp_path / "q.safetensors", "int8")
    assert closed == [dit_bf16, dit_bf16]  # the header probe, then the source it quantized
    assert os.listdir(tmp_path) == []


# --- info ------------------------------------------------------------------------------------

_PLACEMENT = re.compile(
    r"z-image-turbo: DiT at 1024x1024 \((\S+)\) under ([\d.]+) GiB: (\d+) of (\d+) blocks resident, "
    r"(\d+) streamed, (\d+) slots of [\d.]+ MiB, expected peak ([\d.]+) GiB"
)


def test_info_for_a_gtx1070(capsys):
    assert main(["info", "--card", "gtx1070"]) == 0
    out = capsys.readouterr().out
    assert "sm_61" in out and "int8 path dp4a" in out and "native bf16 no" in out
    assert "compute   DiT fp32, text encoder fp32, VAE fp32" in out
    assert "quant     w8a8" in out and "attention mem_efficient" in out
    assert re.search(r"^budget    7\.00 GiB \(8\.00 GiB minus 1\.00 GiB", out, re.M)
    assert "slow_half: Pascal runs fp16 at 1/64 rate" in out and "no_compile:" in out
    match = _PLACEMENT.search(out)
    assert match is not None, out
    scheme, budget, resident, units, streamed, slots, peak = match.groups()
    assert scheme == "w8a8" and budget == "7.00" and units == "34"
    assert int(resident) + int(streamed) == 34 and int(streamed) > 0 and slots == "2"
    assert float(peak) <= 7.0


def test_info_plans_every_variant_or_the_one_asked_for(capsys):
    assert main(["info", "--card", "gtx1070"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if ": DiT at 1024x1024" in line]
    assert [line.split(":")[0] for line in lines] == ["sd3-medium", "sd3.5-medium", "sd3.5-large",
                                                      "sd3.5-large-turbo", "z-image-turbo"]
    large = next(line for line in lines if line.startswith("sd3.5-large:"))
    resident, units, streamed = map(int, re.search(r"(\d+) of (\d+) blocks resident, (\d+) streamed",
                                                   large).groups())
    assert units == 38 and streamed > 0 and resident + streamed == 38  # 8.15 GB of int8 weights: streamed
    assert "guidance as a batch of 2" in large
    assert main(["info", "--card", "gtx1070", "--model", "sd3.5-medium"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if ": DiT at" in line]
    assert len(lines) == 1 and lines[0].startswith("sd3.5-medium: ") and "0 streamed" in lines[0]
    assert main(["info", "--model", "sdxl"]) == 2


def test_info_on_a_real_size_sd35_large_folder_gives_ram_with_and_without_t5(tmp_path, capsys):
    from tests.factories.sparse import sd35_large_folder

    root = sd35_large_folder(tmp_path / "models")  # real headers and sizes, no data on disk
    assert main(["models", str(root)]) == 0
    out = capsys.readouterr().out
    assert "SD3: runs as --model sd3.5-large" in out and "not recognised" not in out
    assert main(["info", "--card", "gtx1070", "--models", str(root)]) == 0
    out = capsys.readouterr().out
    ram = {role: float(m) for role, m in re.findall(r"^ {10}(\w+) +\S+: float16, [\d.]+ \wiB on disk, "
                                                   r"([\d.]+) GiB in RAM", out, re.M)}  # fmt: skip
    assert set(ram) == {"dit", "t5"}  # the CLIPs and the VAE are MiB (CLIP-G int8: 664 MiB)
    host = next(line for line in out.splitlines() if line.startswith("host RAM"))
    one, kept, one_no_t5, kept_no_t5 = map(float, re.findall(r"([\d.]+) GiB", host))
    assert one == ram["dit"] == one_no_t5 and kept - kept_no_t5 == pytest.approx(ram["t5"], abs=0.02)
    assert "the largest, t5 (4.56 GiB), on the card whole" in out  # int8 T5-XXL under 7 GiB
    assert re.search(r"sd3.5-large: DiT at 1024x1024 \(w8a8\) under 7.00 GiB: \d+ of 38 blocks resident", out)


def test_info_for_an_rtx2060_computes_the_dit_in_fp16(capsys):
    assert main(["info", "--card", "rtx2060"]) == 0
    out = capsys.readouterr().out
    assert "compute   DiT fp16, text encoder fp32, VAE fp32" in out
    assert "fp16 tensor cores yes" in out and "int8 path tensor_cores" in out


def test_info_names_missing_kernels_without_failing(capsys, monkeypatch):
    monkeypatch.setattr("pascaline.cli._torch_arch_list", lambda: ["sm_75", "sm_80"])
    assert main(["info", "--card", "gtx1070"]) == 0
    out = capsys.readouterr().out
    assert "installed torch has kernels no" in out and "torch 2.14 with CUDA 12.6" in out
    monkeypatch.setattr("pascaline.cli._torch_arch_list", lambda: ["sm_60", "sm_75"])
    assert main(["info", "--card", "gtx1070"]) == 0
    out = capsys.readouterr().out
    assert "installed torch has kernels yes" in out and "install one that has" not in out


def test_info_unknown_card(capsys):
    assert main(["info", "--card", "bogus"]) == 2
    assert "gtx1070" in _error_line(capsys)


def test_info_on_this_machine(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pascaline ") and "\ntorch " in out and "\ncompute   DiT " in out
    assert "\nbudget    " in out


def test_a_budget_too_small_is_a_line():
    line = _dit_placement(torch.float32, "w8a8", GIB, "z-image-turbo")
    assert line.startswith("z-image-turbo: DiT at 1024x1024 (w8a8) under 1.00 GiB: does not fit.")
    assert "raise --vram-budget" in line


def test_a_full_disk_is_one_sentence_and_exit_2(dit_bf16, tmp_path, monkeypatch, capsys):
    import pascaline.runtime.quantize as files

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "q.safetensors"))

    monkeypatch.setattr(files, "quantize_file", full_disk)
    assert main(["quantize", str(dit_bf16), "--out", str(tmp_path / "q.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err == f"pascaline: error: No space left on device ({tmp_path / 'q.safetensors'}).\n"
