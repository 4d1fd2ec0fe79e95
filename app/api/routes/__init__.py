"""HTTP routers: generate (native), openai (compatible), ops (health, ready, info, metrics)."""
