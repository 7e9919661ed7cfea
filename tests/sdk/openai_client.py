"""The official OpenAI SDK against Sluice (argv: base URL, key, model)."""
import sys

import openai

base_url, key, model = sys.argv[1:4]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)

completion = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}])
assert completion.choices[0].message.content, completion
assert completion.usage.total_tokens > 0, completion

chunks = list(client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "hi"}], stream=True,
    stream_options={"include_usage": True},
))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text, chunks
assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0, chunks[-1]

emb = client.embeddings.create(model=model, input=["a", "b"])
assert len(emb.data) == 2, emb

models = client.models.list()
assert any(m.id == model for m in models.data), models

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("expected an error for an unknown model")
except openai.NotFoundError as e:
    assert "no-such-model" in str(e), e

try:
    openai.OpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}])
    raise SystemExit("expected an authentication error")
except openai.AuthenticationError:
    pass

print("OK", completion.choices[0].message.content, "|", text)
