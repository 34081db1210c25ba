"""What several benchmarks share: the T5-small-sized configuration they build offline, the CPU's name and the
interleaved timing loop."""

import platform
import time

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


def interleaved_times(variants, repeats, order):
    """{name: [seconds per repeat]} of variants {name: function of no arguments}: each repeat times "base" first,
    then the others in a fresh order (`order`, a random.Random), so that no variant always runs right after another."""
    times = {name: [] for name in variants}
    others = [name for name in variants if name != "base"]
    for _ in range(repeats):
        order.shuffle(others)
        for name in ["base", *others]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times
