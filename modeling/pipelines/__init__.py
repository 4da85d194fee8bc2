"""What changes a model: calibration, quantization, pruning, rotation, mixed precision, fine-tuning, distillation."""
