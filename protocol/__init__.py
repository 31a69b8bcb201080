"""What every peer must agree on, and nothing else.

``errors`` (the error hierarchy and its wire codes), ``records`` (DHT keys, NodeRecord, ModelInfo),
``directory`` (reading records from the DHT), ``messages`` (RPC frames, schemas, limits),
``families`` (per-architecture adapters), ``span`` (what a span of blocks computes),
``checkpoint`` (finding and partially loading checkpoints), ``network`` (P2P options),
``default_model`` (SmolLM2-135M-Instruct, converted once from its GGUF).
"""
