"""Lester et al. 2021's recipe on t5-small (or flan-t5-small: change `base`), for people who
converted the weights themselves: `python -m minipt.convert hf/t5-small weights/t5-small`.
Soft prompt of 100 tokens (100 x 512 = 51,200 parameters) on the encoder input,
Adafactor at learning rate 0.3."""
base = "weights/t5-small"
data = "sentiment"
method = "prompt_tuning"
num_virtual_tokens = 100
init = "labels"
init_labels = [" negative", " positive"]
placement = "encoder"
optimizer = "adafactor"
lr = 0.3
weight_decay = 1e-5
steps = 1000
batch_size = 32
dtype = "float32"
out_dir = "out/t5-small-sentiment"
