"""The summary an evaluation prints: one row per metric, one column per way of scoring, with intervals."""

from retinaseg.evaluation import calibration
from retinaseg.evaluation.counts import DISPLAY


def interval(value: float, ci: tuple[float, float] | None, decimals: int, sign: str = "") -> str:
    """`0.8239 [0.8170, 0.8301]`, or the value alone without an interval."""
    text = f"{value:{sign}.{decimals}f}"
    return text if ci is None else f"{text} [{ci[0]:{sign}.{decimals}f}, {ci[1]:{sign}.{decimals}f}]"


def table(metrics: dict) -> str:
    """The printed summary: one row per metric, one column per scoring; intervals where there are some."""
    columns = [
        ("model", metrics, metrics.get("ci95", {})),
        ("mean per image", metrics["per_image_mean"], {}),
        ("whole image", metrics["whole_image"], {}),
    ]
    if "second_observer" in metrics:
        observer = metrics["second_observer"]
        columns += [
            ("second observer", observer, observer.get("ci95", {})),
            ("2nd obs., whole image", observer["whole_image"], {}),
        ]
    header = [""] + [name for name, _, _ in columns]
    rows = []
    for key, (name, decimals) in DISPLAY.items():
        row = [name] + [
            interval(values[key], cis.get(key), decimals) if key in values else "-" for _, values, cis in columns
        ]
        if "model_minus_second_observer" in metrics:
            difference = metrics["model_minus_second_observer"].get(key)
            row.append(
                "-"
                if difference is None
                else interval(difference["difference"], difference["ci95"], decimals, "+")
                + ("" if difference["p_value"] is None else f" p={difference['p_value']:.2g}")
            )
        rows.append(row)
    if "model_minus_second_observer" in metrics:
        header.append("model - second observer")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    resamples = metrics.get("bootstrap", {}).get("resamples", 0)
    lines = [
        f"{metrics['dataset']} {metrics['split']} split, {metrics['n_images']} images ({metrics['fov']} FOV, scale "
        f"{metrics['scale']:g}), threshold {metrics['threshold']:.4f} ({metrics['threshold_from']}), "
        f"FOV pixels pooled unless noted{', flip TTA' if metrics['tta'] else ''}"
        + (f"; [95% interval]: bootstrap over images, {resamples} resamples" if resamples else "")
        + ("; p: paired permutation test" if resamples and "model_minus_second_observer" in metrics else ""),
        *("   ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]),
    ]
    if "ece" in metrics:
        lines.append(
            f"expected calibration error {metrics['ece']:.4f} ({calibration.ECE_BINS} equal-width bins, FOV pixels)"
        )
    return "\n".join(lines)
