"""What several benchmarks share: the T5-small-sized configuration they build offline and the CPU's name."""

import platform

import transformers


def t5_small_config():
    """T5 v1.1-shaped, T5-small-sized (d_model 512, 6+6 layers, 8 heads, d_ff 1024), head tied to the embedding."""
    return transformers.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=6,
                                 num_decoder_layers=6, num_heads=8, feed_forward_proj="gated-gelu",
                                 tie_word_embeddings=True, dropout_rate=0.0, decoder_start_token_id=0,
                                 pad_token_id=0, eos_token_id=1)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
