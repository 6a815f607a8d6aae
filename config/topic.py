"""A 20-token soft prompt on SmolLM2-135M-Instruct for BBC News topics, rank-classified as
" business" / " entertainment" / " politics" / " sports" / " tech"."""
base = "weights/smollm2-135m-instruct"
data = "topic"
method = "prompt_tuning"
num_virtual_tokens = 20
init = "text"
init_text = "Classify the topic of this news article as business, entertainment, politics, sports or tech."
steps = 200
batch_size = 16
lr = 3e-2
optimizer = "adamw"
dtype = "auto"
out_dir = "out/topic"
