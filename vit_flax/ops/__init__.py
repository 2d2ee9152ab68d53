"""The fast paths, each beside its plain reference: `attention` (dot-product attention), `matmul` (the
bf16 matmul policy and the low-precision einsum), `activations` (exact GELU), `layernorm` (LayerNorm with its
backward written out, for low-precision models)."""
