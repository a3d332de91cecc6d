"""The generation of an image as a ComfyUI workflow, so ComfyUI opens pascaline's PNGs.

ComfyUI users drag a PNG onto the canvas to get its workflow back: the frontend reads the
``prompt`` text chunk, an API-format graph (node id -> ``{"class_type", "inputs"}``, a link
being ``[node_id, output_index]``), which ``runtime.images.save_png`` writes from
``comfy_prompt(meta)``. The graph uses ComfyUI's own core nodes to describe the same
generation: the files, the seed (ComfyUI draws the same CPU noise), sampler, scheduler,
shift, guidance, blind start and img2img.

The metadata contract (``runtime.images.generation_metadata``), beyond the common keys
(``prompt``, ``negative``, ``seed``, ``steps``, ``cfg``, ``sampler``, ``scheduler``,
``shift``, ``width``, ``height``, ``blind_start``, ``denoise``, ``quant``, ``models``,
``init_image``):

Each family declares its part (``Family.comfy``, a ``ComfyNodes``): its loader nodes, its
model patches, the ComfyUI names of its schedulers and its negative rule.

- ``family: "zimage"``: ``models`` has ``dit``, ``text_encoder``, ``vae``.
  ``UNETLoader`` + ``CLIPLoader`` (type ``lumina2``, ComfyUI's choice for Z-Image's Qwen3) +
  ``VAELoader``, ``ModelSamplingAuraFlow``, ``EmptySD3LatentImage``, as in ComfyUI's Z-Image
  Turbo template; the negative is ``ConditioningZeroOut`` of the positive unless ``cfg`` is
  not 1 and a negative prompt was given (what the pipeline encodes).
- ``family: "sd3"``: ``models`` has ``dit``, ``clip_l``, ``clip_g``, ``t5`` (absent when run
  without T5: ``DualCLIPLoader``) and ``vae`` (absent: the checkpoint's); ``dit_kind:
  "checkpoint"`` loads ``dit`` with ``CheckpointLoaderSimple`` (else ``UNETLoader``);
  ``negative_mode: "zero"`` zeroes the negative (else the negative text is encoded, "" when
  empty); ``ModelSamplingSD3``; SLG (``slg_layers``, ``slg_scale``, ``slg_start``,
  ``slg_end``, ComfyUI's percents) adds ``SkipLayerGuidanceSD3``.
- ``negative_mode`` (``"zero"`` | ``"text"``: what the pipeline ran, a zeroed positive or
  the negative text, "" when empty) overrides the family's rule; ``variant`` is informative.

Names: samplers are ComfyUI's already (``euler``, ``res_multistep``, ``dpmpp_2m``);
pascaline's ``linear`` schedule is ComfyUI's ``simple`` for Z-Image (the same sigmas
whenever the step count divides 1000, 8 steps included) and ``normal`` for SD3. Quantized
runs name ComfyUI's nearest load option (fp8 weight dtypes; int8 has none: ``default``);
a pascaline pre-quantized or diffusers-folder file is named as it is and must be replaced
by the original single file in ComfyUI. A GGUF file (its model record has ``gguf``, the
GGML type) is loaded by city96's ComfyUI-GGUF nodes, as ComfyUI users run them:
``UnetLoaderGGUF`` for the diffusion model, ``CLIPLoaderGGUF``/``DualCLIPLoaderGGUF``/
``TripleCLIPLoaderGGUF`` when a text encoder is one (they read safetensors files too).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Link = list  # [node_id, output_index], as ComfyUI writes it
Meta = Mapping[str, Any]
SAVE_PREFIX = "pascaline"
_WEIGHT_DTYPES = {"fp8-e4m3": "fp8_e4m3fn", "fp8-e5m2": "fp8_e5m2"}  # UNETLoader's weight_dtype


class Graph:
    """Nodes numbered "1", "2", ... in the order they are added."""

    def __init__(self):
        self.nodes: dict[str, dict[str, Any]] = {}

    def add(self, class_type: str, **inputs: Any) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id


def out(node_id: str, index: int = 0) -> Link:
    return [node_id, index]


def model_file(meta: Meta, role: str) -> str:
    try:
        return meta["models"][role]["file"]
    except KeyError:
        raise ValueError(f"the generation metadata names no {role!r} model file") from None


def is_gguf(meta: Meta, role: str) -> bool:
    """Whether the model file of ``role`` is a GGUF (its record names the GGML type)."""
    return "gguf" in meta.get("models", {}).get(role, {})


def clip_loader(meta: Meta, node: str, *roles: str) -> str:
    """``node`` (``CLIPLoader``, ``DualCLIPLoader``, ``TripleCLIPLoader``), or ComfyUI-GGUF's
    version of it when one of the text encoders of ``roles`` is a GGUF file."""
    return node + "GGUF" if any(is_gguf(meta, r) for r in roles) else node


def unet_loader(g: Graph, meta: Meta) -> Link:
    """``UNETLoader`` of the diffusion-model file, with the weight dtype of an fp8 run
    (``UnetLoaderGGUF`` for a GGUF file)."""
    if is_gguf(meta, "dit"):
        return out(g.add("UnetLoaderGGUF", unet_name=model_file(meta, "dit")))
    weight_dtype = _WEIGHT_DTYPES.get(meta.get("quant", "none"), "default")
    return out(g.add("UNETLoader", unet_name=model_file(meta, "dit"), weight_dtype=weight_dtype))


@dataclass(frozen=True)
class ComfyNodes:
    """What a model family declares: its loader nodes (``MODEL``, ``CLIP``, ``VAE`` links),
    its model patches (sampling shift, guidance), pascaline -> ComfyUI scheduler names, and
    whether its negative is zeroed when the metadata does not say (``negative_mode``)."""

    loaders: Callable[[Graph, Meta], tuple[Link, Link, Link]]
    patches: Callable[[Graph, Meta, Link], Link]
    schedulers: Mapping[str, str]
    zero_negative: Callable[[Meta], bool]


def comfy_prompt(meta: Meta) -> dict[str, dict[str, Any]]:
    """The ComfyUI API-format graph of the generation ``meta`` describes (JSON-ready)."""
    from pascaline.families import get_family

    family = get_family(meta["family"]).comfy
    g = Graph()
    model, clip, vae = family.loaders(g, meta)
    for lora in meta.get("loras") or ():  # the diffusion-model LoRAs, as ComfyUI's model-only loader
        model = out(g.add("LoraLoaderModelOnly", model=model, lora_name=lora["file"],
                          strength_model=float(lora["strength"])))  # fmt: skip
    model = family.patches(g, meta, model)
    positive = out(g.add("CLIPTextEncode", text=meta["prompt"], clip=clip))
    zeroed = _Lazy(lambda: out(g.add("ConditioningZeroOut", conditioning=positive)))
    mode = meta.get("negative_mode") or ("zero" if family.zero_negative(meta) else "text")
    if mode == "zero":
        negative = zeroed()
    else:
        negative = out(g.add("CLIPTextEncode", text=meta.get("negative", ""), clip=clip))
    samples = _sampled(g, meta, family, model, positive, negative, _latent(g, meta, vae), zeroed)
    images = out(g.add("VAEDecode", samples=samples, vae=vae))
    g.add("SaveImage", images=images, filename_prefix=SAVE_PREFIX)
    return g.nodes


class _Lazy:
    """A node made on first use and shared after (the zeroed positive serves two inputs)."""

    def __init__(self, make: Callable[[], Link]):
        self._make, self._link = make, None

    def __call__(self) -> Link:
        if self._link is None:
            self._link = self._make()
        return self._link


def _latent(g: Graph, meta: Meta, vae: Link) -> Link:
    """An empty latent, or the init image scaled and cropped to size (``load_init_image``) and encoded."""
    width, height = int(meta["width"]), int(meta["height"])
    if "init_image" not in meta:
        return out(g.add("EmptySD3LatentImage", width=width, height=height, batch_size=1))
    image = g.add("LoadImage", image=meta["init_image"]["file"])
    scaled = g.add(
        "ImageScale",
        image=out(image, 0),
        upscale_method="lanczos",
        width=width,
        height=height,
        crop="center",
    )
    return out(g.add("VAEEncode", pixels=out(scaled), vae=vae))


def _sampled(
    g: Graph,
    meta: Meta,
    family: ComfyNodes,
    model: Link,
    positive: Link,
    negative: Link,
    latent: Link,
    zeroed: _Lazy,
) -> Link:
    """One ``KSampler``, or for a blind start of k steps two chained ``KSamplerAdvanced``: the
    first k steps on the zeroed positive, the rest on the prompt with no noise added."""
    steps, denoise, blind = (
        int(meta["steps"]),
        float(meta.get("denoise", 1.0)),
        int(meta.get("blind_start", 0)),
    )
    common = dict(
        model=model,
        cfg=float(meta["cfg"]),
        sampler_name=meta["sampler"],
        scheduler=family.schedulers.get(meta["scheduler"], meta["scheduler"]),
        negative=negative,
    )
    if not blind:
        return out(
            g.add(
                "KSampler",
                seed=int(meta["seed"]),
                steps=steps,
                positive=positive,
                latent_image=latent,
                denoise=denoise,
                **common,
            )
        )
    # KSampler's denoise d runs the last steps of an int(steps/d)-step schedule: the same
    # window in KSamplerAdvanced's steps/start_at_step terms.
    total = steps if denoise > 0.9999 else int(steps / denoise)
    first = total - steps
    start = g.add(
        "KSamplerAdvanced",
        add_noise="enable",
        noise_seed=int(meta["seed"]),
        steps=total,
        positive=zeroed(),
        latent_image=latent,
        start_at_step=first,
        end_at_step=first + blind,
        return_with_leftover_noise="enable",
        **common,
    )
    rest = g.add(
        "KSamplerAdvanced",
        add_noise="disable",
        noise_seed=int(meta["seed"]),
        steps=total,
        positive=positive,
        latent_image=out(start),
        start_at_step=first + blind,
        end_at_step=total,
        return_with_leftover_noise="disable",
        **common,
    )
    return out(rest)
