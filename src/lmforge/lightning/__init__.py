"""The Lightning Trainer glue: the LightningModule, its callbacks and strategies."""
