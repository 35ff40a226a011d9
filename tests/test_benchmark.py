"""The benchmark runs end to end in a tiny configuration (a smoke test: no timing is asserted)."""

import pytest

from helpers import TINY_SYNTHETIC, compose_config
from retinaseg.benchmark import BACKEND_VARIANTS, REPORTED_FLAGS, benchmark, table
from retinaseg.errors import ConfigError


@pytest.mark.slow
def test_benchmark_measures_every_variant(tmp_path):
    overrides = [o for o in TINY_SYNTHETIC if not o.startswith("trainer.")]
    cfg = compose_config(
        "benchmark",
        overrides + ["steps=2", "warmup_steps=1", "rounds=1", "inference_images=1", "precisions=[32-true,bf16-mixed]"],
        tmp_path,
    )
    result = benchmark(cfg)
    variants = {(row["loop"], row["precision"]) for row in result["training"]}
    assert variants == {(loop, p) for loop in ("plain", "lightning") for p in ("32-true", "bf16-mixed")}
    assert all(row["patches_per_s"] > 0 and row["speedup_vs_plain_fp32"] > 0 for row in result["training"])
    assert [row["mode"] for row in result["inference"]] == ["whole", "sliding"]
    assert all(row["seconds_per_image"] > 0 for row in result["inference"])
    assert "lightning" in table(result) and "sliding" in table(result)
    # Every backend variant is timed, or says why this machine skips it (no native bf16, no OpenVINO).
    assert [row["variant"] for row in result["backends"]] == list(BACKEND_VARIANTS)
    assert all(row["skipped"] or row["seconds_per_image"] > 0 for row in result["backends"])
    assert all(row["variant"] in table(result) for row in result["backends"])
    assert set(result["machine"]["cpu_flags"]) <= set(REPORTED_FLAGS)


def test_benchmark_never_overwrites_a_file(tmp_path):
    existing = tmp_path / "model.ckpt"
    existing.write_bytes(b"a checkpoint")
    with pytest.raises(ConfigError, match=f"output={existing} exists and is not overwritten"):
        benchmark(compose_config("benchmark", [f"output={existing}"], tmp_path))
    assert existing.read_bytes() == b"a checkpoint"
