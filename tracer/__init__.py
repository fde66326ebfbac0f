"""flopdiff tracer: capture vendor models as aten-level torch.fx graphs and count FLOPs per node."""
