"""Train a torchvision classifier on an image folder with plain PyTorch and save its state_dict:
a network "trained elsewhere" for penrun's tasks to take.

    python scripts/train_on_folder.py DIR --out resnet18.pt --image-size 32 --epochs 3
    penrun task=fit net@teacher=torchvision teacher.arch=resnet18 teacher_ckpt=resnet18.pt \
        data=folder data.root=DIR data.image_size=32

DIR is an ImageFolder layout: DIR/train/<class>/ (or DIR/<class>/). The images are prepared as
penrun prepares them (`data=folder`): RGB, the shorter side resized to --image-size and the
centre cropped, scaled to [-1, 1] (penrun's one normalization: uint8 / 127.5 - 1), so that the
network sees in penrun what it saw here. Classes are numbered in sorted order of their folder
names, as in penrun.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the image folder (DIR/train/<class>/ or DIR/<class>/)")
    parser.add_argument("--out", type=Path, default=Path("classifier.pt"), help="where the state_dict goes")
    parser.add_argument("--arch", default="resnet18", help="a torchvision classification model")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    prepare = transforms.Compose(
        [
            transforms.Resize(args.image_size),  # the shorter side
            transforms.CenterCrop(args.image_size),
            transforms.ToTensor(),  # [0, 1]
            transforms.Normalize([0.5] * 3, [0.5] * 3),  # [-1, 1], as penrun feeds its networks
        ]
    )
    train_dir = args.root / "train" if (args.root / "train").is_dir() else args.root
    dataset = torchvision.datasets.ImageFolder(str(train_dir), transform=prepare)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
    model = torchvision.models.get_model(args.arch, weights=None, num_classes=len(dataset.classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    model.train()
    for epoch in range(1, args.epochs + 1):
        correct = total = 0
        for x, y in loader:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            correct += (logits.argmax(1) == y).sum().item()
            total += len(y)
        print(f"epoch {epoch}/{args.epochs}: loss {loss.item():.4f}, train accuracy {correct / total:.3f}")

    torch.save(model.state_dict(), args.out)
    print(f"{len(dataset.classes)} classes ({', '.join(dataset.classes)}); state_dict saved to {args.out}")
    print(
        f"use it: penrun task=fit net@teacher=torchvision teacher.arch={args.arch} teacher_ckpt={args.out} "
        f"data=folder data.root={args.root} data.image_size={args.image_size}"
    )


if __name__ == "__main__":
    main()
