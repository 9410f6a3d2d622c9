"""Data: sources of images and preference pairs, and what turns them into model input.

    pairs        PairRecord, the JSONL pair schema (read_pairs / write_pairs), HermesFlow's pair_dpo_data.json import
    validate     validate_pairs: every problem with file:line:id, strict or skipping, a summary
    image_ref    cache:<id> / path image refs and ImageCodes (ref -> codes)
    text         local text tokenizers, a word-level builder, HermesFlow's understanding template
    gen_mask     pair_mask: the generation side's per-pair mask, a pure function of (pair id, epoch, seed)
    batching     TokenizedPair, pair_sequences, token-budget packing (PackedBatch) and micro_batches
    token_cache  pre-computed image tokens (tokenize_images, TokenCache)
    token_cache_reader  reading a token cache, every shard and row checked (TokenCache)
"""
