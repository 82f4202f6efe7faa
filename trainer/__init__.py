"""Training and evaluating the ResNet graders: ``accelerate launch trainer/train.py``."""
