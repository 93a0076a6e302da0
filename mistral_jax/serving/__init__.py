"""Serving: `engine` (continuous batching over decode slots, no HTTP) and `api` (OpenAI-compatible routes over it).

Nothing is imported here: `import mistral_jax.serving.engine` does not load FastAPI.
"""
