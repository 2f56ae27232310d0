"""A tiny random-weight llama GGUF, written on the fly, so tests and the quickstart's llama path
drive a real inference engine (llama.cpp) without downloading a model: the GGUF counterpart of
the torch backend's random-weight stand-ins. Needs the ``llama`` extra (gguf, numpy).

    python -m swarmx.backends.tiny_gguf PATH
"""

from __future__ import annotations

from pathlib import Path

N_VOCAB = 3 + 256  # <unk> <s> </s>, then byte-fallback tokens <0x00>..<0xFF>
N_EMBD = 64
N_HEAD = 4
N_FF = 128
N_LAYER = 2
N_CTX = 2048
"""Room for a generation long enough (seconds on a CPU) that a test can cancel it midway."""
PRINTABLE = range(0x20, 0x7F)


def write_tiny_llama_gguf(path: Path) -> None:
    """Write a 2-layer llama with random f32 weights (about 460 KB) to ``path``.

    The output head scores only printable-ASCII byte tokens (the other rows are zero and its
    scale puts them ~20 logits below), so every generated token is one valid UTF-8 character
    and generation never stops early at ``</s>``: a server streams exactly one chunk per token.
    """
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)

    def randn(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("swarmx-tiny-random")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * N_VOCAB)
    writer.add_token_types([*types, *[gguf.TokenType.BYTE] * 256])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    # numpy shapes are ggml's ne reversed: a weight mapping n_in -> n_out is (n_out, n_in).
    output = np.zeros((N_VOCAB, N_EMBD), np.float32)
    printable_rows = [3 + b for b in PRINTABLE]
    output[printable_rows] = randn(len(printable_rows), N_EMBD, scale=1.25)
    writer.add_tensor("token_embd.weight", randn(N_VOCAB, N_EMBD, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    writer.add_tensor("output.weight", output)
    for i in range(N_LAYER):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", np.ones(N_EMBD, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{blk}.{name}.weight", randn(N_EMBD, N_EMBD, scale=0.125))
        writer.add_tensor(f"{blk}.ffn_norm.weight", np.ones(N_EMBD, np.float32))
        writer.add_tensor(f"{blk}.ffn_gate.weight", randn(N_FF, N_EMBD, scale=0.125))
        writer.add_tensor(f"{blk}.ffn_up.weight", randn(N_FF, N_EMBD, scale=0.125))
        writer.add_tensor(f"{blk}.ffn_down.weight", randn(N_EMBD, N_FF, scale=0.09))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    import sys

    write_tiny_llama_gguf(Path(sys.argv[1]))
