"""Workstation role: pretrain an SPL model with backprop (torch) and export it to ONNX."""
