"""`generate --enhance`: the prompt expanded by the text encoder file's own LM, then encoded."""

from __future__ import annotations

import numpy
import pytest
from PIL import Image

from pascaline.cli import main
from pascaline.errors import InvalidArgumentError
from pascaline.runtime.images import read_png_metadata
from pascaline.runtime.pipeline import load_pipeline
from tests.factories.pipeline import shared_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return shared_models(tmp_path_factory)


def test_enhanced_prompt_is_printed_stored_and_is_what_was_encoded(models, tmp_path, capsys):
    out = tmp_path / "fox.png"
    argv = ["generate", "a fox", "--models", str(models.comfy), "--enhance", "--seed", "3", "--steps", "2",
            "--width", "32", "--height", "32", "--quant", "none", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()[0]
    meta = read_png_metadata(out)
    assert printed == f"enhanced prompt: {meta['prompt']}" and meta["original_prompt"] == "a fox"
    assert meta["prompt"] != "a fox" and len(meta["prompt"]) > 20  # the random tiny LM still writes text
    pipe = load_pipeline(models.comfy, device="cpu", quant="none", keep_loaded=True)
    same = pipe.generate(meta["prompt"], width=32, height=32, seed=3, steps=2)
    with Image.open(out) as png:
        assert numpy.array_equal(numpy.asarray(png.convert("RGB")), numpy.asarray(same))
    pipe.enhance_options = {"max_new_tokens": 24}  # the tiny random LM never stops on its own
    runs = [pipe.enhance_prompt("a fox", seed=s) for s in (None, 1, 2)]
    pipe._enhanced.clear()  # computed again, not read from the cache
    assert [pipe.enhance_prompt("a fox", seed=s) for s in (None, 1, 2)] == runs  # greedy, seeded: the same
    assert len(set(runs)) == 3


def test_a_family_without_a_language_model_refuses_enhancement(tmp_path_factory):
    from tests.factories.sd3_pipeline import shared_sd3

    sd3 = load_pipeline(shared_sd3(tmp_path_factory).comfy, device="cpu", quant="none", keep_loaded=False)
    with pytest.raises(InvalidArgumentError, match="SD3 has no language model to enhance prompts with"):
        sd3.generate("a fox", width=64, height=48, steps=1, enhance=True)
