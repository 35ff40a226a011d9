"""The benchmark runs end to end in a tiny configuration (a smoke test: no timing is asserted)."""

import pytest

from helpers.configs import TINY_SYNTHETIC, compose_config
from retinaseg.benchmark import benchmark
from retinaseg.core.errors import ConfigError
from retinaseg.runs.speed import BACKEND_VARIANTS, REPORTED_FLAGS, table


@pytest.mark.slow
def test_benchmark_measures_every_variant(tmp_path):
    overrides = [o for o in TINY_SYNTHETIC if not o.startswith("trainer.")]
    cfg = compose_config(
        "benchmark",
        overrides
        + ["steps=2", "warmup_steps=1", "rounds=1", "inference_images=1", "precisions=[32-true,bf16-mixed]"]
        + ["channels_last=[false,true]", "compile=[false]", "data_batches=2"],
        tmp_path,
    )
    result = benchmark(cfg)
    names = {(row["name"], row["precision"]) for row in result["training"]}
    loops = ("plain", "lightning", "lightning-channels_last")
    assert names == {(name, p) for name in loops for p in ("32-true", "bf16-mixed")}
    assert all(row["patches_per_s"] > 0 and row["speedup_vs_plain_fp32"] > 0 for row in result["training"])
    # Our step against the eager one with the configured layout (model.channels_last, true by default).
    lightning = [row for row in result["training"] if row["loop"] == "lightning"]
    assert all(row["speedup_vs_eager"] > 0 and 0 <= row["waiting_share"] < 1 for row in lightning)
    assert all(row["speedup_vs_eager"] == 1 for row in lightning if row["channels_last"])
    data = result["data"]
    assert data["patches_per_s"] > 0 and "training data alone" in table(result) and data["device"] == "cpu"
    # The two parts, each alone, are faster than both together.
    assert min(data["loader_patches_per_s"], data["finishing_patches_per_s"]) > data["patches_per_s"]
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
