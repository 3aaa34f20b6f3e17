"""``fedhog-recipes`` / ``python -m recipes``: LightningCLI for the paper's image-classification runs.

    python -m recipes fit --config recipes/configs/cifar10_resnet20_fedhog.yaml
    python -m recipes fit --config recipes/configs/cifar10_resnet20_ddp.yaml          # the DDP baseline
    python -m recipes fit --config ... --trainer.strategy.workers_per_device=4         # any knob from the shell
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

import lightning_fedhog  # noqa: F401 - registers strategy names for `--trainer.strategy=fedhog`
from recipes.module import ImageClassifier


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(
        ImageClassifier,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
