# A GRU encoder-decoder without attention (Cho et al. 2014: the encoder's summary vector enters every
# decoder step and the readout), BPE 6k, on Multi30k en -> de: how far one vector gets.
# python train.py config/rnn_en_de.py --dataset=../shared/data/multi30k_en_de
# (Sutskever et al. 2014: add --bottleneck=sutskever --reverse_source=True --out_dir=out/rnn_sutskever_en_de)
# 30 minutes on a 2-core CPU: test2016 23.20 cased sacreBLEU, greedy (Sutskever's: 15.43; docs/results.md).
out_dir = "out/rnn_en_de"
dataset = "bentrevett/multi30k"
dataset_config = ""
src_lang = "en"
tgt_lang = "de"
tokenizer = "bpe"
vocab_size = 6000
max_len = 100
arch = "rnn"
attention = "none"
bottleneck = "cho"
emb_dim = 256
hidden_size = 512
n_enc_layer = 2
n_dec_layer = 2
dropout = 0.1
tie_embeddings = "all"
batch_tokens = 6000
learning_rate = 2e-3
warmup_frac = 0.0
decay = "exp"
min_lr = 1e-4
max_minutes = 30.0
eval_interval = 400
eval_sentences = 0
