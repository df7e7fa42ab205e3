"""The algorithms (pruning, structured pruning, quantization, distillation), free of stages and
MLflow. Imports only ``core``."""
