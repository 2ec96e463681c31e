# Reverse digit sequences with a tiny Transformer: '3 1 4 1 5' -> '5 1 4 1 3'. The check that masks
# and decoding work: validation BLEU 99.1-99.6 after 600 steps, in 20-40 seconds on a 2-core CPU.
# python train.py config/toy_reverse.py
out_dir = "out/toy_reverse"
overwrite = True  # a 40-second check: running it again replaces the last one
dataset = "toy:reverse"
tokenizer = "char"
cache_dir = ""
# untied: tied, every token's own logit starts ~4 standard deviations above the others (an untrained
# residual stream is mostly the input embedding, and the output layer is that embedding), which 15
# symbols cannot hide: the step-0 loss would be 1.3 nats above ln(V). Among 6k words it is invisible.
tie_embeddings = "none"
d_model = 64
n_head = 4
n_enc_layer = 2
n_dec_layer = 2
d_ff = 128
dropout = 0.0
learning_rate = 3e-3
warmup_frac = 0.1
batch_tokens = 4000
max_iters = 600
log_interval = 50
eval_interval = 200
eval_sentences = 200
