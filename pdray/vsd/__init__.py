"""The distillation core: the math of SDS and VSD, particles, the score estimator with its camera-conditioned LoRA,
the sums that keep score replicas on one LoRA, and checkpoints of all of that state."""
