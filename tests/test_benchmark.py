"""The benchmark runs end to end in a tiny configuration (a smoke test: no timing is asserted)."""

import pytest

from helpers.configs import TINY_SYNTHETIC, compose_config
from retinaseg.benchmark import benchmark
from retinaseg.core.errors import ConfigError
from retinaseg.runs.speed import BACKEND_VARIANTS, REPORTED_FLAGS, step_flops, table


@pytest.mark.slow
def test_benchmark_measures_every_variant(tmp_path):
    overrides = [o for o in TINY_SYNTHETIC if not o.startswith("trainer.")]
    cfg = compose_config(
        "benchmark",
        overrides
        + ["steps=2", "warmup_steps=1", "rounds=1", "inference_images=1", "precisions=[32-true,bf16-mixed]"]
        + ["channels_last=[false,true]", "compile=[false]", "data_batches=2", "matmul_size=256"],
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
    # Each loop's arithmetic rate: the step's FLOPs (the same for every loop) over its seconds, against the matrix
    # product's rate at its precision.
    arithmetic = result["arithmetic"]
    assert arithmetic["step_gflop"] > 0 and set(arithmetic["matmul_gflop_per_s"]) == {"32-true", "bf16-mixed"}
    for row in result["training"]:
        assert row["gflop_per_s"] * row["seconds"] == pytest.approx(arithmetic["step_gflop"] * 2)
        rate = arithmetic["matmul_gflop_per_s"][row["precision"]]
        assert row["share_of_matmul"] == pytest.approx(row["gflop_per_s"] / rate)
    assert "of matmul" in table(result) and "256x256 matrix product" in table(result)
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


def test_step_flops_count_the_convolutions_forward_and_backward(tmp_path):
    # A 1-level U-Net on one 8x8 patch of 1 channel, base 1: its convolutions' FLOPs by hand. A 3x3 convolution
    # from c_in to c_out channels over h x w pixels is 2 * 9 * c_in * c_out * h * w FLOPs forward; backward
    # computes the weights' gradient and, except for the first layer, whose input needs none, the input's.
    cfg = compose_config(
        "benchmark",
        ["model.in_channels=1", "model.base_channels=1", "model.depth=1", "model.loss=bce"]
        + ["data.patch_size=8", "data.batch_size=1"],
        tmp_path,
    )

    def conv(c_in, c_out, size, kernel=3):
        return 2 * kernel**2 * c_in * c_out * size**2

    # e1 (8x8: 1->1, 1->1), b (4x4: 1->2, 2->2), d1 up (2x2 transposed, 2->1, out 8x8), d1 (8x8: 2->1, 1->1),
    # outputs (1x1, 1->1 at 8x8). Transposed 2x2 stride 2: 2 * 4 * c_in * c_out * (4x4 inputs).
    layers = [conv(1, 1, 8), conv(1, 1, 8), conv(1, 2, 4), conv(2, 2, 4), 2 * 4 * 2 * 1 * 16, conv(2, 1, 8)]
    layers += [conv(1, 1, 8), conv(1, 1, 8, kernel=1)]
    forward = sum(layers)
    # Backward: twice forward (input and weight gradients), less the first layer's input gradient.
    assert step_flops(cfg) == 3 * forward - layers[0]
