"""Prefix tuning (Li & Liang 2021) on BoolQ with SmolLM2: 10 prefix vectors per layer through
the MLP reparameterisation (hidden 512)."""
base = "weights/smollm2-135m-instruct"
data = "boolq"
method = "prefix_tuning"
num_virtual_tokens = 10
prefix_projection = True
projection_hidden = 512
steps = 300
batch_size = 16
max_len = 320
out_dir = "out/boolq-prefix"
