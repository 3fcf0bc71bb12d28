"""Speed of task=vae and task=gan on MNIST: the training epoch of each model (the tasks' own
epoch functions, timed over the first --steps batches and scaled to a full epoch), the one-off
teacher pass that makes the training conditions, the per-epoch evaluation (sampler, decoder,
evaluator, metrics) and the generation throughput.

    python scripts/bench_generation.py --steps 60

Networks are untrained (speed does not depend on the weights); the teacher is a LeNet-5 with
a cosine head (d = 64), the evaluator a ResNet-8, as in the generation experiment's settings
for MNIST when teacher=lenet5.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from functools import partial

import torch
from hydra import compose, initialize_config_dir

from penrun.app.cli import config_dir
from penrun.app.config import trainer_settings
from penrun.app.generation import GenerationSetup, sample_images, training_conditions
from penrun.app.tasks import gan, vae
from penrun.core.conditions import ConditionSampler, balanced_labels
from penrun.core.metrics import generation_metrics
from penrun.core.penultimate import PenultimateModel
from penrun.data import load_dataset
from penrun.models import build_classifier
from penrun.train.evaluation import predict
from penrun.train.loop import network_input
from penrun.train.seeding import seed_everything

from machine import add_allocator_option, describe_machine, set_allocator
from timing import timed

CLASSIFIER = dict(channels=1, image_size=28, num_classes=10, penultimate_dim=64)


def evaluate(evaluator, fake, labels, real, eval_batch, device) -> dict:
    """The per-epoch evaluation of the generation tasks: evaluator outputs, then the metrics."""
    features, logits = predict(evaluator, fake, eval_batch, device)
    return generation_metrics(features, logits, labels, real, 10)


def config(task: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=[f"task={task}", *overrides])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None, help="defaults to $PENRUN_DATA_DIR")
    parser.add_argument("--steps", type=int, default=60, help="batches timed per model")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    add_allocator_option(parser)
    args = parser.parse_args()
    set_allocator(args)
    torch.set_num_threads(args.threads)
    seed_everything(0)
    data = load_dataset("mnist", data_dir=args.data_dir or os.environ.get("PENRUN_DATA_DIR"))
    full_steps = len(data.y_train) // args.batch_size
    part = replace(
        data,
        x_train=data.x_train[: args.steps * args.batch_size],
        y_train=data.y_train[: args.steps * args.batch_size],
    )
    base = [
        f"trainer.batch_size={args.batch_size}",
        "trainer.progress=false",
        f"trainer.device={args.device}",
    ]
    settings = trainer_settings(config("vae", base))
    device, eval_batch = settings.device, settings.eval_batch_size
    teacher = build_classifier("lenet5", **CLASSIFIER).eval()
    # p(a | y) is sampled on the CPU, as the tasks do (their teachers load on the CPU).
    sampler = ConditionSampler(10, PenultimateModel.from_classifier(teacher))
    teacher.to(device)
    evaluator = build_classifier("resnet8", **CLASSIFIER).eval().to(device)

    conds, t_conds = timed(partial(training_conditions, data, teacher, eval_batch, device), device)
    real, _ = predict(evaluator, data.x_test, eval_batch, device)
    labels = balanced_labels(10, 100)
    gen = torch.Generator().manual_seed(0)
    _, t_sampler = timed(partial(sampler, labels, gen))
    print(f"# {describe_machine(device)}")
    print(f"teacher pass for the training conditions of {len(data.y_train)} images: {t_conds:.1f} s")
    print(f"sampler: 1000 conditions from p(a | y): {t_sampler * 1000:.1f} ms")
    print("| model | cond | s/step | epoch (s, scaled) | eval/epoch (s) | generation (images/s) |")
    print("|---|---|---|---|---|---|")
    rows = [
        ("vae", "onehot", []),
        ("vae", "penultimate", []),
        ("gan", "onehot", []),
        ("gan", "penultimate", []),
        ("gan", "penultimate", ["gan.consistency=1.0"]),
    ]
    for task, cond, extra in rows:
        cfg = config(task, [*base, f"gen.cond={cond}", *extra])
        s = GenerationSetup(
            part,
            settings,
            0,
            network_input(part.x_train, device),
            conds[: len(part.y_train)]
            if cond == "penultimate"
            else training_conditions(part, None, eval_batch, device),
            sampler if cond == "penultimate" else ConditionSampler(10),
            teacher.requires_grad_(False),
            evaluator,
            real,
            {},
        )
        model = {"vae": vae, "gan": gan}[task].build(cfg, s)
        row = model.train_epoch(1)
        per_step = row["epoch_time"] / args.steps
        fake, t_gen = timed(partial(sample_images, model, s, labels, 0), device)
        _, t_metrics = timed(partial(evaluate, evaluator, fake, labels, real, eval_batch, device), device)
        many = balanced_labels(10, 1000)
        _, t_many = timed(partial(sample_images, model, s, many, 0), device)
        name = cond + (" + consistency" if extra else "")
        print(
            f"| {task} | {name} | {per_step:.3f} | {per_step * full_steps:.0f} | "
            f"{t_gen + t_metrics:.2f} | {len(many) / t_many:.0f} |"
        )


if __name__ == "__main__":
    main()
