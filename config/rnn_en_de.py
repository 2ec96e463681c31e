# The classic first NMT model: a character-level 2-layer GRU encoder-decoder with no attention
# (the decoder starts from the final encoder state), Adam 2e-3 with exponential decay,
# on Multi30k English -> German. It shows how far the one-vector bottleneck gets.
# python train.py config/rnn_en_de.py --dataset=../shared/data/multi30k_en_de
out_dir = "out/rnn_en_de"
dataset = "bentrevett/multi30k"
dataset_config = ""
src_lang = "en"
tgt_lang = "de"
tokenizer = "char"
vocab_size = 300
max_len = 200
arch = "rnn"
attention = "none"
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
