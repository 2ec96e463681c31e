# OPUS Books English -> Italian (Helsinki-NLP/opus_books, en-it: ~32k pairs from novels, one split,
# so validation and test are carved out by source-sentence hash), a 512-wide 4+4-layer model sized
# for one GPU. Not measured yet (it needs the hub); its CPU-sized cousin: transformer_europarl_en_it.py.
# python train.py config/transformer_en_it.py      (offline: --dataset=FOLDER with train.jsonl)
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
