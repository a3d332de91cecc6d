"""Models loaded from GGUF files through the production loaders equal the same models loaded from the
float weights the files hold (gguf's own dequantization), for Z-Image (city96 and sd.cpp files),
Qwen3 (llama.cpp names, fp32 compute), T5 and an SD3-named file; streamed equals resident."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pascaline.errors import PascalineError, StateDictError, TruncatedFileError, WrongModelError
from pascaline.formats.qwen3 import load_text_encoder
from pascaline.formats.zimage_dit import load_dit
from pascaline.gguf.loaders import Qwen3GGUF, gguf_dit_skeleton, gguf_tensor_stream, load_gguf_into_
from pascaline.gguf.module import GGUFEmbedding, GGUFLinear, dequant_workspace_bytes
from pascaline.gguf.names import sd3_name, t5_name
from pascaline.gguf.policy import gguf_quant
from pascaline.gguf.reader import GGUFFile
from pascaline.offload.plan import other_nbytes, packed_nbytes, unit_modules, unit_sizes
from pascaline.quant import Int8Dynamic, QLinear
from pascaline.quant.primitives import sqnr_db
from pascaline.runtime.device import DeviceCaps, default_quant
from tests.factories.dit import diffusers_to_comfy
from tests.factories.gguf import qwen3_gguf, t5_gguf, write_gguf, zimage_gguf
from tests.factories.qwen3 import make_qwen3, reference_features
from tests.test_gguf_reader import one_sentence
from tests.test_streamer import assert_streaming_is_exact, sampler_calls

FORMS = {"city96": "Q8_0", "sdcpp": "Q4_0"}  # the common jayn7/unsloth and leejet files


@pytest.fixture(scope="module")
def dit_files(tmp_path_factory, dit_model):
    """Each form as a GGUF, and the float values it holds as a ComfyUI fp32 safetensors file."""
    root = tmp_path_factory.mktemp("gguf-dit")
    comfy = diffusers_to_comfy(dit_model.state_dict())
    files = {}
    for form, qtype in FORMS.items():
        held = zimage_gguf(comfy, root / f"{form}.gguf", qtype, form=form)
        save_file({k: v.contiguous() for k, v in held.items()}, str(root / f"{form}.safetensors"))
        files[form] = (root / f"{form}.gguf", root / f"{form}.safetensors")
    return files


def _outputs(dit):
    call = sampler_calls(dit, dit.config.cap_feat_dim)
    return torch.cat([call(i) for i in range(2)])


@pytest.mark.parametrize("form", FORMS)
def test_dit_from_gguf_equals_the_dequantized_weights(dit_files, form):
    gguf_path, float_path = dit_files[form]
    dit = load_dit(gguf_path, dtype=torch.float32)
    want = _outputs(load_dit(float_path, dtype=torch.float32))
    assert torch.allclose(_outputs(dit), want, rtol=1e-5, atol=1e-6) and want.abs().mean() > 0.1
    assert (
        isinstance(dit.layers[0].attention.qkv, GGUFLinear)
        and dit.layers[0].attention.qkv.gtype.name == FORMS[form]
    )
    # city96 leaves the embedders and refiners in F16; sd.cpp quantizes them (and norms, pad tokens)
    assert isinstance(dit.cap_embedder[1], GGUFLinear) == (form == "sdcpp")
    assert isinstance(dit.context_refiner[0].feed_forward.w1, GGUFLinear) == (form == "sdcpp")
    assert type(dit.layers[0].feed_forward.w2) is nn.Linear  # 170 inputs: no whole blocks, F16 in the file
    assert dit.x_pad_token.dtype == torch.float32 and dequant_workspace_bytes(dit, torch.float32) > 0


def test_gguf_dit_streams_exactly_and_moves_gguf_bytes(dit_files):
    dit = load_dit(dit_files["city96"][0], dtype=torch.float32)
    infos = GGUFFile(dit_files["city96"][0]).tensors
    name, block = unit_modules(dit)[-1]
    for fqn, m in block.named_modules():
        if isinstance(m, GGUFLinear):  # the unit holds exactly the file's blocks
            assert m.qweight.numel() == infos[f"{name}.{fqn}.weight"].nbytes
    float_block = unit_modules(load_dit(dit_files["city96"][1], dtype=torch.float32))[-1][1]
    assert packed_nbytes(block) < 0.5 * packed_nbytes(float_block)
    call = sampler_calls(dit, dit.config.cap_feat_dim)
    for case in ("some", "all"):
        streamer = assert_streaming_is_exact(dit, call, case, activation=10**6, calls=2)
    assert streamer.stats.h2d_bytes >= 2 * sum(b for _, b in streamer.plan.units)


def test_w8a8_requantizes_once_at_load(dit_files):
    gguf_path, float_path = dit_files["sdcpp"]
    dit = load_dit(gguf_path, dtype=torch.float32, quant="w8a8")
    assert isinstance(dit.layers[0].attention.qkv, QLinear)  # the scheme's own layers, requantized
    assert isinstance(dit.layers[0].adaLN_modulation[0], GGUFLinear)  # the rest keeps its GGUF blocks
    want = load_dit(float_path, dtype=torch.float32, quant="w8a8")
    assert torch.equal(dit.layers[0].attention.qkv.qweight, want.layers[0].attention.qkv.qweight)
    assert sqnr_db(_outputs(load_dit(float_path, dtype=torch.float32)), _outputs(dit)) > 25


@pytest.mark.parametrize("quant", [None, "w8a8"])
def test_skeleton_from_the_header_plans_like_the_loaded_model(dit_files, quant):
    path = dit_files["sdcpp"][0]
    skeleton = gguf_dit_skeleton(path, dtype=torch.float32, quant=quant)
    loaded = load_dit(path, dtype=torch.float32, quant=quant)
    assert all(t.device.type == "meta" for t in skeleton.state_dict().values())
    assert unit_sizes(skeleton) == unit_sizes(loaded) and other_nbytes(skeleton) == other_nbytes(loaded)
    workspace = dequant_workspace_bytes(loaded, torch.float16)
    assert dequant_workspace_bytes(skeleton, torch.float16) == workspace > 0


def test_policy_requantizes_for_w8a8_only():
    asked = ("w8a8", "int8", "fp8-e4m3", "none", None)
    assert [gguf_quant(q) for q in asked] == ["w8a8", None, None, None, None]
    assert gguf_quant(Int8Dynamic()) == Int8Dynamic()
    cards = {"gtx1070": "w8a8", "gtx1660": "w8a8", "rtx2060": "w8a8", "h100": None, "cpu": None}
    assert {c: gguf_quant(default_quant(DeviceCaps.preset(c))) for c in cards} == cards


@pytest.fixture(scope="module")
def qwen3_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-qwen3") / "models" / "text_encoders"
    ref = make_qwen3(seed=3)  # real vocabulary, so real prompts tokenize
    held = qwen3_gguf(ref, root / "Qwen3-4B-Q8_0.gguf", "Q8_0")
    # K-quants need rows of 256: a wider tiny model, in a Q4_K_M-like mix (Q6_K table, v and down)
    wide = make_qwen3(seed=4, vocab_size=1000, hidden_size=256, intermediate_size=512, head_dim=64)
    mix = {"v_proj": "Q6_K", "down_proj": "Q6_K", "o_proj": "Q5_K", "gate_proj": "Q3_K", "k_proj": "Q2_K"}
    held_k = qwen3_gguf(wide, root / "Qwen3-Q4_K_M.gguf", "Q4_K", embed_type="Q6_K", types=mix)
    return (root / "Qwen3-4B-Q8_0.gguf", ref, held), (root / "Qwen3-Q4_K_M.gguf", wide, held_k)


def _reference_model(ref, held):
    from transformers import Qwen3Model

    model = Qwen3Model(ref.config).eval()
    model.load_state_dict(held, strict=True)
    return model


def test_qwen3_from_gguf_equals_transformers_on_the_held_weights(qwen3_files, tok):
    path, ref, held = qwen3_files[0]
    encoder = load_text_encoder(path, dtype=torch.float32, tokenizer=tok)
    prompts = ["a lighthouse at dusk", "Маяк на закате 東京の夜景"]
    want = reference_features(_reference_model(ref, held), encoder.tokenize(prompts))
    got = encoder.encode(prompts)
    assert max((a - b).abs().max().item() for a, b in zip(got, want, strict=True)) < 1e-5
    assert isinstance(encoder.model.embed_tokens, GGUFEmbedding) and len(encoder.model.layers) == 2
    assert isinstance(encoder.model.layers[1].mlp.down_proj, GGUFLinear)


def test_qwen3_k_quant_mix(qwen3_files):
    path, ref, held = qwen3_files[1]
    encoder = load_text_encoder(path, dtype=torch.float32, tokenizer=object())
    skeleton = Qwen3GGUF.open(path).skeleton(dtype=torch.float32)
    assert unit_sizes(skeleton) == unit_sizes(encoder.model) and other_nbytes(skeleton) == other_nbytes(
        encoder.model)
    ids = [[5, 17, 999, 3, 42], [1, 2]]
    want = reference_features(_reference_model(ref, held), ids)
    with torch.no_grad():
        got = [encoder.model(input_ids=torch.tensor([s])).last_hidden_state[0] for s in ids]
    assert max((a - b).abs().max().item() for a, b in zip(got, want, strict=True)) < 1e-5
    types = {n: m.gtype.name for n, m in encoder.model.named_modules() if isinstance(m, GGUFLinear)}
    assert {
        types["layers.0.self_attn.v_proj"],
        types["layers.0.self_attn.q_proj"],
        types["layers.1.mlp.gate_proj"],
        types["layers.0.self_attn.k_proj"],
        types["layers.0.self_attn.o_proj"],
    } == {"Q6_K", "Q4_K", "Q3_K", "Q2_K", "Q5_K"}


def test_t5_encoder_from_llama_cpp_names(tmp_path):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=128,
        d_model=64,
        d_kv=16,
        d_ff=96,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    ref = T5EncoderModel(config).eval()
    # transformers' T5 reads wo.weight.dtype in forward, which no quantized layer has: wo stays F16 here
    held = t5_gguf(ref, tmp_path / "t5.gguf", "Q5_1", keep_float=("DenseReluDense.wo",))
    ref.load_state_dict({**held, "encoder.embed_tokens.weight": held["shared.weight"]}, strict=True)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    load_gguf_into_(model, GGUFFile(tmp_path / "t5.gguf"), t5_name, dtype=torch.float32)
    assert isinstance(model.encoder.block[1].layer[0].SelfAttention.q, GGUFLinear)
    ids = torch.tensor([[5, 17, 99, 3, 42, 1]])
    with torch.no_grad():
        assert torch.allclose(
            model(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state, atol=1e-6
        )


class _MiniMMDiT(nn.Module):
    """The SD3 names that matter to the mechanism: a pos_embed [1, N, D] and block linears."""

    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.empty(1, 16, 64))
        block = nn.Module()
        block.attn = nn.Module()
        block.attn.qkv = nn.Linear(64, 192)
        self.joint_blocks = nn.ModuleList([nn.ModuleDict({"x_block": block})])


def test_sd3_names_and_a_pos_embed_stored_without_its_leading_1(tmp_path):
    values = {
        "pos_embed": torch.randn(16, 64),
        "joint_blocks.0.x_block.attn.qkv.weight": torch.randn(192, 64),
        "joint_blocks.0.x_block.attn.qkv.bias": torch.randn(192),
    }
    prefix = "model.diffusion_model."
    held = write_gguf(
        tmp_path / "sd3.gguf",
        {
            prefix + k: (v.numpy(), "F32" if v.ndim == 1 or k == "pos_embed" else "Q8_0")
            for k, v in values.items()
        },
        arch="sd3",
    )
    assert [k for k, _ in gguf_tensor_stream(tmp_path / "sd3.gguf", sd3_name)] == list(values)
    with torch.device("meta"):
        model = _MiniMMDiT()
    load_gguf_into_(model, GGUFFile(tmp_path / "sd3.gguf"), sd3_name, dtype=torch.float32)
    assert torch.equal(model.pos_embed, values["pos_embed"][None])
    qkv = model.joint_blocks[0]["x_block"].attn.qkv
    assert isinstance(qkv, GGUFLinear) and torch.equal(
        qkv.dequantize(), held[prefix + "joint_blocks.0.x_block.attn.qkv.weight"]
    )


def test_wrong_files_get_one_sentence(dit_files, qwen3_files, tmp_path):
    llm = tmp_path / "llama-3-8b.Q4_0.gguf"
    write_gguf(llm, {"token_embd.weight": (torch.randn(64, 32).numpy(), "Q4_0")}, arch="llama")
    for path, call, says in (
        (
            llm,
            lambda p: load_dit(p),
            "holds a 'llama' model (GGUF general.architecture), which pascaline does not",
        ),
        (qwen3_files[0][0], lambda p: load_dit(p), "holds a Qwen3 text encoder (GGUF), not a Z-Image DiT"),
        (
            dit_files["city96"][0],
            lambda p: load_text_encoder(p, tokenizer=object()),
            "not a Qwen3 text encoder",
        ),
    ):
        with pytest.raises(WrongModelError) as e:
            call(path)
        assert says in one_sentence(e.value, path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(dit_files["city96"][0].read_bytes()[:-64])
    with pytest.raises(TruncatedFileError) as e:
        load_dit(cut)
    one_sentence(e.value, cut)


def test_a_stray_tensor_is_listed(tmp_path, dit_model):
    comfy = diffusers_to_comfy(dit_model.state_dict())
    zimage_gguf(
        {**comfy, "layers.0.attention.extra.weight": torch.randn(8, 64)}, tmp_path / "stray.gguf", "Q8_0"
    )
    with pytest.raises(StateDictError, match=r"1 unexpected key\(s\): layers.0.attention.extra.weight") as e:
        load_dit(tmp_path / "stray.gguf")
    assert isinstance(e.value, PascalineError)
