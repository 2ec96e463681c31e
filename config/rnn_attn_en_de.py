# A GRU encoder-decoder with dot attention (Luong et al. 2015) and BPE 6k on Multi30k en -> de.
# python train.py config/rnn_attn_en_de.py --dataset=../shared/data/multi30k_en_de   (--attention=additive: Bahdanau)
# 30 minutes on a 2-core CPU: test2016 33.58 cased sacreBLEU, greedy (docs/results.md).
out_dir = "out/rnn_attn_en_de"
dataset = "bentrevett/multi30k"
dataset_config = ""
src_lang = "en"
tgt_lang = "de"
tokenizer = "bpe"
vocab_size = 6000
arch = "rnn"
attention = "dot"
embed_scale = False  # as measured (docs/results.md); attention gives the encoder a short gradient path anyway
bidirectional = True
emb_dim = 256
hidden_size = 384
n_enc_layer = 2
n_dec_layer = 2
dropout = 0.2
tie_embeddings = "all"
batch_tokens = 6000
learning_rate = 2e-3
warmup_frac = 0.05
decay = "cosine"
max_minutes = 30.0
eval_interval = 400
eval_sentences = 0
