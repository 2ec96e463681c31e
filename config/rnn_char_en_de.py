# The no-attention GRU of rnn_en_de.py on characters: sources 4x longer than in subwords, so the
# source is read backwards (its first words next to the decoder, where the gradient is strongest).
# python train.py config/rnn_char_en_de.py --dataset=../shared/data/multi30k_en_de
# 30 minutes on a 2-core CPU: test2016 12.29 cased sacreBLEU, greedy (docs/results.md).
out_dir = "out/rnn_char_en_de"
dataset = "bentrevett/multi30k"
dataset_config = ""
src_lang = "en"
tgt_lang = "de"
tokenizer = "char"
vocab_size = 300
max_len = 200
arch = "rnn"
attention = "none"
bottleneck = "cho"
reverse_source = True
emb_dim = 256
hidden_size = 512
n_enc_layer = 2
n_dec_layer = 2
dropout = 0.1
tie_embeddings = "all"
batch_tokens = 12000
learning_rate = 2e-3
warmup_frac = 0.0
decay = "exp"
min_lr = 1e-4
max_minutes = 30.0
eval_interval = 400
eval_sentences = 0
