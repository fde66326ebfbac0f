"""On CUDA: kernels attributed to nodes and layers (torch.profiler), the card's ceilings (datasheet and measured),
the roofline per layer, stage and decode step, Nsight Compute's hardware counters."""
