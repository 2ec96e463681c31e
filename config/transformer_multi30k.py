# Multi30k English -> German (Flickr30k captions; test = test2016), sized for a 2-core CPU.
# python train.py config/transformer_multi30k.py                     (from the hub: bentrevett/multi30k)
# python train.py config/transformer_multi30k.py --dataset=../shared/data/multi30k_en_de   (local copy)
# Measured (README "Results"), 30 minutes on a 2-core CPU, test2016, beam 5: 37.82 cased and 38.26
# lower-cased sacreBLEU (3,442 steps; validation BLEU 36.85).
out_dir = "out/multi30k"
dataset = "bentrevett/multi30k"
dataset_config = ""
src_lang = "en"
tgt_lang = "de"
tokenizer = "bpe"
vocab_size = 6000
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
eval_interval = 400
eval_sentences = 0
