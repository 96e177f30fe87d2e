"""The per-trial Ray Tune trainable: 4-bit model loading, LoRA, data, the training loop, metrics."""
