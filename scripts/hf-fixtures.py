#!/usr/bin/env python3
"""Writes the Hugging Face interoperability fixtures of tests/model_interop.rs: a tiny random
GPT2LMHeadModel and a tiny random LlamaForCausalLM saved by transformers' save_pretrained, and
their logits on fixed token ids, computed by transformers in float64.

Needs torch and transformers (not needed by the tests, which only read the files):
    python3 scripts/hf-fixtures.py tests/fixtures
"""
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def write(model, folder, vocab, seq):
    model.save_pretrained(folder, safe_serialization=True)
    for name in os.listdir(folder):
        if name != "model.safetensors":
            os.remove(os.path.join(folder, name))
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, vocab, (2, seq), generator=generator)
    with torch.no_grad():
        logits = model.double()(input_ids).logits
    save_file(
        {"input_ids": input_ids.to(torch.uint32).contiguous(), "logits": logits.float().contiguous()},
        os.path.join(folder, "expected.safetensors"),
    )


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, n_inner=None,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True,
    ))
    # Non-trivial biases and gains, so that every tensor's layout matters.
    with torch.no_grad():
        for name, p in gpt2.named_parameters():
            if name.endswith(".bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    write(gpt2.eval(), os.path.join(out, "hf-gpt2-tiny"), 64, 11)

    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
    ))
    with torch.no_grad():
        for name, p in llama.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    write(llama.eval(), os.path.join(out, "hf-llama-tiny"), 64, 11)


if __name__ == "__main__":
    main()
