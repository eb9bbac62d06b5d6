"""The benchmark the README gives still runs end to end (at a tiny scale: its figures mean nothing here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_ratio_compares_each_run_with_the_baseline_of_its_own_round() -> None:
    bench = _bench()
    # A restore's five rounds on 2 shared cores: the fourth was slow for both sides, the second only for
    # the service; the medians taken apart (14.87 / 13.77) would say 1.08.
    row = bench.Row(
        "Restore",
        "shell",
        seconds=[14.87, 14.92, 14.18, 18.16, 13.59],
        baseline_seconds=[16.20, 12.15, 13.75, 18.13, 13.77],
    )
    assert row.round_ratios == pytest.approx([0.918, 1.228, 1.031, 1.002, 0.987], abs=1e-3)
    assert row.ratio == pytest.approx(1.002, abs=1e-3)
    assert row.ratio_of_medians == pytest.approx(14.87 / 13.77)
    assert row.to_json()["round_ratios"] == row.round_ratios
    # Runs that do not pair with their baseline's (fewer rounds of one side) fall back to the medians.
    unpaired = bench.Row("Check", "reference", seconds=[3.0, 1.0, 2.0], baseline_seconds=[1.0, 2.0])
    assert unpaired.round_ratios == []
    assert unpaired.ratio == pytest.approx(2.0 / 1.5)


def test_the_benchmark_runs_and_reports_every_operation(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # Archives of 20 and 40 MB: the CPU rows read /proc/stat, which counts in ticks of 10 ms, and a transfer of
    # a few MB on loopback can cost less than one (CI: the .sql.zst reference upload of 2 MB counted 0.0 s).
    command = [
        sys.executable,
        str(REPO / "scripts" / "bench.py"),
        "--scale",
        "5",
        "--small-mb",
        "20",
        "--large-mb",
        "40",
    ]
    command += ["--rounds", "1", "--restore-rounds", "1", "--transfer-rounds", "1", "--startup-rounds", "1"]
    command += ["--library-episodes", "300", "--library-rounds", "1"]
    # The scaling group's smallest databases (the generator's minimum row counts make them 9-21 MB of SQL).
    command += ["--scaling-sizes", "3,6,12", "--scaling-rounds", "1", "--listing-seconds", "0.5"]
    command += ["--out", str(out), "--work-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads(out.read_text())
    rows = {row["operation"]: row for row in report["rows"]}
    for operation in (
        "Create .sql.gz",
        "Create .sql.zst",
        "Create .sql",
        "Create .dump (custom)",
        "Restore .sql.gz (no safety backup)",
        "Restore .sql.gz with safety backup",
        "Create .sql.gz.age (encrypted)",
        "Create .dump.age (encrypted)",
        "Restore .sql.gz.age (encrypted)",
        "Upload small (restore=false)",
        "UploadAndRestore .sql.gz (restore=true)",
        "Upload .sql.zst (restore=false)",
        "StreamDownload large",
        "Create .sql.gz with the bucket",
        "Create .sql with the bucket",
        "Restore .sql.gz (library, HNSW)",
        "Restore .dump (library, HNSW)",
    ):
        assert rows[operation]["median_seconds"] > 0, operation
        assert rows[operation]["baseline_median_seconds"] > 0, operation
        assert rows[operation]["server_peak_rss"] > 0, operation
    # The references that show what the cores and the S3 server allow the safety backup's and the bucket's rows.
    for operation in (
        "reference: gunzip | psql -1 with nice pg_dump | zstd -1 beside it",
        "reference: gunzip | psql -1 with nice pg_dump | zstd -1 beside it, paced to end with it",
        "reference: the S3 server completing that .sql's upload",
    ):
        assert rows[operation]["median_seconds"] > 0, operation
        assert rows[operation]["baseline_median_seconds"] > 0, operation
    for operation in ("Create .sql with the bucket", "Create .sql, directory only"):
        assert rows[operation]["cpu_median_seconds"] > 0, operation
    assert "whatever the overlap" in rows["Create .sql with the bucket"]["note"]
    assert {t["target"].split(":")[0] for t in report["targets"]} >= {
        "Create .sql.gz time / (pg_dump | gzip -6) (aim 0.3)",
        "Restore / (gunzip | psql --single-transaction)",
        "Restore with safety backup / Restore without it",
        "server peak RSS over all operations (MB)",
        "Create .sql.gz.age (encrypted) / Create .sql.gz",
        "Restore .sql.gz.age (encrypted) / Restore .sql.gz",
        "Start-up to SERVING, empty directory",
        "Start-up to SERVING, 1,000 archives",
        "List (first page of 50) with 1,000 archives",
        "List (page_size 1000, all in one call) with 1,000 archives",
        "GetStatus with 1,000 archives",
        "Start-up to SERVING, 1,000 archives in the bucket",
        "List (first page of 50) with 1,000 archives in the bucket",
        "List (page_size 1000, all in one call) with 1,000 archives in the bucket",
        "GetStatus with 1,000 archives in the bucket",
        "Restore .sql.gz (library) / (gunzip | psql -1)",
        "Restore .dump (library) / pg_restore --single-transaction",
        "Scaling Create .sql.gz",
        "Scaling Restore .sql.gz",
    }
    assert report["facts"]["library"]["fingerprint_after_restores"] == "same as before"
    assert 0 < report["facts"]["library"]["index_build_share"] < 1
    scaling = [t for t in report["targets"] if t["target"].startswith("Scaling")]
    assert len(scaling) == 4, scaling
    assert all(t["measured"] is not None for t in scaling), scaling
    for size in ("3", "6", "12"):
        for operation in (
            f"Scaling {size} MB: Create .sql.gz",
            f"Scaling {size} MB: Restore .sql.gz (no safety backup)",
        ):
            assert rows[operation]["median_seconds"] > 0, operation
            assert rows[operation]["baseline_median_seconds"] > 0, operation
            assert rows[operation]["server_peak_rss"] > 0, operation
            assert rows[operation]["work_bytes"] > 0, operation
    assert [s["rounds"] for s in report["facts"]["scaling"]] == [1, 1, 1]
    assert "Scaling (seconds per GB" in done.stdout
    # The gzip uploads' grpcio target is retired (issue 16), the downloads' and the .sql.zst upload's are not.
    retired = {t["target"].split(":")[0]: bool(t["retired"]) for t in report["targets"] if "grpcio" in t["target"]}
    assert retired["UploadAndRestore upload small"], retired
    assert not retired["StreamDownload small"] and not retired["Upload .sql.zst (restore=false)"], retired
    assert "RETIRED UploadAndRestore upload small" in done.stdout
    for operation in (
        "Start-up to SERVING, empty directory",
        "Start-up to SERVING, 1,000 archives",
        "List (first page of 50), 1,000 archives",
        "List (page_size 1000, all in one call), 1,000 archives",
        "GetStatus, 1,000 archives",
        "Start-up to SERVING, 1,000 archives in the bucket",
        "List (first page of 50), 1,000 archives in the bucket",
        "GetStatus, 1,000 archives in the bucket",
    ):
        assert rows[operation]["median_seconds"] > 0, operation
    # What one call costs, and so the least median 20 callers at once can see on these cores.
    for name, cpu in report["facts"]["listing_cpu"].items():
        assert cpu["alone_core_ms_per_call"] > 0 and cpu["closed_loop_floor_ms"] > 0, (name, cpu)
    assert "see a median of at least" in rows["GetStatus, 1,000 archives"]["note"]
    assert len(report["facts"]["listing_cpu"]) == 8, "three calls and the bare server's, in each place"
    # The floor of those latencies: a bare grpcio server answering the same bytes, in the same run.
    for where in ("1,000 archives", "1,000 archives in the bucket"):
        bare = rows[f"List's first page from a bare grpcio server, {where}"]
        assert bare["median_seconds"] > 0 and "nothing answers these callers faster" in bare["note"], bare
        assert "the bare grpcio server's median and p99 in the same run" in rows[f"GetStatus, {where}"]["note"]
    assert not [t for t in report["targets"] if "bare grpcio" in t["target"]], "a reference, not a target"
    assert "of them by the S3 server" in rows["GetStatus, 1,000 archives in the bucket"]["note"]
    # What the cores allow a restore with its safety backup: their CPU work over the cores (issue 16, part 2).
    for operation in ("Restore .sql.gz (no safety backup)", "Restore .sql.gz with safety backup"):
        assert rows[operation]["cpu_median_seconds"] > 0, operation
    cpu = report["facts"]["restore_cpu"]
    assert cpu["cores"] >= 1 and cpu["with_safety_floor_ratio"] > 0, cpu
    assert "whatever the overlap" in rows["Restore .sql.gz with safety backup"]["note"]
    assert "CPU core-s" in done.stdout
    # And what they allow the .sql.zst upload: the reference's transfer and the check's inflate over the cores.
    zstd = report["facts"]["zstd_upload_cpu"]
    assert zstd["reference_core_seconds"] > 0 and zstd["check_core_seconds"] > 0, zstd
    assert 0 < zstd["throughput_ceiling"] <= 1, zstd
    assert "whatever the overlap" in rows["Upload .sql.zst (restore=false)"]["note"]
    for reference in (
        "reference: gunzip | psql -1 beside an idle-class busy loop",
        "reference: gunzip | psql -1 with nice pg_dump | zstd -1 beside it",
    ):
        beside = rows[reference]
        assert beside["ratio"] > 0 and beside["cpu_median_seconds"] > 0, beside
    assert "| operation" in done.stdout
