"""The method in pure torch: log-Bessel and the vMF distribution, the generative model of a
final layer, distillation losses, generation conditions and metrics, diagnostics."""
