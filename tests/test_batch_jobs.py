"""`pascaline.batch.jobs` and `.manifest`: JOBS rows (JSONL and CSV), ids, seeds, per-row and file errors,
the manifest's torn lines and the rule that says a row is done. No models: milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pascaline.batch.jobs import JobsFile, JobsFileError
from pascaline.batch.manifest import Manifest, is_done, read_entries
from pascaline.runtime.pipeline import GenerateOptions


def rows_of(tmp_path: Path, text: str, name: str = "jobs.jsonl", seed: int = 100, **kwargs):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return JobsFile.read(path).rows(seed, **kwargs)


def test_jsonl_rows_get_ids_from_their_lines_and_seeds_from_the_batch_seed(tmp_path):
    text = (
        '{"prompt": "a fox", "width": 64, "height": 48, "steps": 2}\n'
        "\n"  # a blank line is no row, but lines keep their numbers
        '{"id": "cat-01", "prompt": "a cat", "seed": 5, "slg_layers": [7, 8], "cfg": 2}\n'
        '{"id": 7, "prompt": "a cow", "seed": null}\n'
    )
    fox, cat, cow = rows_of(tmp_path, text)
    assert (fox.id, fox.line, fox.index, fox.seed_from) == ("1", 1, 0, "batch")
    assert fox.options == GenerateOptions("a fox", width=64, height=48, steps=2, seed=100)
    assert fox.record == {"prompt": "a fox", "width": 64, "height": 48, "steps": 2, "seed": 100}
    assert (cat.id, cat.line, cat.options.seed, cat.seed_from) == ("cat-01", 3, 5, "row")
    assert cat.options.slg_layers == (7, 8) and cat.options.cfg == 2.0
    assert cat.record["slg_layers"] == [7, 8]  # the JSON form, as the manifest reads it back
    assert (cow.id, cow.options.seed, cow.seed_from) == ("7", 102, "batch")  # the third row: seed + 2


def test_csv_rows_mean_what_the_same_jsonl_rows_mean(tmp_path):
    jsonl = rows_of(
        tmp_path,
        '{"prompt": "a fox, at dusk", "width": 64, "steps": 2, "cfg": 4.5}\n'
        '{"id": "b", "prompt": "123", "seed": 9, "slg_layers": [7, 8], "negative_prompt": "x"}\n',
    )
    csv = rows_of(
        tmp_path,
        "\ufeffprompt,width,steps,cfg,id,seed,slg_layers,negative_prompt\n"
        '"a fox, at dusk",64,2,4.5,,,,\n'
        '123,,,,b,9,"[7, 8]",x\n',
        name="jobs.csv",
    )
    assert [(r.options, r.record) for r in csv] == [(r.options, r.record) for r in jsonl]
    assert [r.id for r in csv] == ["2", "b"]  # CSV ids are lines too (the header is line 1)
    assert csv[1].options.prompt == "123"  # text where the field takes text


ROW_ERRORS = [
    (
        '{"prompt": "a", ',
        "line 1 is not valid JSON (Expecting property name enclosed in double quotes at column 17); "
        "write one JSON object per line.",
    ),
    ("[1, 2]", 'line 1 must be a JSON object such as {"prompt": "..."}, not a list.'),
    (
        '{"prompt": "a", "stepz": 3}',
        "unknown field 'stepz'; the accepted fields are prompt, negative_prompt,",
    ),
    (
        '{"prompt": "a", "width": 100, "height": 64}',
        "size 100x64 is not a multiple of 16 on both sides; try 96x64.",
    ),
    ('{"prompt": "a", "steps": "many"}', "steps must be a whole number or null, not 'many'."),
    ('{"id": "../up", "prompt": "a"}', "id '../up' is not a safe file name; use up to 64 letters, digits,"),
    ('{"id": "con.txt", "prompt": "a"}', "id 'con.txt' is not a safe file name"),
    ('{"id": ".hidden", "prompt": "a"}', "id '.hidden' is not a safe file name"),
    ('{"id": "a b", "prompt": "a"}', "id 'a b' is not a safe file name"),
    ('{"id": ["x"], "prompt": "a"}', 'the id must be text such as "cat-01", not a list.'),
    (
        '{"prompt": "a", "model": "sd3.5-large"}',
        "this row asks for model 'sd3.5-large' but the batch runs "
        "z-image-turbo; put rows of another model in a batch of their own.",
    ),
    ('{"prompt": "a", "init_image": "nowhere.png", "denoise": 0.5}', "init image nowhere.png is not a file"),
    ('{"prompt": "a", "init_image": 3}', "init_image must be the path of an image file, not a number."),
    ('{"prompt": "a", "loras": ["gone.safetensors:0.5"]}', "LoRA gone.safetensors is not a file; give"),
]


@pytest.mark.parametrize("line,message", ROW_ERRORS, ids=[str(i) for i in range(len(ROW_ERRORS))])
def test_a_bad_row_is_an_error_of_its_own_and_the_next_row_is_fine(tmp_path, line, message):
    bad, good = rows_of(tmp_path, line + '\n{"prompt": "a fox"}\n', load={"model": "z-image-turbo"})
    assert not bad.ok and bad.error.startswith(message) and bad.error.count(". ") == 0, bad.error
    assert good.ok and good.id == "2" and good.options.seed == 101


def test_ids_are_unique_without_regard_to_case_and_line_ids_count(tmp_path):
    lines = [
        '{"id": "Cat", "prompt": "a"}',
        '{"id": "cat", "prompt": "b"}',
        '{"id": "4", "prompt": "c"}',
        '{"prompt": "d"}',
    ]
    text = "\n".join(lines) + "\n"
    first, second, explicit, by_line = rows_of(tmp_path, text)
    assert first.ok and explicit.ok
    assert (
        second.id is None
        and second.error == "id 'cat' is already used by line 1; give every row an id of its own."
    )
    assert by_line.id is None and by_line.error.startswith("id '4' is already used by line 3")


def test_a_row_checked_by_the_pipeline_and_an_init_image_next_to_the_jobs_file(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "start.png").write_bytes(b"any file")  # the worker decodes it, not the reader

    def check(options):  # as Pipeline.resolve, which knows the family's limits
        if options.steps == 3:
            raise JobsFileError("this model takes no 3 steps.")
        return options

    text = '{"prompt": "a", "steps": 3}\n{"prompt": "b", "init_image": "in/start.png", "denoise": 0.5}\n'
    three, img2img = rows_of(tmp_path, text, check=check)
    assert three.error == "this model takes no 3 steps."
    assert img2img.options.init_image == str((tmp_path / "in" / "start.png").resolve())
    assert img2img.options.denoise == 0.5
    assert img2img.record == {"prompt": "b", "seed": 101, "init_image": "in/start.png", "denoise": 0.5}


def test_a_csv_row_with_too_many_cells_is_an_error(tmp_path):
    bad, good = rows_of(tmp_path, 'prompt,steps\na fox, at dusk,2\n"a fox, at dusk",2\n', name="j.csv")
    assert bad.error == "line 2 has 3 cells but the header names 2 columns; quote cells that hold commas."
    assert good.ok and good.line == 3 and good.options.steps == 2


FILE_ERRORS = [
    ("", "holds no rows; write one JSON object per line (JSONL), or a CSV header and one line per image."),
    ("\n  \n", "holds no rows"),
    ("prompt,steps\n", "holds no rows"),
    ("promt,steps\na,2\n", "is neither a JSON object nor a CSV header of known fields ('promt' is none)"),
    ("prompt,prompt\na,b\n", "names 'prompt' twice; give each column once."),
]


@pytest.mark.parametrize("text,message", FILE_ERRORS, ids=[str(i) for i in range(len(FILE_ERRORS))])
def test_a_file_that_cannot_be_used_is_one_sentence(tmp_path, text, message):
    path = tmp_path / "jobs.txt"
    path.write_text(text)
    with pytest.raises(JobsFileError) as info:
        JobsFile.read(path)
    assert message in str(info.value) and str(info.value).endswith(".")


def test_unreadable_jobs_files(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    cases = {
        tmp_path / "missing.jsonl": "does not exist; check the path.",
        tmp_path: "is a folder",
        tmp_path / "latin1.jsonl": "is not UTF-8 text; save it as a UTF-8 JSONL or CSV file.",
    }
    for path, message in cases.items():
        with pytest.raises(JobsFileError, match=message):
            JobsFile.read(path)


def test_manifest_keeps_what_it_is_given_ignores_a_torn_line_and_appends_whole_lines(tmp_path):
    path = tmp_path / "results.jsonl"
    a, b = {"id": "a", "file": "a.png", "error": None}, {"id": "b", "file": None, "error": "bad."}
    path.write_text(
        json.dumps(a)
        + "\n"
        + json.dumps({"id": "a", "file": "a2.png", "error": None})
        + "\n"
        + json.dumps(b)
        + '\n{"id": "c", "fi'
    )
    entries = read_entries(path)
    assert list(entries) == ["a", "b"] and entries["a"]["file"] == "a2.png"  # the last line of an id wins
    manifest = Manifest(tmp_path).start_([entries["b"]])
    manifest.append({"id": "d", "file": "d.png", "error": None})
    manifest.close()
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["b", "d"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_row_is_done_when_its_entry_made_the_same_request_and_the_file_is_there(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png")
    record = {"prompt": "a", "seed": 1}
    entry = {"id": "a", "file": "a.png", "request": record, "error": None}
    assert is_done(entry, record, tmp_path)
    assert not is_done(entry, {"prompt": "a", "seed": 2}, tmp_path)  # the row changed: it runs again
    assert not is_done({**entry, "file": "gone.png"}, record, tmp_path)
    assert not is_done({**entry, "file": None, "error": "bad."}, record, tmp_path)
    assert not is_done(None, record, tmp_path)


def test_a_rows_lora_is_found_next_to_the_jobs_file_and_recorded_as_written(tmp_path):
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "style.safetensors").write_bytes(b"any file")  # the worker reads it
    (row,) = rows_of(tmp_path, '{"prompt": "a", "loras": ["loras/style.safetensors:0.75"]}\n')
    assert row.ok, row.error
    assert row.options.loras == ((str(tmp_path.resolve() / "loras" / "style.safetensors"), 0.75),)
    assert row.record["loras"] == ["loras/style.safetensors:0.75"]
