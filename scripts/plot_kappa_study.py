"""The kappa study's picture and table (configs/experiment/kappa_study.yaml).

    python scripts/plot_kappa_study.py outputs/multirun/kappa_study

Writes kappa_study.png and kappa_study.csv into the sweep folder: for each arm (distillation,
generation) the test metric against the mean kappa of the sampler the run used, mean and std
over seeds; the paper's kappa times 1..32 as a curve, the matched and fitted calibrations as
marked points, the run without the vMF as a horizontal line. The CSV adds each setting's paired
difference to the run without the vMF (mean [95 % CI, paired t] over shared seeds) and the
distillation arm's validation accuracy: that, not the test accuracy, chooses a calibration.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

from penrun.app.results import RunRecord, collect, paired_difference, paired_differences

# Per task: (test metric plotted, validation metric or None, axis label).
METRICS = {
    "distill": ("transfer_acc", "best_val_acc", "ce + synthetic_targets: USPS test accuracy"),
    "vae": ("cond_acc", None, "penultimate VAE (digits): cond_acc"),
}
MARKERS = {"weights/matched": "s", "weights/fitted": "^", "class_mean/fitted": "D"}


def arm(run: RunRecord) -> str:
    """'baseline' (no vMF), or the run's direction/kappa option."""
    c = run.config
    without_vmf = {
        "distill": c.get("distill.losses.synthetic_targets") == 0.0,
        "vae": c.get("gen.cond") == "onehot",
    }
    if without_vmf[c["task.name"]]:
        return "baseline"
    return f"{c['vmf.direction']}/{c['vmf.kappa']}"


def summarize(runs: list[RunRecord]) -> list[dict]:
    """One row per (task, arm, kappa_scale): means and stds over seeds, and the paired
    difference of the test metric to the task's baseline over the seeds both ran."""
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    for run in runs:
        groups[(run.config["task.name"], arm(run), run.config["vmf.kappa_scale"])].append(run)
    baselines = {task: members for (task, name, _), members in groups.items() if name == "baseline"}
    rows = []
    for (task, name, scale), members in sorted(groups.items()):
        test_key, val_key, _ = METRICS[task]
        row = {"task": task, "arm": name, "kappa_scale": scale, "seeds": len(members)}
        kappas = [r.value("vmf_mean_kappa") for r in members]
        row["mean_kappa"] = statistics.fmean(kappas) if None not in kappas else None  # no vMF
        for label, key in (("test", test_key), ("val", val_key)):
            if key is None:
                continue
            values = [r.value(key) for r in members]
            row[f"{label}_mean"] = statistics.fmean(values)
            row[f"{label}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        diffs = paired_differences(members, baselines.get(task, []), test_key)
        row["test_minus_baseline"] = paired_difference(diffs) if name != "baseline" else ""
        rows.append(row)
    return rows


def plot(rows: list[dict], out: Path) -> None:
    tasks = [t for t in METRICS if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        mine = [r for r in rows if r["task"] == task]
        for r in (r for r in mine if r["arm"] == "baseline"):
            ax.axhline(r["test_mean"], color="gray", ls="--", label="no vMF (ce / one-hot)")
            ax.axhspan(
                r["test_mean"] - r["test_std"], r["test_mean"] + r["test_std"], color="gray", alpha=0.15
            )
        curve = sorted((r for r in mine if r["arm"] == "weights/weights"), key=lambda r: r["mean_kappa"])
        if curve:
            x = [r["mean_kappa"] for r in curve]
            y = [r["test_mean"] for r in curve]
            s = [r["test_std"] for r in curve]
            ax.plot(x, y, "o-", color="C0", label="weights' kappa x 1..32")
            ax.fill_between(
                x,
                [a - b for a, b in zip(y, s, strict=True)],
                [a + b for a, b in zip(y, s, strict=True)],
                color="C0",
                alpha=0.2,
            )
            ax.plot(x[0], y[0], "o", ms=11, mfc="none", color="C0", label="weights (the paper's)")
        for i, (name, marker) in enumerate(MARKERS.items(), start=1):
            for r in (r for r in mine if r["arm"] == name):
                ax.errorbar(
                    r["mean_kappa"],
                    r["test_mean"],
                    yerr=r["test_std"],
                    fmt=marker,
                    ms=8,
                    color=f"C{i}",
                    capsize=3,
                    label=name,
                )
        ax.set_xscale("log")
        ticks = sorted({round(r["mean_kappa"]) for r in mine if r["mean_kappa"]})
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="x", labelsize=7, labelrotation=45)
        ax.set_xlabel("mean kappa of the sampler")
        ax.set_ylabel(METRICS[task][2])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("kappa study: mean and std over seeds")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args()
    runs, missing = collect(args.sweep_dir)
    if missing:
        print(
            f"{len(missing)} run folder(s) without results, left out: {missing[0][0]} ({missing[0][1]}) ..."
        )
    if not runs:
        raise SystemExit(f"plot_kappa_study: error: no complete runs under {args.sweep_dir}")
    try:
        rows = summarize(runs)
    except ValueError as err:  # two runs of one setting share a seed: no pairing
        raise SystemExit(f"plot_kappa_study: error: {err}") from err
    fields = [
        "task",
        "arm",
        "kappa_scale",
        "seeds",
        "mean_kappa",
        "test_mean",
        "test_std",
        "val_mean",
        "val_std",
        "test_minus_baseline",
    ]
    with open(args.sweep_dir / "kappa_study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    plot(rows, args.sweep_dir / "kappa_study.png")
    for r in rows:
        val = f"  val {r['val_mean']:.4f} +- {r['val_std']:.4f}" if "val_mean" in r else ""
        print(
            f"{r['task']:8} {r['arm']:18} x{r['kappa_scale']:<5g} kappa {r['mean_kappa'] or 0:8.1f}  "
            f"test {r['test_mean']:.4f} +- {r['test_std']:.4f}{val}  ({r['seeds']} seeds)  {r['test_minus_baseline']}"
        )
    print(f"wrote {args.sweep_dir / 'kappa_study.png'} and kappa_study.csv")


if __name__ == "__main__":
    main()
