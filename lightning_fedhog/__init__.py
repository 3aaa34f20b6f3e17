"""lightning-fedhog: federated SGD with local asynchrony (Chatterjee, Kungurtsev, Alistarh, ICDCS 2024) for Lightning.

Importing this package registers ``Trainer(strategy="fedhog")`` and its presets in Lightning's strategy registry.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_fedhog.callbacks import WallClock
from lightning_fedhog.config import FedHogConfig
from lightning_fedhog.strategy import FedHogStrategy

__all__ = ["FedHogConfig", "FedHogStrategy", "WallClock"]
__version__ = "0.1.0"

FedHogStrategy.register_strategies(StrategyRegistry)
