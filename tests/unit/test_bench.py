"""`weatherkd bench loader` in process, small: what it reads and reports (no timing bound)."""

import pytest

from weatherkd.commands import bench
from weatherkd.errors import UserError


def test_bench_loader_builds_each_encoding_and_reports_per_core_rates():
    out = bench.bench("loader")(["--size", "96x64", "--samples", "6", "--crop", "32", "--batch-size", "2",
                              "--batches", "2", "--warmup", "1", "--workers", "0"])
    assert out["cores"] == 1 and out["samples"] == 4 and "96x64" in out["source"]
    for name in ("naive_folder", "shards_png", "shards_qoi"):
        assert out[name]["samples_per_s"] > 0 and out[name]["samples_per_s_per_core"] == out[name]["samples_per_s"]
    assert out["shards_png"]["bytes_vs_png"] == 1.0 and out["shards_qoi"]["bytes_vs_png"] > 0
    # the folder holds the same three images per sample as PNG files
    assert out["naive_folder"]["bytes_per_sample"] == pytest.approx(out["shards_png"]["bytes_per_sample"], rel=0.2)


@pytest.mark.parametrize("args, message", [(["--encodings", "jpeg"], "unknown encoding jpeg"),
                                           (["--size", "640"], "--size must be W×H")])
def test_bench_loader_refuses_bad_settings(args, message):
    with pytest.raises(UserError, match=message):
        bench.bench("loader")(args)
