//! The HTTP API: OpenAI routes under `/v1` and vLLM's native routes, on TCP or a unix socket.
