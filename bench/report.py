"""The bench's report: tables, the throughput-vs-p99 plot, and the summary of ratios."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.results import CeilingResult, LevelResult


def table(name: str, ceil: CeilingResult, rows: list[LevelResult]) -> str:
    lines = [
        f"\n{name}: in-process ceiling {ceil['images_per_s']:.2f} img/s (median of {len(ceil['samples'])} samples, "
        f"{min(ceil['samples']):.2f}-{max(ceil['samples']):.2f}; batch {ceil['batch']}, {ceil['pipeline']}; forward "
        f"{ceil['forward_ms_per_image']:.2f} ms/img), batch-1 pipeline p50 {ceil['batch1_p50_ms']:.1f} ms",
        f"{'conc':>5} {'img/s':>8} {'x ceil':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'p50/b1':>7} "
        f"{'busy':>5} {'batch':>5} {'fwd/img':>7} {'PSS MB':>7}  statuses",
    ]
    for row in rows:
        lines.append(
            f"{row['concurrency']:>5} {row['images_per_s']:>8.2f} {row['images_per_s'] / ceil['images_per_s']:>7.2f} "
            f"{row['p50_ms']:>8.1f} {row['p90_ms']:>8.1f} {row['p99_ms']:>8.1f} "
            f"{row['p50_ms'] / ceil['batch1_p50_ms']:>7.2f} {row['inference_busy']:>5.0%} {row['mean_batch']:>5.1f} "
            f"{row['forward_ms_per_image']:>5.1f}ms {row.get('service_pss_mb', float('nan')):>7.0f}  {row['statuses']}"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, entry in results["images"].items():
        rows = entry["service"]
        axis.plot([r["p99_ms"] for r in rows], [r["images_per_s"] for r in rows], marker="o", label=name)
        for row in rows:
            axis.annotate(f"c={row['concurrency']}", (row["p99_ms"], row["images_per_s"]), fontsize=7)
        axis.axhline(entry["ceiling"]["images_per_s"], linestyle="--", linewidth=0.8, color=axis.lines[-1].get_color())
    axis.set_xscale("log")
    axis.set_xlabel("p99 latency (ms, log)")
    axis.set_ylabel("images/s")
    axis.set_title(f"{results['model']} on {results['device']}: service vs in-process ceiling (dashed)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def summary(results: dict[str, Any]) -> dict[str, float]:
    """The targets docs/performance.md reports, as ratios of the ceilings (and the extras, where they ran)."""
    summary: dict[str, float] = {}
    chelsea = results["images"].get("chelsea_451x300")
    if chelsea:
        ceiling, rows = chelsea["ceiling"], chelsea["service"]
        best = max((r["images_per_s"] for r in rows if r["concurrency"] <= 16), default=0.0)
        if best:
            summary["chelsea_saturated_x_ceiling"] = best / ceiling["images_per_s"]
        for row in rows:
            if row["concurrency"] == 64:
                summary["chelsea_c64_img_s"] = row["images_per_s"]
                summary["chelsea_c64_x_ceiling"] = row["images_per_s"] / ceiling["images_per_s"]
        summary["chelsea_ceiling_img_s"] = ceiling["images_per_s"]
        summary["chelsea_forward_only_img_s"] = 1000 / ceiling["forward_ms_per_image"]
        if rows[0]["concurrency"] == 1:
            summary["concurrency1_p50_x_batch1"] = rows[0]["p50_ms"] / ceiling["batch1_p50_ms"]
    big = results["images"].get("photo_1600x1066")
    if big:
        summary["large_jpeg_x_ceiling"] = (
            max(r["images_per_s"] for r in big["service"]) / big["ceiling"]["images_per_s"]
        )
    summary.update(
        cold_start_s=results["cold_start_s"],
        service_peak_pss_mb=results["service_pss_mb"],
        service_peak_rss_mb=results["service_peak_rss_mb"],
        service_idle_pss_mb=results["service_pss_idle_mb"],
    )
    if "torch_fp32_service" in results and chelsea:
        one16 = next((r["images_per_s"] for r in chelsea["service"] if r["concurrency"] == 16), None)
        if one16:
            summary["chelsea_c16_x_torch_fp32_service"] = one16 / results["torch_fp32_service"][0]["images_per_s"]
    if "reduced_decode_off" in results:
        big = results["images"]["photo_1600x1066"]
        chelsea = results["images"]["chelsea_451x300"]
        on16 = next(r for r in big["service"] if r["concurrency"] == 16)["images_per_s"]
        summary["large_jpeg_reduced_on_vs_off_c16"] = on16 / results["reduced_decode_off"][0]["images_per_s"]
        multi = results["multi_worker"]["service"][0]["images_per_s"]
        one = next(r for r in chelsea["service"] if r["concurrency"] == 16)["images_per_s"]
        summary["multi_worker_vs_one_worker_c16"] = multi / one
    return summary
