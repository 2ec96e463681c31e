# OPUS Books English -> Italian (Helsinki-NLP/opus_books, config en-it: ~32k sentence pairs from
# novels, one split only: validation and test are carved out of it by source-sentence hash).
# python train.py config/transformer_en_it.py
# Sized for one GPU (a 512-wide 4+4-layer model, 40 epochs); it has not been timed on one yet.
# On a CPU, shrink it (see transformer_europarl_en_it.py, the same job sized for 30 CPU minutes).
# Result: not measured yet (it needs the hub and a GPU). The measured en-it reference is the
# Europarl CPU recipe in README "Results".
# Offline: --dataset=path/to/folder with train.jsonl rows {"translation": {"en": ..., "it": ...}}.
out_dir = "out/transformer_en_it"
dataset = "Helsinki-NLP/opus_books"
dataset_config = "en-it"
src_lang = "en"
tgt_lang = "it"
tokenizer = "bpe"
vocab_size = 8000
joint_vocab = True
tie_embeddings = "all"
max_len = 128
batch_tokens = 12000
d_model = 512
n_head = 8
n_enc_layer = 4
n_dec_layer = 4
d_ff = 2048
dropout = 0.3
learning_rate = 1e-3
warmup_frac = 0.1
label_smoothing = 0.1
max_epochs = 40.0
log_interval = 50
eval_interval = 500
eval_sentences = 500
