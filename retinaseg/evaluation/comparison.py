"""Two evaluations of the same images, metric by metric (b - a): paired by image, with the paired-bootstrap 95%
interval of each difference and the two-sided p-value of a paired permutation test
(retinaseg.evaluation.stats.paired_comparison), recomputed without the models from what each evaluation wrote
(retinaseg.evaluation.directory); and comparison.md, which says how each was made and what differs.
"""

import logging

from retinaseg.core.errors import ConfigError, DataError
from retinaseg.evaluation import stats
from retinaseg.evaluation.counts import DISPLAY
from retinaseg.evaluation.directory import Evaluation, EvaluationSettings
from retinaseg.evaluation.scoring import ImageCounts

log = logging.getLogger(__name__)


def image_keys(counts: ImageCounts) -> list[tuple[str, int, int]]:
    """Each image as (id, vessel pixels, FOV pixels): the same photograph scored against the same label and FOV
    in two evaluations has the same key."""
    c = counts.confusion
    return [(i, int(p), int(t)) for i, p, t in zip(counts.ids, c.tp + c.fn, c.tp + c.fp + c.fn + c.tn)]


def paired_images(a: Evaluation, b: Evaluation, allow_different_images: bool) -> tuple[ImageCounts, ImageCounts]:
    """a's and b's counts of the same images in the same order; refused for different image sets unless
    `allow_different_images` (then the images both scored)."""
    keys_a, keys_b = image_keys(a.counts), image_keys(b.counts)
    if keys_a == keys_b:
        return a.counts, b.counts
    position = {key: n for n, key in enumerate(keys_b)}
    common = [n for n, key in enumerate(keys_a) if key in position]
    if not allow_different_images or not common:
        relabelled = len(set(a.counts.ids) & set(b.counts.ids)) - len(common)
        raise DataError(
            f"a and b scored different images (a: {len(keys_a)} of split {a.settings.split}, b: {len(keys_b)} "
            f"of split {b.settings.split}, {len(common)} in common"
            + (f", {relabelled} more with the same id but other labels or FOV masks" if relabelled else "")
            + "): compare evaluations of the same images"
            + (", or pass allow_different_images=true to compare those both scored" if common else "")
        )
    log.warning("comparing the %d images both evaluations scored (a: %d, b: %d)", len(common), len(keys_a), len(keys_b))
    return a.counts.select(common), b.counts.select([position[keys_a[n]] for n in common])


def threshold_rule(settings: EvaluationSettings) -> str:
    """How an evaluation's threshold was chosen: the rule two evaluations must share (a fixed value, or a rule such
    as the validation images' best F1, which gives each model its own value)."""
    if settings.threshold_from == "fixed":
        return f"fixed at {settings.threshold:.4f}"
    return f"chosen by {settings.threshold_from}"


def describe_threshold(settings: EvaluationSettings) -> str:
    """The rule with the value it gave."""
    rule = threshold_rule(settings)
    return rule if settings.threshold_from == "fixed" else f"{rule} ({settings.threshold:.4f})"


def describe_binarisation(settings: EvaluationSettings) -> str:
    """The binarisation options (retinaseg.inference.binarise) beyond the threshold; "off" also for an evaluation
    older than them."""
    options = settings.binarisation or {}
    parts = []
    if options.get("hysteresis") is not None:
        parts.append(f"hysteresis {options['hysteresis']:g} (low threshold {options['low_threshold']:.4g})")
    if options.get("bridge"):
        parts.append(f"bridge {options['bridge']:g}")
    if options.get("min_size"):
        parts.append(f"min_size {options['min_size']}")
    chosen = options.get("chosen_on_validation_images")
    return (", ".join(parts) or "off") + (f"; {' and '.join(chosen)} chosen by validation F1" if chosen else "")


# What says how an evaluation was made, in comparison.md's and .json's description of a and b: (name, how it is read
# from the settings). An older metrics.json without an entry shows null.
SETTINGS = (
    ("checkpoint", lambda s: s.checkpoint),
    ("dataset", lambda s: s.dataset),
    ("split", lambda s: s.split),
    ("images", lambda s: s.n_images),
    ("threshold", describe_threshold),
    ("binarisation", describe_binarisation),
    ("tta", lambda s: s.tta),
    ("backend", lambda s: (s.inference or {}).get("backend")),
    ("precision", lambda s: (s.inference or {}).get("precision")),
    ("inference", lambda s: (s.inference or {}).get("mode")),
    ("scale", lambda s: s.scale),
    ("fov", lambda s: s.fov),
)


def describe(settings: EvaluationSettings) -> dict:
    """How an evaluation was made (SETTINGS)."""
    return {name: read(settings) for name, read in SETTINGS}


def compare(
    a: Evaluation,
    b: Evaluation,
    resamples: int,
    seed: int,
    allow_different_images: bool = False,
    allow_different_thresholds: bool = False,
) -> dict:
    """b - a, metric by metric, on the images both scored (comparison.json's content)."""
    counts_a, counts_b = paired_images(a, b, allow_different_images)
    if threshold_rule(a.settings) != threshold_rule(b.settings) and not allow_different_thresholds:
        raise ConfigError(
            f"a's threshold was {describe_threshold(a.settings)}, b's {describe_threshold(b.settings)}: the threshold "
            "metrics would differ by how the threshold was chosen; evaluate both the same way, or pass "
            "allow_different_thresholds=true"
        )
    if not counts_a.histograms.same_bins(counts_b.histograms):
        raise DataError("a and b binned their probabilities differently: evaluate both with the same retinaseg version")
    n = len(counts_a.ids)
    both = ImageCounts.concatenate(counts_a, counts_b)
    differences = stats.paired_comparison(both.pooled, n, resamples, seed)
    settings_a, settings_b = describe(a.settings), describe(b.settings)
    return {
        "a": str(a.directory.resolve()),
        "b": str(b.directory.resolve()),
        "threshold_a": describe_threshold(a.settings),
        "threshold_b": describe_threshold(b.settings),
        "settings": {"a": settings_a, "b": settings_b},
        # What tells a and b apart: the settings they were evaluated with that differ.
        "differs_in": [name for name in settings_a if settings_a[name] != settings_b[name]],
        "images": list(counts_a.ids),
        "n_images": n,
        "bootstrap": {"resamples": resamples, "seed": seed, "level": 0.95},
        "metrics": {key: difference.to_json() for key, difference in differences.items()},
    }


def shown(value) -> str:
    """A setting as comparison.md's table shows it (a path in code font, null as -)."""
    if value is None:
        return "-"
    return f"`{value}`" if isinstance(value, str) and "/" in value else str(value)


def markdown(result: dict) -> str:
    """comparison.md: what was compared and one table row per metric."""
    resamples = result["bootstrap"]["resamples"]
    lines = [
        "# b - a",
        "",
        f"- a: `{result['a']}`, threshold {result['threshold_a']}",
        f"- b: `{result['b']}`, threshold {result['threshold_b']}",
        "- a and b differ in: " + (", ".join(result["differs_in"]) or "nothing but the directory they were written to"),
        f"- {result['n_images']} images paired; FOV pixels pooled; AUC from the evaluations' histograms",
        (
            f"- 95% interval: paired bootstrap over images ({resamples} resamples); p: two-sided paired permutation "
            f"test ({resamples} random swaps of a and b per image); seed {result['bootstrap']['seed']}"
            if resamples
            else "- no intervals (bootstrap=0)"
        ),
        "",
        "| setting | a | b | differs |",
        "| --- | --- | --- | --- |",
        *(
            f"| {name} | {shown(value)} | {shown(result['settings']['b'][name])} | "
            f"{'yes' if name in result['differs_in'] else ''} |"
            for name, value in result["settings"]["a"].items()
        ),
        "",
        "| metric | a | b | b - a | 95% interval of b - a | p |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for key, (name, decimals) in DISPLAY.items():
        if key not in result["metrics"]:
            continue
        name += " (lower is better)" if key == "betti0_error" else ""
        m = result["metrics"][key]
        ci = "-" if m["ci95"] is None else f"[{m['ci95'][0]:+.{decimals}f}, {m['ci95'][1]:+.{decimals}f}]"
        p = "-" if m["p_value"] is None else f"{m['p_value']:.2g}"
        lines.append(
            f"| {name} | {m['a']:.{decimals}f} | {m['b']:.{decimals}f} | {m['difference']:+.{decimals}f} | {ci} | {p} |"
        )
    return "\n".join(lines) + "\n"
