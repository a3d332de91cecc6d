import gc
import os

import pytest
import torch

from pascaline.offload.ledger import HostMemoryPeak, LeakError, MemoryLedger, host_memory


def test_place_and_release_with_peaks():
    ledger = MemoryLedger()
    ledger.place("slots", 300)
    ledger.place("resident", 200)
    ledger.release("slots", 100)
    assert ledger.placed_bytes == 400 and ledger.peak_placed_bytes == 500
    assert ledger.owners() == {"slots": 200, "resident": 200}
    ledger.release("slots")
    assert ledger.owners() == {"resident": 200}
    with pytest.raises(ValueError, match="releases more"):
        ledger.release("resident", 201)


def test_stage_that_frees_everything_passes_strict():
    ledger = MemoryLedger(strict=True)
    with ledger.stage("encoder") as rec:
        ledger.place("encoder.slots", 1000)
        scratch = ledger.track("encoder.scratch", torch.empty(256))
        assert ledger.placed_bytes == 2024
        del scratch
        ledger.release("encoder.slots")
    assert rec.freed and rec.leaked_bytes == 0 and rec.peak_placed_bytes == 2024
    assert rec.seconds > 0 and rec.placed_at_exit == 0


def test_ledger_detects_a_deliberately_leaked_tensor():
    ledger = MemoryLedger(strict=True)
    kept_alive = []
    with pytest.raises(LeakError, match=r"'dit' left 4\.00 KiB .*dit\.cache"), ledger.stage("dit"):
        leaked = ledger.track("dit.cache", torch.empty(1024))
        kept_alive.append(leaked)  # the leak: a reference survives the stage
        del leaked
    record = ledger.records[-1]
    assert (record.freed, record.leaked_bytes, record.owners_left) == (False, 4096, ("dit.cache",))
    kept_alive.clear()
    gc.collect()
    assert ledger.placed_bytes == 0


def test_not_strict_records_instead_of_raising():
    ledger = MemoryLedger(strict=False)
    with ledger.stage("vae"):
        ledger.place("vae.weights", 64)
    with ledger.stage("next"):
        pass
    first, second = ledger.records
    assert (first.freed, first.leaked_bytes, second.freed) == (False, 64, True)
    summary = ledger.summary()
    assert [s["name"] for s in summary["stages"]] == ["vae", "next"]
    assert summary["all_freed"] is False and summary["owners"] == {"vae.weights": 64}
    assert {"seconds", "peak_vram_bytes", "peak_rss_bytes", "freed"} <= set(summary["stages"][0])


def test_kept_output_is_not_a_leak():
    ledger = MemoryLedger(strict=True)
    with ledger.stage("encoder") as rec:
        out = ledger.track("encoder.out", torch.empty(10))
        rec.keep(out)
    assert rec.freed and rec.kept_bytes == 40
    del out


def test_nested_stages_and_rss():
    ledger = MemoryLedger(strict=True)
    with ledger.stage("pipeline") as outer, ledger.stage("dit") as inner:
        ledger.place("dit", 10)
        ledger.release("dit")
    assert outer.peak_placed_bytes == inner.peak_placed_bytes == 10
    assert [r.name for r in ledger.records] == ["dit", "pipeline"]
    assert outer.peak_rss_bytes is None or outer.peak_rss_bytes >= outer.rss_at_entry > 0


def test_an_exception_inside_a_stage_is_not_masked():
    ledger = MemoryLedger(strict=True)
    with pytest.raises(KeyError), ledger.stage("broken"):
        ledger.place("x", 5)
        raise KeyError("inner")
    assert ledger.records[-1].freed is False


@pytest.mark.cuda
def test_cuda_allocator_leak_is_detected():
    ledger = MemoryLedger("cuda", strict=True)
    keep = []
    with pytest.raises(LeakError, match="allocated on CUDA"), ledger.stage("dit"):
        keep.append(torch.empty(1 << 20, device="cuda"))
    assert ledger.records[-1].cuda_leaked_bytes == 4 << 20
    keep.clear()
    with ledger.stage("clean") as rec:
        x = torch.empty(1 << 20, device="cuda")
        del x
    assert rec.cuda_peak_allocated_bytes >= 4 << 20 and rec.freed


def test_cuda_library_workspaces_are_not_leaks(monkeypatch):
    # the CUDA bookkeeping on a CPU machine: the allocator's figure comes from ``allocated``
    allocated = {"now": 0}
    ledger = MemoryLedger(cuda_slack_bytes=100)
    monkeypatch.setattr(ledger, "_cuda", True)
    monkeypatch.setattr(ledger, "_allocated", lambda: allocated["now"])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    with ledger.stage("first matmul"):
        allocated["now"] += 64  # a cuBLAS workspace kept for the stream
    with ledger.stage("leak"):
        allocated["now"] += 200
    assert [r.freed for r in ledger.records] == [True, False]
    assert ledger.records[1].cuda_leaked_bytes == 200


# --- host memory: real (anonymous) memory apart from the pages of mapped files ------------------

linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/self/status")


@linux_only
def test_reading_a_mapped_file_counts_as_mapped_not_real(tmp_path):
    from safetensors.torch import save_file

    from pascaline.formats.safetensors_io import WeightSource

    save_file({"w": torch.ones(16 << 20, dtype=torch.uint8)}, str(tmp_path / "w.safetensors"))  # 16 MiB
    before = host_memory()
    with WeightSource(tmp_path / "w.safetensors") as source:
        view = source.get("w")
        assert int(view.sum()) == 16 << 20  # touches every page of the mapping
        mapped = host_memory()
        del view
    assert mapped.mapped_bytes - before.mapped_bytes > 12 << 20  # RSS alone would call this used memory
    assert mapped.real_bytes - before.real_bytes < 4 << 20
    assert mapped.rss_bytes == mapped.real_bytes + mapped.mapped_bytes


def test_peak_sampler_and_ledger_report_real_memory_first():
    with HostMemoryPeak(interval=0.001) as peak:
        block = torch.ones(32 << 20, dtype=torch.uint8)  # 32 MiB, touched
        peak.sample()
        del block
    now = host_memory()
    assert peak.peak_real_bytes >= (now.real_bytes if now else 0)
    assert peak.peak_rss_bytes >= peak.peak_real_bytes
    ledger = MemoryLedger()
    with ledger.stage("s") as record:
        inside = host_memory()
        ledger.sample()
    if inside is not None:  # the stage's figure is the real one: shared libraries alone are mapped pages
        assert inside.real_bytes <= record.peak_rss_bytes < inside.rss_bytes
        assert record.peak_mapped_bytes > 0
