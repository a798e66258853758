"""The configurations of the real models the app offers as cross-version examples (from their config.json).

Only what decides tensor names and shapes is kept; the tests build header-exact, sparse checkpoints
from them, so that a pair the app suggests is known to line up without downloading gigabytes.
"""

from __future__ import annotations

QWEN2_05B = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
    "num_attention_heads": 14, "num_key_value_heads": 2, "num_hidden_layers": 24, "vocab_size": 151936,
    "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "torch_dtype": "bfloat16",
}  # fmt: skip
QWEN2_15B = {**QWEN2_05B, "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
             "num_hidden_layers": 28}  # fmt: skip
LLAMA3_8B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
}  # fmt: skip

CONFIGS = {
    "Qwen/Qwen2-0.5B": {**QWEN2_05B, "max_position_embeddings": 131072},
    "Qwen/Qwen2-0.5B-Instruct": {**QWEN2_05B, "max_position_embeddings": 32768},
    "Qwen/Qwen2.5-0.5B": {**QWEN2_05B, "max_position_embeddings": 32768},
    "Qwen/Qwen2.5-0.5B-Instruct": {**QWEN2_05B, "max_position_embeddings": 32768},
    "Qwen/Qwen2-1.5B": {**QWEN2_15B, "max_position_embeddings": 131072},
    "Qwen/Qwen2-1.5B-Instruct": {**QWEN2_15B, "max_position_embeddings": 32768},
    "Qwen/Qwen2.5-1.5B": {**QWEN2_15B, "max_position_embeddings": 131072},
    "meta-llama/Meta-Llama-3-8B": {**LLAMA3_8B, "max_position_embeddings": 8192},
    "meta-llama/Meta-Llama-3-8B-Instruct": {**LLAMA3_8B, "max_position_embeddings": 8192},
    "meta-llama/Llama-3.1-8B": {
        **LLAMA3_8B, "max_position_embeddings": 131072,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    },
}  # fmt: skip
