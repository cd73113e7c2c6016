"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) and its loader."""
