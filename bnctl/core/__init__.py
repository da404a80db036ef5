"""What every operation stands on: BN discovery (the one "is this a BN?"), statistics and
health flags, torch.fx tracing and views of conv/linear/BN calls, ONNX graph helpers, and
the verification of outputs."""
