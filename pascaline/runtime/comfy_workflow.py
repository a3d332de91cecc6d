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

- ``family: "zimage"`` (the default): ``models`` has ``dit``, ``text_encoder``, ``vae``.
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
- ``negative_mode`` (``"zero"`` | ``"text"``) overrides the family's rule for any family;
  ``variant`` is informative only.

Names: samplers are ComfyUI's already (``euler``, ``res_multistep``, ``dpmpp_2m``);
pascaline's ``linear`` schedule is ComfyUI's ``simple`` for Z-Image (the same sigmas
whenever the step count divides 1000, 8 steps included) and ``normal`` for SD3. Quantized
runs name ComfyUI's nearest load option (fp8 weight dtypes; int8 has none: ``default``);
a pascaline pre-quantized or diffusers-folder file is named as it is and must be replaced
by the original single file in ComfyUI.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Link = list  # [node_id, output_index], as ComfyUI writes it
Meta = Mapping[str, Any]
SAVE_PREFIX = "pascaline"
_WEIGHT_DTYPES = {"fp8-e4m3": "fp8_e4m3fn", "fp8-e5m2": "fp8_e5m2"}  # UNETLoader's weight_dtype


class _Graph:
    """Nodes numbered "1", "2", ... in the order they are added."""

    def __init__(self):
        self.nodes: dict[str, dict[str, Any]] = {}

    def add(self, class_type: str, **inputs: Any) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id


def _out(node_id: str, index: int = 0) -> Link:
    return [node_id, index]


def _file(meta: Meta, role: str) -> str:
    try:
        return meta["models"][role]["file"]
    except KeyError:
        raise ValueError(f"the generation metadata names no {role!r} model file") from None


def _unet(g: _Graph, meta: Meta) -> Link:
    weight_dtype = _WEIGHT_DTYPES.get(meta.get("quant", "none"), "default")
    return _out(g.add("UNETLoader", unet_name=_file(meta, "dit"), weight_dtype=weight_dtype))


@dataclass(frozen=True)
class Family:
    """What a model family declares: its loader nodes (``MODEL``, ``CLIP``, ``VAE`` links),
    its model patches (sampling shift, guidance), pascaline -> ComfyUI scheduler names, and
    whether its negative is zeroed when the metadata does not say (``negative_mode``)."""

    loaders: Callable[[_Graph, Meta], tuple[Link, Link, Link]]
    patches: Callable[[_Graph, Meta, Link], Link]
    schedulers: Mapping[str, str]
    zero_negative: Callable[[Meta], bool]


def _zimage_loaders(g: _Graph, meta: Meta) -> tuple[Link, Link, Link]:
    model = _unet(g, meta)
    clip = g.add("CLIPLoader", clip_name=_file(meta, "text_encoder"), type="lumina2", device="default")
    vae = g.add("VAELoader", vae_name=_file(meta, "vae"))
    return model, _out(clip), _out(vae)


def _zimage_patches(g: _Graph, meta: Meta, model: Link) -> Link:
    return _out(g.add("ModelSamplingAuraFlow", model=model, shift=float(meta["shift"])))


def _sd3_loaders(g: _Graph, meta: Meta) -> tuple[Link, Link, Link]:
    models = meta["models"]
    clip = vae = None
    if meta.get("dit_kind") == "checkpoint":
        ckpt = g.add("CheckpointLoaderSimple", ckpt_name=_file(meta, "dit"))
        model, clip, vae = _out(ckpt, 0), _out(ckpt, 1), _out(ckpt, 2)
    else:
        model = _unet(g, meta)
    if "clip_l" in models or "clip_g" in models:
        names = {"clip_name1": _file(meta, "clip_l"), "clip_name2": _file(meta, "clip_g")}
        if "t5" in models:
            clip = _out(g.add("TripleCLIPLoader", **names, clip_name3=_file(meta, "t5")))
        else:
            clip = _out(g.add("DualCLIPLoader", **names, type="sd3"))
    if "vae" in models:
        vae = _out(g.add("VAELoader", vae_name=_file(meta, "vae")))
    if clip is None or vae is None:
        raise ValueError("SD3 metadata needs clip_l/clip_g and vae files, or dit_kind 'checkpoint'")
    return model, clip, vae


def _sd3_patches(g: _Graph, meta: Meta, model: Link) -> Link:
    model = _out(g.add("ModelSamplingSD3", model=model, shift=float(meta["shift"])))
    if meta.get("slg_scale") and meta.get("slg_layers"):
        model = _out(
            g.add(
                "SkipLayerGuidanceSD3",
                model=model,
                layers=", ".join(str(int(i)) for i in meta["slg_layers"]),
                scale=float(meta["slg_scale"]),
                start_percent=float(meta.get("slg_start", 0.01)),
                end_percent=float(meta.get("slg_end", 0.15)),
            )
        )
    return model


FAMILIES: dict[str, Family] = {
    "zimage": Family(
        _zimage_loaders,
        _zimage_patches,
        {"linear": "simple"},
        zero_negative=lambda meta: float(meta["cfg"]) == 1.0 or not meta.get("negative"),
    ),
    "sd3": Family(_sd3_loaders, _sd3_patches, {"linear": "normal"}, zero_negative=lambda meta: False),
}


def comfy_prompt(meta: Meta) -> dict[str, dict[str, Any]]:
    """The ComfyUI API-format graph of the generation ``meta`` describes (JSON-ready)."""
    family = FAMILIES[meta.get("family", "zimage")]
    g = _Graph()
    model, clip, vae = family.loaders(g, meta)
    model = family.patches(g, meta, model)
    positive = _out(g.add("CLIPTextEncode", text=meta["prompt"], clip=clip))
    zeroed = _Lazy(lambda: _out(g.add("ConditioningZeroOut", conditioning=positive)))
    mode = meta.get("negative_mode") or ("zero" if family.zero_negative(meta) else "text")
    if mode == "zero":
        negative = zeroed()
    else:
        negative = _out(g.add("CLIPTextEncode", text=meta.get("negative", ""), clip=clip))
    samples = _sampled(g, meta, family, model, positive, negative, _latent(g, meta, vae), zeroed)
    images = _out(g.add("VAEDecode", samples=samples, vae=vae))
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


def _latent(g: _Graph, meta: Meta, vae: Link) -> Link:
    """An empty latent, or the init image scaled and cropped to size (``load_init_image``) and encoded."""
    width, height = int(meta["width"]), int(meta["height"])
    if "init_image" not in meta:
        return _out(g.add("EmptySD3LatentImage", width=width, height=height, batch_size=1))
    image = g.add("LoadImage", image=meta["init_image"]["file"])
    scaled = g.add(
        "ImageScale",
        image=_out(image, 0),
        upscale_method="lanczos",
        width=width,
        height=height,
        crop="center",
    )
    return _out(g.add("VAEEncode", pixels=_out(scaled), vae=vae))


def _sampled(
    g: _Graph,
    meta: Meta,
    family: Family,
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
        return _out(
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
        latent_image=_out(start),
        start_at_step=first + blind,
        end_at_step=total,
        return_with_leftover_noise="disable",
        **common,
    )
    return _out(rest)
