"""The health flags of ``bnctl inspect``: names (a JSON contract) and meanings. Imports nothing heavy."""

#: Every flag inspect can raise, with what it means. The names are part of the JSON contract.
FLAGS: dict[str, str] = {
    "nonfinite": "NaN or Inf in running statistics or affine parameters: every output becomes NaN",
    "negative_var": "running_var has negative entries, impossible for a variance: the file is corrupted",
    "var_below_eps": "running_var below eps: the layer divides by ~sqrt(eps) and amplifies noise",
    "never_updated": "running_mean is all 0 and running_var all 1: initial values, never estimated from data",
    "no_running_stats": "track_running_stats=False: eval mode normalizes with the batch's own statistics",
    "dead_channels": "some channels have |weight| ~ 0: they output a constant (their bias)",
    "fp16_risk": "statistics, the folded scale |weight|/sqrt(var+eps) or the folded shift exceed float16's range (65504): inf in half precision",
    "fp16_precision": "var+eps is float16-subnormal in some channels: potential precision loss in half precision",
    "momentum_zero": "momentum is 0: the running statistics can never change",
    "eps_sensitive": "the file does not record eps, and another common eps (1e-3, 1e-5, 0) would change outputs by over 1%: pass the training eps with --eps",
    "train_mode": "saved in train mode: inference would use batch statistics",
    "unmaterialized": "a lazy BatchNorm that never saw an input: it has no tensors yet",
    "bad_tensor": "a tensor of the layer cannot be used (no data, sparse, complex, or the wrong shape): it is left out of the summaries",
}
