"""Worker processes for the distributed tests, started as torchrun starts a training script."""
