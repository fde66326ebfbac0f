"""On CUDA: kernels attributed to nodes and layers (torch.profiler), Nsight Compute's hardware counters."""
