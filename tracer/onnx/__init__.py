"""The ONNX graph of the prefill and a decode step, exported weight-free and counted node by node beside the fx graph."""
