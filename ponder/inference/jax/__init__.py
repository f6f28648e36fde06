"""In-process JAX engine for the Llama family (Llama 2/3, Qwen2/2.5, Mistral).

`config` (ModelConfig, presets), `model` (params pytree and the one forward function),
`checkpoint` (Hugging Face safetensors load/save, random init) and `tokenizer` (tokenizer.json
and the chat template). Nothing heavy is imported here: import the submodule you need.
"""
