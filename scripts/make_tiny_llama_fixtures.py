#!/usr/bin/env python3
"""Write tiny random Llama-3 / Llama-3.1 checkpoints and their reference logits.

For each variant this writes, under omnikv-backend/tests/fixtures/<variant>/:
  config.json, model.safetensors   an HF checkpoint (transformers, float32, CPU)
  model.gguf                       the same weights as a GGUF file (F32 tensors,
                                   llama.cpp tensor names and q/k row order;
                                   llama3 rope scaling as `rope_freqs.weight`)
  reference.json                   input ids and transformers' logits

and for the Llama-3.1 variant also model-no-rope-freqs.gguf (rope_freqs left out,
to show that the scaling matters). Needs: torch, transformers, safetensors, gguf.

    python3 scripts/make_tiny_llama_fixtures.py
"""
import json
import math
import os

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import gguf

ROOT = os.path.join(os.path.dirname(__file__), "..", "omnikv-backend", "tests", "fixtures")

BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
)

VARIANTS = {
    "tiny-llama3": dict(rope_scaling=None),
    "tiny-llama31": dict(
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        )
    ),
}

SEQ_LEN = 40


def rope_freq_factors(cfg):
    """Per-frequency divisors as llama.cpp stores them in rope_freqs.weight."""
    rs = cfg["rope_scaling"]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    orig = rs["original_max_position_embeddings"]
    low_wl = orig / rs["low_freq_factor"]
    high_wl = orig / rs["high_freq_factor"]
    out = []
    for i in range(0, head_dim, 2):
        inv = 1.0 / cfg["rope_theta"] ** (i / head_dim)
        wl = 2 * math.pi / inv
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(rs["factor"])
        else:
            smooth = (orig / wl - rs["low_freq_factor"]) / (rs["high_freq_factor"] - rs["low_freq_factor"])
            out.append(1.0 / ((1 - smooth) / rs["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def permute(w, n_head):
    """HF (rotate halves) -> GGUF (rotate adjacent pairs) row order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, cfg, sd, with_rope_freqs):
    w = gguf.GGUFWriter(path, "llama")
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_rope_dimension_count(head_dim)
    t = lambda k: sd[k].numpy().astype(np.float32)
    w.add_tensor("token_embd.weight", t("model.embed_tokens.weight"))
    w.add_tensor("output.weight", t("lm_head.weight"))
    w.add_tensor("output_norm.weight", t("model.norm.weight"))
    if with_rope_freqs:
        w.add_tensor("rope_freqs.weight", rope_freq_factors(cfg))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(t(p + "self_attn.q_proj.weight"), cfg["num_attention_heads"]))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(t(p + "self_attn.k_proj.weight"), cfg["num_key_value_heads"]))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(p + "self_attn.v_proj.weight"))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(p + "self_attn.o_proj.weight"))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(p + "mlp.gate_proj.weight"))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(p + "mlp.up_proj.weight"))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(p + "mlp.down_proj.weight"))
        w.add_tensor(f"blk.{i}.attn_norm.weight", t(p + "input_layernorm.weight"))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", t(p + "post_attention_layernorm.weight"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tokenizer(out, vocab_size):
    """A word-level tokenizer `t0 .. t{n-1}` and a plain chat template, so the
    tiny checkpoints can be served by mistral.rs (for end-to-end tests)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {f"t{i}": i for i in range(vocab_size)}
    vocab["<unk>"] = 0
    vocab["<s>"] = 1
    vocab["</s>"] = 2
    del vocab["t0"], vocab["t1"], vocab["t2"]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(out, "tokenizer.json"))
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    )
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "chat_template": template,
                "model_max_length": 256,
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            f,
            indent=1,
        )


def main():
    for seed, (name, extra) in enumerate(VARIANTS.items()):
        torch.manual_seed(1234 + seed)
        cfg = dict(BASE, **extra)
        model = LlamaForCausalLM(LlamaConfig(**cfg)).float().eval()
        # Norm weights are initialised to ones; randomise them so that a wrong
        # norm weight cannot go unnoticed.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        out = os.path.join(ROOT, name)
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        ids = torch.randint(3, cfg["vocab_size"], (1, SEQ_LEN), generator=torch.Generator().manual_seed(7 + seed))
        with torch.no_grad():
            logits = model(ids).logits[0]
        ref = {
            "what": "logits of transformers.LlamaForCausalLM (float32, CPU) for input_ids, every position",
            "transformers": __import__("transformers").__version__,
            "torch": torch.__version__,
            "input_ids": ids[0].tolist(),
            "logits": [[round(float(x), 6) for x in row] for row in logits],
        }
        with open(os.path.join(out, "reference.json"), "w") as f:
            json.dump(ref, f)
        # Write config.json the way published Llama-3/3.1 checkpoints have it
        # (`rope_theta` + `rope_scaling`; transformers >= 5 would nest both in
        # `rope_parameters`, which mistral.rs 0.8.1 cannot read).
        with open(os.path.join(out, "config.json")) as f:
            written = json.load(f)
        params = written.pop("rope_parameters", None) or {}
        written["rope_theta"] = params.get("rope_theta", cfg["rope_theta"])
        written["rope_scaling"] = cfg["rope_scaling"]
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(written, f, indent=2, sort_keys=True)
        write_tokenizer(out, cfg["vocab_size"])
        sd = model.state_dict()
        write_gguf(os.path.join(out, "model.gguf"), cfg, sd, cfg["rope_scaling"] is not None)
        if cfg["rope_scaling"] is not None:
            write_gguf(os.path.join(out, "model-no-rope-freqs.gguf"), cfg, sd, False)
        for f in ("generation_config.json",):
            p = os.path.join(out, f)
            if os.path.exists(p):
                os.remove(p)
        print("wrote", out)


if __name__ == "__main__":
    main()
