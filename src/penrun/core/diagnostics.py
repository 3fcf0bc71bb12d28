"""How well real penultimate activations follow the vMF model of a final layer."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from penrun.core.vmf import VonMisesFisher


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = a.double().sort().values, b.double().sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True).double() / len(a)
    cdf_b = torch.searchsorted(b, points, right=True).double() / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def class_cosines(a: torch.Tensor, y: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """mu_y^T a for each unit vector a with class y."""
    return (a * mu[y]).sum(dim=1)


def linear_probe_accuracy(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int,
    epochs: int = 30,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Train a linear classifier (softmax regression) on one set, return its accuracy on another."""
    rng = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(x_train.shape[1], num_classes, dtype=x_train.dtype)
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=rng)
        probe.bias.zero_()
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(epochs):
        for idx in torch.randperm(len(y_train), generator=rng).split(batch_size):
            loss = F.cross_entropy(probe(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (probe(x_test).argmax(1) == y_test).double().mean().item()


def plot_cosine_histograms(
    real: torch.Tensor,
    synthetic: torch.Tensor,
    y_real: torch.Tensor,
    y_synthetic: torch.Tensor,
    path: Path,
) -> None:
    """One panel per class: the distribution of mu_y^T a, real against synthetic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = int(max(y_real.max(), y_synthetic.max())) + 1
    cols = min(5, classes)
    rows = -(-classes // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), squeeze=False, sharex=True)
    bins = torch.linspace(-1, 1, 61).numpy()
    for k, ax in enumerate(axes.flat):
        if k >= classes:
            ax.axis("off")
            continue
        ax.hist(real[y_real == k].numpy(), bins=bins, density=True, alpha=0.6, label="real")
        ax.hist(
            synthetic[y_synthetic == k].numpy(),
            bins=bins,
            density=True,
            alpha=0.6,
            label="synthetic",
        )
        ax.set_title(f"class {k}", fontsize=9)
    axes.flat[0].legend(fontsize=8)
    fig.supxlabel("cosine to the class direction mu_y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_circle(a: torch.Tensor, y: torch.Tensor, mu: torch.Tensor, kappa: torch.Tensor, path: Path) -> None:
    """d = 2: activations on the unit circle under the per-class vMF densities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    theta = torch.linspace(-torch.pi, torch.pi, 721, dtype=torch.float64)
    circle = torch.stack([theta.cos(), theta.sin()], dim=1)
    fig, ax = plt.subplots(figsize=(6, 6))
    colors = plt.cm.tab10.colors
    for k in range(len(mu)):
        density = VonMisesFisher(mu[k].double(), kappa[k].double()).log_prob(circle).exp()
        radius = 1 + 0.5 * density / density.max()
        color = colors[k % len(colors)]
        ax.plot(radius * circle[:, 0], radius * circle[:, 1], color=color, lw=1)
        pts = a[y == k]
        ax.scatter(pts[:, 0], pts[:, 1], s=4, color=color, alpha=0.4, label=str(k))
    ax.set_aspect("equal")
    ax.legend(markerscale=3, fontsize=7, loc="upper right")
    ax.set_title("real activations on the circle; curves: per-class vMF densities")
    fig.savefig(path, dpi=100)
    plt.close(fig)
