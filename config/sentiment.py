"""The default run (what `python train.py` does): a 20-token soft prompt on
SmolLM2-135M-Instruct for Pang & Lee sentence polarity, rank-classified as
" negative" / " positive"."""
base = "weights/smollm2-135m-instruct"
data = "sentiment"
method = "prompt_tuning"
num_virtual_tokens = 20
init = "text"
init_text = "Classify the sentiment of this movie review as positive or negative."
steps = 200
batch_size = 16
lr = 3e-2
optimizer = "adamw"
dtype = "auto"
out_dir = "out/sentiment"
