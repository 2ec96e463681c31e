# Europarl English -> Italian (59.5k lower-cased pairs; validation and test carved out by source hash),
# transformer_multi30k.py's recipe sized for 30 CPU minutes.
# python train.py config/transformer_europarl_en_it.py      (reads ../shared/data/europarl_en_it)
# 30 minutes on a 2-core CPU: test 17.89 cased sacreBLEU, greedy (docs/results.md).
out_dir = "out/europarl_en_it"
dataset = "../shared/data/europarl_en_it"
dataset_config = ""
src_lang = "en"
tgt_lang = "it"
tokenizer = "bpe"
vocab_size = 8000
joint_vocab = True
tie_embeddings = "all"
batch_tokens = 6000
d_model = 256
n_head = 8
n_enc_layer = 3
n_dec_layer = 3
d_ff = 1024
dropout = 0.1
learning_rate = 1.5e-3
warmup_frac = 0.15
label_smoothing = 0.1
max_minutes = 30.0
log_interval = 50
eval_interval = 500
eval_sentences = 0
