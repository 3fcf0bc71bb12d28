"""task=fit: does a teacher's final layer describe its penultimate activations, and how far off is it?

Compares the real activations of the test split with synthetic ones drawn from the vMF model
of the final layer: the Generative-Discriminative identity, per-class concentrations (from the
weights and fitted), cosine distributions (KS distance), and a linear classifier trained only
on synthetic activations and tested on the real ones.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from penrun.app.config import load_data, start_task
from penrun.app.teachers import obtain_classifier, penultimate_model
from penrun.core.diagnostics import (
    class_cosines,
    ks_distance,
    linear_probe_accuracy,
    plot_circle,
    plot_cosine_histograms,
)
from penrun.core.penultimate import PenultimateModel, fit_kappa_from_activations
from penrun.models import Classifier
from penrun.train.evaluation import accuracy, predict
from penrun.train.run_folder import RunFolder

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    settings, folder, done = start_task(cfg)
    if done is not None:
        return done
    data = load_data(cfg)
    teacher, ckpt, path = obtain_classifier(cfg, data)
    model = penultimate_model(teacher, ckpt, path, cfg.vmf)
    teacher.to(settings.device)
    log.info(f"fit: the teacher's activations of {len(data.y_test)} test images")
    h, logits = predict(teacher, data.x_test, settings.eval_batch_size, settings.device)
    log.info(
        f"fit: {cfg.fit.samples_per_class} synthetic activations per class, their cosines, KS distances "
        "and a linear probe; then the calibration options"
    )
    metrics = {
        "task": "fit",
        "teacher_ckpt": str(path),
        "kappa_fitted_train": ckpt.get("activation_stats", {}).get("fitted_kappa"),
        "direction": cfg.vmf.direction,
        "kappa": cfg.vmf.kappa,
        "kappa_scale": cfg.vmf.kappa_scale,
        **diagnose(
            model,
            head_input(teacher, h.double()),
            logits.double(),
            data.y_test,
            cfg.fit.samples_per_class,
            cfg.seed,
            folder.dir,
        ),
        "options": compare_options(teacher, ckpt, cfg, h.double(), data.y_test),
    }
    log_to_tensorboard(folder, metrics)
    folder.write_metrics(metrics, status="complete")
    folder.close()
    log.info(summary(metrics))
    return metrics


def head_input(teacher: Classifier, h: torch.Tensor) -> torch.Tensor:
    """What the final layer sees: h itself, or h / |h| for a cosine head."""
    return F.normalize(h, dim=1) if teacher.head.normalizes_input else h


def diagnose(
    model: PenultimateModel,
    h: torch.Tensor,
    logits: torch.Tensor,
    y: torch.Tensor,
    samples_per_class: int,
    seed: int,
    out,
) -> dict[str, Any]:
    model = model.to(dtype=torch.float64)
    k = model.num_classes
    posterior = model.posterior(h)
    real_a, (synth_a, synth_y), real_cos, synth_cos = synthetic_vs_real(model, h, y, samples_per_class, seed)
    test_fit = fit_kappa_from_activations(h, y, k)
    per_class = [
        {
            "class": c,
            "count": int((y == c).sum()),
            "kappa_weights": model.kappa[c].item(),
            "kappa_fitted_test": test_fit["fitted_kappa"][c].item(),
            # The fit is about the class's own mean direction, which need not be mu_y.
            "mean_resultant_length": test_fit["mean_resultant_length"][c].item(),
            "mean_direction_cos_mu": (test_fit["mean_direction"][c] @ model.mu[c]).item(),
            "mean_cos_real": real_cos[y == c].mean().item(),
            "mean_cos_synthetic": synth_cos[synth_y == c].mean().item(),
            "ks_distance": ks_distance(real_cos[y == c], synth_cos[synth_y == c]),
        }
        for c in range(k)
        if (y == c).any()
    ]
    plot_cosine_histograms(real_cos, synth_cos, y, synth_y, out / "cosine_hist.png")
    if model.dim == 2:
        plot_circle(real_a, y, model.mu, model.kappa, out / "circle.png")
    return {
        "softmax_acc": accuracy(logits, y),
        "generative_acc": accuracy(posterior, y),
        "posterior_max_abs_diff": (posterior - logits.softmax(1)).abs().max().item(),
        "synthetic_to_real_acc": linear_probe_accuracy(synth_a, synth_y, real_a, y, k, seed=seed),
        "dim": model.dim,
        "mean_ks_distance": sum(c["ks_distance"] for c in per_class) / len(per_class),
        "per_class": per_class,
    }


# The calibrations side by side (docs/method.md#33-the-kappa-options): the paper's weights,
# the weights' direction with a matched kappa, the ML fit around the class mean.
OPTIONS = (("weights", "weights"), ("weights", "matched"), ("weights", "fitted"), ("class_mean", "fitted"))


def compare_options(
    teacher: Classifier, ckpt: dict[str, Any], cfg: DictConfig, h: torch.Tensor, y: torch.Tensor
) -> list[dict[str, Any]]:
    """Each (direction, kappa) option's fit to the real test activations, at the configured
    kappa_scale and radius; empty when the teacher has no recorded statistics."""
    stats = ckpt.get("activation_stats")
    if not stats or "mean_direction" not in stats:
        log.info("no activation statistics with mean directions in the teacher: fit compares no options")
        return []
    rows = []
    for direction, kappa in OPTIONS:
        try:
            model = PenultimateModel.from_classifier(
                teacher, stats, cfg.vmf.radius, kappa, cfg.vmf.kappa_scale, direction
            ).to(dtype=torch.float64)
        except ValueError as err:  # e.g. a class too small to fit a kappa: that option has no row
            log.info(f"vmf.direction={direction} vmf.kappa={kappa}: {err}")
            continue
        k = model.num_classes
        real_a, (synth_a, synth_y), real_cos, synth_cos = synthetic_vs_real(
            model, h, y, cfg.fit.samples_per_class, cfg.seed
        )
        present = [c for c in range(k) if (y == c).any()]
        rows.append(
            {
                "direction": direction,
                "kappa": kappa,
                "mean_kappa": model.kappa.mean().item(),
                "mean_cos_real": real_cos.mean().item(),
                "mean_cos_synthetic": synth_cos.mean().item(),
                "mean_ks_distance": sum(
                    ks_distance(real_cos[y == c], synth_cos[synth_y == c]) for c in present
                )
                / len(present),
                "synthetic_to_real_acc": linear_probe_accuracy(synth_a, synth_y, real_a, y, k, seed=cfg.seed),
            }
        )
    return rows


def synthetic_vs_real(
    model: PenultimateModel, h: torch.Tensor, y: torch.Tensor, samples_per_class: int, seed: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The real directions, class-balanced synthetic ones (the probe's training set), and the
    cosines of each to the model's class directions."""
    real_a = F.normalize(h, dim=1)
    rng = torch.Generator().manual_seed(seed)
    synth_a, synth_y = model.sample(model.num_classes * samples_per_class, balanced=True, generator=rng)
    return (
        real_a,
        (synth_a, synth_y),
        class_cosines(real_a, y, model.mu),
        class_cosines(synth_a, synth_y, model.mu),
    )


def log_to_tensorboard(folder: RunFolder, metrics: dict[str, Any]) -> None:
    scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
    folder.log_scalars(scalars, 0)
    for c in metrics["per_class"]:
        folder.log_scalars(
            {f"class_{c['class']}/{k}": v for k, v in c.items() if k not in ("class", "count")}, 0
        )
    import matplotlib.image

    for name in ("cosine_hist", "circle"):
        path = folder.dir / f"{name}.png"
        if path.exists():
            folder.writer.add_image(name, matplotlib.image.imread(path)[..., :3], 0, dataformats="HWC")


def summary(metrics: dict[str, Any]) -> str:
    lines = [
        f"softmax_acc {metrics['softmax_acc']:.4f}  generative_acc {metrics['generative_acc']:.4f}  "
        f"(max |posterior - softmax| {metrics['posterior_max_abs_diff']:.1e})",
        f"synthetic_to_real_acc {metrics['synthetic_to_real_acc']:.4f}  mean KS distance {metrics['mean_ks_distance']:.3f}",
        "class  kappa(weights)  kappa(fitted)  cos(mean dir, mu)  cos real  cos synth  KS",
    ]
    lines += [
        f"{c['class']:>5}  {c['kappa_weights']:>14.2f}  {c['kappa_fitted_test']:>13.2f}  {c['mean_direction_cos_mu']:>17.3f}  {c['mean_cos_real']:>8.3f}  {c['mean_cos_synthetic']:>9.3f}  {c['ks_distance']:.3f}"
        for c in metrics["per_class"]
    ]
    if metrics["options"]:
        lines.append(
            "vmf options (mean over classes): direction  kappa  mean kappa  cos real  cos synth  KS  synthetic_to_real_acc"
        )
        lines += [
            f"{o['direction']:>10} {o['kappa']:>8} {o['mean_kappa']:>11.1f} {o['mean_cos_real']:>9.3f} {o['mean_cos_synthetic']:>10.3f} {o['mean_ks_distance']:.3f}  {o['synthetic_to_real_acc']:.4f}"
            for o in metrics["options"]
        ]
    return "\n".join(lines)
